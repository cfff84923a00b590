"""Pictures of a run, drawn with PIL only: a PNG grid of samples and a PNG of the loss curves.

    save_image_grid(images_B3HW, "run/samples/step0010000.png")          # floats in [-1, 1] or uint8
    save_loss_plot({"sit/loss": [(1, 0.9), (2, 0.8)]}, "run/losses.png")

Both write `path` atomically (a temp file in the same folder, then os.replace), so a crash or a reader never
sees half a PNG. Holds: pixel conversion (spec sec. 6.3), grid layout, the line plot. Must not hold model,
sampling or training code, nor depend on matplotlib/torchvision.
"""

# B batch, H W image height and width

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _save_png(image: Image.Image, path: str) -> None:
    """PNG to `path` via a per-process temp file in the same folder and os.replace (atomic on POSIX)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only when save or replace failed
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
    _save_png(Image.fromarray(grid), path)
    return path


# ---------------------------------------------------------------------------------------------------
# Loss curves
# ---------------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _draw_panel(draw: ImageDraw.ImageDraw, font, key: str, series: list[tuple[int, float]], box: tuple[int, ...],
                colour: tuple[int, int, int]) -> None:
    """One series in `box` = (x0, y0, x1, y1): title, frame, y min/max, x step ticks, the polyline."""
    x0, y0, x1, y1 = box
    pts = [(int(s), float(v)) for s, v in series if math.isfinite(float(v))]
    skipped = len(series) - len(pts)
    title = key + (f"   ({skipped} non-finite point{'s' * (skipped != 1)} skipped)" if skipped else "")
    draw.text((x0, y0 + 2), title, fill="black", font=font)
    left, top, right, bottom = x0 + 64, y0 + 18, x1 - 12, y1 - 28  # plot area inside the panel
    draw.rectangle((left, top, right, bottom), outline=(170, 170, 170))
    if not pts:
        draw.text((left + 8, top + 8), "no finite values", fill=(120, 120, 120), font=font)
        return
    s_lo, s_hi = min(s for s, _ in pts), max(s for s, _ in pts)
    v_lo, v_hi = min(v for _, v in pts), max(v for _, v in pts)
    if s_hi == s_lo:
        s_hi = s_lo + 1
    if v_hi == v_lo:  # flat series: centre it in a band of +-5% (or +-1 around 0)
        half = 0.05 * abs(v_lo) or 1.0
        v_lo, v_hi = v_lo - half, v_hi + half

    def xy(s: float, v: float) -> tuple[float, float]:
        px = left + (s - s_lo) / (s_hi - s_lo) * (right - left)
        return px, bottom - (v - v_lo) / (v_hi - v_lo) * (bottom - top)

    # y axis: max at the top, min at the bottom; x axis: 5 step ticks and the axis name.
    draw.text((x0 + 2, top), _fmt(v_hi), fill="black", font=font)
    draw.text((x0 + 2, bottom - 10), _fmt(v_lo), fill="black", font=font)
    for k in range(5):
        s = s_lo + (s_hi - s_lo) * k / 4
        px = xy(s, v_lo)[0]
        draw.line((px, bottom, px, bottom + 3), fill=(120, 120, 120))
        label = str(round(s))
        draw.text((min(max(px - 3 * len(label), x0), x1 - 6 * len(label)), bottom + 5), label, fill="black",
                  font=font)
    draw.text(((left + right) // 2 - 12, bottom + 15), "step", fill=(90, 90, 90), font=font)
    line = [xy(s, v) for s, v in sorted(pts)]
    if len(line) == 1:
        (px, py), r = line[0], 2
        draw.ellipse((px - r, py - r, px + r, py + r), fill=colour)
    else:
        draw.line(line, fill=colour, width=2)


def save_loss_plot(history: dict[str, list[tuple[int, float]]], path: str, width: int = 900,
                   panel_height: int = 160) -> str:
    """One panel per key (sorted), stacked: value against step; returns path.

    The PNG is width x (max(1, len(history)) * panel_height). NaN/inf points are skipped (the title counts
    them); an empty or all-non-finite series gets an empty panel; an empty history one "no data" panel.
    """
    if width < 160 or panel_height < 80:
        raise ValueError(f"save_loss_plot: width={width} must be >= 160 and panel_height={panel_height} >= 80")
    keys = sorted(history)
    image = Image.new("RGB", (width, max(1, len(keys)) * panel_height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    if not keys:
        draw.text((10, 10), "no data yet", fill="black", font=font)
    for i, key in enumerate(keys):
        box = (0, i * panel_height, width, (i + 1) * panel_height)
        _draw_panel(draw, font, key, list(history[key]), box, PALETTE[i % len(PALETTE)])
    _save_png(image, path)
    return path
