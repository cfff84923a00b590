"""dataset_tool: `check` sorts files into kinds, writes the clean list the folder source (and the trainer, by itself)
reads and a report; `prepare` is deterministic, resumable after an interruption, leaves unreadable files out and
refuses a mismatched resume. Run as a user would: main(argv) and `python -m`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from image_trees import save_kind, write_tree
from PIL import Image

import repae.train.h5_prepare as prep
from repae.train.data import ImageFolderSource
from repae.train.dataset_tool import classify, main
from repae.train.h5_data import H5Source
from repae.train.sources import default_clean_list


def _png16(path, w, h):
    Image.fromarray(np.full((h, w), 40000, np.uint16)).save(path)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A tree with good files of every kind and bad ones: empty, truncated PNG and JPEG, not an image, tiny."""
    root = tmp_path_factory.mktemp("messy") / "tree"
    write_tree(str(root))
    good_png = (root / "ant" / "a0.png").read_bytes()
    good_jpg = (root / "ant" / "a1.jpg").read_bytes()
    (root / "ant" / "empty.png").write_bytes(b"")
    (root / "bee" / "cut.png").write_bytes(good_png[:len(good_png) // 2])
    (root / "bee" / "cut.jpg").write_bytes(good_jpg[:len(good_jpg) // 2])
    (root / "cat" / "notes.jpg").write_bytes(b"this is not an image")
    save_kind(str(root / "cat" / "tiny.png"), "rgb", 8, 5, seed=3)
    _png16(str(root / "cat" / "deep.png"), 40, 40)
    save_kind(str(root / "cat" / "png_named.jpg"), "rgb", 40, 40, seed=4)  # a PNG under a JPEG name
    Image.open(root / "cat" / "png_named.jpg").save(root / "cat" / "png_named.jpg", format="PNG")
    return root


BAD = {"ant/empty.png": "zero-byte", "bee/cut.png": "truncated", "bee/cut.jpg": "truncated",
       "cat/notes.jpg": "unreadable"}


def test_check_reports_kinds_and_writes_a_clean_list(messy, capsys):
    assert main(["check", str(messy), "--workers", "2", "--min-side", "16"]) == 0
    out_dir = os.path.dirname(default_clean_list(str(messy)))
    report = json.loads(open(os.path.join(out_dir, "report.json")).read())
    assert {e["path"]: e["kind"] for e in report["excluded"]} == BAD
    kinds = {f["path"]: f["kinds"] for f in report["flagged"]}
    assert kinds["bee/b0.jpg"] == ["cmyk"] and kinds["cat/deep.png"] == ["greyscale", "16-bit"]
    assert kinds["bee/b1.png"] == ["alpha", "tiny"] and kinds["ant/a3.png"] == ["palette", "tiny"]
    assert kinds["cat/tiny.png"] == ["tiny"] and kinds["cat/png_named.jpg"] == ["format-mismatch"]
    assert kinds["bee/b2.png"] == ["greyscale", "alpha"] and "ant/a0.png" not in kinds
    assert report["num_files"] == 19 and report["num_clean"] == 15 and report["counts"]["truncated"] == 2
    summary = capsys.readouterr().out
    assert "19 files, 15 clean, 4 excluded" in summary and "the trainer reads it by itself" in summary
    assert "cat/notes.jpg: unreadable" in summary

    source = ImageFolderSource(str(messy), 16, global_batch_size=5, rank=0, world_size=1, seed=0, num_workers=0,
                               file_list=default_clean_list(str(messy)))
    assert source.num_images == 15 and source.num_classes == 3
    for _ in range(3):
        source.next_batch()
    assert source.num_bad_images == 0  # the loader meets none of the excluded files
    lines = [line for line in open(default_clean_list(str(messy))) if not line.startswith("#")]
    assert lines[0] == "ant/a0.png\t0\n" and not any(p in "".join(lines) for p in BAD)


def test_check_drop_tiny_and_out(messy, tmp_path):
    assert main(["check", str(messy), "--workers", "1", "--out", str(tmp_path / "c"), "--drop-tiny"]) == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    clean = [line.split("\t")[0] for line in (tmp_path / "c" / "clean_list.txt").read_text().splitlines()[1:]]
    assert clean == ["bee/b0.jpg", "bee/b2.png", "bee/b3.png"]  # the only files with a short side >= 64
    assert all(e["kind"] in ("tiny", *BAD.values()) for e in report["excluded"])


def test_unfiltered_loader_skips_and_counts_what_check_excludes(messy, capsys):
    source = ImageFolderSource(str(messy), 16, global_batch_size=19, rank=0, world_size=1, seed=0, num_workers=0)
    source.next_batch()
    assert sorted(source.bad_images) == sorted(BAD)
    assert sum("skipped unreadable image" in line for line in capsys.readouterr().out.splitlines()) == 4


def test_classify_truncation_words(messy):
    assert classify(str(messy / "bee" / "cut.png"), 16)[0] == "truncated"
    assert classify(str(messy / "ant" / "a0.png"), 16) == (None, [], "PNG RGB 32x32")


def test_prepare_is_deterministic_and_leaves_bad_files_out(messy, tmp_path, capsys):
    """Explicit --file-list of all files (bad ones too): they are left out and listed; 1 and 2 workers agree."""
    listing = tmp_path / "all.txt"
    rel = sorted(str(p.relative_to(messy)) for p in messy.rglob("*.*") if p.suffix in (".png", ".jpg"))
    listing.write_text("".join(f"{p}\t{['ant', 'bee', 'cat'].index(p[:3])}\n" for p in rel))
    for workers in ("1", "2"):
        assert main(["prepare", str(messy), str(tmp_path / workers), "--resolution", "16", "--workers", workers,
                     "--file-list", str(listing), "--shard-size", "4"]) == 0
    for name in ("images.h5", "images_h5.json", "prepare_report.json"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()
    report = json.loads((tmp_path / "1" / "prepare_report.json").read_text())
    assert sorted(s["path"] for s in report["skipped"]) == sorted(BAD) and report["num_written"] == 15
    assert not (tmp_path / "1" / ".prepare").exists()
    source = H5Source(str(tmp_path / "1" / "images.h5"), 16, global_batch_size=5, rank=0, world_size=1, seed=0,
                      num_workers=0)
    assert source.num_images == 15
    assert main(["prepare", str(messy), str(tmp_path / "1"), "--resolution", "16", "--file-list", str(listing),
                 "--shard-size", "4"]) == 0  # done already: nothing to do
    assert "nothing to do" in capsys.readouterr().out


def test_prepare_resumes_after_an_interruption(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    write_tree(str(root))
    args = dict(resolution=16, shard_size=5, log=lambda *_: None)
    prep.prepare(str(root), str(tmp_path / "fresh"), **args)

    real, calls = prep._encode_one, []

    def dies_at_the_8th(task):
        calls.append(task)
        if len(calls) == 8:
            raise KeyboardInterrupt  # as a kill would, in the middle of the second part
        return real(task)

    monkeypatch.setattr(prep, "_encode_one", dies_at_the_8th)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(root), str(tmp_path / "out"), **args)
    work = tmp_path / "out" / ".prepare"
    assert sorted(os.listdir(work)) == ["params.json", "part-00000.h5", "part-00001.h5.tmp"]
    assert not (tmp_path / "out" / "images.h5").exists()  # never a half-written final file
    calls.clear()
    monkeypatch.setattr(prep, "_encode_one", lambda task: calls.append(task) or real(task))
    prep.prepare(str(root), str(tmp_path / "out"), **args)
    assert len(calls) == 12 - 5  # the finished first part was not redone
    for name in ("images.h5", "images_h5.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()

    with pytest.raises(ValueError, match="other input or settings"):
        prep.prepare(str(root), str(tmp_path / "out"), **{**args, "resolution": 8})


def test_prepare_uses_the_clean_list_and_runs_as_a_module(tmp_path):
    root = tmp_path / "tree"
    write_tree(str(root))
    (root / "bee" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    assert main(["check", str(root), "--workers", "1"]) == 0
    proc = subprocess.run([sys.executable, "-m", "repae.train.dataset_tool", "prepare", str(root), str(tmp_path / "o"),
                           "--resolution", "16", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clean_list.txt" in proc.stdout and "prepare:" in proc.stderr  # the log line, then the progress bar
    h5 = H5Source(str(tmp_path / "o" / "images.h5"), 16, global_batch_size=4, rank=0, world_size=1, seed=0,
                  num_workers=0)
    folder = ImageFolderSource(str(root), 16, global_batch_size=4, rank=0, world_size=1, seed=0, num_workers=0,
                               file_list=default_clean_list(str(root)))
    for _ in range(3):
        (a, la), (b, lb) = h5.next_batch(), folder.next_batch()
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(h5.last_indices, folder.last_indices)
    bad = subprocess.run([sys.executable, "-m", "repae.train.dataset_tool", "check", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: image folder") and bad.stderr.count("\n") == 1
