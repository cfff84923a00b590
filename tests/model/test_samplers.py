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


# ---------------------------------------------------------------------------------------------------
# Guidance: scale 1 and the exact interval bounds
# ---------------------------------------------------------------------------------------------------


def _label_model(x, t, y):
    """A nonlinear, label-dependent velocity: CFG changes the result wherever it is applied."""
    return torch.sin(3 * x) * (1 + 0.1 * y.to(x.dtype))[:, None, None, None] + t[:, None, None, None] * x


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_maruyama"])
def test_cfg_scale_one_is_bitwise_no_cfg(sampler):
    """cfg_scale = 1 runs the conditional pass only, so it is bitwise a run without guidance, for both samplers
    (the mix d_u + 1 * (d_c - d_u) would not be bitwise d_c)."""
    x1, y = _noise(11), _labels()

    def run(**kw):
        if sampler == "euler_maruyama":
            return euler_maruyama_sampler(_label_model, x1, y, num_steps=6,
                                          generator=torch.Generator().manual_seed(0), **kw)
        return euler_sampler(_label_model, x1, y, num_steps=6, heun=sampler == "heun", **kw)

    plain = run(null_class=None)
    assert torch.equal(run(cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, null_class=NULL), plain)
    # Guidance above 1 with an interval that holds no step is no guidance either.
    assert torch.equal(run(cfg_scale=4.0, guidance_low=2.0, guidance_high=3.0, null_class=NULL), plain)
    assert not torch.equal(run(cfg_scale=4.0, null_class=NULL), plain)


def _guided_steps(sampler, low, high, n, **kw):
    """Which model calls ran guided (batch 2B), for a label-independent model."""
    rec = Recorder(lambda x, t, y: 0.3 * x)
    sampler(rec, _noise(), _labels(), num_steps=n, cfg_scale=2.0, guidance_low=low, guidance_high=high,
            null_class=NULL, **kw)
    return [c["n"] == 2 * B for c in rec.calls]


@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama"])
def test_guidance_interval_switches_exactly_at_its_bounds(sampler):
    """t_cur == guidance_low and t_cur == guidance_high are guided; one float64 ulp outside either bound is not."""
    n = 10
    if sampler == "euler":
        fn, kw = euler_sampler, {}
        ts = torch.linspace(1, 0, n + 1, dtype=torch.float64).tolist()[:-1]  # t_cur of each call
    else:
        fn, kw = euler_maruyama_sampler, {"generator": torch.Generator().manual_seed(0)}
        ts = torch.linspace(1, 0.04, n, dtype=torch.float64).tolist()  # the last call is the step 0.04 -> 0
    i_high, i_low = 3, len(ts) - 1  # low = the last call's t_cur: 0.1 for the ODE, 0.04 (the mean step) for the SDE
    high, low = ts[i_high], ts[i_low]

    def expect(first, last):
        return [first <= i <= last for i in range(len(ts))]

    assert _guided_steps(fn, low, high, n, **kw) == expect(i_high, i_low)
    assert _guided_steps(fn, low, math.nextafter(high, -math.inf), n, **kw) == expect(i_high + 1, i_low)
    assert _guided_steps(fn, math.nextafter(low, math.inf), high, n, **kw) == expect(i_high, i_low - 1)
    assert _guided_steps(fn, math.nextafter(low, -math.inf), math.nextafter(high, math.inf), n,
                         **kw) == expect(i_high, i_low)
    # A degenerate interval [t, t] guides exactly the step at t.
    assert _guided_steps(fn, ts[5], ts[5], n, **kw) == expect(5, 5)
    if sampler == "euler":  # the corrector follows its predictor, so Heun's calls come in guided pairs
        pairs = [g for g in expect(i_high, i_low) for _ in range(2)][:-1]
        assert _guided_steps(fn, low, high, n, heun=True) == pairs


# ---------------------------------------------------------------------------------------------------
# An analytic velocity field: Gaussian data, where the exact flow and score are known
# ---------------------------------------------------------------------------------------------------
# Data x0 ~ N(mu_c, s_c^2) independently per element of channel c, eps ~ N(0, 1), x_t = (1 - t) x0 + t eps. Then x_t
# ~ N(m_t, V_t) with m_t = (1 - t) mu and V_t = (1 - t)^2 s^2 + t^2, and Gaussian conditioning gives
#   E[x0 | x_t = x] = mu + (1 - t) s^2 (x - m_t) / V_t,   E[eps | x_t = x] = t (x - m_t) / V_t,
#   v(x, t) = E[eps - x0 | x_t = x] = -mu + k_t (x - m_t) / V_t,  k_t = t - (1 - t) s^2 = V_t' / 2,
#   score(x, t) = -(x - m_t) / V_t.
# The ODE dx/dt = v keeps z = (x - m_t) / sqrt(V_t) fixed (d/dt [m_t + sqrt(V_t) z] = -mu + V_t' / (2 sqrt(V_t)) z),
# so the exact flow maps the noise x_1 = z (m_1 = 0, V_1 = 1) to x_0 = mu + s z. v is smooth on [0, 1] (V_t >= s^2 /
# (1 + s^2) > 0), so Euler and Heun converge at their orders all the way down to t = 0.

GAUSS_MU = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
GAUSS_S = torch.tensor([0.3, 0.6, 1.0, 1.5], dtype=torch.float64)


def _gaussian_velocity(x, t, y):
    """The exact velocity v(x, t) of the Gaussian data above, per channel (y is ignored)."""
    mu, s = GAUSS_MU[:, None, None], GAUSS_S[:, None, None]
    t = t.to(torch.float64)[:, None, None, None]
    m, var = (1 - t) * mu, (1 - t) ** 2 * s**2 + t**2
    return (-mu + (t - (1 - t) * s**2) * (x.to(torch.float64) - m) / var).to(x.dtype)


def _loglog_slope(num_steps, errors):
    """Least-squares slope of -log(error) against log(num_steps): the measured order of convergence."""
    lx, ly = [math.log(n) for n in num_steps], [-math.log(e) for e in errors]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


@pytest.mark.parametrize("heun,order_range", [(False, (0.8, 1.3)), (True, (1.7, 2.4))])
def test_ode_converges_at_its_order_on_gaussian_data(heun, order_range):
    """Max error to the exact flow endpoint mu + s z over 8..64 steps. Measured slopes: Euler 0.97 (error 0.65 at 8
    steps, 0.086 at 64), Heun 2.06 (0.072 -> 9.9e-4); Heun's last step is plain Euler, a local O(h^2) error that
    keeps the global order 2. float64 noise, so the model runs in float64 and rounding stays far below the error."""
    z = torch.randn(64, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)
    exact = GAUSS_MU[:, None, None] + GAUSS_S[:, None, None] * z
    steps = (8, 16, 32, 64)
    errors = [(euler_sampler(_gaussian_velocity, z, y, num_steps=n, null_class=None, heun=heun) - exact).abs().max()
              .item() for n in steps]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    lo, hi = order_range
    assert lo <= _loglog_slope(steps, errors) <= hi, errors


def _sde_moments_of_the_discrete_chain(num_steps, mu, s):
    """Exact mean and variance of the Euler-Maruyama chain on the Gaussian field, started from N(0, 1).

    The drift d = v - t score = -mu + a_t (x - m_t) with a_t = (k_t + t) / V_t is affine, so each step maps a Gaussian
    to a Gaussian: mean m' = m + dt d(m), var' = (1 + dt a_t)^2 var + 2 t |dt| (no noise term on the last step).
    """
    ts = torch.cat([torch.linspace(1, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    mean, var = torch.zeros_like(mu), torch.ones_like(s)
    for i in range(num_steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        m_t, v_t = (1 - t) * mu, (1 - t) ** 2 * s**2 + t**2
        a = (t - (1 - t) * s**2 + t) / v_t
        mean = mean + dt * (-mu + a * (mean - m_t))
        var = (1 + dt * a) ** 2 * var + (2 * t * dt.abs() if i < num_steps - 1 else 0.0)
    return mean, var


def test_sde_matches_the_data_moments_on_gaussian_data():
    """250 steps on 4096 x [4, 2, 2] latents: per channel N = 16,384 iid samples of N(mu_c, s_c^2), up to a
    discretisation bias of the std that the chain's own moments give exactly.

    The bias is almost all the deterministic last step 0.04 -> 0: from the exact marginal at tau = 0.04 it gives
    std (1 - tau a_tau) sqrt(V_tau), i.e. -2.8 % for s = 0.3, -0.9 % for 0.6, -0.5 % for 1.0, -0.4 % for 1.5; the 249
    stochastic steps add under 0.4 % (their variance at t = 0.04 is 0.994..0.999 of V_0.04). The mean is unbiased.
    Tolerances: 5 standard errors, s / sqrt(N) for the mean and std / sqrt(2 (N - 1)) for the std. Measured: means
    0.4993, -0.9975, -0.0108, 2.0005; stds 0.2933, 0.5957, 0.9976, 1.4838 (chain: 0.2915, 0.5949, 0.9952, 1.4938).
    """
    num_steps, batch = 250, 4096
    z = torch.randn(batch, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = euler_maruyama_sampler(_gaussian_velocity, z, torch.zeros(batch, dtype=torch.long), num_steps=num_steps,
                                 null_class=None, generator=torch.Generator().manual_seed(2))
    samples = out.transpose(0, 1).reshape(4, -1)
    n = samples.shape[1]
    mean, std = samples.mean(1), samples.std(1)

    chain_mean, chain_var = _sde_moments_of_the_discrete_chain(num_steps, GAUSS_MU, GAUSS_S)
    chain_std = chain_var.sqrt()
    torch.testing.assert_close(chain_mean, GAUSS_MU, atol=1e-12, rtol=0)
    tau = 0.04
    v_tau = (1 - tau) ** 2 * GAUSS_S**2 + tau**2
    last_step_std = (1 - tau * (2 * tau - (1 - tau) * GAUSS_S**2) / v_tau) * v_tau.sqrt()
    assert ((chain_std - last_step_std).abs() <= 4e-3 * GAUSS_S).all()
    bias = chain_std / GAUSS_S - 1
    assert ((bias <= 0) & (bias >= -0.03)).all(), bias

    assert ((mean - GAUSS_MU).abs() <= 5 * GAUSS_S / math.sqrt(n)).all(), mean
    assert ((std - chain_std).abs() <= 5 * chain_std / math.sqrt(2 * (n - 1))).all(), std
    assert ((std - GAUSS_S).abs() <= 5 * GAUSS_S / math.sqrt(2 * (n - 1)) + bias.abs() * GAUSS_S).all(), std


# ---------------------------------------------------------------------------------------------------
# Bitwise parity with a transcription of the original's samplers
# ---------------------------------------------------------------------------------------------------
# Written from docs/METHOD.md#sampling in the original's order of operations: per step it rebuilds the CFG test
# `cfg_scale > 1 and low <= t_cur <= high`, builds the time input as ones(n) cast to float64 times t_cur, runs the
# model in the latents' dtype, and its linear-path score uses tensor-valued d_alpha = -ones, d_sigma = ones. The SDE
# draws randn_like(x) (float64, the global RNG) before the model call. Only here, as the oracle.


def _original_guided(t_cur, cfg_scale, low, high):
    return cfg_scale > 1.0 and t_cur <= high and t_cur >= low


def _original_inputs(x, y, t, guided):
    x_in = torch.cat([x] * 2, dim=0) if guided else x
    y_in = torch.cat([y, torch.tensor([NULL] * y.size(0))], dim=0) if guided else y
    return x_in, y_in, torch.ones(x_in.size(0)).to(dtype=torch.float64) * t


def _original_mix(d, guided, cfg_scale):
    if not guided:
        return d
    d_cond, d_uncond = d.chunk(2)
    return d_uncond + cfg_scale * (d_cond - d_uncond)


def _original_euler(model, latents, y, num_steps, heun, cfg_scale, low, high):
    dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        guided = _original_guided(t_cur, cfg_scale, low, high)
        x_in, y_in, t_in = _original_inputs(x_cur, y, t_cur, guided)
        d_cur = _original_mix(model(x_in.to(dtype=dtype), t_in.to(dtype=dtype), y_in).to(torch.float64), guided,
                              cfg_scale)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            x_in, y_in, t_in = _original_inputs(x_next, y, t_next, guided)
            d_prime = _original_mix(model(x_in.to(dtype=dtype), t_in.to(dtype=dtype), y_in).to(torch.float64),
                                    guided, cfg_scale)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def _original_score(v, x, t):
    t = t.view(t.size(0), *([1] * (x.dim() - 1)))
    alpha, d_alpha = 1 - t, torch.ones_like(x) * -1
    sigma, d_sigma = t, torch.ones_like(x)
    reverse_alpha_ratio = alpha / d_alpha
    var = sigma**2 - reverse_alpha_ratio * d_sigma * sigma
    return (reverse_alpha_ratio * v - x) / var


def _original_euler_maruyama(model, latents, y, num_steps, cfg_scale, low, high):
    dtype = latents.dtype
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)])
    x_next = latents.to(torch.float64)

    def drift(x_cur, t_cur):
        guided = _original_guided(t_cur, cfg_scale, low, high)
        x_in, y_in, t_in = _original_inputs(x_cur, y, t_cur, guided)
        v_cur = model(x_in.to(dtype=dtype), t_in.to(dtype=dtype), y_in).to(torch.float64)
        s_cur = _original_score(v_cur, x_in, t_in)
        return _original_mix(v_cur - 0.5 * (2 * t_cur) * s_cur, guided, cfg_scale)

    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt = t_next - t_cur
        x_cur = x_next
        diffusion = 2 * t_cur
        deps = torch.randn_like(x_cur) * torch.sqrt(torch.abs(dt))
        x_next = x_cur + drift(x_cur, t_cur) * dt + torch.sqrt(diffusion) * deps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    return x_next + (t_next - t_cur) * drift(x_next, t_cur)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("cfg_scale,low,high", [(1.0, 0.0, 1.0), (4.0, 0.0, 1.0), (2.5, 0.2, 0.7)])
def test_euler_is_bitwise_the_original(heun, cfg_scale, low, high, dtype):
    """Same noise, a nonlinear label-dependent model: the float64 trajectories are torch.equal. float64 latents make
    the model's outputs full float64, so the CFG mix rounds too (on float32 outputs it is exact in float64)."""
    x1, y = _noise(12, dtype), _labels()
    ours = euler_sampler(_label_model, x1, y, num_steps=9, cfg_scale=cfg_scale, guidance_low=low,
                         guidance_high=high, null_class=NULL, heun=heun)
    ref = _original_euler(_label_model, x1, y, 9, heun, cfg_scale, low, high)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg_scale,low,high", [(1.0, 0.0, 1.0), (1.8, 0.0, 0.825), (2.2, 0.3, 0.65)])
def test_euler_maruyama_is_bitwise_the_original(cfg_scale, low, high, dtype):
    """Same noise stream: ours with generator=None (global RNG) and with a Generator of the same seed both equal the
    original's randn_like under that seed, bit for bit."""
    x1, y, n = _noise(13, dtype), _labels(), 12
    kw = {"num_steps": n, "cfg_scale": cfg_scale, "guidance_low": low, "guidance_high": high, "null_class": NULL}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ref = _original_euler_maruyama(_label_model, x1, y, n, cfg_scale, low, high)
        torch.manual_seed(5)
        global_rng = euler_maruyama_sampler(_label_model, x1, y, **kw)
    with_generator = euler_maruyama_sampler(_label_model, x1, y, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(global_rng, ref), (global_rng - ref).abs().max()
    assert torch.equal(with_generator, ref), (with_generator - ref).abs().max()
