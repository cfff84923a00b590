"""Checking and converting a training image tree.

    python -m repae.train.dataset_tool check ROOT [--out DIR] [--min-side 64] [--workers N] [--drop-tiny]
    python -m repae.train.dataset_tool prepare ROOT OUT_DIR --resolution 256 [--workers N] [--file-list F]

check: decodes every image of the tree (the files and labels the folder source reads: train/data.py) in worker
processes with a progress bar, and sorts each file into one kind:
- excluded from the clean list: `zero-byte` (an empty file), `truncated` (the data ends early), `unreadable`
  (not an image, a corrupt header or corrupt compressed data, a decode that fails for any other reason);
- kept, but counted and listed (each is one the loaders convert exactly as the reference does, train/data.py:
  to_rgb): `greyscale` (L, 1, LA, 16-bit grey), `palette` (P, PA), `cmyk`, `16-bit` (16 bits per sample, high
  byte kept), `alpha` (an alpha channel or a transparent colour; alpha is dropped), `other-mode` (another PIL
  mode, converted by PIL), `format-mismatch` (e.g. a PNG named .JPEG: decoded by its content), and `tiny`
  (short side < --min-side: the reference crop upsamples it; --drop-tiny excludes these too).
It writes DIR/clean_list.txt (`relpath<TAB>label` lines in the folder source's order and labels, which the
trainer reads by itself when DIR is the default <root>-check/: train/sources.py) and DIR/report.json, and prints a
one-screen summary.

prepare: the reference crop of the tree in the original's HDF5 layout (train/h5_prepare.py, train/h5_data.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections import Counter

from PIL import Image

from .data import WIDE_INT_MODES, scan_with_label_source, to_rgb
from .loader import failure_reason
from .sources import default_clean_list

EXCLUDED_KINDS = ("zero-byte", "truncated", "unreadable")
KEPT_KINDS = ("greyscale", "palette", "cmyk", "16-bit", "alpha", "other-mode", "format-mismatch", "tiny")
_GREY_MODES = ("L", "1", "LA", "La", *WIDE_INT_MODES)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _png_bit_depth(path: str) -> int:
    """The bit depth of a PNG's IHDR (0 for another format): PIL opens 16-bit RGB(A) PNGs as 8-bit modes."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head.startswith(b"\x89PNG\r\n\x1a\n") else 0


def classify(path: str, min_side: int) -> tuple[str | None, list[str], str]:
    """(excluded kind or None, kept kinds, detail) of one file; never raises for a bad file."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte", [], "the file is empty"
        with Image.open(path) as img:
            fmt, mode, info, (w, h) = img.format, img.mode, img.info, img.size
            img.load()  # the full decode: truncation and corrupt data show here
            to_rgb(img)
    # Any failure of one file's decode is that file's fault (see train/loader.py: ReplacingDataset).
    except Exception as err:  # noqa: BLE001
        reason = failure_reason(err)
        return ("truncated" if "truncat" in reason.lower() or isinstance(err, EOFError) else "unreadable"), [], reason
    kinds = [kind for kind, hit in (
        ("greyscale", mode in _GREY_MODES), ("palette", mode in ("P", "PA")), ("cmyk", mode == "CMYK"),
        ("16-bit", mode in WIDE_INT_MODES or (fmt == "PNG" and _png_bit_depth(path) == 16)),
        ("alpha", mode in _ALPHA_MODES or "transparency" in info),
        ("other-mode", mode not in (*_GREY_MODES, "RGB", "P", "PA", "CMYK", *_ALPHA_MODES)),
        ("format-mismatch", Image.registered_extensions().get(os.path.splitext(path)[1].lower()) != fmt),
        ("tiny", min(w, h) < min_side)) if hit]
    return None, kinds, f"{fmt} {mode} {w}x{h}"


def _classify_task(task: tuple[str, str, int]) -> tuple[str, str | None, list[str], str]:
    root, relpath, min_side = task
    return (relpath, *classify(os.path.join(root, relpath), min_side))


def _run_pool(fn, tasks: list, workers: int, desc: str):
    """fn over tasks in order, in `workers` processes, with a progress bar on stderr."""
    from tqdm import tqdm

    if workers <= 1:
        yield from tqdm(map(fn, tasks), total=len(tasks), desc=desc, unit="file", dynamic_ncols=True)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from tqdm(pool.imap(fn, tasks, chunksize=16), total=len(tasks), desc=desc, unit="file",
                        dynamic_ncols=True)


def check(root: str, out_dir: str | None = None, *, min_side: int = 64, workers: int = 1, drop_tiny: bool = False,
          log=print) -> dict:
    """Classify every image of `root`, write out_dir/clean_list.txt and out_dir/report.json; returns the report."""
    relpaths, labels, label_source = scan_with_label_source(root)
    out_dir = out_dir or os.path.dirname(default_clean_list(root))
    excluded_kinds = (*EXCLUDED_KINDS, "tiny") if drop_tiny else EXCLUDED_KINDS
    counts, excluded, flagged, clean = Counter(), [], [], []
    tasks = [(root, p, min_side) for p in relpaths]
    for (relpath, bad, kinds, detail), label in zip(_run_pool(_classify_task, tasks, workers, "check"), labels):
        counts.update([bad] if bad else kinds)
        out = bad or next((k for k in kinds if k in excluded_kinds), None)
        if out:
            excluded.append({"path": relpath, "kind": out, "detail": detail})
        else:
            clean.append(f"{relpath}\t{label}\n")
        if kinds:
            flagged.append({"path": relpath, "kinds": kinds, "detail": detail})
    report = {"root": os.path.abspath(root), "label_source": label_source, "num_files": len(relpaths),
              "num_clean": len(clean), "min_side": min_side, "excluded_kinds": list(excluded_kinds),
              "counts": {k: counts[k] for k in (*EXCLUDED_KINDS, *KEPT_KINDS)}, "excluded": excluded,
              "flagged": flagged}
    os.makedirs(out_dir, exist_ok=True)
    header = (f"# dataset_tool check {report['root']}: {len(clean)} of {len(relpaths)} files (labels: "
              f"{label_source}); excluded kinds: {', '.join(excluded_kinds)}\n")
    _write_atomic(os.path.join(out_dir, "clean_list.txt"), header + "".join(clean))
    _write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1))
    log(_summary(report, out_dir))
    return report


def _write_atomic(path: str, text: str) -> None:
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def _summary(report: dict, out_dir: str) -> str:
    """The one-screen summary of a check."""
    c = report["counts"]
    lines = [f"check {report['root']}: {report['num_files']} files, {report['num_clean']} clean, "
             f"{len(report['excluded'])} excluded",
             "  excluded  " + ", ".join(f"{k} {c[k]}" for k in EXCLUDED_KINDS)
             + (f" (+ tiny {c['tiny']})" if "tiny" in report["excluded_kinds"] else ""),
             "  kept      " + ", ".join(f"{k} {c[k]}" for k in KEPT_KINDS if k not in report["excluded_kinds"])]
    lines += [f"  {e['path']}: {e['kind']} ({e['detail']})" for e in report["excluded"][:10]]
    if len(report["excluded"]) > 10:
        lines.append(f"  ... {len(report['excluded']) - 10} more in report.json")
    where = ("the trainer reads it by itself for data.root=" + report["root"]
             if os.path.abspath(out_dir) == os.path.abspath(os.path.dirname(default_clean_list(report["root"])))
             else "pass it as data.file_list")
    clean_list, report_json = (os.path.join(out_dir, name) for name in ("clean_list.txt", "report.json"))
    lines.append(f"wrote {clean_list} ({where}) and {report_json}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repae.train.dataset_tool", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="find unreadable, truncated, empty, non-RGB and tiny files; write a clean list")
    c.add_argument("root", help="the image tree (class folders, or a dataset.json with labels)")
    c.add_argument("--out", default=None, help="output folder (default: <root>-check, which the trainer reads)")
    c.add_argument("--min-side", type=int, default=64, help="short side below which a file counts as tiny")
    c.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode processes")
    c.add_argument("--drop-tiny", action="store_true", help="leave tiny files out of the clean list too")
    q = sub.add_parser("prepare", help="write the reference crop of the tree as the original's images.h5")
    q.add_argument("root", help="the image tree")
    q.add_argument("out_dir", help="output folder: images.h5, images_h5.json, prepare_report.json")
    q.add_argument("--resolution", type=int, required=True, help="side R of the stored crops (256 for ImageNet)")
    q.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode processes")
    q.add_argument("--file-list", default=None, help="relpath<TAB>label lines (default: <root>-check/clean_list.txt "
                   "when it exists, else the whole tree)")
    q.add_argument("--shard-size", type=int, default=None, help="images per resumable part (default 4096)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            report = check(args.root, args.out, min_side=args.min_side, workers=args.workers,
                           drop_tiny=args.drop_tiny)
            return 0 if report["num_clean"] else 1
        from .h5_prepare import DEFAULT_SHARD_SIZE, prepare

        prepare(args.root, args.out_dir, resolution=args.resolution, workers=args.workers,
                file_list=args.file_list, shard_size=args.shard_size or DEFAULT_SHARD_SIZE)
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
