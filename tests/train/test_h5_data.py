"""H5Source (data.source=h5): an images.h5 written by `dataset_tool prepare` and one written by a transcription of
the original's preprocessing.py give the folder source's bytes, order and labels; world-size-independent batches,
resume, workers, re-cropping at another resolution, bad entries skipped and counted, one-line errors."""

from __future__ import annotations

import io
import json
import sys

import h5py
import numpy as np
import pytest
import torch
from image_trees import original_h5_items, write_original_h5, write_tree
from PIL import Image

from repae.train.data import ImageFolderSource, center_crop_arr
from repae.train.dataset_tool import main
from repae.train.h5_data import H5Source, image_key, import_h5py, read_layout

RES, G = 32, 4  # 12 images: 3 global batches of 4 per epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tree, the h5 of `prepare` and the h5 of the original's writer, side by side."""
    d = tmp_path_factory.mktemp("h5")
    files = write_tree(str(d / "tree"))
    assert main(["prepare", str(d / "tree"), str(d / "prepared"), "--resolution", str(RES), "--workers", "2",
                 "--shard-size", "5"]) == 0
    write_original_h5(files, str(d / "original"), RES)
    return d


def _source(kind, d, *, rank=0, world=1, workers=0, res=RES, **kw):
    common = dict(global_batch_size=G, rank=rank, world_size=world, seed=0, num_workers=workers, **kw)
    if kind == "folder":
        return ImageFolderSource(str(d / "tree"), res, **common)
    return H5Source(str(d / kind / "images.h5"), res, **common)


def _take(source, n):
    out = []
    for _ in range(n):
        images, labels = source.next_batch()
        out.append((images, labels, source.last_indices))
    return out


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["prepared", "original"])
def test_h5_gives_the_folder_sources_bytes_order_and_labels(data, kind):
    _assert_same(_take(_source(kind, data), 7), _take(_source("folder", data), 7))  # over two epochs


def test_prepare_writes_the_originals_bytes(data):
    """prepare's file equals the transcribed original writer's to the byte, the sidecar too."""
    for name in ("images.h5", "images_h5.json"):
        assert (data / "prepared" / name).read_bytes() == (data / "original" / name).read_bytes()


def test_the_originals_reader_reads_the_prepared_file(data):
    source = _source("prepared", data)
    items = original_h5_items(str(data / "prepared"))
    assert [key for key, _, _ in items] == [image_key(i) for i in range(12)]
    for i, (_, image_CHW, label) in enumerate(items):
        sample = source.dataset[i]
        assert image_CHW.dtype == np.uint8 and torch.equal(sample.image, torch.from_numpy(image_CHW))
        assert sample.label == label


def test_two_ranks_cover_each_image_once_per_epoch(data):
    one = _take(_source("prepared", data), 6)
    ranks = [_source("prepared", data, rank=r, world=2, workers=r) for r in range(2)]
    seen = []
    for k in range(6):
        (i0, l0, x0), (i1, l1, x1) = _take(ranks[0], 1)[0], _take(ranks[1], 1)[0]
        assert torch.equal(torch.cat([i0, i1]), one[k][0]) and torch.equal(torch.cat([l0, l1]), one[k][1])
        seen += torch.cat([x0, x1]).tolist()
    assert sorted(seen[:12]) == sorted(seen[12:]) == list(range(12))  # each epoch: every image once


def test_resume_mid_epoch_continues_with_the_next_batch(data):
    full = _take(_source("prepared", data), 5)
    first = _source("prepared", data)
    _take(first, 2)
    resumed = _source("prepared", data, workers=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    _assert_same(_take(resumed, 3), full[2:])


def test_another_run_resolution_recrops_the_stored_pngs(data):
    source = _source("prepared", data, res=16)
    with h5py.File(data / "prepared" / "images.h5", "r") as f:
        for i in range(12):
            stored = Image.open(io.BytesIO(np.asarray(f[image_key(i)]).tobytes()))
            want = torch.from_numpy(center_crop_arr(stored, 16)).permute(2, 0, 1)
            assert torch.equal(source.dataset[i].image, want)


def test_labels_and_check_labels(data):
    keys, labels, where = read_layout(str(data / "original" / "images.h5"))
    assert labels == [0] * 4 + [1] * 4 + [2] * 4 and where.endswith("images.h5:dataset.json")
    source = _source("original", data)
    assert source.num_images == 12 and source.num_classes == 3
    source.check_labels(3)
    with pytest.raises(ValueError, match=r"labels up to 2 \(3 classes\), but sit.num_classes=2"):
        source.check_labels(2)


def _broken_copy(data, tmp_path) -> str:
    """The original's file with image 1 truncated and image 5 not a PNG at all."""
    out = tmp_path / "broken"
    out.mkdir()
    for name in ("images.h5", "images_h5.json"):
        (out / name).write_bytes((data / "original" / name).read_bytes())
    with h5py.File(out / "images.h5", "r+") as f:
        png = np.asarray(f[image_key(1)]).tobytes()
        for i, junk in [(1, png[:len(png) // 2]), (5, b"not a png")]:
            del f[image_key(i)]
            f.create_dataset(image_key(i), data=np.array(junk, dtype="S"))
    return str(out / "images.h5")


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_entries_are_replaced_counted_and_logged_once(data, tmp_path, capsys, workers):
    path = _broken_copy(data, tmp_path)
    source = H5Source(path, RES, global_batch_size=G, rank=0, world_size=1, seed=0, num_workers=workers)
    reference = _source("original", data)
    for images, labels, indices in _take(source, 6):
        want = [2 if i == 1 else 6 if i == 5 else i for i in indices.tolist()]
        assert indices.tolist() == want
        assert torch.equal(images, torch.stack([reference.dataset[i].image for i in want]))
        assert labels.tolist() == [int(reference.dataset.labels[i]) for i in want]
    assert source.num_bad_images == 2 and sorted(source.bad_images) == [image_key(1), image_key(5)]
    lines = [line for line in capsys.readouterr().out.splitlines() if "unreadable image" in line]
    assert len(lines) == 2 and all(f"{path}:" in line for line in lines)
    with pytest.raises(ValueError, match=r"^2 unreadable images on rank 0 exceed data.max_bad_images=1 "):
        _take(H5Source(path, RES, global_batch_size=G, rank=0, world_size=1, seed=0, num_workers=0,
                       max_bad_images=1), 6)


def test_a_greyscale_png_entry_is_converted(data, tmp_path):
    """An entry another writer stored as greyscale decodes to 3 equal channels (to_rgb), not 1 channel."""
    grey = (np.arange(RES * RES) % 251).astype(np.uint8).reshape(RES, RES)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    with h5py.File(tmp_path / "images.h5", "w") as f:
        f.create_dataset(image_key(0), data=np.array(buf.getvalue(), dtype="S"))
        f.create_dataset("dataset.json", data=np.array(json.dumps({"labels": [[image_key(0), 3]]}).encode(), "S"))
    source = H5Source(str(tmp_path / "images.h5"), RES, global_batch_size=1, rank=0, world_size=1, seed=0,
                      num_workers=0)  # no sidecar: the keys come from the file
    images, labels = source.next_batch()
    assert torch.equal(images[0], torch.from_numpy(grey).expand(3, RES, RES)) and labels.tolist() == [3]


def test_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="images.h5"):
        H5Source(str(tmp_path / "images.h5"), RES, global_batch_size=1, rank=0, world_size=1, seed=0)
    with h5py.File(tmp_path / "images.h5", "w") as f:
        f.create_dataset(image_key(0), data=np.array(b"x", dtype="S"))
        f.create_dataset("dataset.json", data=np.array(b'{"labels": []}', dtype="S"))
    with pytest.raises(ValueError, match=r"has no label for '00000/img00000000.png'"):
        H5Source(str(tmp_path / "images.h5"), RES, global_batch_size=1, rank=0, world_size=1, seed=0)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ValueError, match=r"needs h5py: pip install 'repae\[train\]'") as info:
        import_h5py()
    assert "\n" not in str(info.value)


def test_the_trainer_builds_it_from_the_config(data, tmp_path):
    from conftest import tiny_config

    from repae.train.sources import build_source

    cfg = tiny_config(tmp_path / "run", "data.source=auto", f"data.root={data / 'prepared' / 'images.h5'}",
                      f"data.resolution={RES}", "sit.num_classes=3")
    source, line = build_source(cfg, rank=0, world=1, device=torch.device("cpu"), run_dir=str(tmp_path / "run"))
    assert isinstance(source, H5Source) and "data source: h5 (data.source=auto" in line and "12 images" in line
    assert torch.equal(source.next_batch()[0], _source("folder", data).next_batch()[0])
