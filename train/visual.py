"""Pictures of a run: a PNG grid of samples (PIL) and a PNG of the loss curves (matplotlib, Agg).

    save_image_grid(images_B3HW, "run/samples/step0010000.png")          # floats in [-1, 1] or uint8
    save_loss_plot({"sit/loss": [(1, 0.9), (2, 0.8)]}, "run/losses.png")

Both write `path` atomically (a temp file in the same folder, then os.replace), so a crash or a reader never
sees half a PNG. Holds: pixel conversion (docs/METHOD.md#sampling), grid layout, the loss figure. Must not hold model,
sampling or training code. The grid is drawn here rather than with torchvision's make_grid: the same layout in
a few lines, tested pixel for pixel, and no torchvision import in the trainer.
"""

# B batch, H W image height and width

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


def _write_atomic(path: str, write) -> None:
    """write(file object) into a per-process temp file in path's folder, then os.replace (atomic on POSIX)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only when writing or replacing failed
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------
# Sample grid
# ---------------------------------------------------------------------------------------------------


def to_uint8(images_B3HW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 as the original generate.py: (x + 1) / 2, clamp(255 x, 0, 255), truncate.

    uint8 input passes through unchanged.
    """
    if images_B3HW.dtype == torch.uint8:
        return images_B3HW.detach().cpu()
    if not images_B3HW.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1] or uint8, got {images_B3HW.dtype}")
    x = (images_B3HW.detach().float().cpu() + 1) / 2
    # NaN would cast to an arbitrary byte: draw it black.
    return torch.clamp(torch.nan_to_num(255.0 * x, nan=0.0), 0, 255).to(torch.uint8)


def save_image_grid(images_B3HW: torch.Tensor, path: str, nrow: int | None = None, pad: int = 2) -> str:
    """Images as a grid of `nrow` columns (default ceil(sqrt(B))) with `pad` black pixels around each; returns path.

    The PNG is (rows * (H + pad) + pad) x (nrow * (W + pad) + pad), rows = ceil(B / nrow), like torchvision's
    make_grid. A single [3, H, W] image is taken as B = 1.
    """
    if images_B3HW.dim() == 3:
        images_B3HW = images_B3HW.unsqueeze(0)
    if images_B3HW.dim() != 4 or images_B3HW.shape[1] != 3 or images_B3HW.shape[0] == 0:
        raise ValueError(f"save_image_grid: images must be [B>0, 3, H, W], got {list(images_B3HW.shape)}")
    if nrow is not None and nrow < 1:
        raise ValueError(f"save_image_grid: nrow must be >= 1, got {nrow}")
    if pad < 0:
        raise ValueError(f"save_image_grid: pad must be >= 0, got {pad}")
    x_BHW3 = to_uint8(images_B3HW).permute(0, 2, 3, 1).numpy()
    B, H, W, _ = x_BHW3.shape
    nrow = min(nrow or math.ceil(math.sqrt(B)), B)
    rows = math.ceil(B / nrow)
    grid = np.zeros((rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[top:top + H, left:left + W] = x_BHW3[i]
    _write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    return path


# ---------------------------------------------------------------------------------------------------
# Loss curves (matplotlib, Agg backend)
# ---------------------------------------------------------------------------------------------------

LOG_SPAN = 100.0
"""A family whose positive terms (series with every finite value > 0) span more than this ratio (max / min) is
drawn with those terms on a log y axis (e.g. reconstruction, perceptual, KL) and its other terms (the total VAE loss
with its negative alignment term) on a linear axis of their own, so no term is flattened to a line."""
FAMILY_ORDER = ("sit", "vae", "disc")
"""Panels in the order of the step's phases; other families follow, sorted."""


@dataclass(frozen=True)
class Panel:
    """One panel of the loss figure: series of one family (the part of the key before '/') and their y scale."""

    title: str
    keys: tuple[str, ...]
    yscale: str  # "linear" or "log"


def _finite(series) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([s for s, _ in series], dtype=np.float64)
    values = np.array([v for _, v in series], dtype=np.float64)
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def plan_panels(history: dict[str, list[tuple[int, float]]]) -> list[Panel]:
    """Group the series by family and choose the y scale from their finite values (see LOG_SPAN)."""
    families: dict[str, list[str]] = {}
    for key in sorted(history):
        families.setdefault(key.split("/")[0], []).append(key)
    order = [f for f in FAMILY_ORDER if f in families] + sorted(set(families) - set(FAMILY_ORDER))
    panels = []
    for family in order:
        keys = families[family]
        values = {k: _finite(history[k])[1] for k in keys}
        positive = tuple(k for k in keys if values[k].size and (values[k] > 0).all())
        signed = tuple(k for k in keys if k not in positive)
        pos = np.concatenate([values[k] for k in positive] or [np.ones(1)])
        if pos.max() / pos.min() <= LOG_SPAN:  # a signed series near 0 alone never asks for a log axis
            panels.append(Panel(f"{family} losses", tuple(keys), "linear"))
            continue
        if signed:
            panels.append(Panel(f"{family} losses" + (", signed terms" if positive else ""), signed, "linear"))
        if positive:
            panels.append(Panel(f"{family} losses" + (", positive terms" if signed else "") + " (log y)", positive,
                                "log"))
    return panels


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing): s_t = w s_{t-1} + (1 - w) v_t, / (1 - w^t)."""
    out, acc = np.empty_like(values), 0.0
    for t, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out[t - 1] = acc / (1 - weight**t)
    return out


def save_loss_plot(history: dict[str, list[tuple[int, float]]], path: str, width: float = 10.0,
                   panel_height: float = 3.0, dpi: int = 100) -> str | None:
    """One panel per loss family (sit, vae, disc, ...; two where plan_panels splits one), stacked; returns path.

    Each series is drawn raw (thin, faint) and, from 10 points on, smoothed (debiased EMA, weight 0.9 from 100
    points, else 0.6). The y axis is log where a family's positive terms span more than LOG_SPAN (plan_panels).
    NaN/inf points are left out and counted in the legend. The PNG is width x (panels * panel_height) inches at dpi.
    Returns None (and warns once) when matplotlib is not installed: the run goes on without the figure.
    """
    if width < 2 or panel_height < 1 or dpi < 10:
        raise ValueError(f"save_loss_plot: width={width} in must be >= 2, panel_height={panel_height} in >= 1, "
                         f"dpi={dpi} >= 10")
    try:  # the object API draws with Agg by itself: no pyplot, no global backend change, no display
        from matplotlib.figure import Figure
    except ImportError:
        _warn_no_matplotlib()
        return None
    panels = plan_panels(history)
    fig = Figure(figsize=(width, panel_height * max(1, len(panels))), dpi=dpi, layout="constrained")
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, panel in zip(axes, panels):
        for i, key in enumerate(panel.keys):
            steps, values = _finite(history[key])
            skipped = len(history[key]) - len(values)
            label = key.split("/", 1)[-1] + (f" ({skipped} non-finite left out)" if skipped else "")
            colour = f"C{i % 10}"
            if len(values) >= 10:
                ax.plot(steps, values, color=colour, linewidth=0.8, alpha=0.3)
                ax.plot(steps, smooth(values, 0.9 if len(values) >= 100 else 0.6), color=colour, linewidth=1.6,
                        label=label)
            else:
                ax.plot(steps, values, color=colour, linewidth=1.4, marker="o", markersize=3, label=label)
        ax.set_yscale(panel.yscale)
        ax.set_title(panel.title, loc="left", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize=8, ncols=2 if len(panel.keys) > 4 else 1, framealpha=0.8)
    _write_atomic(path, lambda f: fig.savefig(f, format="png"))
    return path


@functools.cache
def _warn_no_matplotlib() -> None:
    warnings.warn("matplotlib is not installed: no loss figure (pip install matplotlib)", stacklevel=3)
