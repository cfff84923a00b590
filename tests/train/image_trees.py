"""Test helpers: small image trees of every kind, and transcriptions of the original's preprocessing.py and dataset.py
(its RGB conversion and ADM crop, its HDF5 writer, its HDF5 reader), the oracles of the crop and layout tests.

The transcriptions follow the original's code step by step (docs/METHOD.md#data-preprocessing) and live only here."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------
# The original's read_image + center_crop_arr (an array in, an array out) and its PNG encode
# ---------------------------------------------------------------------------------------------------


def original_read_image(path) -> np.ndarray:
    """preprocessing.py: read_image: PIL open, convert("RGB"), to an (H, W, 3) uint8 array."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def original_center_crop_arr(image_arr: np.ndarray, image_size: int) -> np.ndarray:
    """utils.py: center_crop_arr: from the array back to PIL, BOX halvings, BICUBIC to the short side, centre crop."""
    pil_image = Image.fromarray(image_arr)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def original_crop(path, image_size: int) -> np.ndarray:
    """The original's (H, W, 3) crop of one file: read_image, then center_crop_arr."""
    return original_center_crop_arr(original_read_image(path), image_size)


def original_png(arr_HW3: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr_HW3).save(out, format="PNG", compress_level=0, optimize=False)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------
# The original's HDF5 writer and reader
# ---------------------------------------------------------------------------------------------------


def write_original_h5(files: list[tuple[str, int]], out_dir: str, image_size: int) -> None:
    """preprocessing.py's main: image idx of `files` (path, label) at f"{s[:5]}/img{s}.png", groups made one by one,
    each entry np.array(bytes, dtype="S"); dataset.json {"labels": [[key, label], ...]}; the sidecar lists every
    name that h5py's visititems meets."""
    import h5py

    def create_dataset_in_group(h5file, full_path, data):
        parts = full_path.strip("/").split("/")
        grp = h5file
        for part in parts[:-1]:
            grp = grp[part] if part in grp else grp.create_group(part)
        grp.create_dataset(parts[-1], data=np.array(data, dtype="S"))

    os.makedirs(out_dir, exist_ok=True)
    metadata = []
    with h5py.File(os.path.join(out_dir, "images.h5"), "w") as h5f:
        for idx, (path, label) in enumerate(files):
            idx_str = f"{idx:08d}"
            arcname = os.path.join(idx_str[:5], f"img{idx_str}.png")
            create_dataset_in_group(h5f, arcname, original_png(original_crop(path, image_size)))
            metadata.append([arcname, label])
        create_dataset_in_group(h5f, "dataset.json", json.dumps({"labels": metadata}).encode("utf-8"))
    names = []
    with h5py.File(os.path.join(out_dir, "images.h5"), "r") as h5f:
        h5f.visititems(lambda name, obj: names.append(name))
    with open(os.path.join(out_dir, "images_h5.json"), "w") as f:
        json.dump(names, f, indent=2)


def original_h5_items(data_dir: str) -> list[tuple[str, np.ndarray, int]]:
    """dataset.py: CustomINH5Dataset: (key, uint8 (C, H, W), label) of each image, in its index order."""
    import h5py

    Image.init()
    supported_ext = Image.EXTENSION.keys() | {".npy"}
    with open(os.path.join(data_dir, "images_h5.json")) as f:
        h5_json = json.load(f)
    with h5py.File(os.path.join(data_dir, "images.h5"), "r") as hf:
        filelist = sorted(n for n in set(h5_json) if os.path.splitext(n)[1].lower() in supported_ext)
        labels = dict(json.loads(np.array(hf["dataset.json"]).tobytes().decode("utf-8"))["labels"])
        items = []
        for fname in filelist:
            rtn = np.array(Image.open(io.BytesIO(np.array(hf[fname]))))
            items.append((fname, rtn.reshape(*rtn.shape[:2], -1).transpose(2, 0, 1), int(labels[fname])))
    return items


# ---------------------------------------------------------------------------------------------------
# Trees
# ---------------------------------------------------------------------------------------------------


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth (H, W, 3) uint8 picture with some noise (the resize filters see real structure)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(7 * xx + seed), np.cos(5 * yy - seed), np.sin(3 * (xx + yy))], -1)
    return np.clip(127.5 + 100 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def save_kind(path: str, kind: str, w: int, h: int, seed: int) -> None:
    """One 8-bit file of `kind`: rgb / jpeg / grey / palette / rgba / la / cmyk / bilevel."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = Image.fromarray(_pattern(h, w, seed))
    img = {"rgb": rgb, "jpeg": rgb, "grey": rgb.convert("L"), "palette": rgb.convert("P"),
           "rgba": Image.merge("RGBA", (*rgb.split(), rgb.convert("L"))), "la": rgb.convert("LA"),
           "cmyk": rgb.convert("CMYK"), "bilevel": rgb.convert("1")}[kind]
    img.save(path, **({"quality": 95} if path.endswith(".jpg") else {}))


TREE = [  # (relpath, kind, width, height): three classes, every 8-bit kind, small and large, portrait and landscape
    ("ant/a0.png", "rgb", 32, 32), ("ant/a1.jpg", "jpeg", 97, 41), ("ant/a2.png", "grey", 41, 97),
    ("ant/a3.png", "palette", 20, 13), ("bee/b0.jpg", "cmyk", 130, 70), ("bee/b1.png", "rgba", 13, 20),
    ("bee/b2.png", "la", 64, 64), ("bee/b3.png", "bilevel", 70, 140), ("cat/c0.jpg", "jpeg", 63, 200),
    ("cat/c1.png", "rgb", 200, 63), ("cat/c2.png", "rgba", 45, 45), ("cat/c3.jpg", "jpeg", 33, 31),
]


def write_tree(root: str) -> list[tuple[str, int]]:
    """TREE under root; returns (path, label) in the folder source's order (sorted relpaths, sorted class folders)."""
    for k, (rel, kind, w, h) in enumerate(TREE):
        save_kind(os.path.join(root, rel), kind, w, h, seed=k)
    classes = sorted({rel.split("/")[0] for rel, *_ in TREE})
    return [(os.path.join(root, rel), classes.index(rel.split("/")[0])) for rel in sorted(r for r, *_ in TREE)]


def write_png16(path, arr_HWC: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB / grey+alpha): big-endian samples, filter 0."""
    h, w = arr_HWC.shape[:2]
    rows = b"".join(b"\x00" + arr_HWC[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                           + chunk(b"IEND", b""))
