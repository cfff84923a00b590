"""The online FID (train/online_eval.py) on a tiny run with a randomly initialised Inception: a 2-step run with
eval.fid_every=1 logs a finite eval/fid at both steps and trains bitwise as the same run without it (losses,
grad norms, weights, modes); two ranks' statistics equal one rank's (the shares simulated in one process: the
same chunks, features and sums a 2-rank run computes); the config and startup errors are one line naming the key.
scipy's 2048-wide sqrtm (~16 s here) is replaced by test_evaluate's stand-in: the plumbing is under test, the
Frechet distance itself is tested in test_evaluate.py."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

pytest.importorskip("deepspeed")
pytest.importorskip("torch_fidelity")
pytest.importorskip("scipy")
if importlib.util.find_spec("lpips") is None:  # its shipped weights file only (importing it needs scipy)
    pytest.skip("lpips is not installed", allow_module_level=True)
from test_evaluate import fast_sqrtm

from repae.train import evaluate_inception, evaluate_metrics
from repae.train.online_eval import POOL_WIDTH, feature_sums, statistics_from_sums

# PERF: the CPU suite's budget. 2 images a step at 32 px, eager kernels (the Triton interpreter is not under test
# here), one log row (each draws losses.png); 2 samples an evaluation, one a chunk, and a reference holding its
# statistics: the random Inception's forward at 299 px costs ~1 s an image on 2 busy cores, and this file runs 6.
RUN = ("schedule.max_steps=2", "schedule.global_batch_size=2", "data.resolution=32", "kernel_backend=eager",
       "logging.sample_every=0", "logging.log_every=2")
EVAL = ("eval.fid_every=1", "eval.num_samples=2", "eval.batch_size=1", "eval.steps=2",
        "eval.inception_allow_random=true")


def write_ref(path) -> None:
    """An ADM-style reference batch holding its FID statistics only (as VIRTUAL_imagenet256_labeled.npz does)."""
    np.savez_compressed(path, mu=np.zeros(POOL_WIDTH), sigma=np.eye(POOL_WIDTH))


def rows(run_dir) -> list[dict]:
    with open(run_dir / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def record(trainer) -> tuple[list, list]:
    """Every step's logs and every evaluation's features, as fit() produces them."""
    logs, feats = [], []
    run_step, features = trainer.run_step, trainer.online_fid and trainer.online_fid.features
    trainer.run_step = lambda *a, **k: logs.append(run_step(*a, **k)) or logs[-1]
    if features:
        trainer.online_fid.features = lambda *a, **k: feats.append(features(*a, **k)) or feats[-1]
    return logs, feats


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ds_world):
    """The same 2-step run with and without the online FID: (root, trainers after fit, step logs, features).
    Neither writes its final checkpoint nor draws losses.png (not under test here, ~1 s each)."""
    from repae.train import visual
    from repae.train.trainer import Trainer

    root = tmp_path_factory.mktemp("online")
    write_ref(root / "ref.npz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_metrics, "_sqrtm", fast_sqrtm)
        mp.setattr(visual, "save_loss_plot", lambda *a, **k: None)
        mp.setattr(Trainer, "save_checkpoint", lambda self: None)
        on = Trainer(tiny_config(root / "on", *RUN, *EVAL, f"eval.ref={root / 'ref.npz'}"))
        on_logs, feats = record(on)
        on.fit()
        on_logs.append(torch.get_rng_state())  # what the next step and a checkpoint would start from
        off = Trainer(tiny_config(root / "off", *RUN))  # build.py seeds the global RNG again
        off_logs, _ = record(off)
        off.fit()
        off_logs.append(torch.get_rng_state())
    return root, (on, off), (on_logs, off_logs), feats


def test_a_run_logs_a_finite_fid_at_every_evaluation(runs):
    root, (on, _), _, feats = runs
    evals = [r for r in rows(root / "on") if "eval/fid" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(np.isfinite(r["eval/fid"]) and r["eval/seconds"] > 0 for r in evals), evals
    assert [s for s, _ in on.history["eval/fid"]] == [1, 2] and [len(f) for f in feats] == [2, 2]
    assert on.online_fid.ref_stats[1].shape == (POOL_WIDTH, POOL_WIDTH)


def test_training_is_bitwise_the_same_with_and_without_evaluations(runs):
    root, (on, off), (on_logs, off_logs), _ = runs
    assert len(on_logs) == len(off_logs) == 3  # step 2 runs after the first evaluation
    for step, (a, b) in enumerate(zip(on_logs[:2], off_logs[:2]), 1):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), step  # every loss and flag
    # The step's draws come from their own generator, so the losses alone would not see a draw from the global
    # RNG (the Inception's default init is one): its state after the run must be the same too.
    assert torch.equal(on_logs[2], off_logs[2])
    train_on = [r for r in rows(root / "on") if "eval/fid" not in r]
    train_off = rows(root / "off")
    assert [r["step"] for r in train_on] == [r["step"] for r in train_off] == [2]
    keys = [k for k in train_off[0] if not k.startswith("perf/")]  # losses, grad norms, BN statistics
    assert {k: train_on[0][k] for k in keys} == {k: train_off[0][k] for k in keys}
    for name in ("sit", "vae", "disc"):
        state_on, state_off = on.engines[name].module.state_dict(), off.engines[name].module.state_dict()
        assert all(torch.equal(state_on[k], state_off[k]) for k in state_off), name
        modes = [[m.training for m in t.engines[name].module.modules()] for t in (on, off)]
        assert modes[0] == modes[1], name
    assert all(torch.equal(v, off.ema.state_dict()[k]) for k, v in on.ema.state_dict().items())
    assert not on.ema.module.training and on.online_fid.net.fc.weight.device.type == "cpu"


def test_two_ranks_statistics_equal_one_rank(runs):
    _, (on, _), _, feats = runs
    ema, vae = on.ema.module, on.models.vae.module
    one = feats[-1]  # the step-2 evaluation of the run (world size 1); the models have not changed since
    shares = [on.online_fid.features(2, ema, vae, rank=r, world=2) for r in (0, 1)]
    # eval.batch_size=1: chunk 0 (sample 0) on rank 0, chunk 1 (sample 1) on rank 1, each made as on one rank.
    assert one.shape == (2, POOL_WIDTH) and np.array_equal(np.concatenate(shares), one)
    mu1, sigma1 = statistics_from_sums(feature_sums(one))
    mu2, sigma2 = statistics_from_sums(feature_sums(shares[0]) + feature_sums(shares[1]))
    np.testing.assert_allclose(mu2, mu1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma2, sigma1, rtol=1e-12, atol=1e-12)
    mu_ref, sigma_ref = evaluate_metrics.fid_statistics(one)  # the offline evaluator's statistics (mean in fp32)
    np.testing.assert_allclose(mu1, mu_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma1, sigma_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("overrides,message", [
    (("eval.fid_every=5",), "config key eval.ref is not set: eval.fid_every=5 needs an ADM reference batch"),
    (("eval.fid_evry=5",), "unknown config key eval.fid_evry (did you mean 'fid_every'?)"),
    (("eval.fid_every=-1",), "config key eval.fid_every=-1 must be an integer >= 0"),
    (("eval.num_samples=1",), "config key eval.num_samples=1 must be an integer >= 2"),
    (("eval.sampler=heun",), "config key eval.sampler='heun' must be one of ('ode', 'sde')"),
    (("eval.sampler=sde", "eval.heun=true"), "config key eval.heun=True is an ODE option"),
    (("eval.cfg_scale=0.5",), "config key eval.cfg_scale=0.5 must be a finite number >= 1"),
    (("eval.guidance_low=0.7", "eval.guidance_high=0.5"),
     "config key eval.guidance_high=0.5 must be >= eval.guidance_low=0.7"),
])
def test_config_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:
        tiny_config(tmp_path, *overrides)
    assert "\n" not in str(err.value) and str(err.value).startswith(message), str(err.value)


def test_missing_files_stop_the_trainer_before_it_builds(tmp_path, monkeypatch):
    """A missing reference or Inception file, or a reference without statistics or images: one line naming the
    key and the file, raised in Trainer.__init__ before any model is built."""
    from repae.train.trainer import Trainer

    monkeypatch.setenv("REPAE_WEIGHTS_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    write_ref(tmp_path / "ref.npz")
    np.savez(tmp_path / "labels.npz", arr_1=np.zeros(4, dtype=np.int64))
    cases = [
        ((f"eval.ref={tmp_path / 'nowhere.npz'}", "eval.inception_allow_random=true"), FileNotFoundError,
         f"config key eval.ref: {tmp_path / 'nowhere.npz'} does not exist"),
        ((f"eval.ref={tmp_path / 'ref.npz'}", f"eval.inception_weights={tmp_path / 'no.pth'}"), FileNotFoundError,
         f"config key eval.inception_weights: {tmp_path / 'no.pth'} does not exist"),
        ((f"eval.ref={tmp_path / 'ref.npz'}",), FileNotFoundError,
         f"config key eval.inception_weights: the FID Inception weights not found: no "
         f"{evaluate_inception.INCEPTION_FILE} in {tmp_path / 'env'}"),
        ((f"eval.ref={tmp_path / 'labels.npz'}", "eval.inception_allow_random=true"), ValueError,
         f"config key eval.ref: {tmp_path / 'labels.npz'} holds neither mu, sigma nor images arr_0 (it has arr_1)"),
    ]
    for extra, error, message in cases:
        with pytest.raises(error) as err:
            Trainer(tiny_config(tmp_path / "run", "eval.fid_every=10", *extra))
        assert "\n" not in str(err.value) and str(err.value).startswith(message), str(err.value)
    assert not (tmp_path / "run").exists()  # stopped before the run directory was made
