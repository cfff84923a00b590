"""A small synthetic image set for the CPU demo and the tests (data.source = "demo"), written atomically.

    write_demo_dataset(root, num_images=64, num_classes=4, resolution=64, seed=0)

Deterministic PNGs in root/class_XX/ (the class-folder layout train/data.py reads): a class-coloured blob on a
class-oriented gradient, so a tiny model has something learnable. The set is written into a sibling temp folder,
DEMO_MARKER last, then renamed onto root; a half-written set never appears at root.
"""

# R resolution

from __future__ import annotations

import json
import os
import re
import shutil
import socket

import numpy as np
from PIL import Image


def _demo_image(rng: np.random.RandomState, label: int, num_classes: int, resolution: int) -> np.ndarray:
    """Smooth RGB image [R, R, 3] uint8: a class-coloured blob on a class-oriented gradient."""
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float64) / max(resolution - 1, 1)
    angle = 2 * np.pi * label / num_classes  # gradient direction encodes the class
    grad = 0.5 + 0.5 * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    hue = label / num_classes  # blob colour encodes the class too; position, size and shade vary per image
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    cy, cx = rng.uniform(0.25, 0.75, size=2)
    radius = rng.uniform(0.12, 0.3)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))[..., None]
    background = grad[..., None] * (0.3 + 0.4 * rng.uniform(size=3))
    img = (1 - blob) * background + blob * colour
    return np.clip(np.round(255 * img), 0, 255).astype(np.uint8)


DEMO_MARKER = ".demo_complete.json"
"""Written last into a demo set (its parameters): a folder without it is never taken as a complete set."""


def _demo_temp_prefix(root: str) -> str:
    return f"{root}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_demo_temps(root: str) -> list[str]:
    """Remove the temp folders of earlier writes of `root` that died half way; returns the removed paths.

    Temp folders are `<root>.tmp-<host>-<pid>` (and `<root>.tmp<pid>` of older versions). One is kept only
    while its writer, another live process on this host, may still be writing it; any other one is stale
    (the writer was killed, or it is this very process after an exception).
    """
    parent, prefix = os.path.dirname(root), os.path.basename(_demo_temp_prefix(root))
    pattern = re.compile(re.escape(prefix) + r"(?:-(?P<host>.+)-)?(?P<pid>\d+)")
    removed = []
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        match = pattern.fullmatch(name)
        if match is None:  # not one of ours: never touched
            continue
        host, pid = match["host"] or socket.gethostname(), int(match["pid"])
        if not (host == socket.gethostname() and pid != os.getpid() and _pid_alive(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    return removed


def _demo_is_complete(root: str, params: dict) -> bool:
    try:
        with open(os.path.join(root, DEMO_MARKER)) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def write_demo_dataset(root: str, num_images: int = 64, num_classes: int = 4, resolution: int = 64,
                       seed: int = 0) -> str:
    """Write `num_images` deterministic PNGs into root/class_XX/ (round-robin over classes); returns root.

    Atomic: the set is written into the sibling `<root>.tmp-<host>-<pid>`, DEMO_MARKER last, and renamed onto
    `root`; a write that fails or is killed half way never leaves a folder at `root`, and stale temp folders are
    removed at the next call, which rebuilds the set. A complete set with the same parameters is kept as it is;
    an existing non-empty `root` that is not one is a ValueError (it is never overwritten).
    """
    if num_images <= 0 or num_classes <= 0 or resolution <= 0:
        raise ValueError(f"write_demo_dataset: num_images={num_images}, num_classes={num_classes}, "
                         f"resolution={resolution} must all be > 0")
    root = os.path.abspath(root)
    params = {"num_images": num_images, "num_classes": num_classes, "resolution": resolution, "seed": seed}
    remove_stale_demo_temps(root)
    if _demo_is_complete(root, params):
        return root
    if os.path.exists(root) and not (os.path.isdir(root) and not os.listdir(root)):
        raise ValueError(f"write_demo_dataset: {root} exists and is not a complete demo set with {params} (no "
                         f"matching {DEMO_MARKER}); remove it or choose another folder")
    target = f"{_demo_temp_prefix(root)}-{socket.gethostname()}-{os.getpid()}"
    try:
        rng = np.random.RandomState(seed)
        for i in range(num_images):
            label = i % num_classes
            folder = os.path.join(target, f"class_{label:02d}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(_demo_image(rng, label, num_classes, resolution)).save(
                os.path.join(folder, f"img_{i:05d}.png"))
        with open(os.path.join(target, DEMO_MARKER), "w") as f:
            json.dump(params, f)
        try:
            os.replace(target, root)  # onto a missing or empty root; a non-empty one raises
        except OSError:
            if not _demo_is_complete(root, params):
                raise
            shutil.rmtree(target)  # another writer won the race: keep its (identical) set
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return root
