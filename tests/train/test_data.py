"""ImageFolderSource: labels, the ADM crop, world-size-independent batches, resume, epochs, errors (CPU, no workers)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from repae.train.data import ImageFolderSource, load_image, scan_image_folder
from repae.train.demo_data import write_demo_dataset

RES = 16


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """24 images of 3 classes at 16 px: 3 global batches of 8 per epoch."""
    return write_demo_dataset(str(tmp_path_factory.mktemp("demo") / "data"), num_images=24, num_classes=3,
                              resolution=RES, seed=0)


def _source(root, G=8, rank=0, world=1, seed=0, **kw):
    return ImageFolderSource(root, RES, global_batch_size=G, rank=rank, world_size=world, seed=seed,
                             num_workers=kw.pop("num_workers", 0), **kw)


def _take(source, n):
    return [source.next_batch() for _ in range(n)]


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for (gi, gl), (wi, wl) in zip(got, want):
        assert torch.equal(gi, wi) and torch.equal(gl, wl)


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


# ---------------------------------------------------------------------------------------------------
# Scan, labels, decode
# ---------------------------------------------------------------------------------------------------


def test_labels_from_sorted_top_level_folders(tmp_path):
    px = np.zeros((4, 4, 3), np.uint8)
    for rel in ["zebra/b.png", "zebra/a.jpg", "ant/x/deep.png", "mole/m.webp", "mole/notes.txt", "ant/.hidden.png"]:
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("not an image")
        else:
            _png(str(tmp_path / rel), px)
    relpaths, labels = scan_image_folder(str(tmp_path))
    assert relpaths == ["ant/x/deep.png", "mole/m.webp", "zebra/a.jpg", "zebra/b.png"]
    assert labels == [0, 1, 2, 2]


def test_labels_from_dataset_json(tmp_path):
    px = np.zeros((4, 4, 3), np.uint8)
    for rel in ["a/0.png", "b/1.png"]:
        _png(str(tmp_path / rel), px)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["a/0.png", 7], ["b/1.png", 3]]}))
    assert scan_image_folder(str(tmp_path)) == (["a/0.png", "b/1.png"], [7, 3])
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["a/0.png", 7]]}))
    with pytest.raises(ValueError, match="b/1.png"):
        scan_image_folder(str(tmp_path))


def _center_crop_independent(img: Image.Image, res: int) -> np.ndarray:
    """The ADM crop written out step by step: halvings counted first, sizes by hand, crop by offsets."""
    w, h = img.size
    while min(w, h) >= 2 * res:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    short = min(w, h)
    new_w, new_h = round(w * res / short), round(h * res / short)
    arr = np.asarray(img.resize((new_w, new_h), Image.BICUBIC))
    oy, ox = (new_h - res) // 2, (new_w - res) // 2
    return arr[oy:oy + res, ox:ox + res]


@pytest.mark.parametrize("size,res", [((97, 61), 24), ((300, 130), 32), ((50, 81), 16)])
def test_center_crop_matches_independent_reimplementation(tmp_path, size, res):
    rng = np.random.RandomState(1)
    w, h = size
    arr = rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    Image.fromarray(arr).convert("RGBA").save(path)  # an RGBA file: the loader converts to RGB
    got_3RR = load_image(path, res)
    want_RR3 = _center_crop_independent(Image.fromarray(arr), res)
    assert got_3RR.dtype == torch.uint8 and got_3RR.shape == (3, res, res)
    assert torch.equal(got_3RR, torch.from_numpy(np.array(want_RR3)).permute(2, 0, 1))


def test_demo_dataset_is_deterministic(tmp_path):
    a = write_demo_dataset(str(tmp_path / "a"), num_images=6, num_classes=3, resolution=RES, seed=5)
    b = write_demo_dataset(str(tmp_path / "b"), num_images=6, num_classes=3, resolution=RES, seed=5)
    paths, labels = scan_image_folder(a)
    assert labels == [0, 0, 1, 1, 2, 2] and paths == scan_image_folder(b)[0]
    for p in paths:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()
    assert not any(n.endswith(".tmp") or ".tmp" in n for n in os.listdir(tmp_path))


# ---------------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------------


def test_batches_follow_the_seeded_permutation(demo_root):
    source = _source(demo_root)
    assert source.steps_per_epoch == 3 and source.num_images == 24
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0 + 1))  # epoch 1
    _take(source, 3)
    images, labels = source.next_batch()  # epoch 1, batch 0
    assert images.shape == (8, 3, RES, RES) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    for j, idx in enumerate(perm[:8].tolist()):
        sample = source.dataset[idx]
        assert sample.index == idx and sample.bad == ()
        assert torch.equal(images[j], sample.image) and labels[j] == sample.label


def test_one_rank_and_two_ranks_see_the_same_global_batches(demo_root):
    one = _take(_source(demo_root, G=8), 5)  # crosses into epoch 1
    ranks = [_take(_source(demo_root, G=8, rank=r, world=2), 5) for r in range(2)]
    for k in range(5):
        (i0, l0), (i1, l1) = ranks[0][k], ranks[1][k]
        assert i0.shape[0] == 4
        assert torch.equal(torch.cat([i0, i1]), one[k][0]) and torch.equal(torch.cat([l0, l1]), one[k][1])


def test_epoch_wrap_covers_each_image_once_then_reshuffles(demo_root):
    source = _source(demo_root)
    seen = []
    for k in range(3):
        assert source.state_dict()["epoch"] == 0 and source.state_dict()["batch_in_epoch"] == k
        seen.append(source.next_batch()[0])
    assert source.state_dict()["epoch"] == 1 and source.state_dict()["batch_in_epoch"] == 0
    epoch0 = torch.cat(seen)
    flat = {bytes(x.flatten().tolist()) for x in epoch0}
    assert len(flat) == 24  # every image once (the demo images are all distinct)
    epoch1 = torch.cat([b[0] for b in _take(source, 3)])
    assert not torch.equal(epoch0, epoch1) and {bytes(x.flatten().tolist()) for x in epoch1} == flat


def test_drop_last_drops_the_partial_batch(demo_root):
    source = _source(demo_root, G=10)  # 24 = 2 * 10 + 4
    assert source.steps_per_epoch == 2
    _take(source, 2)
    assert source.state_dict()["epoch"] == 1
    keep = _source(demo_root, G=10, drop_last=False)
    assert keep.steps_per_epoch == 3 and [b[0].shape[0] for b in _take(keep, 4)] == [10, 10, 4, 10]


# ---------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------


def test_resume_mid_epoch_continues_with_the_next_batch(demo_root):
    full = _take(_source(demo_root, seed=3), 7)
    first = _source(demo_root, seed=3)
    _take(first, 4)  # epoch 1, batch 1 next
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON / checkpoint round trip
    assert (state["epoch"], state["batch_in_epoch"], state["seed"]) == (1, 1, 3)
    resumed = _source(demo_root, seed=3)
    resumed.load_state_dict(state)
    _assert_batches_equal(_take(resumed, 3), full[4:])
    # The same position on two ranks: the world size may change across a resume.
    halves = []
    for r in range(2):
        s = _source(demo_root, seed=3, rank=r, world=2)
        s.load_state_dict(state)
        halves.append(_take(s, 3))
    for k in range(3):
        assert torch.equal(torch.cat([halves[0][k][0], halves[1][k][0]]), full[4 + k][0])


def test_load_state_dict_drops_prefetched_batches(demo_root):
    source = _source(demo_root)
    before = source.state_dict()
    want = _take(source, 2)
    source.load_state_dict(before)  # rewind an already-running iterator
    _assert_batches_equal(_take(source, 2), want)


def test_workers_give_the_same_batches(demo_root):
    want = _take(_source(demo_root), 4)
    _assert_batches_equal(_take(_source(demo_root, num_workers=2), 4), want)


def test_load_state_dict_rejects_a_mismatch(demo_root):
    state = _source(demo_root, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _source(demo_root, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        _source(demo_root, G=4).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_in_epoch"):
        _source(demo_root).load_state_dict({"epoch": 0})


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_missing_folder_raises_file_not_found(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        _source(missing)


def test_folder_without_images_raises_value_error(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        _source(str(tmp_path))


def test_global_batch_not_divisible_by_world_size(demo_root):
    with pytest.raises(ValueError, match="global_batch_size=9.*world_size=2"):
        _source(demo_root, G=9, world=2)


def test_fewer_images_than_one_global_batch(demo_root):
    with pytest.raises(ValueError, match="fewer than global_batch_size"):
        _source(demo_root, G=32)
