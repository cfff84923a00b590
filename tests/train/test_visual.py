"""PNG sample grid (PIL) and loss figure (matplotlib): sizes, pixel values, uint8 input, panel plan, smoothing,
NaN/inf and empty series, no matplotlib."""

import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from repae.train.visual import plan_panels, save_image_grid, save_loss_plot, smooth, to_uint8


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


def test_plan_panels_groups_by_family_in_phase_order_and_splits_wide_families():
    flat = [(1, 0.5), (2, 0.4)]
    history = {
        "disc/discriminator_loss": flat, "zeta/loss": flat, "sit/loss": flat, "sit/proj_loss": [(1, -0.3)],
        # vae: spans 4 decades with a signed total -> a linear panel of signed terms and a log panel of positive ones
        "vae/loss": [(1, 0.2), (2, -0.5)], "vae/reconstruction_loss": flat, "vae/kl_loss": [(1, 3e-5), (2, 4e-5)],
        "vae/empty_loss": [], "vae/nan_loss": [(1, float("nan"))],
    }
    got = [(p.title, p.keys, p.yscale) for p in plan_panels(history)]
    assert got == [
        ("sit losses", ("sit/loss", "sit/proj_loss"), "linear"),
        ("vae losses, signed terms", ("vae/empty_loss", "vae/loss", "vae/nan_loss"), "linear"),
        ("vae losses, positive terms (log y)", ("vae/kl_loss", "vae/reconstruction_loss"), "log"),
        ("disc losses", ("disc/discriminator_loss",), "linear"),
        ("zeta losses", ("zeta/loss",), "linear"),
    ]
    only_positive = {"a/x": [(1, 1e-4)], "a/y": [(1, 1.0)]}
    assert [(p.title, p.yscale) for p in plan_panels(only_positive)] == [("a losses (log y)", "log")]


def test_smooth_is_a_debiased_ema():
    v = np.array([1.0, 1.0, 1.0, 5.0])
    np.testing.assert_allclose(smooth(v[:3], 0.9), [1.0, 1.0, 1.0])  # debiased: a constant stays constant
    acc = [0.0]
    for x in v:
        acc.append(0.6 * acc[-1] + 0.4 * x)
    np.testing.assert_allclose(smooth(v, 0.6), [a / (1 - 0.6**t) for t, a in enumerate(acc[1:], start=1)])


def test_loss_plot_size_and_content(tmp_path):
    steps = range(1, 50)
    history = {"sit/loss": [(s, 1.0 / s) for s in steps], "vae/loss": [(s, 0.5 + 0.01 * s) for s in steps]}
    path = save_loss_plot(history, str(tmp_path / "losses.png"), width=6, panel_height=1.5, dpi=100)
    img = _read(path)
    assert img.shape == (300, 600, 3)  # two panels of 6 x 1.5 inches at 100 dpi
    # Both series drew coloured (non-grey) pixels in their own panel.
    coloured = (img.max(axis=2).astype(int) - img.min(axis=2)) > 60
    assert coloured[:150].sum() > 50 and coloured[150:].sum() > 50
    assert _no_temp_files(tmp_path)


def test_loss_plot_tolerates_nan_inf_empty_and_single_points(tmp_path):
    history = {
        "a/x": [(1, float("nan")), (2, 1.0), (3, float("inf")), (4, 0.5), (5, -math.inf)],
        "b/x": [],
        "c/x": [(7, float("nan"))],
        "d/x": [(3, 2.0)],
        "e/x": [(1, 4.0), (2, 4.0)],  # flat
        "f/x": [(s, 1e-3 * s) for s in range(1, 200)],  # smoothed, log y
    }
    path = save_loss_plot(history, str(tmp_path / "l.png"), width=5, panel_height=1.2, dpi=50)
    assert _read(path).shape == (6 * 60, 250, 3)
    empty = save_loss_plot({}, str(tmp_path / "empty.png"), width=5, panel_height=1.2, dpi=50)
    assert _read(empty).shape == (60, 250, 3)
    with pytest.raises(ValueError, match="panel_height"):
        save_loss_plot(history, str(tmp_path / "x.png"), panel_height=0.1)


def test_loss_plot_without_matplotlib_warns_and_goes_on(tmp_path, monkeypatch):
    from repae.train import visual

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `from matplotlib.figure import ...` fails
    visual._warn_no_matplotlib.cache_clear()
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert save_loss_plot({"a/x": [(1, 1.0)]}, str(tmp_path / "l.png")) is None
    assert not os.listdir(tmp_path)
