"""Parity of the latent BatchNorm (+ flow interpolation, + denormalisation) against its eager twin,
nn.BatchNorm2d, and a real two-rank (gloo) run of the SyncBN statistics hook."""

# B batch, C latent channels, H, W latent height and width

import os

import pytest
import torch
import torch.multiprocessing as mp
from parity import DEVICE, check_parity, fwd_bwd

from repae.kernels import (
    LatentBatchNorm,
    latent_bn,
    latent_bn_denorm,
    latent_bn_denorm_ref,
    latent_bn_interp,
    latent_bn_interp_ref,
    latent_bn_ref,
    make_latent_bn_inputs,
)
from repae.kernels.latent_bn_ref import allreduce_stats_hook

# (B, C, H, W): f8d4 at 256 px, f16d32 at 256 px (smaller batch), odd sizes, B=1, H=W=1
SHAPES_CPU = [(32, 4, 32, 32), (4, 32, 16, 16), (3, 5, 7, 3), (1, 3, 5, 2), (6, 2, 1, 1)]
SHAPES_GPU = [(32, 4, 32, 32), (32, 32, 16, 16), (3, 5, 7, 3), (256, 4, 32, 32)]
ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _split(inputs):
    """(tensor inputs for fwd_bwd, fresh copies of the running statistics)."""
    tensors = {k: inputs[k] for k in ("z", "t", "noise")}
    return tensors, [inputs[k].clone() for k in STAT_KEYS]


def _run_interp(shape, dtype, training, path, *, magnitude=1.0, noise_grad=True):
    inputs = make_latent_bn_inputs(*shape, dtype, seed=sum(shape), device=DEVICE, magnitude=magnitude)
    inputs["noise"].requires_grad_(noise_grad)
    tensors, stats_got = _split(inputs)
    _, stats_eager = _split(inputs)
    _, stats_oracle = _split(inputs)
    kw = dict(use_batch_stats=training, path=path)
    names = ("x_t", "v_target")
    got, douts = fwd_bwd(latent_bn_interp, tensors, names, backend="triton",
                         running_mean=stats_got[0], running_var=stats_got[1], num_batches_tracked=stats_got[2], **kw)
    eager, _ = fwd_bwd(latent_bn_interp, tensors, names, douts=douts, backend="eager",
                       running_mean=stats_eager[0], running_var=stats_eager[1], num_batches_tracked=stats_eager[2],
                       **kw)
    oracle, _ = fwd_bwd(latent_bn_interp_ref, tensors, names, douts=douts, upcast=True, use_batch_stats=training,
                        path=path, running_mean=stats_oracle[0], running_var=stats_oracle[1],
                        num_batches_tracked=stats_oracle[2])
    check_parity(got, eager, oracle, atol=ATOL[dtype])
    for name, g, e, o in zip(STAT_KEYS, stats_got, stats_eager, stats_oracle):
        assert g.dtype == o.dtype
        if name == "num_batches_tracked":
            assert g.item() == e.item() == o.item() == int(training)
        else:
            torch.testing.assert_close(g, o, atol=1e-5 * magnitude ** 2, rtol=1e-5, msg=name)
    assert got["x_t"].dtype == dtype and got["dz"].dtype == dtype
    return got


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("dtype", list(ATOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES_CPU, ids=str)
def test_latent_bn_interp_matches_ref(shape, dtype, training, path):
    _run_interp(shape, dtype, training, path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("dtype", list(ATOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES_GPU, ids=str)
def test_latent_bn_interp_matches_ref_full_size(shape, dtype, training, path):
    _run_interp(shape, dtype, training, path)


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
def test_latent_bn_large_magnitude(training):
    """Channel means ~1e3 with unit-scale spread: the two-pass variance stays exact."""
    _run_interp((4, 4, 8, 8), torch.float32, training, "linear", magnitude=1e3, noise_grad=False)


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("dtype", list(ATOL), ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7, 3), (4, 32, 4, 4)], ids=str)
def test_latent_bn_plain_matches_ref(shape, dtype, training):
    inputs = make_latent_bn_inputs(*shape, dtype, seed=1, device=DEVICE)
    z = {"z": inputs["z"]}
    results = []
    for backend in ("triton", "eager", None):
        rm, rv, nbt = (inputs[k].clone() for k in STAT_KEYS)
        if backend is None:
            res = fwd_bwd(latent_bn_ref, z, ("x0",), douts=results[0][1], upcast=True, use_batch_stats=training,
                          running_mean=rm, running_var=rv, num_batches_tracked=nbt)
        else:
            res = fwd_bwd(latent_bn, z, ("x0",), douts=results[0][1] if results else None, backend=backend,
                          use_batch_stats=training, running_mean=rm, running_var=rv, num_batches_tracked=nbt)
        results.append(res)
    check_parity(results[0][0], results[1][0], results[2][0], atol=ATOL[dtype])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_running_stats_match_batchnorm2d_after_three_steps(backend, momentum):
    C = 5
    ours = LatentBatchNorm(C, momentum=momentum, backend=backend).to(DEVICE)
    torch_bn = torch.nn.BatchNorm2d(C, eps=1e-4, momentum=momentum, affine=False).to(DEVICE)
    for step in range(3):
        z = make_latent_bn_inputs(4, C, 6, 5, seed=step, device=DEVICE, requires_grad=False)["z"]
        torch.testing.assert_close(ours(z), torch_bn(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, torch_bn.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.running_var, torch_bn.running_var, atol=1e-5, rtol=1e-6)
    assert ours.num_batches_tracked.item() == torch_bn.num_batches_tracked.item() == 3
    ours.eval(), torch_bn.eval()
    z = make_latent_bn_inputs(3, C, 4, 4, seed=9, device=DEVICE, requires_grad=False)["z"]
    torch.testing.assert_close(ours(z), torch_bn(z), atol=1e-5, rtol=1e-5)
    assert ours.num_batches_tracked.item() == 3


def test_official_batchnorm_state_dict_loads_strict():
    torch_bn = torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
    torch_bn.running_mean.normal_()
    torch_bn.running_var.uniform_(0.5, 2)
    torch_bn.num_batches_tracked.fill_(17)
    ours = LatentBatchNorm(4)
    ours.load_state_dict(torch_bn.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(torch_bn.state_dict()) == list(STAT_KEYS)
    for k, v in torch_bn.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_init_stats_from_latents_stats_file():
    ours = LatentBatchNorm(4)
    bias, scale = torch.randn(1, 4, 1, 1), torch.rand(1, 4, 1, 1) + 0.1
    ours.init_stats(latents_scale=scale, latents_bias=bias)
    torch.testing.assert_close(ours.running_mean, bias.flatten())
    torch.testing.assert_close(ours.running_var, (1 / scale.flatten()) ** 2)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ours.denormalize(x), x / scale + bias)  # generate.py's decode


@pytest.mark.parametrize("dtype", list(ATOL), ids=str)
def test_latent_bn_denorm_matches_ref(dtype):
    inputs = make_latent_bn_inputs(3, 5, 7, 3, dtype, device=DEVICE)
    x = {"x": inputs["z"]}
    stats = dict(running_mean=inputs["running_mean"], running_var=inputs["running_var"])
    got, douts = fwd_bwd(latent_bn_denorm, x, ("z",), backend="triton", **stats)
    eager, _ = fwd_bwd(latent_bn_denorm, x, ("z",), douts=douts, backend="eager", **stats)
    oracle, _ = fwd_bwd(latent_bn_denorm_ref, x, ("z",), douts=douts, upcast=True,
                        **{k: v.double() for k, v in stats.items()})
    check_parity(got, eager, oracle, atol=ATOL[dtype])


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_latent_bn_gradcheck_float64(training, path):
    inputs = make_latent_bn_inputs(3, 2, 2, 3, torch.float64, device=DEVICE, seed=4)
    noise = inputs["noise"].requires_grad_(True)

    def f(z, noise):
        stats = [inputs[k].clone() for k in STAT_KEYS]  # the same statistics at every evaluation
        return latent_bn_interp(z, inputs["t"], noise, *stats, use_batch_stats=training, path=path, backend="triton")

    assert torch.autograd.gradcheck(f, (inputs["z"], noise))

    def g(z):
        stats = [inputs[k].clone() for k in STAT_KEYS]
        return latent_bn(z, *stats, use_batch_stats=training, backend="triton")

    assert torch.autograd.gradcheck(g, (inputs["z"],))


def test_latent_bn_deterministic():
    inputs = make_latent_bn_inputs(4, 4, 8, 8, device=DEVICE, seed=3)
    tensors, _ = _split(inputs)
    runs, douts = [], None
    for _ in range(2):
        stats = [inputs[k].clone() for k in STAT_KEYS]
        res, douts = fwd_bwd(latent_bn_interp, tensors, ("x_t", "v"), douts=douts, running_mean=stats[0],
                             running_var=stats[1], num_batches_tracked=stats[2], use_batch_stats=True, backend="triton")
        runs.append(res)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def _two_rank_worker(rank, world, init_file, inputs, douts, out_dir):
    os.environ["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    half = inputs["z"].shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    bn = LatentBatchNorm(inputs["z"].shape[1], backend="triton", stats_hook=allreduce_stats_hook())
    bn.running_mean.copy_(inputs["running_mean"])
    bn.running_var.copy_(inputs["running_var"])
    z = inputs["z"][sl].clone().requires_grad_(True)
    x_t, v = bn.interpolate(z, inputs["t"][sl], inputs["noise"][sl], use_batch_stats=True)
    torch.autograd.backward((x_t, v), (douts[0][sl], douts[1][sl]))
    torch.save({"x_t": x_t.detach(), "v": v.detach(), "dz": z.grad, **bn.state_dict()}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_gloo_equal_one_rank(tmp_path):
    """SyncBN semantics: 2 ranks x batch 3 (gloo, all-reduce hook) == 1 rank x batch 6, forward,
    backward through the global batch statistics, and the running statistics."""
    inputs = make_latent_bn_inputs(6, 3, 4, 5, requires_grad=False, seed=11)
    g = torch.Generator().manual_seed(0)
    douts = [torch.randn(inputs["z"].shape, generator=g) for _ in range(2)]
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init"), inputs, douts, str(tmp_path)), nprocs=2)
    bn = LatentBatchNorm(3, backend="triton")
    bn.running_mean.copy_(inputs["running_mean"])
    bn.running_var.copy_(inputs["running_var"])
    z = inputs["z"].clone().requires_grad_(True)
    x_t, v = bn.interpolate(z, inputs["t"], inputs["noise"], use_batch_stats=True)
    torch.autograd.backward((x_t, v), douts)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, full in (("x_t", x_t), ("v", v), ("dz", z.grad)):
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]), full.detach(), atol=1e-5, rtol=1e-5,
                                   msg=name)
    for key, value in bn.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r[key], value, atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_hook_statistics_exact_with_stale_running_stats(backend):
    """The SyncBN (hook) path is as exact as the one-rank path when the running statistics are far from
    the batch's (the first steps without a latents-stats file, or a drifting VAE): channel means 1000
    with standard deviations 0.1 to 2, running statistics at their (0, 1) init. Shifting the sums by the
    running mean alone loses the variance to cancellation here (measured 0.2 in x0 units)."""
    g = torch.Generator().manual_seed(3)
    std = torch.tensor([1.0, 0.5, 2.0, 0.1]).view(1, 4, 1, 1)
    z = (1000 + torch.randn(8, 4, 8, 8, generator=g) * std).to(DEVICE)
    calls = []

    def hook(stats):  # one rank: the sum over ranks is the identity
        calls.append(stats.clone())

    z64, dims = z.double(), (0, 2, 3)
    mean, var = z64.mean(dims), z64.var(dims, unbiased=False)
    oracle = (z64 - mean.view(1, 4, 1, 1)) / (var.view(1, 4, 1, 1) + 1e-4).sqrt()
    plain = torch.nn.functional.batch_norm(z, torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE),
                                           training=True, eps=1e-4)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    x0 = latent_bn(z, rm, rv, use_batch_stats=True, stats_hook=hook, backend=backend)
    assert calls and all(c.shape == (3, 4) for c in calls)
    err, plain_err = (x0.double() - oracle).abs().max().item(), (plain.double() - oracle).abs().max().item()
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)
    n = z.numel() // 4
    torch.testing.assert_close(rm.double(), 0.1 * mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_latent_bn_bad_inputs(backend):
    inp = make_latent_bn_inputs(2, 3, 4, 4, device=DEVICE, requires_grad=False)
    z, t, noise, rm, rv, nbt = (inp[k] for k in ("z", "t", "noise", *STAT_KEYS))
    with pytest.raises(ValueError, match=r"z must be 4-D \[B, C, H, W\]"):
        latent_bn(z[0], rm, rv, use_batch_stats=True, backend=backend)
    with pytest.raises(ValueError, match=r"running_mean must have shape \[3\]"):
        latent_bn(z, rm[:2], rv, use_batch_stats=True, backend=backend)
    with pytest.raises(ValueError, match="running_var must be fp32"):
        latent_bn(z, rm, rv.half(), use_batch_stats=True, backend=backend)
    with pytest.raises(ValueError, match="num_batches_tracked must be a one-element int64"):
        latent_bn(z, rm, rv, nbt.float(), use_batch_stats=True, backend=backend)
    with pytest.raises(ValueError, match="z must be a floating-point tensor"):
        latent_bn(z.long(), rm, rv, use_batch_stats=True, backend=backend)
    with pytest.raises(ValueError, match=r"t must hold one time per sample \(B=2"):
        latent_bn_interp(z, t[:1], noise, rm, rv, use_batch_stats=False, backend=backend)
    with pytest.raises(ValueError, match=r"noise must have shape \[2, 3, 4, 4\]"):
        latent_bn_interp(z, t, noise[:1], rm, rv, use_batch_stats=False, backend=backend)
    with pytest.raises(ValueError, match="path must be one of"):
        latent_bn_interp(z, t, noise, rm, rv, use_batch_stats=False, path="vp", backend=backend)
    with pytest.raises(ValueError, match="t must not require grad"):
        latent_bn_interp(z, t.clone().requires_grad_(True), noise, rm, rv, use_batch_stats=False, backend=backend)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        latent_bn(z, rm.to("meta"), rv, use_batch_stats=True, backend=backend)


def test_latent_bn_single_value_per_channel_in_training():
    z = torch.randn(1, 3, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        latent_bn(z, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), use_batch_stats=True,
                  backend="triton")
