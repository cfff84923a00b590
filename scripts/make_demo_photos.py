"""Build train/assets/demo_photos (the real photographs of the demo run) from public-domain / CC0 photographs that
scikit-image and matplotlib ship inside their wheels. Run once; its output is committed.

    pip download --no-deps -d /tmp/wheels scikit-image matplotlib
    python scripts/make_demo_photos.py /tmp/wheels/scikit_image-*.whl /tmp/wheels/matplotlib-*.whl

Four classes, 12 JPEGs each: seeded crops of the sources at several sizes and aspect ratios (portrait,
landscape, some smaller than 256 px), one greyscale photograph among them. The licence of every source is in
train/assets/demo_photos/LICENSE.md.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train", "assets", "demo_photos")
CLASSES = {  # class folder -> [(wheel member, crops)]
    "class_00_people": [("skimage/data/astronaut.png", 5), ("matplotlib/mpl-data/sample_data/grace_hopper.jpg", 4),
                        ("skimage/data/camera.png", 3)],
    "class_01_cat": [("skimage/data/chelsea.png", 12)],
    "class_02_coffee": [("skimage/data/coffee.png", 12)],
    "class_03_space": [("skimage/data/rocket.jpg", 6), ("skimage/data/hubble_deep_field.jpg", 6)],
}


def read_member(wheels: list[str], member: str) -> Image.Image:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            if member in z.namelist():
                return Image.open(io.BytesIO(z.read(member))).copy()
    raise FileNotFoundError(f"{member} is in none of {wheels}")


def crops(img: Image.Image, n: int, rng: np.random.RandomState) -> list[Image.Image]:
    """n crops: a random box of 45-95 % of each side, then scaled so its long side is 180-320 px."""
    W, H = img.size
    out = []
    for _ in range(n):
        w, h = int(W * rng.uniform(0.45, 0.95)), int(H * rng.uniform(0.45, 0.95))
        x, y = rng.randint(0, W - w + 1), rng.randint(0, H - h + 1)
        box = img.crop((x, y, x + w, y + h))
        scale = rng.uniform(180, 320) / max(w, h)
        out.append(box.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC))
    return out


def main(wheels: list[str]) -> None:
    rng = np.random.RandomState(0)
    for cls, sources in CLASSES.items():
        folder = os.path.join(OUT, cls)
        os.makedirs(folder, exist_ok=True)
        i = 0
        for member, n in sources:
            img = read_member(wheels, member)
            img = img.convert("L") if img.mode in ("L", "I;16", "I") else img.convert("RGB")
            for crop in crops(img, n, rng):
                name = f"{os.path.splitext(os.path.basename(member))[0]}_{i:02d}.jpg"
                crop.save(os.path.join(folder, name), quality=88, optimize=True)
                i += 1


if __name__ == "__main__":
    main(sys.argv[1:])
