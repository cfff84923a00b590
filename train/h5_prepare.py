"""`dataset_tool prepare`: the reference crop of an image tree written in the original's HDF5 layout.

    prepare("/data/imagenet/train", "/data/in256", resolution=256, workers=16)   # -> /data/in256/images.h5 + sidecar

The layout is train/h5_data.py's (docs/METHOD.md#data-preprocessing): image idx of the input list at key
image_key(idx), the PNG (8-bit RGB, compress_level=0, as the original's preprocessing.py encodes it) of
train/data.py's reference crop (to_rgb, center_crop_arr), dataset.json with the labels in index order, and the
images_h5.json sidecar. The same file feeds this trainer (data.source=h5) and the original's dataset.py.

- Input: --file-list when given, else the clean list of `dataset_tool check` beside the tree
  (<root>-check/clean_list.txt) when it exists, else the scanned tree with the folder source's labels. Image idx is
  the position in that list, so with a clean list the h5 holds the folder source's images in its order.
- Multi-process: a pool of `workers` processes decodes, crops and encodes; the parent writes in index order.
- Resumable: the work goes into OUT_DIR/.prepare/part-KKKKK.h5 files of `shard_size` images, each written to a
  temp name and renamed when complete; a killed run starts again at the first missing part. The final file is
  assembled from the parts into a temp file and renamed onto images.h5, the sidecar and prepare_report.json
  after it, then the parts are removed: a complete images.h5 or none, never a half-written one.
- Deterministic: the same input gives the same bytes (worker count and interruptions included).
- An input file that does not decode is left out (its key stays unused, which the original's reader allows) and
  listed in prepare_report.json; run `dataset_tool check` first to have none.
"""

# R resolution; in formulas n images

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil

import numpy as np
from PIL import Image

from .data import list_images, load_image
from .h5_data import H5_FILE, H5_INDEX_FILE, LABELS_KEY, image_key, import_h5py, is_image_key
from .loader import failure_reason
from .sources import default_clean_list

WORK_DIR, REPORT_FILE, FORMAT = ".prepare", "prepare_report.json", 1
DEFAULT_SHARD_SIZE = 4096


def encode_png(arr_RR3: np.ndarray) -> bytes:
    """uint8 [R, R, 3] -> PNG bytes as the original encodes them (PIL, compress_level=0, no optimize)."""
    buf = io.BytesIO()
    Image.fromarray(arr_RR3).save(buf, format="PNG", compress_level=0, optimize=False)
    return buf.getvalue()


def _encode_one(task: tuple[str, int]) -> tuple[bytes | None, str]:
    """(path, R) -> (PNG of the reference crop, "") or (None, reason) for a file that does not decode."""
    path, resolution = task
    try:
        image_3RR = load_image(path, resolution)
    # Any failure of one file's decode is that file's fault (see train/loader.py: ReplacingDataset).
    except Exception as err:  # noqa: BLE001
        return None, failure_reason(err)
    return encode_png(image_3RR.permute(1, 2, 0).numpy()), ""


def _put(h5file, key: str, data) -> None:
    """One entry as the original stores it: a 0-d fixed-length byte string (groups made on the way)."""
    h5file.create_dataset(key, data=np.array(data, dtype="S"))


def _input_list(root: str, file_list: str | None, log) -> tuple[list[str], list[int], str]:
    if file_list is None and os.path.isfile(default_clean_list(root)):
        file_list = default_clean_list(root)
    relpaths, labels, label_source = list_images(root, file_list)
    log(f"prepare: {len(relpaths)} images of {root} (labels: {label_source})")
    return relpaths, labels, label_source


def _check_resumable(out_dir: str, params: dict) -> bool:
    """True when OUT_DIR already holds the finished result of `params`; ValueError when it holds something else."""
    work, report = os.path.join(out_dir, WORK_DIR), os.path.join(out_dir, REPORT_FILE)
    if os.path.isfile(os.path.join(work, "params.json")):
        with open(os.path.join(work, "params.json")) as f:
            old = json.load(f)
        if old != params:
            diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
            raise ValueError(f"{work} holds an unfinished prepare of other input or settings ({', '.join(diff)} "
                             f"differ); remove it to start over, or rerun with the same arguments")
        return False
    if os.path.isfile(report):
        with open(report) as f:
            if json.load(f).get("params") == params:
                return True
    if os.path.exists(os.path.join(out_dir, H5_FILE)):
        raise ValueError(f"{out_dir} already holds an {H5_FILE} of other input or settings; remove it or choose "
                         f"another OUT_DIR")
    return False


def _write_parts(tasks: list[tuple[str, int]], work: str, shard_size: int, workers: int) -> None:
    """Every missing part-KKKKK.h5 of `shard_size` images, in order, each renamed into place when complete."""
    from tqdm import tqdm

    h5py = import_h5py()
    num_parts = -(-len(tasks) // shard_size)
    todo = [k for k in range(num_parts) if not os.path.isfile(os.path.join(work, f"part-{k:05d}.h5"))]
    done = len(tasks) - sum(len(tasks[k * shard_size:(k + 1) * shard_size]) for k in todo)
    pool = multiprocessing.Pool(workers) if workers > 1 and todo else None
    try:
        with tqdm(total=len(tasks), initial=done, desc="prepare", unit="img", dynamic_ncols=True) as bar:
            for k in todo:
                lo = k * shard_size
                chunk = tasks[lo:lo + shard_size]
                results = pool.imap(_encode_one, chunk, chunksize=8) if pool else map(_encode_one, chunk)
                tmp, skipped = os.path.join(work, f"part-{k:05d}.h5.tmp"), []
                with h5py.File(tmp, "w") as part:
                    for idx, (png, reason) in enumerate(results, lo):
                        if png is None:
                            skipped.append([idx, reason])
                        else:
                            _put(part, image_key(idx), png)
                        bar.update(1)
                    part.attrs["skipped"] = json.dumps(skipped)
                os.replace(tmp, os.path.join(work, f"part-{k:05d}.h5"))
    finally:
        if pool is not None:
            pool.terminate()


def _assemble(work: str, out_dir: str, num_parts: int, labels: list[int]) -> list:
    """images.h5 and images_h5.json from the parts (temp files renamed into place); returns the skipped [idx, why]."""
    h5py = import_h5py()
    tmp_h5, tmp_index = (os.path.join(out_dir, f"{name}.tmp") for name in (H5_FILE, H5_INDEX_FILE))
    table, skipped = [], []
    with h5py.File(tmp_h5, "w") as out:
        for k in range(num_parts):
            with h5py.File(os.path.join(work, f"part-{k:05d}.h5"), "r") as part:
                names = []
                part.visit(names.append)
                for key in sorted(n for n in names if is_image_key(n)):
                    out.create_dataset(key, data=np.asarray(part[key]))
                    table.append([key, labels[int(key[-12:-4])]])
                skipped += json.loads(part.attrs["skipped"])
        _put(out, LABELS_KEY, json.dumps({"labels": table}).encode("utf-8"))
        names = []
        out.visititems(lambda name, _obj: names.append(name))
    with open(tmp_index, "w") as f:
        json.dump(names, f, indent=2)
    os.replace(tmp_h5, os.path.join(out_dir, H5_FILE))
    os.replace(tmp_index, os.path.join(out_dir, H5_INDEX_FILE))
    return skipped


def prepare(root: str, out_dir: str, *, resolution: int, workers: int = 1, file_list: str | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE, log=print) -> dict:
    """Write out_dir/images.h5 + images_h5.json (+ prepare_report.json) from the tree at root; returns the report."""
    if resolution <= 0 or shard_size <= 0 or workers < 1:
        raise ValueError(f"--resolution ({resolution}), --shard-size ({shard_size}) and --workers ({workers}) "
                         f"must be >= 1")
    import_h5py()
    relpaths, labels, label_source = _input_list(root, file_list, log)
    listing = "".join(f"{p}\t{label}\n" for p, label in zip(relpaths, labels)).encode()
    params = {"format": FORMAT, "resolution": resolution, "num_files": len(relpaths), "shard_size": shard_size,
              "list_sha1": hashlib.sha1(listing).hexdigest()}
    os.makedirs(out_dir, exist_ok=True)
    if _check_resumable(out_dir, params):
        log(f"prepare: {out_dir} already holds this result ({REPORT_FILE}); nothing to do")
        with open(os.path.join(out_dir, REPORT_FILE)) as f:
            return json.load(f)
    work = os.path.join(out_dir, WORK_DIR)
    if not os.path.isfile(os.path.join(work, "params.json")):  # a fresh start (or one killed before its first part)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        with open(os.path.join(work, "params.json.tmp"), "w") as f:
            json.dump(params, f)
        os.replace(os.path.join(work, "params.json.tmp"), os.path.join(work, "params.json"))
    tasks = [(os.path.join(root, p), resolution) for p in relpaths]
    _write_parts(tasks, work, shard_size, workers)
    skipped = _assemble(work, out_dir, -(-len(tasks) // shard_size), labels)
    report = {"root": os.path.abspath(root), "label_source": label_source, "params": params,
              "num_written": len(tasks) - len(skipped),
              "skipped": [{"index": i, "path": relpaths[i], "reason": why} for i, why in skipped]}
    with open(os.path.join(out_dir, f"{REPORT_FILE}.tmp"), "w") as f:
        json.dump(report, f, indent=1)
    os.replace(os.path.join(out_dir, f"{REPORT_FILE}.tmp"), os.path.join(out_dir, REPORT_FILE))
    shutil.rmtree(work)
    log(f"prepare: wrote {report['num_written']} images to {os.path.join(out_dir, H5_FILE)} (+ {H5_INDEX_FILE})"
        + (f"; {len(skipped)} unreadable files left out, listed in {REPORT_FILE}" if skipped else ""))
    return report
