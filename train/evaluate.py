"""`python -m repae.train.evaluate samples.npz --ref VIRTUAL_imagenet256_labeled.npz`: FID, sFID, Inception
Score, precision and recall of a sample batch against a reference batch, computed as the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) computes them, so the numbers compare with published ones.

Inputs are ADM batches: an .npz whose `arr_0` is uint8 [n, R, R, 3]; a file may also hold precomputed FID
statistics (`mu`, `sigma` of the pool features, `mu_s`, `sigma_s` of the spatial ones), which are then used for
FID and sFID as ADM does (ADM's reference batches hold them). Precision/recall need the reference images.
Features: `train/evaluate_inception.py` (cached per file); statistics: `train/evaluate_metrics.py`.
Prints a table and writes the numbers as JSON (`--json`, default `<samples>.eval.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

from repae.train import evaluate_inception as inception
from repae.train import evaluate_metrics as metrics

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m repae.train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="sample batch .npz (arr_0: uint8 [n, R, R, 3])")
    p.add_argument("--ref", required=True, help="reference batch .npz, e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--json", default=None, help="where to write the metrics (default: <samples>.eval.json)")
    p.add_argument("--weights", default=None, help=f"Inception weights file (default: {inception.INCEPTION_FILE} "
                   "in --weights-dir, $REPAE_WEIGHTS_DIR, the torch hub cache)")
    p.add_argument("--weights-dir", default=None, help="first folder searched for the Inception weights")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--cache-dir", default=None, help="feature caches go here (default: beside each input file)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write feature caches")
    p.add_argument("--pr-float32", action="store_true",
                   help="precision/recall distances in float32 (ADM: float16, float32 only when half overflows)")
    p.add_argument("--allow-random-inception", action="store_true",
                   help="TESTS ONLY: a randomly initialised Inception when no weights are given; numbers are noise")
    return p.parse_args(argv)


def _precomputed(path: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """((mu, sigma), (mu_s, sigma_s)) stored in the .npz, or None (ADM's `read_statistics`)."""
    if not set(STAT_KEYS) <= set(inception.npz_keys(path)):
        return None
    with np.load(path) as z:
        return (z["mu"], z["sigma"]), (z["mu_s"], z["sigma_s"])


def _statistics(path: str, feats: dict[str, np.ndarray] | None):
    """Pool and spatial (mu, sigma) of one file: stored ones when present, else from its features."""
    stored = _precomputed(path)
    if stored is not None:
        return stored, "stored in the file"
    return (metrics.fid_statistics(feats["pool"]), metrics.fid_statistics(feats["spatial"])), "from its images"


def compute(args: argparse.Namespace) -> dict:
    """The metrics dict of one evaluation (ValueError / FileNotFoundError for bad input)."""
    for path in (args.samples, args.ref):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    ref_keys = inception.npz_keys(args.ref)
    ref_has_images = "arr_0" in ref_keys
    if not ref_has_images and not set(STAT_KEYS) <= set(ref_keys):
        raise ValueError(f"{args.ref}: needs arr_0 (images) or {', '.join(STAT_KEYS)} (statistics)")
    allow_random = args.allow_random_inception and args.weights is None
    if allow_random:
        print("WARNING: RANDOMLY INITIALISED INCEPTION (--allow-random-inception): the numbers below are "
              "meaningless; this mode exists for tests only", file=sys.stderr)
    net, net_id = inception.build_inception(args.weights, args.weights_dir, allow_random=allow_random)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def features(path: str) -> dict[str, np.ndarray]:
        return inception.cached_features(path, net, net_id, device=device, batch_size=args.batch_size,
                                         cache_dir=args.cache_dir, use_cache=not args.no_cache)

    sample_feats = features(args.samples)
    ref_feats = features(args.ref) if ref_has_images else None
    (sample_pool, sample_spatial), _ = _statistics(args.samples, sample_feats)
    (ref_pool, ref_spatial), ref_source = _statistics(args.ref, ref_feats)
    out = {
        "fid": metrics.frechet_distance(*sample_pool, *ref_pool),
        "sfid": metrics.frechet_distance(*sample_spatial, *ref_spatial),
        "inception_score": metrics.inception_score(sample_feats["logits"]),
        "precision": None,
        "recall": None,
    }
    if ref_feats is not None:
        out["precision"], out["recall"] = metrics.precision_recall(
            ref_feats["pool"], sample_feats["pool"], half=not args.pr_float32, device=device)
    out.update(num_samples=len(sample_feats["pool"]), num_ref=None if ref_feats is None else len(ref_feats["pool"]),
               ref_statistics=ref_source, inception=net_id, samples=os.path.abspath(args.samples),
               ref=os.path.abspath(args.ref))
    return out


def format_table(result: dict) -> str:
    """The five metrics, one per line."""
    rows = [("FID", "fid"), ("sFID", "sfid"), ("Inception Score", "inception_score"),
            ("Precision", "precision"), ("Recall", "recall")]
    lines = []
    for label, key in rows:
        value = result[key]
        lines.append(f"{label:<16} {'n/a (the reference has no images)' if value is None else f'{value:.4f}'}")
    return "\n".join(lines)


def write_result(result: dict, path: str) -> None:
    """The metrics as JSON (a non-finite number as null), and a line naming the file."""
    with open(path, "w") as f:
        json.dump({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()},
                  f, indent=2)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = compute(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    write_result(result, args.json or args.samples + ".eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
