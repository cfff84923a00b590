"""The CPU crop (train/data.py: load_image) equals the original's crop bit for bit: a transcription of its read_image +
center_crop_arr (tests/train/image_trees.py) over generated images of every 8-bit kind and size class, and over the
shipped demo photographs; 16-bit files follow the documented high-byte rule instead of the original's clipping."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from image_trees import original_center_crop_arr, original_crop, save_kind, write_png16
from PIL import Image

from repae.train.data import load_image
from repae.train.sources import DEMO_PHOTOS

SIZES = {  # (width, height) against R = 32
    "smaller": (20, 13), "smaller-portrait": (13, 27), "exact": (32, 32), "portrait": (41, 97),
    "landscape": (97, 41), "twice": (64, 64), "just-under-twice": (63, 200), "halved-twice": (300, 130),
}
KINDS = ("rgb", "jpeg", "grey", "palette", "rgba", "la", "cmyk", "bilevel")


def _hwc(image_3RR: torch.Tensor) -> np.ndarray:
    return image_3RR.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", list(SIZES))
def test_crop_equals_the_original_bit_for_bit(tmp_path, kind, size):
    w, h = SIZES[size]
    path = str(tmp_path / f"x.{'jpg' if kind in ('jpeg', 'cmyk') else 'png'}")
    save_kind(path, kind, w, h, seed=w * h)
    got_3RR = load_image(path, 32)
    assert got_3RR.dtype == torch.uint8 and got_3RR.shape == (3, 32, 32)
    np.testing.assert_array_equal(_hwc(got_3RR), original_crop(path, 32))


def test_cmyk_and_alpha_files_are_what_the_test_meant():
    """The kinds above are real: PIL opens the saved files in the modes they stand for."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for kind, mode in [("cmyk", "CMYK"), ("rgba", "RGBA"), ("la", "LA"), ("palette", "P"), ("bilevel", "1")]:
            path = os.path.join(d, f"{kind}.{'jpg' if kind == 'cmyk' else 'png'}")
            save_kind(path, kind, 40, 30, seed=1)
            assert Image.open(path).mode == mode


@pytest.mark.parametrize("resolution", [64, 256])
def test_shipped_photos_crop_like_the_original(resolution):
    paths = sorted(glob.glob(os.path.join(DEMO_PHOTOS, "*", "*.jpg")))
    assert len(paths) == 48
    for path in paths:  # 256: all photos are smaller than 2R (no halving), some smaller than R (upsampled)
        np.testing.assert_array_equal(_hwc(load_image(path, resolution)), original_crop(path, resolution),
                                      err_msg=path)


@pytest.mark.parametrize("size", ["smaller", "portrait", "halved-twice"])
def test_16bit_pngs_crop_the_high_byte(tmp_path, size):
    """16-bit RGB: PIL itself keeps the high byte, so the crop equals the original's. 16-bit grey: the original's
    convert("RGB") saturates (docs/METHOD.md#deviations-from-the-original-code); ours crops the high byte, i.e. the
    original's crop of the 8-bit image v >> 8."""
    w, h = SIZES[size]
    rng = np.random.RandomState(w)
    rgb48 = (rng.randint(0, 256, (h, w, 3)) * 257 + rng.randint(0, 256, (h, w, 3))).astype(np.uint16)
    write_png16(tmp_path / "rgb48.png", rgb48, 2)
    np.testing.assert_array_equal(_hwc(load_image(str(tmp_path / "rgb48.png"), 32)),
                                  original_crop(str(tmp_path / "rgb48.png"), 32))
    np.testing.assert_array_equal(_hwc(load_image(str(tmp_path / "rgb48.png"), 32)),
                                  original_center_crop_arr((rgb48 >> 8).astype(np.uint8), 32))

    grey16 = rgb48[..., 0]
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    high_RR3 = np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1)
    got = _hwc(load_image(str(tmp_path / "grey16.png"), 32))
    np.testing.assert_array_equal(got, original_center_crop_arr(high_RR3, 32))
    assert original_crop(str(tmp_path / "grey16.png"), 32).mean() > got.mean() + 60  # the original's saturation
