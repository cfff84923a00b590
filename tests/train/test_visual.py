"""PNG sample grid and loss plot (PIL only): sizes, pixel values, uint8 input, NaN/inf and empty series."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from repae.train.visual import save_image_grid, save_loss_plot, to_uint8


def _read(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.array(img.convert("RGB"))


def _no_temp_files(folder):
    return not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_to_uint8_follows_generate_py():
    """(x + 1) / 2, clamp(255 x, 0, 255), truncating cast: -1 -> 0, 0 -> 127, 1 -> 255, out of range clamped."""
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, float("nan")])
    assert to_uint8(x).tolist() == [0, 0, 127, 191, 255, 255, 0]
    u = torch.tensor([0, 7, 255], dtype=torch.uint8)
    assert torch.equal(to_uint8(u), u)


def test_grid_layout_and_pixels(tmp_path):
    B, H, W, nrow, pad = 5, 2, 3, 3, 1
    images = torch.linspace(-1, 1, B * 3 * H * W).reshape(B, 3, H, W)
    path = str(tmp_path / "sub" / "grid.png")  # the folder is created
    assert save_image_grid(images, path, nrow=nrow, pad=pad) == path
    grid = _read(path)
    assert grid.shape == (2 * (H + pad) + pad, nrow * (W + pad) + pad, 3)  # 2 rows of 3
    want = to_uint8(images).permute(0, 2, 3, 1).numpy()
    mask = np.zeros(grid.shape[:2], bool)
    for i in range(B):
        r, c = divmod(i, nrow)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        np.testing.assert_array_equal(grid[top:top + H, left:left + W], want[i])
        mask[top:top + H, left:left + W] = True
    assert (grid[~mask] == 0).all()  # padding and the empty 6th cell are black
    assert _no_temp_files(tmp_path / "sub")


def test_grid_uint8_input_and_default_columns(tmp_path):
    images = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = save_image_grid(images, str(tmp_path / "u8.png"), pad=0)
    grid = _read(path)
    assert grid.shape == (10, 12, 3)  # ceil(sqrt(4)) = 2 columns, no padding
    np.testing.assert_array_equal(grid[5:, 6:], images[3].permute(1, 2, 0).numpy())
    # A single [3, H, W] image and an overwrite of an existing file.
    save_image_grid(images[0], path, pad=0)
    np.testing.assert_array_equal(_read(path), images[0].permute(1, 2, 0).numpy())


def test_grid_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\[2, 1, 4, 4\]"):
        save_image_grid(torch.zeros(2, 1, 4, 4), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="nrow"):
        save_image_grid(torch.zeros(2, 3, 4, 4), str(tmp_path / "x.png"), nrow=0)


def test_loss_plot_size_and_content(tmp_path):
    steps = range(1, 50)
    history = {"sit/loss": [(s, 1.0 / s) for s in steps], "vae/loss": [(s, 0.5 + 0.01 * s) for s in steps]}
    path = save_loss_plot(history, str(tmp_path / "losses.png"), width=600, panel_height=150)
    img = _read(path)
    assert img.shape == (300, 600, 3)
    # Both series drew coloured (non-grey) pixels in their own panel.
    coloured = (img.max(axis=2).astype(int) - img.min(axis=2)) > 60
    assert coloured[:150].sum() > 50 and coloured[150:].sum() > 50
    assert _no_temp_files(tmp_path)


def test_loss_plot_tolerates_nan_inf_empty_and_single_points(tmp_path):
    history = {
        "a": [(1, float("nan")), (2, 1.0), (3, float("inf")), (4, 0.5), (5, -math.inf)],
        "b": [],
        "c": [(7, float("nan"))],
        "d": [(3, 2.0)],
        "e": [(1, 4.0), (2, 4.0)],  # flat
    }
    path = save_loss_plot(history, str(tmp_path / "l.png"))
    assert _read(path).shape == (5 * 160, 900, 3)
    empty = save_loss_plot({}, str(tmp_path / "empty.png"))
    assert _read(empty).shape == (160, 900, 3)
