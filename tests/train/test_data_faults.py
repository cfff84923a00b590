"""Faults in the training data (CPU): unreadable files skipped, counted, named and replaced deterministically,
the bad-file threshold, 16-bit and other PIL modes to RGB, the label check against sit.num_classes (also through
train/main.py), and the atomic demo-set write under an exception and under SIGKILL."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from image_trees import write_png16
from PIL import Image

import repae.train.demo_data as demo_mod
from repae.train.data import ImageFolderSource, load_image, to_rgb
from repae.train.demo_data import DEMO_MARKER, remove_stale_demo_temps, write_demo_dataset

RES = 8
N, G = 20, 5  # 20 files in two classes, 4 global batches of 5 per epoch


def _source(root, G=G, rank=0, world=1, seed=0, **kw):
    return ImageFolderSource(str(root), RES, global_batch_size=G, rank=rank, world_size=world, seed=seed,
                             num_workers=kw.pop("num_workers", 0), **kw)


def _take(source, n):
    return [source.next_batch() for _ in range(n)]


def _jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _corrupt_jpeg() -> bytes:
    """A JPEG whose Huffman table (DHT segment) is overwritten: the header parses, the decode fails."""
    b = bytearray(_jpeg_bytes(99))
    dht = b.find(b"\xff\xc4")
    b[dht + 5:dht + 25] = bytes(range(200, 220))
    return bytes(b)


# index -> (file name, bytes, a word of PIL's reason): consecutive bad files (3, 4), the last file of class a
# (9, replaced by class b's first file), and the very last file (19, wraps around to index 0).
BAD = {
    3: ("a/03_truncated.jpg", _jpeg_bytes(3)[:300], "truncated"),
    4: ("a/04_empty.png", b"", "cannot identify"),
    9: ("a/09_corrupt.jpg", _corrupt_jpeg(), "broken data stream"),
    14: ("b/14_text.png", b"this is a text file, not a PNG\n", "cannot identify"),
    19: ("b/19_truncated.png", _png_bytes(19)[:200], "truncated"),
}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "images"
    for i in range(N):
        cls = "a" if i < 10 else "b"
        name, content, _ = BAD.get(i, (f"{cls}/{i:02d}_good.png", _png_bytes(i), None))
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def _expected_replacement(i: int) -> int:
    """The rule written out: the first index i, i+1, ... (mod N) that is not one of the bad files."""
    while i in BAD:
        i = (i + 1) % N
    return i


def _expected_batches(root, num_batches, seed=0):
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.*"))
    assert len(files) == N
    out = []
    for k in range(num_batches):
        epoch, b = divmod(k, N // G)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch))
        used = [_expected_replacement(i) for i in perm[b * G:(b + 1) * G].tolist()]
        images = torch.stack([load_image(str(root / files[j]), RES) for j in used])
        labels = torch.tensor([0 if files[j].startswith("a/") else 1 for j in used])
        out.append((images, labels, used))
    return out


# ---------------------------------------------------------------------------------------------------
# Unreadable files
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_replaced_counted_and_named_once(bad_root, num_workers, capsys):
    source = _source(bad_root, num_workers=num_workers)
    want = _expected_batches(bad_root, 8)  # two epochs: every file drawn twice
    for k, (images, labels) in enumerate(_take(source, 8)):
        assert images.shape == (G, 3, RES, RES) and images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, want[k][0]) and torch.equal(labels, want[k][1]), f"batch {k}"
    assert source.num_bad_images == len(BAD)
    assert sorted(source.bad_images) == sorted(name for name, _, _ in BAD.values())
    lines = [line for line in capsys.readouterr().out.splitlines() if "unreadable image" in line]
    assert len(lines) == len(BAD)  # one line per file, not one per draw
    for i, (name, _, word) in BAD.items():
        assert word in source.bad_images[name].lower(), (name, source.bad_images[name])
        (line,) = [line for line in lines if str(bad_root / name) in line]
        assert line.startswith("[repae] rank 0: skipped unreadable image ") and word in line.lower()
        replacement = sorted(str(p.relative_to(bad_root)) for p in bad_root.rglob("*.*"))[_expected_replacement(i)]
        assert f"replaced by {replacement}" in line and "data.max_bad_images=100" in line


def test_bad_files_keep_the_world_size_independent_order(bad_root):
    one = _take(_source(bad_root, G=10), 4)
    ranks = [_source(bad_root, G=10, rank=r, world=2, num_workers=2 * r) for r in range(2)]
    for k in range(4):
        (i0, l0), (i1, l1) = ranks[0].next_batch(), ranks[1].next_batch()
        assert torch.equal(torch.cat([i0, i1]), one[k][0]) and torch.equal(torch.cat([l0, l1]), one[k][1])


def test_resume_with_bad_files_is_exact(bad_root):
    full = _take(_source(bad_root), 6)
    first = _source(bad_root)
    _take(first, 3)
    resumed = _source(bad_root, num_workers=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for (gi, gl), (wi, wl) in zip(_take(resumed, 3), full[3:]):
        assert torch.equal(gi, wi) and torch.equal(gl, wl)


def test_dataset_item_reports_what_it_skipped(bad_root):
    source = _source(bad_root)
    sample = source.dataset[3]  # 3 and 4 bad: the image of 5
    assert sample.index == 5 and [i for i, _ in sample.bad] == [3, 4] and sample.label == 0
    assert torch.equal(sample.image, source.dataset[5].image)
    assert source.dataset[19].index == 0 and source.dataset[9].label == 1  # wraps; class b's file replaces a's


def _expected_stop(limit: int) -> tuple[int, int]:
    """(batch index, distinct bad count) at which the bad files met so far first exceed `limit`."""
    seen = set()
    for k in range(N // G):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
        for i in perm[k * G:(k + 1) * G].tolist():
            while i in BAD:  # every bad file probed on the way to the replacement
                seen.add(i)
                i = (i + 1) % N
        if len(seen) > limit:
            return k, len(seen)
    raise AssertionError("limit never exceeded")


@pytest.mark.parametrize("limit", [0, 1, 2, 4])  # counts 2, 2, 5, 5 at the stop: batches 0, 0, 1, 1
def test_threshold_stops_with_one_line(bad_root, limit):
    source = _source(bad_root, max_bad_images=limit)
    stop_batch, count = _expected_stop(limit)
    _take(source, stop_batch)  # the batches before go through
    with pytest.raises(ValueError) as info:
        source.next_batch()
    msg = str(info.value)
    assert "\n" not in msg and source.num_bad_images == count > limit
    assert msg.startswith(f"{count} unreadable images on rank 0 exceed data.max_bad_images={limit} (last: ")
    assert msg.endswith("fix or remove the files, or raise data.max_bad_images")
    assert any(str(bad_root / name) in msg for name, _, _ in BAD.values())


def test_threshold_not_reached_goes_on(bad_root):
    source = _source(bad_root, max_bad_images=len(BAD))  # exactly as many as there are: tolerated
    _take(source, 8)
    assert source.num_bad_images == len(BAD)


def test_no_readable_file_is_one_line(tmp_path):
    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^no readable image among the 3 files under data.root=") as info:
        _source(tmp_path, G=3).next_batch()
    assert "\n" not in str(info.value)


def test_max_bad_images_config_key(tmp_path):
    from conftest import tiny_config

    assert tiny_config(tmp_path).data.max_bad_images == 100
    assert tiny_config(tmp_path, "data.max_bad_images=0").data.max_bad_images == 0
    with pytest.raises(ValueError, match=r"^config key data.max_bad_images=-1 must be an integer >= 0"):
        tiny_config(tmp_path, "data.max_bad_images=-1")
    with pytest.raises(ValueError, match="max_bad_images"):
        _source(tmp_path, max_bad_images=-1)


# ---------------------------------------------------------------------------------------------------
# Modes: 16-bit, greyscale, palette, CMYK, alpha
# ---------------------------------------------------------------------------------------------------


def test_16bit_grey_png_is_scaled_not_saturated(tmp_path):
    path = str(tmp_path / "mid.png")
    Image.fromarray(np.full((RES, RES), 32896, np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    got = load_image(path, RES)
    assert torch.equal(got, torch.full((3, RES, RES), 128, dtype=torch.uint8))  # convert("RGB") gives 255


def test_16bit_grey_gradient_is_the_high_byte(tmp_path):
    v = (np.arange(64 * 64, dtype=np.int64) * 16).reshape(64, 64).astype(np.uint16)  # 0 .. 65520
    path = str(tmp_path / "ramp.png")
    Image.fromarray(v).save(path)
    got = load_image(path, 64)  # same size: the crop and the resize are identities
    want = torch.from_numpy((v.astype(np.int64) >> 8).astype(np.uint8)).expand(3, 64, 64)
    assert torch.equal(got, want)
    assert abs(got.float().mean().item() - 127.5) < 0.5  # the saturating convert gave ~254.5


def test_mode_I_and_big_endian_are_clipped_and_shifted():
    vals = np.array([[-5, 0, 255, 256, 32896, 65535, 70000]], dtype=np.int32)
    got = np.asarray(to_rgb(Image.fromarray(vals)))
    assert got.shape == (1, 7, 3) and got[0, :, 0].tolist() == [0, 0, 0, 1, 128, 255, 255]
    assert (got == got[..., :1]).all()
    be = Image.frombytes("I;16B", (3, 1), np.array([0x00FF, 0x8080, 0xFF00], ">u2").tobytes())
    assert np.asarray(to_rgb(be))[0, :, 1].tolist() == [0, 128, 255]


def test_16bit_rgb_and_grey_alpha_pngs_take_the_high_byte_too(tmp_path):
    rgb = np.zeros((RES, RES, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0x1234, 0xFF80, 0x80FF
    write_png16(tmp_path / "rgb48.png", rgb, 2)
    assert load_image(str(tmp_path / "rgb48.png"), RES)[:, 0, 0].tolist() == [0x12, 0xFF, 0x80]
    la = np.zeros((RES, RES, 2), np.uint16)
    la[..., 0], la[..., 1] = 0x80FF, 0x1234
    write_png16(tmp_path / "la16.png", la, 4)
    assert load_image(str(tmp_path / "la16.png"), RES)[:, 0, 0].tolist() == [0x80] * 3  # alpha dropped


def test_greyscale_palette_bilevel_alpha_convert(tmp_path):
    grey = np.arange(RES * RES, dtype=np.uint8).reshape(RES, RES) * 3
    Image.fromarray(grey).save(tmp_path / "l.png")
    assert torch.equal(load_image(str(tmp_path / "l.png"), RES), torch.from_numpy(grey).expand(3, RES, RES))

    idx = (np.arange(RES * RES) % 3).reshape(RES, RES).astype(np.uint8)
    pal = Image.frombytes("P", (RES, RES), idx.tobytes())
    colours = [(200, 10, 20), (0, 150, 250), (7, 8, 9)]
    pal.putpalette([c for rgb in colours for c in rgb])
    pal.save(tmp_path / "p.png")
    got = load_image(str(tmp_path / "p.png"), RES)
    assert torch.equal(got.permute(1, 2, 0), torch.tensor(colours, dtype=torch.uint8)[torch.from_numpy(idx).long()])

    bits = Image.frombytes("L", (RES, RES), (idx * 127).tobytes()).convert("1")
    bits.save(tmp_path / "bits.png")
    assert set(load_image(str(tmp_path / "bits.png"), RES).unique().tolist()) == {0, 255}

    rgba = np.zeros((RES, RES, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 20, 30), np.where(idx == 0, 0, 255)  # half transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    got = load_image(str(tmp_path / "rgba.png"), RES)
    assert got.permute(1, 2, 0).reshape(-1, 3).unique(dim=0).tolist() == [[10, 20, 30]]  # alpha dropped
    la = np.stack([grey, np.full_like(grey, 40)], -1)
    Image.frombytes("LA", (RES, RES), la.tobytes()).save(tmp_path / "la.png")
    assert torch.equal(load_image(str(tmp_path / "la.png"), RES), torch.from_numpy(grey).expand(3, RES, RES))


def test_cmyk_jpeg_converts(tmp_path):
    cmyk = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 0, 255)]
    want = [(255, 255, 255), (0, 255, 255), (255, 0, 255), (0, 0, 0)]
    arr = np.zeros((16, 64, 4), np.uint8)
    for k, c in enumerate(cmyk):
        arr[:, 16 * k:16 * (k + 1)] = c
    img = Image.frombytes("CMYK", (64, 16), arr.tobytes())
    assert np.asarray(to_rgb(img))[0, ::16].tolist() == [list(w) for w in want]  # exact, in memory
    img.save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    got = load_image(str(tmp_path / "c.jpg"), 16)  # 64x16 -> centre 16x16 of the 2nd half: colours 1 and 2
    assert np.abs(got[:, 8, 3].int().numpy() - np.array(want[1])).max() <= 4
    assert np.abs(got[:, 8, 12].int().numpy() - np.array(want[2])).max() <= 4


# ---------------------------------------------------------------------------------------------------
# Labels against sit.num_classes
# ---------------------------------------------------------------------------------------------------


def _labelled_root(root, labels):
    for k in range(len(labels)):
        path = root / f"img_{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(path)
    (root / "dataset.json").write_text(json.dumps({"labels": [[f"img_{k}.png", v] for k, v in enumerate(labels)]}))
    return root


@pytest.mark.parametrize("extra", [1, 2])  # one class too many (the null class), two too many (IndexError)
def test_labels_beyond_num_classes_are_one_line(tmp_path, extra):
    num_classes = 4
    source = _source(_labelled_root(tmp_path, list(range(num_classes + extra))), G=2)
    top = num_classes + extra - 1
    with pytest.raises(ValueError) as info:
        source.check_labels(num_classes)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "dataset.json") in msg
    assert f"has labels up to {top} ({top + 1} classes), but sit.num_classes={num_classes}" in msg
    source.check_labels(top + 1)  # the fix the message names passes


def test_labels_from_folders_and_negative_labels(tmp_path):
    for k in range(5):
        (tmp_path / "f" / f"class_{k}").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "f" / f"class_{k}" / "x.png")
    with pytest.raises(ValueError, match=r"the 5 class folders of data.root=.*labels up to 4 \(5 classes\), but "
                                         r"sit.num_classes=4"):
        _source(tmp_path / "f", G=2).check_labels(4)
    with pytest.raises(ValueError, match=r"dataset.json \('labels'\) has label -1: labels must be >= 0"):
        _source(_labelled_root(tmp_path / "neg", [0, -1, 2]), G=2).check_labels(4)


MAIN = Path(__file__).resolve().parents[2] / "train" / "main.py"
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.json"
_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _run_main(run_dir, *sets):
    env = {**{k: v for k, v in os.environ.items() if k not in _DIST_VARS}, "DS_ACCELERATOR": "cpu"}
    args = [sys.executable, str(MAIN), "--config", str(CONFIG)]
    for item in ("schedule.global_batch_size=4", "logging.tensorboard=false", "logging.sample_every=0",
                 "schedule.max_steps=2", f"logging.run_dir={run_dir}", *sets):
        args += ["--set", item]
    return subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["labels", "bad_images"])
def test_main_stops_with_one_line(tmp_path, case):
    """Through train/main.py: labels past sit.num_classes=4, or one bad file with data.max_bad_images=0: exit 2."""
    pytest.importorskip("deepspeed")
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("lpips is not installed")
    root = _labelled_root(tmp_path / "images", [0, 1, 2, 3, 4] if case == "labels" else [0, 1, 2, 3, 0])
    if case == "bad_images":
        (root / "img_2.png").write_bytes(b"")
    proc = _run_main(tmp_path / "run", "data.source=folder", f"data.root={root}", "data.max_bad_images=0")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if case == "labels":
        assert "has labels up to 4 (5 classes), but sit.num_classes=4" in errors[0]
    else:
        assert errors[0].startswith("error: 1 unreadable images on rank 0 exceed data.max_bad_images=0 (last: ")
        assert str(root / "img_2.png") in errors[0]


# ---------------------------------------------------------------------------------------------------
# Demo set: atomic write
# ---------------------------------------------------------------------------------------------------


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_demo_write_interrupted_by_an_exception_leaves_nothing(tmp_path, monkeypatch):
    want = _files(write_demo_dataset(str(tmp_path / "ref"), num_images=9, num_classes=3, resolution=RES, seed=2))
    real, calls = demo_mod._demo_image, []

    def dying(*args):
        calls.append(1)
        assert not root.exists()  # images go into the temp folder, never into root
        if len(calls) == 5:
            raise RuntimeError("simulated kill")
        return real(*args)

    root = tmp_path / "demo"
    monkeypatch.setattr(demo_mod, "_demo_image", dying)
    with pytest.raises(RuntimeError, match="simulated kill"):
        write_demo_dataset(str(root), num_images=9, num_classes=3, resolution=RES, seed=2)
    assert len(calls) == 5 and sorted(os.listdir(tmp_path)) == ["ref"]  # no root, no temp folder
    monkeypatch.setattr(demo_mod, "_demo_image", real)
    write_demo_dataset(str(root), num_images=9, num_classes=3, resolution=RES, seed=2)
    assert _files(root) == want and DEMO_MARKER in want and len(want) == 10


_KILLED_WRITER = """
import os, sys, time
import repae.train.demo_data as d
real, count = d._demo_image, [0]
def slow(*args):
    count[0] += 1
    if count[0] == 4:
        open(sys.argv[2], "w").close()
        time.sleep(600)
    return real(*args)
d._demo_image = slow
d.write_demo_dataset(sys.argv[1], num_images=9, num_classes=3, resolution=8, seed=2)
"""


def test_demo_write_killed_mid_write_is_rebuilt(tmp_path):
    root, ready = tmp_path / "demo", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root), str(ready)])
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, "writer died or hung before the kill point"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    temp = tmp_path / f"demo.tmp-{socket.gethostname()}-{proc.pid}"
    assert not root.exists() and temp.is_dir() and len(list(temp.rglob("*.png"))) == 3  # the half-written set
    write_demo_dataset(str(root), num_images=9, num_classes=3, resolution=RES, seed=2)
    assert not temp.exists() and (root / DEMO_MARKER).is_file() and len(list(root.rglob("*.png"))) == 9
    ref = write_demo_dataset(str(tmp_path / "ref"), num_images=9, num_classes=3, resolution=RES, seed=2)
    assert _files(root) == _files(ref)


def test_stale_temp_folders_go_live_and_foreign_ones_stay(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    root = str(tmp_path / "demo")
    host = socket.gethostname()
    names = {"stale_old": f"demo.tmp{dead.pid}", "stale_new": f"demo.tmp-{host}-{dead.pid}",
             "mine": f"demo.tmp-{host}-{os.getpid()}", "live": f"demo.tmp-{host}-{os.getppid()}",
             "unrelated": "demo.tmpfiles", "other_root": f"demox.tmp{dead.pid}"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"")
    removed = remove_stale_demo_temps(root)
    assert sorted(os.path.basename(p) for p in removed) == sorted([names["stale_old"], names["stale_new"],
                                                                     names["mine"]])
    assert sorted(os.listdir(tmp_path)) == sorted([names["live"], names["unrelated"], names["other_root"]])


def test_demo_write_reuses_a_complete_set_and_refuses_a_foreign_folder(tmp_path):
    root = tmp_path / "demo"
    write_demo_dataset(str(root), num_images=4, num_classes=2, resolution=RES, seed=0)
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    write_demo_dataset(str(root), num_images=4, num_classes=2, resolution=RES, seed=0)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamp  # kept, not rewritten
    with pytest.raises(ValueError, match=re.escape(f"{root} exists and is not a complete demo set")):
        write_demo_dataset(str(root), num_images=5, num_classes=2, resolution=RES, seed=0)
    partial = tmp_path / "partial"
    (partial / "class_00").mkdir(parents=True)
    (partial / "class_00" / "img_00000.png").write_bytes(_png_bytes(0))  # no marker: never taken as complete
    with pytest.raises(ValueError, match="no matching " + re.escape(DEMO_MARKER)):
        write_demo_dataset(str(partial), num_images=4, num_classes=2, resolution=RES, seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_demo_dataset(str(empty), num_images=4, num_classes=2, resolution=RES, seed=0)
    assert _files(empty) == _files(root)
