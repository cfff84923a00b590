"""Euler ODE and Euler-Maruyama SDE samplers (docs/METHOD.md#sampling) on model functions with known answers (CPU)."""

import math

import pytest
import torch

from repae.model.samplers import euler_maruyama_sampler, euler_sampler, score_from_velocity

B, C, H, W = 3, 4, 2, 2
NULL = 10


def _noise(seed=0, dtype=torch.float32):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _labels():
    return torch.tensor([1, 2, 3])


class Recorder:
    """model_fn wrapper that logs (batch, t values, labels, dtypes) of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, y):
        self.calls.append({"n": x.shape[0], "t": t.double().tolist(), "y": y.tolist(), "x_dtype": x.dtype,
                           "t_dtype": t.dtype})
        return self.fn(x, t, y)


# ---------------------------------------------------------------------------------------------------
# Euler ODE
# ---------------------------------------------------------------------------------------------------


def test_euler_constant_velocity_lands_on_x0():
    """v = eps - x0 is the exact velocity of the straight path from noise eps to x0."""
    x0 = _noise(1, torch.float64)
    eps = _noise(2, torch.float64)
    out = euler_sampler(lambda x, t, y: (eps - x0).to(x.dtype), eps, _labels(), num_steps=7, null_class=NULL)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("heun", [False, True])
def test_euler_linear_field_matches_the_closed_form_steps(heun):
    """dx/dt = a x: an Euler step multiplies by 1 + a dt, Heun's by 1 + a dt + (a dt)^2 / 2; exact is exp(-a)."""
    a, n = 0.7, 20
    x1 = _noise(3, torch.float64)
    out = euler_sampler(lambda x, t, y: a * x, x1, _labels(), num_steps=n, null_class=NULL, heun=heun)
    ts = torch.linspace(1, 0, n + 1, dtype=torch.float64).tolist()
    factor = 1.0
    for i in range(n):
        h = a * (ts[i + 1] - ts[i])
        factor *= 1 + h + (h * h / 2 if heun and i < n - 1 else 0.0)
    torch.testing.assert_close(out, factor * x1, atol=1e-12, rtol=1e-12)
    # Global error vs the exact solution: ~6e-3 for Euler, ~2.4e-4 for Heun (its last step is plain Euler).
    assert abs(factor - math.exp(-a)) < (5e-4 if heun else 1e-2)


def test_heun_skips_the_corrector_on_the_last_step():
    rec = Recorder(lambda x, t, y: torch.zeros_like(x))
    euler_sampler(rec, _noise(), _labels(), num_steps=5, null_class=NULL, heun=True)
    assert len(rec.calls) == 2 * 5 - 1
    rec = Recorder(lambda x, t, y: torch.zeros_like(x))
    euler_sampler(rec, _noise(), _labels(), num_steps=5, null_class=NULL)
    assert len(rec.calls) == 5


def test_state_is_float64_and_the_model_runs_in_the_latents_dtype():
    """The model sees float32 casts of a float64 state; the result equals a hand-written float64 loop."""
    x1 = _noise(4)

    def model_fn(x, t, y):
        return torch.sin(3 * x) + t[:, None, None, None]

    rec = Recorder(model_fn)
    out = euler_sampler(rec, x1, _labels(), num_steps=6, null_class=NULL)
    assert all(c["x_dtype"] == torch.float32 and c["t_dtype"] == torch.float32 for c in rec.calls)
    assert out.dtype == torch.float64
    ts = torch.linspace(1, 0, 7, dtype=torch.float64)
    x = x1.double()
    for i in range(6):
        t_B = torch.full((B,), float(ts[i]), dtype=torch.float64).float()
        x = x + (ts[i + 1] - ts[i]) * model_fn(x.float(), t_B, None).double()
    assert torch.equal(out, x)
    # A float32 state would have drifted away from the float64 one.
    assert not torch.equal(out.float().double(), out)


def test_cfg_only_inside_the_guidance_interval():
    """Inside [low, high] the model sees [x, x] with labels [y, null] and d = d_u + s (d_c - d_u)."""
    cond, uncond, s = 1.0, -2.0, 3.0

    def model_fn(x, t, y):
        v = torch.where(y == NULL, uncond, cond).to(x.dtype)
        return v[:, None, None, None].expand_as(x).clone()

    rec = Recorder(model_fn)
    n, low, high = 10, 0.3, 0.7
    out = euler_sampler(rec, _noise(), _labels(), num_steps=n, cfg_scale=s, guidance_low=low, guidance_high=high,
                        null_class=NULL)
    ts = torch.linspace(1, 0, n + 1, dtype=torch.float64).tolist()
    inside = [low <= t <= high for t in ts[:-1]]
    assert sum(inside) == 5  # t = 0.7, 0.6, 0.5, 0.4, 0.3 (both ends inclusive)
    assert len(rec.calls) == n
    expected = _noise().double()
    for call, t_cur, t_next, g in zip(rec.calls, ts[:-1], ts[1:], inside):
        assert call["n"] == (2 * B if g else B)
        assert call["y"] == ([1, 2, 3, NULL, NULL, NULL] if g else [1, 2, 3])
        assert call["t"] == pytest.approx([t_cur] * call["n"], abs=1e-7)
        expected = expected + (t_next - t_cur) * ((uncond + s * (cond - uncond)) if g else cond)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_cfg_scale_one_never_doubles_the_batch():
    rec = Recorder(lambda x, t, y: torch.zeros_like(x))
    euler_sampler(rec, _noise(), _labels(), num_steps=4, cfg_scale=1.0, null_class=None)
    assert [c["n"] for c in rec.calls] == [B] * 4
    with pytest.raises(ValueError, match="null_class"):
        euler_sampler(rec, _noise(), _labels(), num_steps=4, cfg_scale=2.0, null_class=None)
    with pytest.raises(ValueError, match="num_steps"):
        euler_sampler(rec, _noise(), _labels(), num_steps=0, null_class=NULL)
    with pytest.raises(ValueError, match="labels"):
        euler_sampler(rec, _noise(), torch.tensor([1]), null_class=NULL)


# ---------------------------------------------------------------------------------------------------
# Score and Euler-Maruyama SDE
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_score_from_velocity_on_the_exact_path(path_type):
    """On x_t = alpha x0 + sigma eps with the true v, the score of N(alpha x0, sigma^2) is -eps / sigma."""
    x0, eps = _noise(5, torch.float64), _noise(6, torch.float64)
    t_B = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    t = t_B[:, None, None, None]
    if path_type == "linear":
        alpha, sigma, d_alpha, d_sigma = 1 - t, t, -1.0, 1.0
    else:
        alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        d_alpha, d_sigma = -math.pi / 2 * sigma, math.pi / 2 * alpha
    x_t, v = alpha * x0 + sigma * eps, d_alpha * x0 + d_sigma * eps
    torch.testing.assert_close(score_from_velocity(v, x_t, t_B, path_type), -eps / sigma, atol=1e-10, rtol=1e-10)
    if path_type == "linear":  # the simplified form
        torch.testing.assert_close(score_from_velocity(v, x_t, t_B), (-(1 - t) * v - x_t) / t, atol=1e-12, rtol=0)


def test_sde_time_grid_and_nfe():
    rec = Recorder(lambda x, t, y: torch.zeros_like(x))
    euler_maruyama_sampler(rec, _noise(), _labels(), num_steps=6, null_class=NULL,
                           generator=torch.Generator().manual_seed(0))
    want = torch.linspace(1, 0.04, 6, dtype=torch.float64).tolist()
    assert len(rec.calls) == 6  # NFE = num_steps: 5 stochastic steps + the deterministic last one
    assert [c["t"][0] for c in rec.calls] == pytest.approx(want, abs=1e-7)


def test_sde_is_reproducible_with_a_generator_and_its_last_step_is_deterministic():
    x1, y, n = _noise(7), _labels(), 5

    def model_fn(x, t, y):
        return 0.5 * x + t[:, None, None, None]

    def run(seed):
        return euler_maruyama_sampler(model_fn, x1, y, num_steps=n, null_class=NULL,
                                      generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.dtype == torch.float64 and torch.equal(a, b) and not torch.equal(a, c)

    # Replay with the same noise list by hand: n - 1 noisy steps, then the mean step 0.04 -> 0.
    g = torch.Generator().manual_seed(0)
    ts = torch.cat([torch.linspace(1, 0.04, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = x1.double()

    def drift(x, t):
        t_B = torch.full((B,), float(t), dtype=torch.float64)
        v = model_fn(x.float(), t_B.float(), y).double()
        score = (-(1 - t) * v - x) / t
        return v - t * score  # v - w/2 score with w = 2t

    for i in range(n - 1):
        dt = ts[i + 1] - ts[i]
        eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x = x + drift(x, ts[i]) * dt + torch.sqrt(2 * ts[i]) * eps * torch.sqrt(dt.abs())
    x = x + (ts[n] - ts[n - 1]) * drift(x, ts[n - 1])
    torch.testing.assert_close(a, x, atol=1e-12, rtol=1e-12)
    # Exactly n - 1 draws: the generators agree afterwards.
    g_used = torch.Generator().manual_seed(0)
    euler_maruyama_sampler(model_fn, x1, y, num_steps=n, null_class=NULL, generator=g_used)
    assert torch.equal(torch.randn(4, generator=g_used), torch.randn(4, generator=g))


def test_sde_with_one_step_is_a_single_deterministic_step():
    """num_steps = 1: t_steps = [1, 0], no noise at all (the generator is not touched)."""
    g = torch.Generator().manual_seed(0)
    x1 = _noise(8, torch.float64)
    x0 = _noise(9, torch.float64)
    out = euler_maruyama_sampler(lambda x, t, y: (x1 - x0).to(x.dtype), x1, _labels(), num_steps=1, null_class=NULL,
                                 generator=g)
    # At t = 1 the linear score is -x / 1, so d = v + x = x1 - x0 + x1 and x0' = x1 - d.
    torch.testing.assert_close(out, x0 - x1, atol=1e-12, rtol=0)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=torch.Generator().manual_seed(0)))


def test_sde_cfg_interval_and_guided_drift():
    """CFG on the drift inside [low, high]; with a label-independent model it changes nothing."""
    x1, y = _noise(10), _labels()
    rec = Recorder(lambda x, t, y: 0.3 * x)
    kw = {"num_steps": 8, "null_class": NULL}
    a = euler_maruyama_sampler(rec, x1, y, cfg_scale=4.0, guidance_low=0.0, guidance_high=0.5,
                               generator=torch.Generator().manual_seed(0), **kw)
    ts = torch.linspace(1, 0.04, 8, dtype=torch.float64).tolist()
    assert [c["n"] for c in rec.calls] == [2 * B if t <= 0.5 else B for t in ts]
    assert all(c["y"][B:] == [NULL] * B for c in rec.calls if c["n"] == 2 * B)
    b = euler_maruyama_sampler(lambda x, t, y: 0.3 * x, x1, y, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="path_type"):
        euler_maruyama_sampler(rec, x1, y, path_type="vp", **kw)


def test_samplers_drive_a_tiny_sit():
    """SiT.inference as model_fn, CFG with its null class: finite float64 latents of the input shape."""
    from repae.model.sit import build_sit

    torch.manual_seed(0)
    sit = build_sit(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                    encoder_depth=1, z_dims=(8,), projector_dim=16, kernel_backend="eager").eval()
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 4])
    null = sit.config.num_classes
    ode = euler_sampler(sit.inference, z, y, num_steps=3, cfg_scale=4.0, null_class=null)
    sde = euler_maruyama_sampler(sit.inference, z, y, num_steps=3, cfg_scale=2.0, guidance_high=0.5, null_class=null,
                                 generator=torch.Generator().manual_seed(0))
    for out in (ode, sde):
        assert out.shape == z.shape and out.dtype == torch.float64 and torch.isfinite(out).all()
