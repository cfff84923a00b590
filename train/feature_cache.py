"""DINOv2 feature cache: the encoders' patch tokens of a whole dataset, precomputed once and read by the step.

    python -m repae.train.feature_cache --config CONFIG [--set k=v ...] --out PATH [--dtype fp16|bf16]
    cache = FeatureCache.for_run(cfg, encoders)          # checked against the run's encoders and config
    cache.check_source(source)                           # ... and its dataset
    zs = cache.targets(source.last_indices, device)      # tuple of fp32 [B, N, E], one per encoder

Valid because REPA-E has no augmentation and the encoders are frozen: the targets of an image are a fixed
function of its dataset index (docs/METHOD.md#feature-cache). The cache holds the encoders' output rounded to the
storage dtype, and nothing else differs from running them in the step.

Format: PATH is a folder holding
- `tokens_<k>.npy`, one per encoder k (the order of encoder.enc_type): shape [n, N, E_k] in dataset-index order
  (the source's file order), dtype float16 for fp16, uint16 holding the bfloat16 bit patterns for bf16 (numpy has
  no bfloat16); a standard .npy, opened memory-mapped;
- `header.json`: {"format", "version", "dtype", "rows_done", "complete", "identity", "info"}. `identity` is what a
  run checks, field by field (a mismatch is one line naming the field and both values): the encoders (enc_type,
  width, token count, a hash of each state dict as built, random init or pretrained), data.resolution, the
  preprocessing (the ADM crop and DINOv2's normalise/resize, model/encoders.py), the autocast precision (and TF32
  when that is fp32) and the dataset (root, image count, a hash of the ordered relpaths and labels). `info` is
  not checked (the weight file's name and size, device, torch version, date).
`rows_done` is the resume watermark: rows [0, rows_done) are on disk (flushed before the header says so), so a
killed write continues there; `complete` is set after the last row. Rows are written by one process (no rank
sharding). A row whose file was unreadable holds the tokens of its replacement (train/data.py), a row a run
never reads (sources report the replacement's index). DALI runs: the rows are computed from the reference PIL
decode and crop (train/data.py), not from DALI's pixels.
"""

# B batch, N encoder tokens, E encoder width, R image side; in formulas n images, k encoder

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np
import torch

from .array_cache import (
    HEADER,  # noqa: F401 (re-exported: the header file name of this cache)
    collate_images,
    open_for_write,
    read_header,
    source_for_cache,
    state_dict_fingerprint,
    write_header,
)
from .array_cache import check_identity as _check_identity
from .array_cache import dataset_identity as _dataset_identity

FORMAT, VERSION = "repae-feature-cache", 1
WHAT, COMPUTED_FOR = "feature cache", "encoder, config or dataset"
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
NUMPY_DTYPES = {"fp16": np.float16, "bf16": np.uint16}


def tokens_file(path: str, k: int) -> str:
    return os.path.join(path, f"tokens_{k}.npy")


# ---------------------------------------------------------------------------------------------------
# Identity: what the cache was computed from, compared field by field at load
# ---------------------------------------------------------------------------------------------------


def _weights_info(cfg, enc_type: str) -> str:
    """The encoder weight file's basename and size, or 'random init' (not checked: the fingerprint is)."""
    from repae.model.encoders import find_dinov2_weights, parse_enc_type

    path = cfg.encoder.weights
    if path is None:
        try:
            path = find_dinov2_weights(parse_enc_type(enc_type)[0], cfg.encoder.weights_dir)
        except FileNotFoundError:
            return "random init (encoder.allow_random)"
    return f"{os.path.basename(path)} ({os.path.getsize(path)} bytes)"


def config_identity(cfg, encoders) -> dict:
    """The identity fields that come from the run config and its built encoders."""
    from repae.model.encoders import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, dinov2_input_size

    R, precision = cfg.data.resolution, cfg.schedule.precision
    return {  # compared in this order: the first difference is the one named
        "resolution": R,
        "preprocessing": {"crop": "RGB, ADM center crop (train/data.py load_image)", "scale": "x / 255",
                          "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
                          "resize": f"bicubic to {dinov2_input_size(R)} px, align_corners=False, no antialias"},
        # TF32 changes fp32 matmuls only: it matters when the encoders run without autocast.
        "autocast": {"precision": precision, "tf32": cfg.schedule.tf32 if precision == "fp32" else None},
        "encoders": [{"enc_type": e.enc_type, "embed_dim": e.embed_dim, "num_tokens": e.num_patches,
                      "fingerprint": state_dict_fingerprint(e)} for e in encoders],
    }


def dataset_identity(source) -> dict:
    """train/array_cache.py's dataset identity (root, image count, hash of the ordered names and labels)."""
    return _dataset_identity(source, WHAT)


def check_identity(path: str, cached: dict, identity: dict,
                   hint: str = "rebuild it, or unset encoder.feature_cache") -> None:
    """ValueError (one line naming the field and both values) unless every field of `identity` equals the
    cache's (resolution, preprocessing, autocast, encoders, dataset: whichever are given)."""
    _check_identity(path, cached, identity, what=WHAT, computed_for=COMPUTED_FOR, hint=hint)


def _read_header(path: str) -> dict:
    return read_header(path, FORMAT, VERSION, WHAT)


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


class FeatureCache:
    """A complete cache opened read-only (memory-mapped); `targets(indices)` gives the step's zs."""

    def __init__(self, path: str):
        self.path = path
        self.header = _read_header(path)
        if not self.header.get("complete"):
            raise ValueError(f"feature cache {path} is incomplete ({self.header.get('rows_done')} of "
                             f"{self.num_images} rows): finish it by running the same feature_cache command again")
        self.dtype = self.header["dtype"]
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"feature cache {path}: storage dtype {self.dtype!r}, expected one of "
                             f"{', '.join(STORAGE_DTYPES)}")
        self.tokens = [np.load(tokens_file(path, k), mmap_mode="r")
                       for k in range(len(self.header["identity"]["encoders"]))]
        for k, arr in enumerate(self.tokens):
            enc = self.header["identity"]["encoders"][k]
            want = (self.num_images, enc["num_tokens"], enc["embed_dim"])
            if arr.shape != want or arr.dtype != NUMPY_DTYPES[self.dtype]:
                raise ValueError(f"feature cache {tokens_file(path, k)}: {arr.dtype} {arr.shape}, the header says "
                                 f"{np.dtype(NUMPY_DTYPES[self.dtype])} {want}")

    @property
    def num_images(self) -> int:
        return self.header["identity"]["dataset"]["num_images"]

    @classmethod
    def for_run(cls, cfg, encoders) -> FeatureCache:
        """encoder.feature_cache opened and checked against the run's config and built encoders."""
        cache = cls(cfg.encoder.feature_cache)
        cache.check(config_identity(cfg, encoders))
        return cache

    def check(self, identity: dict) -> None:
        """check_identity against this cache's header."""
        check_identity(self.path, self.header["identity"], identity)

    def check_source(self, source) -> None:
        self.check({"dataset": dataset_identity(source)})

    def targets(self, indices_B: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The cached zs of dataset indices [B]: one fp32 [B, N, E] per encoder on `device`."""
        rows = indices_B.detach().cpu().numpy().astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_images):
            raise ValueError(f"feature cache {self.path}: dataset index {int(rows.min())}..{int(rows.max())} "
                             f"outside its {self.num_images} rows")
        out = []
        # PERF: a synchronous read in the step's thread, B * N * E * 2 bytes per encoder (12 MB for 32 images of
        # ViT-B at 256 px): page-cache speed once the file is warm.
        for arr in self.tokens:
            block = torch.from_numpy(np.ascontiguousarray(arr[rows]))  # (B, N, E)
            if self.dtype == "bf16":
                block = block.view(torch.int16).view(torch.bfloat16)  # uint16 bit patterns (same bytes)
            out.append(block.to(device, non_blocking=True).float())
        return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def to_storage(zs_BNE: torch.Tensor, dtype: str) -> np.ndarray:
    """fp32 tokens -> the numpy array stored (float16, or uint16 bf16 bit patterns); fp16 overflow is an error."""
    q = zs_BNE.to(STORAGE_DTYPES[dtype])
    if dtype == "fp16" and not bool(torch.isfinite(q).all()):
        raise ValueError(f"feature cache: encoder tokens up to {float(zs_BNE.abs().max()):.4g} overflow fp16 "
                         "(max 65504): use --dtype bf16")
    q = q.cpu()
    return q.numpy() if dtype == "fp16" else q.view(torch.int16).numpy().view(np.uint16)


def _open_for_write(path: str, identity: dict, info: dict, dtype: str) -> tuple[dict, list[np.ndarray]]:
    """The header and writable token arrays: a partial cache of the same identity and dtype continues, anything
    else at `path` that has a header is refused (one line)."""
    n = identity["dataset"]["num_images"]
    arrays = {os.path.basename(tokens_file(path, k)): ((n, e["num_tokens"], e["embed_dim"]), NUMPY_DTYPES[dtype])
              for k, e in enumerate(identity["encoders"])}
    header = {"format": FORMAT, "version": VERSION, "dtype": dtype, "rows_done": 0, "complete": False,
              "identity": identity, "info": info}
    header, out = open_for_write(path, header, arrays, what=WHAT, computed_for=COMPUTED_FOR, same=("dtype",))
    return header, list(out.values())


@torch.no_grad()
def write_cache(cfg, path: str, *, dtype: str = "fp16", batch_size: int = 64, device: torch.device | None = None,
                progress: bool = True, log=print) -> str:
    """Compute the encoders' tokens of every image of the run's dataset (index order) into `path`, or continue a
    partial write there; the encoders are built and run exactly as the trainer does. Returns path."""
    from .build import build_encoders
    from .step import autocast

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"feature cache: dtype {dtype!r}, expected one of {', '.join(STORAGE_DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"feature cache: batch size {batch_size}, expected >= 1")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # As train/build.py: the same TF32 switches, and the seed before the encoders (a random encoder is the same).
    torch.backends.cuda.matmul.allow_tf32 = cfg.schedule.tf32
    torch.backends.cudnn.allow_tf32 = cfg.schedule.tf32
    torch.manual_seed(cfg.schedule.seed)
    encoders = [e.to(device) for e in build_encoders(cfg)]
    source, line = source_for_cache(cfg, device, WHAT)
    log(line)
    identity = {**config_identity(cfg, encoders), "dataset": dataset_identity(source)}
    info = {"weights": [_weights_info(cfg, e.enc_type) for e in encoders], "device": str(device),
            "torch": torch.__version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    header, arrays = _open_for_write(path, identity, info, dtype)
    n, start = identity["dataset"]["num_images"], header["rows_done"]
    if header["complete"]:
        log(f"feature cache {path} is already complete ({n} images)")
        return path
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(source.dataset, range(start, n)),
                                         batch_size=batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                                         collate_fn=collate_images)
    from tqdm import tqdm

    bar = tqdm(total=n, initial=start, unit="img", desc="feature cache", disable=not progress)
    amp = autocast(device, cfg.schedule.precision)
    for images_B3RR in loader:
        images_B3RR = images_B3RR.to(device)
        with amp:  # as the step's phase 0
            zs = [enc(images_B3RR).float() for enc in encoders]
        stop = start + images_B3RR.shape[0]
        for arr, z_BNE in zip(arrays, zs):
            arr[start:stop] = to_storage(z_BNE, dtype)
            arr.flush()
        start = header["rows_done"] = stop
        header["complete"] = stop == n
        write_header(path, header)  # after the rows are flushed: the watermark never runs ahead of the data
        bar.update(images_B3RR.shape[0])
    bar.close()
    log(f"wrote {path}: {n} images, {len(arrays)} encoder(s), {dtype}")
    return path


def main(argv=None) -> int:
    from .config import load_config

    p = argparse.ArgumentParser(description="precompute the DINOv2 patch tokens of a run's dataset (a feature "
                                            "cache for encoder.feature_cache); a killed run continues")
    p.add_argument("--config", required=True, help="the run JSON (configs/*.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as train.main")
    p.add_argument("--out", required=True, help="the cache folder (continued when it holds a partial cache)")
    p.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="fp16", help="storage dtype (default fp16)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.set)
        write_cache(cfg, a.out, dtype=a.dtype, batch_size=a.batch_size)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
