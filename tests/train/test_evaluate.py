"""The evaluator: its statistics against a NumPy/SciPy reference written here (scipy sqrtm FID, softmax/KL IS,
brute-force k-NN precision/recall), FID of a set against itself, the command end to end on tiny images with a
randomly initialised Inception (features cached and reused), and the missing-weights message."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch

from repae.train import evaluate, evaluate_inception, evaluate_metrics

RTOL = 1e-6


def ref_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.astype(np.float64).mean(0), b.astype(np.float64).mean(0)
    s1, s2 = np.cov(a.astype(np.float64), rowvar=False), np.cov(b.astype(np.float64), rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def ref_is(logits: np.ndarray, split: int) -> float:
    probs = scipy.special.softmax(logits.astype(np.float64), axis=1)
    scores = [np.exp(scipy.special.rel_entr(p, p.mean(0, keepdims=True)).sum(1).mean())
              for p in np.split(probs, range(split, len(probs), split))]
    return float(np.mean(scores))


def ref_sq_dists(u: np.ndarray, v: np.ndarray, half: bool) -> np.ndarray:
    if not half:
        return ((u.astype(np.float64)[:, None] - v.astype(np.float64)[None]) ** 2).sum(-1)
    h = np.float16  # ADM's float16 graph, each op rounded to half
    u16, v16 = u.astype(h), v.astype(h)
    nu = (u16 * u16).astype(np.float32).sum(1).astype(h)[:, None]
    nv = (v16 * v16).astype(np.float32).sum(1).astype(h)[None, :]
    mm = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(h)
    return np.maximum(((nu - h(2) * mm) + nv), h(0)).astype(np.float32)


def ref_pr(ref: np.ndarray, sample: np.ndarray, half: bool, k: int = 3) -> tuple[float, float]:
    r_ref = np.sort(ref_sq_dists(ref, ref, half), axis=1)[:, k]
    r_sample = np.sort(ref_sq_dists(sample, sample, half), axis=1)[:, k]
    d = ref_sq_dists(sample, ref, half)  # [n_sample, n_ref]
    return float((d <= r_ref[None]).any(1).mean()), float((d <= r_sample[:, None]).any(0).mean())


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / d**0.5 + shift).astype(np.float32)


def test_statistics_match_numpy_scipy_reference():
    a, b = features(300, 48, 0), features(250, 48, 1, shift=0.3)
    fid = evaluate_metrics.frechet_distance(*evaluate_metrics.fid_statistics(a), *evaluate_metrics.fid_statistics(b))
    assert fid == pytest.approx(ref_fid(a, b), rel=RTOL)
    spatial_a, spatial_b = features(300, 63, 2), features(250, 63, 3, shift=-0.2)  # sFID: the same on other features
    sfid = evaluate_metrics.frechet_distance(*evaluate_metrics.fid_statistics(spatial_a),
                                             *evaluate_metrics.fid_statistics(spatial_b))
    assert sfid == pytest.approx(ref_fid(spatial_a, spatial_b), rel=RTOL)
    logits = 3 * features(300, 40, 4)
    for split in (5000, 64):  # ADM's split of 5000 (one split here), and several splits with a short last one
        assert evaluate_metrics.inception_score(logits, split) == pytest.approx(ref_is(logits, split), rel=RTOL)
    ref, sample = features(200, 32, 5), features(180, 32, 6, shift=0.4)
    got = evaluate_metrics.precision_recall(ref, sample, half=False, batch_size=64)
    assert got == pytest.approx(ref_pr(ref, sample, half=False), rel=RTOL)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    got_half = evaluate_metrics.precision_recall(ref, sample, half=True, batch_size=64)
    # The float16 graph: the same ops rounded the same way; sums may round differently at a half boundary, so a
    # tie can flip: at most one point of either set.
    want_half = ref_pr(ref, sample, half=True)
    assert abs(got_half[0] - want_half[0]) <= 1 / 180 and abs(got_half[1] - want_half[1]) <= 1 / 200


def test_fid_of_a_set_against_itself_is_zero():
    stats = evaluate_metrics.fid_statistics(features(1000, 256, 7))
    fid = evaluate_metrics.frechet_distance(*stats, *stats)
    print(f"FID(self) = {fid:.3e}")  # 256-d features of 1000 points
    assert abs(fid) < 1e-6


def write_batch(path, n: int, seed: int, **extra) -> None:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, **extra)


def fast_sqrtm(matrix: np.ndarray) -> np.ndarray:
    """A stand-in for scipy's sqrtm in the end-to-end test only, not a square root (scipy's 2048-wide call takes
    ~16 s on 2 cores; the real one is tested above): the plumbing is under test here, not the numbers."""
    return np.diag(np.sqrt(np.diag(matrix).clip(min=0)))


N_SAMPLES, N_REF = 150, 130


def test_command_end_to_end_with_random_inception(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    monkeypatch.setattr(evaluate_metrics, "_sqrtm", fast_sqrtm)
    passes = []
    real = evaluate_inception.inception_features
    monkeypatch.setattr(evaluate_inception, "inception_features",
                        lambda *a, **k: passes.append(a[2]) or real(*a, **k))
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    write_batch(samples, N_SAMPLES, 0)  # a few hundred tiny images in all
    write_batch(ref, N_REF, 1)
    argv = [str(samples), "--ref", str(ref), "--allow-random-inception", "--batch-size", "50"]
    assert evaluate.main(argv + ["--json", str(tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert passes == [N_SAMPLES, N_REF]
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert isinstance(first[key], float) and np.isfinite(first[key]), (key, first[key])
    assert "RANDOMLY INITIALISED INCEPTION" in capsys.readouterr().err
    with np.load(str(samples) + ".inception.npz") as z:
        assert z["pool"].shape == (N_SAMPLES, 2048) and z["spatial"].shape == (N_SAMPLES, 7 * 17 * 17)
        assert z["logits"].shape == (N_SAMPLES, 1008) and z["pool"].std() > 0
    with np.load(str(ref) + ".inception.npz") as z:
        pool, spatial = z["pool"], z["spatial"]

    assert evaluate.main(argv + ["--json", str(tmp_path / "b.json")]) == 0  # second call: both caches reused
    assert passes == [N_SAMPLES, N_REF]
    assert json.loads((tmp_path / "b.json").read_text()) == first

    # An ADM-style reference holding only its statistics (here those of ref.npz): the same FID/sFID, no P/R.
    stats_only = tmp_path / "stats.npz"
    mu, sigma = evaluate_metrics.fid_statistics(pool)
    mu_s, sigma_s = evaluate_metrics.fid_statistics(spatial)
    np.savez(stats_only, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    argv = [str(samples), "--ref", str(stats_only), "--allow-random-inception", "--json", str(tmp_path / "c.json")]
    assert evaluate.main(argv) == 0
    third = json.loads((tmp_path / "c.json").read_text())
    assert passes == [N_SAMPLES, N_REF] and third["precision"] is None
    assert third["ref_statistics"] == "stored in the file"
    assert (third["fid"], third["sfid"]) == (first["fid"], first["sfid"])


def test_missing_weights_is_one_line_naming_file_folders_and_url(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REPAE_WEIGHTS_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    write_batch(tmp_path / "s.npz", 2, 0)
    rc = evaluate.main([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--weights-dir",
                        str(tmp_path / "mine")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    for part in (evaluate_inception.INCEPTION_FILE, str(tmp_path / "mine"), str(tmp_path / "env"),
                 str(tmp_path / "hub" / "checkpoints"), evaluate_inception.INCEPTION_URL):
        assert part in err, (part, err)
