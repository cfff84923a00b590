"""The VAE latent cache (train/latent_cache.py, docs/METHOD.md#latent-cache): the stored mean and std are the VAE
posterior's own fp32 numbers, bitwise, and `mean + std * eps` from them is the VAE's own sample with that eps; a
killed write continues without recomputing its written chunks; two ranks (gloo processes launched as torchrun
launches them) finish a partial one-rank write into the same bytes; a cache made for other VAE weights, latent
statistics, resolution or dataset is refused in one line naming the field.
Everything runs the tiny VAE (ch 32, f8) in fp32 on CPU over 12 images of 32 px, in chunks of 5 (the last one 2).
"""

# B batch, C latent channels, h, w latent height and width

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONFIGS, tiny_config

from repae.model.vae import AutoencoderKL, save_latents_stats
from repae.model.weights import save_weights
from repae.train.array_cache import HEADER
from repae.train.config import TrainConfig, check_paths
from repae.train.data import ImageFolderDataset, ImageFolderSource
from repae.train.demo_data import write_demo_dataset
from repae.train.latent_cache import (
    MOMENTS,
    LatentCache,
    build_frozen_vae,
    deal_chunks,
    done_file,
    main,
    posterior_moments,
    write_cache,
)
from repae.train.main import _free_port

N, CHUNK, R = 12, 5, 32
LDM = {"stage": "ldm"} if "stage" in {f.name for f in dataclasses.fields(TrainConfig)} else {}
"""The config stage that reads data.latent_cache (the LDM-only run), where the config has stages."""
CPU = torch.device("cpu")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def overrides(ns, *extra: str) -> list[str]:
    return [f"logging.run_dir={ns.run_dir}", "schedule.global_batch_size=4", "schedule.precision=fp32",
            "data.num_workers=0", "logging.tensorboard=false", "data.source=folder", f"data.root={ns.root}",
            f"data.resolution={R}", f"vae.weights={ns.weights}", *extra]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """12 images, a random tiny VAE saved as its weight file with a non-trivial -latents-stats twin, and the
    cache of them written by the command."""
    base = tmp_path_factory.mktemp("latent_cache")
    ns = SimpleNamespace(root=write_demo_dataset(str(base / "images"), num_images=N, num_classes=4, resolution=R),
                         run_dir=base / "run", weights=base / "vae.pt", path=str(base / "cache"))
    cfg = tiny_config(ns.run_dir, *overrides(ns)[1:])
    torch.manual_seed(1)
    save_weights(AutoencoderKL(cfg.model_configs().vae).state_dict(), ns.weights)
    save_latents_stats(base / "vae-latents-stats.pt", torch.tensor([0.1, -0.2, 0.3, 0.0]),
                       torch.tensor([0.5, 2.0, 1.0, 0.25]))
    argv = ["--config", str(CONFIGS / "tiny_cpu.json"), "--out", ns.path, "--batch-size", str(CHUNK)]
    assert main(argv + [a for s in overrides(ns) for a in ("--set", s)]) == 0
    ns.cfg = dataclasses.replace(cfg, **LDM, data=dataclasses.replace(cfg.data, latent_cache=ns.path))
    return ns


def vae_posteriors(cfg):
    """The VAE (built as the writer builds it) over the images in index order, in the writer's chunks."""
    vae, _, _ = build_frozen_vae(cfg, CPU)
    ds = ImageFolderDataset(cfg.data.root, R)
    images = torch.stack([ds[i].image for i in range(N)])
    with torch.no_grad():
        return [vae.encode(images[i:i + CHUNK].float() / 127.5 - 1) for i in range(0, N, CHUNK)], images, vae


def test_round_trip_is_the_posterior_bitwise(cached):
    cache = LatentCache.for_run(cached.cfg, *build_frozen_vae(cached.cfg, CPU))
    assert cache.num_images == N and cache.latent_shape == (4, R // 8, R // 8)
    posteriors, images, vae = vae_posteriors(cached.cfg)
    mean_BChw, std_BChw = cache.moments(torch.arange(N), CPU)
    assert mean_BChw.dtype == std_BChw.dtype == torch.float32 and mean_BChw.shape == (N, 4, R // 8, R // 8)
    assert torch.equal(mean_BChw, torch.cat([p.mean for p in posteriors]))
    assert torch.equal(std_BChw, torch.cat([p.std for p in posteriors]))  # exp(0.5 * clamped logvar)
    assert np.array_equal(cache.labels, ImageFolderDataset(cached.cfg.data.root, R).labels)
    rows = torch.tensor([7, 0, 11, 7])  # any order, repeats
    got = cache.moments(rows, CPU)
    assert torch.equal(got[0], mean_BChw[rows]) and torch.equal(got[1], std_BChw[rows])
    with pytest.raises(ValueError, match=f"dataset index -1..3 outside its {N} rows"):
        cache.moments(torch.tensor([3, -1]), CPU)
    # A sample from the cache is the VAE's own sample with the same eps (DiagonalGaussianDistribution.sample).
    for k, p in enumerate(posteriors):
        mean, std = cache.moments(torch.arange(k * CHUNK, min(N, (k + 1) * CHUNK)), CPU)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(k))
        assert torch.equal(mean + std * eps, p.sample(torch.Generator().manual_seed(k)))
    # fp32 without autocast, even inside a caller's autocast region
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, std = posterior_moments(vae, images[:CHUNK])
    assert torch.equal(mean, posteriors[0].mean) and torch.equal(std, posteriors[0].std)


def _one_line_error(fn, *names, error=ValueError):
    with pytest.raises(error) as err:
        fn()
    text = str(err.value)
    assert "\n" not in text and all(n in text for n in names), text


def test_mismatched_identity_is_one_line_naming_the_field(cached, tmp_path):
    cfg = cached.cfg
    vae, bias, scale = build_frozen_vae(cfg, CPU)
    LatentCache.for_run(cfg, vae, bias, scale)  # the run it was made for passes
    # other latent statistics: a stats file of the run, and the trainer's own tensors
    save_latents_stats(tmp_path / "stats.pt", bias + 0.5, scale)
    other = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, latents_stats=str(tmp_path / "stats.pt")))
    _one_line_error(lambda: LatentCache.for_run(other, *build_frozen_vae(other, CPU)),
                    "latents_stats.bias[0] is 0.10000000149011612 in the cache but 0.6000000238418579")
    _one_line_error(lambda: LatentCache.for_run(cfg, vae, bias, scale.flip(0)), "latents_stats.scale[0]")
    # other VAE weights (one element changed)
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1
    _one_line_error(lambda: LatentCache.for_run(cfg, vae, bias, scale), "vae.fingerprint")
    # another resolution
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=64))
    _one_line_error(lambda: LatentCache.for_run(other, *build_frozen_vae(other, CPU)), f"resolution is {R}", "but 64")
    # the dataset: the run's own source passes; one image fewer, another label, another root do not
    source = ImageFolderSource(cfg.data.root, R, global_batch_size=4, rank=0, world_size=1, seed=0, num_workers=0)
    cache = LatentCache(cached.path)
    cache.check_source(source)
    ds = source.dataset
    fewer = SimpleNamespace(root=source.root, dataset=SimpleNamespace(relpaths=ds.relpaths[1:], labels=ds.labels[1:]))
    _one_line_error(lambda: cache.check_source(fewer), f"dataset.num_images is {N}", f"but {N - 1}")
    relabeled = SimpleNamespace(root=source.root, dataset=SimpleNamespace(relpaths=ds.relpaths, labels=ds.labels[::-1]))
    _one_line_error(lambda: cache.check_source(relabeled), "dataset.index_hash")
    _one_line_error(lambda: cache.check_source(SimpleNamespace(root=str(tmp_path), dataset=ds)), "dataset.root")
    # writing into it for another VAE is refused; no cache configured, or none there
    seeded = tiny_config(cached.run_dir, *overrides(cached)[1:-1], "schedule.seed=3")  # random VAE, other seed
    _one_line_error(lambda: write_cache(seeded, cached.path, batch_size=CHUNK, progress=False),
                    "vae.fingerprint", "remove it, or write to another --out")
    unset = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, latent_cache=None))
    _one_line_error(lambda: LatentCache.for_run(unset, vae, bias, scale), "data.latent_cache is not set")
    missing = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, latent_cache=str(tmp_path / "none")))
    _one_line_error(lambda: check_paths(missing), "config key data.latent_cache", "does not exist",
                    error=FileNotFoundError)


def _kill_at_call(monkeypatch, k: int) -> list[int]:
    """AutoencoderKL.encode raises KeyboardInterrupt at its k-th call (0: never); returns the rows of each call."""
    encode, calls = AutoencoderKL.encode, []

    def encode_or_die(self, x):
        calls.append(len(x))
        if len(calls) == k:
            raise KeyboardInterrupt  # the process killed in the middle of the k-th chunk
        return encode(self, x)

    monkeypatch.setattr(AutoencoderKL, "encode", encode_or_die)
    return calls


def _partial(cached, path: str, monkeypatch) -> None:
    """A one-rank write killed in its second chunk: chunk 0 written and marked."""
    _kill_at_call(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        write_cache(cached.cfg, path, batch_size=CHUNK, progress=False)
    monkeypatch.undo()
    assert np.load(done_file(path, 0)).tolist() == [True, False, False]
    _one_line_error(lambda: LatentCache(path), f"incomplete ({CHUNK} of {N} rows)")


def _same_files(path: str, ref: str) -> None:
    for name in (MOMENTS, "labels.npy"):
        assert open(os.path.join(path, name), "rb").read() == open(os.path.join(ref, name), "rb").read(), name
    header, want = (json.loads(open(os.path.join(p, HEADER)).read()) for p in (path, ref))
    assert header["complete"] and header["identity"] == want["identity"]
    assert not [f for f in os.listdir(path) if f.startswith("done-")]


def test_killed_write_continues_without_recomputing(cached, tmp_path, monkeypatch):
    path = str(tmp_path / "resumed")
    _partial(cached, path, monkeypatch)
    calls = _kill_at_call(monkeypatch, 0)
    write_cache(cached.cfg, path, batch_size=3, progress=False)  # the cache's chunks of 5 win
    assert calls == [CHUNK, N - 2 * CHUNK]  # chunks 1 and 2 only
    _same_files(path, cached.path)


def test_deal_chunks_is_disjoint_and_balanced():
    done = np.array([True, False, False, True, False, False, False])
    shares = [deal_chunks(done, r, 3) for r in range(3)]
    assert shares == [[1, 5], [2, 6], [4]]
    assert deal_chunks(done, 0, 1) == [1, 2, 4, 5, 6]


def test_two_ranks_finish_a_one_rank_write_into_the_same_bytes(cached, tmp_path, monkeypatch):
    path = str(tmp_path / "two_ranks")
    _partial(cached, path, monkeypatch)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    # On CPU the conv results depend on the thread count: the ranks use this process's, as the reference did.
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    argv = [sys.executable, "-m", "repae.train.latent_cache", "--config", str(CONFIGS / "tiny_cpu.json"), "--out",
            path, "--batch-size", str(CHUNK)] + [a for s in overrides(cached) for a in ("--set", s)]
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert f"{CHUNK} of {N} rows already written, {N - CHUNK} to compute on 2 rank(s)" in outs[0][0], outs[0]
    _same_files(path, cached.path)
