"""The DINOv2 feature cache (train/feature_cache.py, docs/METHOD.md#feature-cache): the written rows equal the
encoders' output cast to the storage dtype, exactly; a cache made for another encoder, resolution, precision or
dataset is refused in one line naming the field; a killed write continues into the same files; an images.h5
prepared from the tree gives the same rows; and a step that reads its targets from the cache equals the step that
runs the encoders, within the storage rounding.

Step tolerance (fp16 storage, unit roundoff u = 2^-11): the cached targets are z * (1 + d) with |d| <= u per
element (plus 2^-25 absolute on fp16's subnormals, nothing a cosine sees), so a cosine against them moves by at
most 2u: the alignment and REPA losses must agree within 2u (the VAE and SiT losses within their weights 1.5
and 0.5 times that), every loss that does not see the targets bitwise, and the VAE and SiT gradients within 2u
of their largest element. Measured on CPU: losses 1e-6 apart, gradients 3e-6 (VAE) and 1.5e-5 (SiT) of their
largest element; reading the next image's rows instead fails every one of these.
Everything runs the tiny config in fp32 on CPU (a random ViT-S/14, 64 px, 64 synthetic images).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from repae.model.encoders import DINOv2Encoder
from repae.train.build import build_encoders
from repae.train.config import check_paths
from repae.train.data import ImageFolderDataset, ImageFolderSource
from repae.train.ema import EMA
from repae.train.feature_cache import (
    HEADER,
    STORAGE_DTYPES,
    FeatureCache,
    config_identity,
    main,
    tokens_file,
    write_cache,
)
from repae.train.step import train_step

BATCH = 16
U = {"fp16": 2.0**-11, "bf16": 2.0**-8}
"""Unit roundoff: round to nearest moves a normal number by at most u relative."""
TINY = {"fp16": 2.0**-25, "bf16": 0.0}
"""Absolute rounding error below the normal range (fp16 subnormals, |z| < 2^-14, are spaced 2^-24)."""


def run_config(run_dir, *extra):
    return tiny_config(run_dir, "data.source=synthetic", *extra)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A run dir with the synthetic set, and an fp16 cache of it written by the command."""
    root = tmp_path_factory.mktemp("feature_cache")
    run_dir, path = root / "run", root / "cache_fp16"
    argv = ["--config", "configs/tiny_cpu.json", "--out", str(path), "--batch-size", str(BATCH)]
    for s in (f"logging.run_dir={run_dir}", "schedule.global_batch_size=4", "schedule.precision=fp32",
              "data.num_workers=0", "logging.tensorboard=false", "data.source=synthetic"):
        argv += ["--set", s]
    cwd = os.getcwd()
    os.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return SimpleNamespace(cfg=run_config(run_dir), path=str(path), run_dir=run_dir)


def online_targets(cfg) -> list[torch.Tensor]:
    """The encoders of a run (built as the trainer builds them) over the whole set in index order, fp32, in the
    cache writer's chunks."""
    torch.manual_seed(cfg.schedule.seed)
    encoders = build_encoders(cfg)
    ds = ImageFolderDataset(os.path.join(cfg.logging.run_dir, "demo_data"), cfg.data.resolution)
    images = torch.stack([ds[i].image for i in range(len(ds))])
    with torch.no_grad():
        return [torch.cat([enc(images[i:i + BATCH]).float() for i in range(0, len(ds), BATCH)]) for enc in encoders]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_round_trip_equals_encoder_output_in_storage_dtype(cached, dtype, tmp_path):
    path = cached.path
    if dtype != "fp16":
        path = write_cache(cached.cfg, str(tmp_path / dtype), dtype=dtype, batch_size=BATCH, progress=False)
    want = online_targets(cached.cfg)
    cache = FeatureCache(path)
    n = len(want[0])
    got = cache.targets(torch.arange(n), torch.device("cpu"))
    assert len(got) == 1 and got[0].dtype == torch.float32 and got[0].shape == (n, 16, 384)
    assert torch.equal(got[0], want[0].to(STORAGE_DTYPES[dtype]).float())
    err = (got[0] - want[0]).abs()
    assert 0 < err.max() and bool((err <= U[dtype] * want[0].abs() + TINY[dtype]).all())  # rounded to nearest
    rows = torch.tensor([5, 0, 63, 5])  # any order, repeats
    assert torch.equal(cache.targets(rows, torch.device("cpu"))[0], got[0][rows])
    with pytest.raises(ValueError, match="dataset index -1..63 outside its 64 rows"):
        cache.targets(torch.tensor([-1, 63]), torch.device("cpu"))


def _one_line_error(fn, *names):
    with pytest.raises(ValueError) as err:
        fn()
    text = str(err.value)
    assert "\n" not in text and all(n in text for n in names), text
    return text


def test_mismatched_identity_is_one_line_naming_the_field(cached, tmp_path):
    cfg = cached.cfg
    cache = FeatureCache(cached.path)
    torch.manual_seed(cfg.schedule.seed)
    encoders = build_encoders(cfg)
    cache.check(config_identity(cfg, encoders))  # the run it was made for passes
    # resolution (the encoders are rebuilt for it)
    other = run_config(cached.run_dir, "data.resolution=32")
    torch.manual_seed(other.schedule.seed)
    _one_line_error(lambda: FeatureCache.for_run(dataclasses.replace(other, encoder=dataclasses.replace(
        other.encoder, feature_cache=cached.path)), build_encoders(other)), "resolution is 64", "but 32")
    # enc_type (same width: only the name and weights differ)
    other = run_config(cached.run_dir, "encoder.enc_type=dinov2reg-vit-s")
    _one_line_error(lambda: cache.check(config_identity(other, build_encoders(other))),
                    "encoders[0].enc_type is 'dinov2-vit-s'", "'dinov2reg-vit-s'")
    # the weights (one element changed)
    with torch.no_grad():
        encoders[0].vit.blocks[0].attn.qkv.weight[0, 0] += 1
    _one_line_error(lambda: cache.check(config_identity(cfg, encoders)), "encoders[0].fingerprint")
    # precision
    other = run_config(cached.run_dir, "schedule.precision=bf16")
    _one_line_error(lambda: cache.check({"autocast": config_identity(other, [])["autocast"]}),
                    "autocast.precision is 'fp32'", "'bf16'")
    # the dataset: another tree, one image fewer, another label
    source = ImageFolderSource(os.path.join(cached.run_dir, "demo_data"), 64, global_batch_size=4, rank=0,
                               world_size=1, seed=0, num_workers=0)
    cache.check_source(source)
    fewer = SimpleNamespace(root=source.root, dataset=SimpleNamespace(relpaths=source.dataset.relpaths[1:],
                                                                     labels=source.dataset.labels[1:]))
    _one_line_error(lambda: cache.check_source(fewer), "dataset.num_images is 64", "but 63")
    relabeled = SimpleNamespace(root=source.root, dataset=SimpleNamespace(relpaths=source.dataset.relpaths,
                                                                         labels=source.dataset.labels[::-1]))
    _one_line_error(lambda: cache.check_source(relabeled), "dataset.index_hash")
    moved = SimpleNamespace(root=str(tmp_path), dataset=source.dataset)
    _one_line_error(lambda: cache.check_source(moved), "dataset.root")


def test_missing_or_incomplete_cache_is_refused(cached, tmp_path):
    cfg = run_config(cached.run_dir, f"encoder.feature_cache={tmp_path / 'none'}")
    with pytest.raises(FileNotFoundError, match="config key encoder.feature_cache: .*none does not exist"):
        check_paths(cfg)
    header = json.loads(open(os.path.join(cached.path, HEADER)).read())
    os.makedirs(tmp_path / "partial")
    header.update(rows_done=16, complete=False)
    (tmp_path / "partial" / HEADER).write_text(json.dumps(header))
    _one_line_error(lambda: FeatureCache(str(tmp_path / "partial")), "incomplete (16 of 64 rows)")


def test_killed_write_continues_into_the_same_files(cached, tmp_path, monkeypatch):
    forward, calls = DINOv2Encoder.forward, []

    def dies_at_third_batch(self, images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process killed in the middle of the third chunk
        return forward(self, images)

    path = str(tmp_path / "resumed")
    monkeypatch.setattr(DINOv2Encoder, "forward", dies_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        write_cache(cached.cfg, path, batch_size=BATCH, progress=False)
    header = json.loads(open(os.path.join(path, HEADER)).read())
    assert header["rows_done"] == 2 * BATCH and not header["complete"]
    monkeypatch.setattr(DINOv2Encoder, "forward", forward)
    with pytest.raises(ValueError, match="dtype is 'fp16' in the cache but 'bf16' here"):
        write_cache(cached.cfg, path, dtype="bf16", batch_size=BATCH, progress=False)
    write_cache(cached.cfg, path, batch_size=BATCH, progress=False)
    done, ref = (json.loads(open(os.path.join(p, HEADER)).read()) for p in (path, cached.path))
    assert done["complete"] and done["rows_done"] == 64 and done["identity"] == ref["identity"]
    assert open(tokens_file(path, 0), "rb").read() == open(tokens_file(cached.path, 0), "rb").read()


def _recorded(models, run) -> tuple[dict, dict]:
    """run() (a step on `models`) -> (its logs, the VAE and SiT gradients it applied, before clipping); the
    engines' step is wrapped to copy them (PlainEngine zeroes them after the update)."""
    grads = {}
    for name in ("vae", "sit"):
        engine = getattr(models, name)

        def recording_step(engine=engine, step=engine.step, name=name):
            grads[name] = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
                           if p.grad is not None}
            step()

        engine.step = recording_step
    return run(), grads


def _max_rel_diff(a: dict, b: dict) -> float:
    """max |a - b| over all tensors, relative to max |b|."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a) / max(v.abs().max().item() for v in b.values())


def test_cached_step_equals_online_step(cached):
    from repae.train.trainer import Trainer

    online = Trainer(cached.cfg, use_deepspeed=False)
    exact_models = copy.deepcopy(online.models)  # the same initial state, for the step given exact targets
    exact_models.ema = EMA(exact_models.sit.module)  # the EMA keeps tensor lists by identity: rebuilt on the copy
    cfg = dataclasses.replace(cached.cfg, encoder=dataclasses.replace(cached.cfg.encoder, feature_cache=cached.path))
    from_cache = Trainer(cfg, use_deepspeed=False)
    assert from_cache.models.encoders == [] and len(online.models.encoders) == 1
    inputs = online.next_inputs()
    cached_inputs = from_cache.next_inputs()  # the same batch and draws, targets read from the cache's rows
    assert torch.equal(inputs.images, cached_inputs.images) and torch.equal(inputs.noise, cached_inputs.noise)
    assert inputs.targets is None and cached_inputs.targets[0].shape == (4, 16, 384)
    with torch.no_grad():
        zs = [enc(inputs.images).float() for enc in online.models.encoders]
    want_logs, want_grads = _recorded(online.models, lambda: online.run_step(inputs))

    # Targets passed in are used as they are: the encoders' own output gives the online step bitwise.
    exact_models.encoders = []
    exact = dataclasses.replace(inputs, targets=tuple(zs))
    logs, grads = _recorded(exact_models, lambda: train_step(exact_models, exact, online.settings, step=0))
    assert all(torch.equal(logs[k], want_logs[k]) for k in want_logs)
    assert all(torch.equal(grads[m][k], want_grads[m][k]) for m in want_grads for k in want_grads[m])

    # From the cache, through the trainer: equal within the fp16 rounding of the targets.
    u = U["fp16"]
    torch.testing.assert_close(cached_inputs.targets[0], zs[0], rtol=u, atol=TINY["fp16"])
    logs, grads = _recorded(from_cache.models, lambda: from_cache.run_step(cached_inputs))
    tol = {"vae/align_loss": 2 * u, "sit/proj_loss": 2 * u, "vae/loss": 1.5 * 2 * u, "sit/loss": 0.5 * 2 * u}
    loss_diffs = {k: abs(float(logs[k]) - float(want_logs[k])) for k in tol}
    grad_diffs = {m: _max_rel_diff(grads[m], want_grads[m]) for m in want_grads}
    print(f"cached vs online: loss |diff| {loss_diffs}, gradient max |diff| / max |g| {grad_diffs}")
    assert all(loss_diffs[k] <= tol[k] for k in tol), loss_diffs
    assert all(torch.equal(logs[k], want_logs[k]) for k in want_logs if k not in tol)  # target-free losses
    assert all(d <= 2 * u for d in grad_diffs.values()), grad_diffs


def test_h5_source_caches_the_same_rows(cached, tmp_path):
    """An images.h5 prepared from the tree holds its reference crops in the same order: the same tokens, and
    the h5 run's own source passes the dataset check."""
    pytest.importorskip("h5py")
    from repae.train.h5_data import H5Source
    from repae.train.h5_prepare import prepare

    prepare(os.path.join(cached.run_dir, "demo_data"), str(tmp_path / "h5"), resolution=64, log=lambda *a: None)
    h5 = str(tmp_path / "h5" / "images.h5")
    cfg = run_config(cached.run_dir, "data.source=h5", f"data.root={h5}")
    path = write_cache(cfg, str(tmp_path / "cache"), batch_size=BATCH, progress=False)
    assert open(tokens_file(path, 0), "rb").read() == open(tokens_file(cached.path, 0), "rb").read()
    source = H5Source(h5, 64, global_batch_size=4, rank=0, world_size=1, seed=0, num_workers=0)
    FeatureCache(path).check_source(source)
    _one_line_error(lambda: FeatureCache(cached.path).check_source(source), "dataset.root")
