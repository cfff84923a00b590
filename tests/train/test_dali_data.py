"""DALISource: the folder source's order and labels, two-rank sharding, resume, the corrupt-file and missing-DALI
messages (DALI's CPU backend), and the mixed (nvJPEG) decoder on a GPU."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from repae.train.data import ImageFolderSource, load_image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'repae[dali]')")
from repae.train.dali_data import MISSING_DALI, DALISource  # noqa: E402

RES = 32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """24 JPEGs of 3 classes, 40..70 px (some halved at R=16, most upscaled at R=32): 3 batches of 8 per epoch."""
    root = tmp_path_factory.mktemp("dali") / "data"
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / f"n0{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(40, 71, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.JPEG", quality=90)
    return str(root)


def _dali(root, G=8, rank=0, world=1, device=CPU, res=RES, **kw):
    return DALISource(root, res, device=device, global_batch_size=G, rank=rank, world_size=world, seed=0,
                      num_workers=kw.pop("num_workers", 0), **kw)


def _take(source, n):
    return [(*source.next_batch(), source.last_indices) for _ in range(n)]


def test_order_and_labels_equal_the_folder_source(root):
    folder = ImageFolderSource(root, RES, global_batch_size=8, rank=0, world_size=1, seed=0, num_workers=0)
    dali = _dali(root)
    assert (dali.num_images, dali.num_classes) == (24, 3)
    for (image, label, index), (f_image, f_label, f_index) in zip(_take(dali, 5), _take(folder, 5)):
        assert image.shape == (8, 3, RES, RES) and image.dtype == torch.uint8 and label.dtype == torch.int64
        assert torch.equal(index, f_index) and torch.equal(label, f_label)
        assert (image.int() - f_image.int()).abs().float().mean() < 8  # the crops differ by the filters only


def test_two_ranks_cover_each_image_once_per_epoch(root):
    one = _take(_dali(root), 3)
    ranks = [_take(_dali(root, rank=r, world=2), 3) for r in range(2)]
    for k in range(3):
        assert torch.equal(torch.cat([ranks[0][k][2], ranks[1][k][2]]), one[k][2])
        assert torch.equal(torch.cat([ranks[0][k][0], ranks[1][k][0]]), one[k][0])
    seen = torch.cat([b[2] for r in ranks for b in r])
    assert sorted(seen.tolist()) == list(range(24))


def test_resume_mid_epoch_and_across_epochs(root):
    want = _take(_dali(root), 6)
    source = _dali(root)
    _take(source, 2)
    state = source.state_dict()
    resumed = _dali(root)
    resumed.load_state_dict(state)
    for got, ref in zip(_take(resumed, 4), want[2:]):
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    folder = ImageFolderSource(root, RES, global_batch_size=8, rank=0, world_size=1, seed=0, num_workers=0)
    folder.load_state_dict(resumed.state_dict())  # the two sources' states are interchangeable


def test_file_list_order_and_labels(root, tmp_path):
    lines = ["n01/001.JPEG\t7", "n00/000.JPEG\t5", "n02/002.JPEG\t6", "n00/003.JPEG\t5"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    source = _dali(root, G=4, file_list=str(tmp_path / "list.txt"))
    _, labels = source.next_batch()
    by_index = dict(zip(range(4), [7, 5, 6, 5]))
    assert labels.tolist() == [by_index[i] for i in source.last_indices.tolist()]
    with pytest.raises(ValueError, match="sit.num_classes=7"):
        source.check_labels(7)


def test_parallel_reader_workers_give_the_same_batches(root):
    want = _take(_dali(root), 2)
    for got, ref in zip(_take(_dali(root, num_workers=1), 2), want):
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("content", [b"this is not a jpeg" * 20, "truncated"])
def test_corrupt_file_is_one_line_naming_it_and_the_tool(root, tmp_path, content):
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(root, tree)
    bad = tree / "n01" / "004.JPEG"
    bad.write_bytes(bad.read_bytes()[:300] if content == "truncated" else content)
    source = _dali(str(tree))
    with pytest.raises(ValueError) as err:
        for _ in range(3):
            source.next_batch()
    message = str(err.value)
    assert "\n" not in message and str(bad) in message
    assert f"python -m repae.train.dataset_tool check {tree}" in message


def test_missing_dali_is_one_line_naming_the_extra(root, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.setitem(sys.modules, "nvidia.dali.fn", None)
    with pytest.raises(ImportError) as err:
        _dali(root)
    assert str(err.value) == MISSING_DALI and "pip install 'repae[dali]'" in MISSING_DALI
    assert "nvidia-dali-cuda130" in MISSING_DALI
    assert isinstance(err.value, ValueError)  # train/main.py prints a ValueError as one line, exit code 2


@pytest.mark.gpu(reason="DALI's mixed decoder is nvJPEG on the GPU")
@pytest.mark.parametrize("res", [32, 16])
def test_mixed_decoder_matches_the_cpu_backend(root, res):
    gpu = _take(_dali(root, device=torch.device("cuda"), res=res, num_workers=2), 3)
    cpu = _take(_dali(root, res=res), 3)
    for (g_image, g_label, g_index), (c_image, c_label, c_index) in zip(gpu, cpu):
        assert g_image.is_cuda and g_image.shape == c_image.shape and g_image.dtype == torch.uint8
        assert torch.equal(g_label, c_label) and torch.equal(g_index, c_index)
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels
        assert (g_image.cpu().int() - c_image.int()).abs().float().mean() < 4


@pytest.mark.gpu(reason="DALI's mixed decoder is nvJPEG on the GPU")
def test_mixed_decoder_on_real_photographs_is_near_the_reference_crop():
    from repae.train.sources import DEMO_PHOTOS

    source = DALISource(DEMO_PHOTOS, 64, device=torch.device("cuda"), global_batch_size=48, rank=0, world_size=1,
                        seed=0, num_workers=2)
    images, _ = source.next_batch()
    ref = torch.stack([load_image(source.dataset.path(i), 64) for i in source.last_indices.tolist()])
    assert (images.cpu().int() - ref.int()).abs().float().mean() < 4
