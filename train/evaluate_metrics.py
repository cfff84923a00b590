"""The sample-quality statistics of the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`), on
features that are already computed: FID and sFID (Frechet distance of mean/covariance), Inception Score, and the
improved precision/recall of Kynkaanniemi et al. (k-NN manifolds). No network and no file I/O here.

Math (n images, d feature width, k = 3 neighbours):
  stats     mu = mean(f), sigma = cov(f) (float64, rows are images)            torch-fidelity's own function
  FID       |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))               scipy sqrtm, as ADM
  IS        mean over splits of 5000 of exp(mean_i KL(p_i || mean_j p_j)), p = softmax(logits_unbiased)
  radii     r_i = squared distance from f_i to its k-th nearest neighbour in its own set (itself excluded)
  precision fraction of samples inside any reference ball (d^2(s, r_j) <= r_j); recall the same, sets swapped.
Distances are squared Euclidean; like ADM they are computed in float16 (inputs and every op rounded to half)
and recomputed in float32 when the half result is not finite; `half=False` computes them in float32.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

ADM_IS_SPLIT_SIZE = 5000
ADM_NEIGHBOURS = 3
ADM_PR_BATCH = 10000


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of [n, d] features, with torch-fidelity's function (mean in the input dtype, float64 cov)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features)))
    return stats["mu"], stats["sigma"]


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's matrix square root (the call ADM makes; a module attribute so a test may swap it)."""
    return linalg.sqrtm(matrix)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """ADM's `FIDStatistics.frechet_distance`: eps * I added to both covariances when sqrtm is not finite, a
    ValueError when the square root has an imaginary diagonal above 1e-3, else its real part."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different widths: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = ADM_IS_SPLIT_SIZE) -> float:
    """ADM's IS: softmax of the unbiased logits [n, classes], consecutive splits of `split_size` (no shuffle),
    the mean of the per-split scores. The softmax is taken in float64 (ADM: float32, a ~1e-7 difference)."""
    probs = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), dim=1).numpy()
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _half(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back: one half-precision op computed in float32, as a GPU half kernel does."""
    return x.half().float()


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, *, half: bool = True) -> torch.Tensor:
    """[n1, n2] float32 squared distances max(|u|^2 - 2 u.v + |v|^2, 0), ADM's `_batch_pairwise_distances`.
    half=True: its float16 graph (each op rounded to half), with the float32 graph when that is not finite."""
    if half:
        u16, v16 = _half(u.float()), _half(v.float())
        norm_u = _half(_half(u16 * u16).sum(1, keepdim=True))
        norm_v = _half(_half(v16 * v16).sum(1)[None, :])
        dist = _half(_half(norm_u - _half(2 * _half(u16 @ v16.T))) + norm_v).clamp_min(0)
        if torch.isfinite(dist).all():
            return dist
    u, v = u.float(), v.float()
    norm_u, norm_v = (u * u).sum(1, keepdim=True), (v * v).sum(1)[None, :]
    return (norm_u - 2 * (u @ v.T) + norm_v).clamp_min(0)


def manifold_radii(features: torch.Tensor, *, k: int = ADM_NEIGHBOURS, half: bool = True,
                   batch_size: int = ADM_PR_BATCH) -> torch.Tensor:
    """[n] squared distance of each feature to its k-th nearest neighbour in the same set (entry k of the sorted
    row, entry 0 being the point itself), rows in batches of `batch_size`."""
    radii = [pairwise_sq_distances(rows, features, half=half).kthvalue(k + 1, dim=1).values
             for rows in features.split(batch_size)]
    return torch.cat(radii)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, *, half: bool,
                     batch_size: int) -> torch.Tensor:
    """[n_points] bool: point i lies within some ball d^2(point, centre_j) <= radii_j."""
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for start in range(0, len(points), batch_size):
        rows = points[start:start + batch_size]
        for col in range(0, len(centres), batch_size):
            dist = pairwise_sq_distances(rows, centres[col:col + batch_size], half=half)
            inside[start:start + len(rows)] |= (dist <= radii[None, col:col + batch_size]).any(dim=1)
    return inside


def precision_recall(ref: np.ndarray | torch.Tensor, sample: np.ndarray | torch.Tensor, *,
                     k: int = ADM_NEIGHBOURS, half: bool = True, batch_size: int = ADM_PR_BATCH,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """ADM's `compute_prec_recall(ref, sample)`: precision = share of samples inside the reference manifold,
    recall = share of references inside the sample manifold (balls of radius the k-th neighbour distance)."""
    ref_t = torch.as_tensor(ref, dtype=torch.float32, device=device)
    sample_t = torch.as_tensor(sample, dtype=torch.float32, device=device)
    ref_radii = manifold_radii(ref_t, k=k, half=half, batch_size=batch_size)
    sample_radii = manifold_radii(sample_t, k=k, half=half, batch_size=batch_size)
    precision = _inside_any_ball(sample_t, ref_t, ref_radii, half=half, batch_size=batch_size)
    recall = _inside_any_ball(ref_t, sample_t, sample_radii, half=half, batch_size=batch_size)
    return float(precision.double().mean()), float(recall.double().mean())
