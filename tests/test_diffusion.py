"""Tests of the stateless split-diffusion math in `collafuse.common.diffusion`.

Three kinds of evidence, each with numbers that can fail:

* a Gaussian oracle (docs/design.md §2): for x_0 ~ N(mu, s0^2 I) the posterior mean E[x_0 | x_t]
  has a closed form, so it can stand in for a perfectly trained network on both sides of the cut;
* diffusers' DDPMScheduler / DDIMScheduler on the same betas, step by step and chain by chain;
* least-squares and loss-landscape checks of the bridge q(x_c | x_t, x_0) the server trains on.

Statistical checks compare against a tolerance of `Z` standard errors computed from the sample
size, with fixed seeds so that a run is reproducible. Every pixel of every sample is an independent
draw (the oracle model acts per pixel), so the sample size is the number of scalars.

A note on the oracle. With the exact posterior mean plugged in, the *mean* of every DDPM/DDIM
chain is exact, but the *variance* is not: the textbook reverse step x_s ~ N(a x0_hat + b x_t, var)
leaves out the a^2 Var[x_0 | x_t] that the true reverse transition carries (Bao et al. 2022,
Analytic-DPM), so the samples come out under-dispersed by an amount that shrinks with the step size
(about 14% of s0^2 for 100 full steps of the rescaled linear schedule, about 2% at T=1000, 25-55%
for 10 strided steps). The tests therefore check:

* point-mass data (s0 = 0), where Var[x_0 | x_t] = 0 and every sampler is exact at any stride:
  x_{t_cut} has the marginal of q(x_{t_cut}) and the chain ends on mu;
* Gaussian data: means against the true marginals, variances against the exact moments of the
  linear-Gaussian chain (propagated here in float64 from the betas, independently of the code
  under test), and the size of the deficit against the true marginals where it is negligible;
* the `analytic` sampler, which adds the missing term back (a^2 Var[x_0 | x_t] through Gamma_t):
  with the oracle's exact Gamma_t every state of a strided chain has the true marginal q(x_s),
  while `ddpm` on the same stride and noise ends measurably under-dispersed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from collafuse.common.config import ScheduleConfig
from collafuse.common.diffusion import Diffusion, TimestepSampler, make_betas

Z = 5.0  # standard errors allowed in every statistical check
MU, S0 = 0.3, 0.4  # the oracle's data distribution x_0 ~ N(MU, S0^2 I)
IMAGE = (1, 8, 8)  # (C, H, W)


def make_diffusion(T: int, schedule: str = "linear") -> Diffusion:
    return Diffusion(make_betas(ScheduleConfig(num_timesteps=T, beta_schedule=schedule)))


def alpha_bars(d: Diffusion) -> np.ndarray:
    """abar_0..abar_T in float64, recomputed from the betas rather than read from `d`."""
    return np.concatenate([[1.0], np.cumprod(1.0 - d.betas)])


def gaussian_oracle(abar: np.ndarray, mu: float, s0: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The eps-predicting "model" whose x0_hat is E[x_0 | x_t] for x_0 ~ N(mu, s0^2 I)."""
    ab = torch.from_numpy(abar)  # float64, (T + 1,)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        a = ab[t].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1), float64
        gain = a.sqrt() * s0**2 / (a * s0**2 + 1 - a)
        x0_hat = mu + gain.to(x_t.dtype) * (x_t - (a.sqrt() * mu).to(x_t.dtype))
        return (x_t - a.sqrt().to(x_t.dtype) * x0_hat) / (1 - a).sqrt().to(x_t.dtype)

    return model


def marginal(abar_t: float, mu: float, s0: float) -> tuple[float, float]:
    """Mean and variance per pixel of q(x_t) when x_0 ~ N(mu, s0^2)."""
    return math.sqrt(abar_t) * mu, abar_t * s0**2 + 1 - abar_t


def chain_moments(
    abar: np.ndarray,
    mu: float,
    s0: float,
    start: tuple[float, float],
    timesteps: Sequence[int],
    kind: str,
    eta: float = 0.0,
) -> tuple[float, float]:
    """Exact mean and variance per pixel after running the oracle chain through `timesteps`.

    With the oracle model every step is affine in x_t plus independent Gaussian noise,
    x_s = A x_t + B + C z, so the moments propagate in closed form. Written from the textbook
    formulas (Ho et al. 2020 eq. 7; Song et al. 2021 eq. 12, 16), not from the code under test.
    """
    m, v = start
    for t, s in zip(timesteps[:-1], timesteps[1:], strict=True):
        ab_t, ab_s = abar[t], abar[s]
        gain = math.sqrt(ab_t) * s0**2 / (ab_t * s0**2 + 1 - ab_t)
        # x0_hat = kx x_t + kc; eps_hat = ex x_t + ec
        kx, kc = gain, mu * (1 - gain * math.sqrt(ab_t))
        ex = (1 - math.sqrt(ab_t) * kx) / math.sqrt(1 - ab_t)
        ec = -math.sqrt(ab_t) * kc / math.sqrt(1 - ab_t)
        beta = 1 - ab_t / ab_s  # the effective beta of a (possibly strided) step
        post_var = (1 - ab_s) / (1 - ab_t) * beta
        if kind == "ddpm":
            x0_coef = math.sqrt(ab_s) * beta / (1 - ab_t)
            xt_coef = math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)
            A, B, C2 = x0_coef * kx + xt_coef, x0_coef * kc, post_var
        else:
            sigma2 = eta**2 * post_var
            direction = math.sqrt(max(1 - ab_s - sigma2, 0.0))
            A = math.sqrt(ab_s) * kx + direction * ex
            B = math.sqrt(ab_s) * kc + direction * ec
            C2 = sigma2
        m, v = A * m + B, A * A * v + C2
    return m, v


def draw_marginal(
    n: int, abar_t: float, mu: float, s0: float, seed: int, shape: tuple[int, ...] = IMAGE
) -> Tensor:
    """n images (n, *shape) from the exact q(x_t) of the oracle's data, in float32."""
    g = torch.Generator().manual_seed(seed)
    m, v = marginal(abar_t, mu, s0)
    return (m + math.sqrt(v) * torch.randn((n, *shape), generator=g, dtype=torch.float64)).float()


def assert_moments(x: Tensor, mean: float, var: float, what: str) -> None:
    """Sample mean and variance of all scalars of x within Z standard errors of (mean, var).

    The standard errors are those of n independent Gaussian draws: sqrt(var / n) for the mean,
    var sqrt(2 / (n - 1)) for the unbiased variance.
    """
    flat = x.double().flatten()
    n = flat.numel()
    m_hat, v_hat = float(flat.mean()), float(flat.var())
    se_m, se_v = math.sqrt(var / n), var * math.sqrt(2.0 / (n - 1))
    assert abs(m_hat - mean) <= Z * se_m, (
        f"{what}: mean {m_hat:.5f}, want {mean:.5f} ± {Z * se_m:.5f}"
    )
    assert abs(v_hat - var) <= Z * se_v, f"{what}: var {v_hat:.5f}, want {var:.5f} ± {Z * se_v:.5f}"


# --------------------------------------------------------------------------------------------
# 1. The Gaussian oracle: the split sampler on a perfectly "trained" model.
# --------------------------------------------------------------------------------------------

T_ORACLE = 100  # linear schedule rescaled to T=100: abar_T = 2.0e-5
N_ORACLE = 4096  # images; 4096 * 64 = 262,144 scalars, so Z se of the variance is 1.4%

SAMPLERS = [
    pytest.param("ddpm", 0.0, 0, id="ddpm-full"),
    pytest.param("ddpm", 0.0, 7, id="ddpm-7hops"),
    pytest.param("ddim", 0.0, 7, id="ddim-eta0-7hops"),
    pytest.param("ddim", 1.0, 7, id="ddim-eta1-7hops"),
]
CUTS = [0.2, 0.5, 0.8]


def run_split(
    d: Diffusion,
    model: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,
    c: int,
    kind: str,
    eta: float,
    steps: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """The server's chain T..c, then the client's chain c..0 from the handed-over x_c."""
    T = d.num_timesteps
    server_g = torch.Generator().manual_seed(seed)
    client_g = torch.Generator().manual_seed(seed + 1)
    x_c = d.sample_loop(
        model, x_T, d.timesteps(T, c, steps), kind, eta=eta, generator=server_g, clip=False
    )
    x_0 = d.sample_loop(
        model, x_c, d.timesteps(c, 0, steps), kind, eta=eta, generator=client_g, clip=False
    )
    return x_c, x_0


@pytest.mark.parametrize("cut_ratio", CUTS)
@pytest.mark.parametrize(("kind", "eta", "steps"), SAMPLERS)
def test_split_sampler_is_exact_on_point_mass_data(
    kind: str, eta: float, steps: int, cut_ratio: float
) -> None:
    """s0 = 0: the oracle is exact for every sampler and stride, so x_{t_cut} ~ q(x_{t_cut}).

    x_T is drawn from the exact marginal N(sqrt(abar_T) mu, 1 - abar_T), not N(0, I).
    """
    d = make_diffusion(T_ORACLE)
    abar = alpha_bars(d)
    c = d.t_cut(cut_ratio)
    model = gaussian_oracle(abar, MU, 0.0)
    x_T = draw_marginal(N_ORACLE, abar[-1], MU, 0.0, seed=1)
    x_c, x_0 = run_split(d, model, x_T, c, kind, eta, steps, seed=2)
    assert_moments(x_c, *marginal(abar[c], MU, 0.0), what=f"x_{c}")
    # The last step returns x0_hat = E[x_0 | x_1] = mu whatever x_1 is.
    torch.testing.assert_close(x_0, torch.full_like(x_0, MU), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cut_ratio", CUTS)
@pytest.mark.parametrize(("kind", "eta", "steps"), SAMPLERS)
def test_split_sampler_gaussian_oracle(kind: str, eta: float, steps: int, cut_ratio: float) -> None:
    """x_0 ~ N(mu, s0^2): the split chain's moments at t_cut and at 0.

    x_T is drawn from the exact marginal N(sqrt(abar_T) mu, abar_T s0^2 + 1 - abar_T), so the
    only gap to the true marginals is the sampler's own under-dispersion (module docstring).
    """
    d = make_diffusion(T_ORACLE)
    abar = alpha_bars(d)
    T, c = d.num_timesteps, d.t_cut(cut_ratio)
    model = gaussian_oracle(abar, MU, S0)
    start = marginal(abar[T], MU, S0)
    x_T = draw_marginal(N_ORACLE, abar[T], MU, S0, seed=3)
    x_c, x_0 = run_split(d, model, x_T, c, kind, eta, steps, seed=4)

    at_c = chain_moments(abar, MU, S0, start, d.timesteps(T, c, steps), kind, eta)
    at_0 = chain_moments(abar, MU, S0, at_c, d.timesteps(c, 0, steps), kind, eta)
    # Means are exact: E[x0_hat] = mu and E[eps_hat] = 0 at every step.
    assert at_c[0] == pytest.approx(math.sqrt(abar[c]) * MU, abs=1e-12)
    assert at_0[0] == pytest.approx(MU, abs=1e-12)
    # Variances never exceed the truth (the missing term is a^2 Var[x_0 | x_t] >= 0).
    assert at_c[1] <= marginal(abar[c], MU, S0)[1] + 1e-12
    assert at_0[1] <= S0**2 + 1e-12

    # The code under test reproduces those moments within sampling error.
    assert_moments(x_c, *at_c, what=f"x_{c}")
    assert_moments(x_0, *at_0, what="x_0")
    # Where the sampler's deficit is below one standard error, x_{t_cut} matches q(x_{t_cut})
    # itself (full-step DDPM at cuts 0.5 and 0.8, every sampler at 0.8).
    true_c = marginal(abar[c], MU, S0)
    if true_c[1] - at_c[1] < true_c[1] * math.sqrt(2 / x_c.numel()):
        assert_moments(x_c, *true_c, what=f"x_{c} against q(x_{c})")


@pytest.mark.parametrize(("schedule", "cut_ratio"), [("linear", 0.5), ("cosine", 0.8)])
def test_fine_chain_hands_over_the_true_marginal(schedule: str, cut_ratio: float) -> None:
    """With every one of T=1000 steps the server's x_{t_cut} matches q(x_{t_cut}) itself.

    At these cuts the sampler's deficit is < 0.1% of the variance, below one standard error; the
    final variance is checked against s0^2 within the known deficit (< 2% for these schedules).
    """
    d = make_diffusion(1000, schedule)
    abar = alpha_bars(d)
    T, c = d.num_timesteps, d.t_cut(cut_ratio)
    model = gaussian_oracle(abar, MU, S0)
    x_T = draw_marginal(1024, abar[T], MU, S0, seed=5)
    x_c, x_0 = run_split(d, model, x_T, c, "ddpm", 0.0, 0, seed=6)
    assert_moments(x_c, *marginal(abar[c], MU, S0), what=f"x_{c}")
    at_0 = chain_moments(abar, MU, S0, marginal(abar[T], MU, S0), d.timesteps(T, 0), "ddpm")
    assert 0.0 <= 1 - at_0[1] / S0**2 < 0.02
    assert_moments(x_0, *at_0, what="x_0")


@pytest.mark.parametrize(("kind", "eta", "steps"), SAMPLERS)
def test_split_equals_one_chain(kind: str, eta: float, steps: int) -> None:
    """Stopping at t_cut and resuming there is the same chain as one run through t_cut."""
    d = make_diffusion(T_ORACLE)
    model = gaussian_oracle(alpha_bars(d), MU, S0)
    T, c = d.num_timesteps, d.t_cut(0.3)
    x_T = torch.randn((16, *IMAGE), generator=torch.Generator().manual_seed(7))
    server, client = d.timesteps(T, c, steps), d.timesteps(c, 0, steps)
    g = torch.Generator().manual_seed(8)
    x_c = d.sample_loop(model, x_T, server, kind, eta=eta, generator=g, clip=False)
    split = d.sample_loop(model, x_c, client, kind, eta=eta, generator=g, clip=False)
    g = torch.Generator().manual_seed(8)
    whole = d.sample_loop(model, x_T, server + client[1:], kind, eta=eta, generator=g, clip=False)
    torch.testing.assert_close(split, whole, rtol=0, atol=0)


# ----- Analytic-DPM: the optimal reverse variance --------------------------------------------

T_ANALYTIC = 1000
N_ANALYTIC = 20_000  # 1-pixel samples: Z se of a variance is 5% of it
ANALYTIC_STEPS = 20  # hops per segment, strides of 35-50 timesteps
PIXEL = (1, 1, 1)


def oracle_gamma(abar_t: float, s0: float) -> float:
    """Gamma_t = E[E[eps | x_t]^2] per pixel for x_0 ~ N(mu, s0^2): (1 - abar_t) / Var[x_t].

    E[eps | x_t] = sqrt(1 - abar_t) (x_t - E[x_t]) / Var[x_t]; its second moment follows.
    """
    return (1 - abar_t) / (abar_t * s0**2 + 1 - abar_t)


def oracle_states(
    d: Diffusion,
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    timesteps: Sequence[int],
    kind: str,
    seed: int,
) -> list[Tensor]:
    """Every state of the chain through `timesteps` (x first), the exact Gamma_t for analytic."""
    abar = alpha_bars(d)
    g = torch.Generator().manual_seed(seed)
    B = x.shape[0]
    states = [x]
    for t_now, t_next in zip(timesteps[:-1], timesteps[1:], strict=True):
        t, s = torch.full((B,), t_now), torch.full((B,), t_next)
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        gamma = None
        if kind == "analytic":
            gamma = torch.full((B,), oracle_gamma(abar[t_now], S0), dtype=torch.float64)
        x = d.step(model(x, t), x, t, s, kind, noise=z, clip=False, gamma=gamma).prev_sample
        states.append(x)
    return states


@pytest.mark.parametrize(("start", "stop"), [(1000, 0), (1000, 300), (300, 0)])
def test_analytic_variance_makes_a_strided_oracle_chain_exact(start: int, stop: int) -> None:
    """With the exact Gamma_t every state of a 20-hop chain has the marginal of q itself.

    For Gaussian data Var[x_0 | x_t] does not depend on x_t, so the analytic step is the true
    reverse transition q(x_s | x_t) and the chain is exact from an exact start, the final
    step to 0 included (it adds Var[x_0 | x_1]). ddpm, on the same stride and the same noise,
    follows its own exact moments and ends under-dispersed (0.57 and 0.80 of s0^2 here).
    """
    d = make_diffusion(T_ANALYTIC)
    abar = alpha_bars(d)
    model = gaussian_oracle(abar, MU, S0)
    ts = d.timesteps(start, stop, ANALYTIC_STEPS)
    x = draw_marginal(N_ANALYTIC, abar[start], MU, S0, seed=30, shape=PIXEL)
    analytic = oracle_states(d, model, x, ts, "analytic", seed=31)
    for t, state in zip(ts, analytic, strict=True):
        assert_moments(state, *marginal(abar[t], MU, S0), what=f"analytic x_{t}")
    # sample_loop takes Gamma per step and runs the same chain.
    gamma = torch.tensor([oracle_gamma(abar[t], S0) for t in ts[:-1]], dtype=torch.float64)
    g = torch.Generator().manual_seed(31)
    looped = d.sample_loop(model, x, ts, "analytic", generator=g, clip=False, gamma=gamma)
    torch.testing.assert_close(looped, analytic[-1], rtol=0, atol=0)

    ddpm = oracle_states(d, model, x, ts, "ddpm", seed=31)[-1]
    exact = chain_moments(abar, MU, S0, marginal(abar[start], MU, S0), ts, "ddpm")
    assert_moments(ddpm, *exact, what=f"ddpm x_{stop}")
    if stop == 0:
        # Measurably short of s0^2, by far more than the tolerance the analytic chain met.
        n = ddpm.numel()
        assert float(ddpm.double().var()) < S0**2 * (1 - Z * math.sqrt(2 / (n - 1)))
        assert exact[1] / S0**2 < 0.85


def test_estimate_gamma_matches_the_oracle() -> None:
    """The Monte Carlo mean of eps_hat^2 over draws of q(x_t) is Gamma_t within its error.

    eps_hat = E[eps | x_t] is Gaussian with variance Gamma_t, so eps_hat^2 / Gamma_t is
    chi-square(1): the mean over n scalars has standard error Gamma_t sqrt(2 / n).
    """
    d = make_diffusion(T_ANALYTIC)
    abar = alpha_bars(d)
    model = gaussian_oracle(abar, MU, S0)
    ts = [1000, 700, 300, 40, 1]
    n = 256  # images of 64 pixels
    drawn: list[int] = []

    def draw(t: int) -> Tensor:
        drawn.append(t)
        return draw_marginal(n, abar[t], MU, S0, seed=32 + t)

    one_a_call = d.estimate_gamma(model, ts, draw)
    assert drawn == ts and one_a_call.shape == (len(ts),) and one_a_call.dtype == torch.float64
    for t, got in zip(ts, one_a_call.tolist(), strict=True):
        want = oracle_gamma(abar[t], S0)
        assert abs(got - want) <= Z * want * math.sqrt(2 / (n * 64)), (t, got, want)
    # Batching timesteps into fewer model calls changes nothing.
    calls: list[int] = []

    def counted(x: Tensor, t: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return model(x, t)

    batched = d.estimate_gamma(counted, ts, draw, max_batch=2 * n)
    assert calls == [2 * n, 2 * n, n]
    torch.testing.assert_close(batched, one_a_call, rtol=1e-12, atol=0)


def test_analytic_step_formula_and_bounds() -> None:
    """x_s = a x0_hat + b x_t + sqrt(var + a^2 (1 - abar_t)/abar_t (1 - Gamma_t)) z, from abar.

    Gamma_t is clamped to [0, 1] (Gamma 1 is ddpm, bit for bit); with clip the added variance is
    at most a^2 (x_0 in [-1, 1]) and a final x_0 lies in [-1, 1].
    """
    d = make_diffusion(100)
    abar = alpha_bars(d)
    g = torch.Generator().manual_seed(33)
    t = torch.tensor([100, 60, 60, 20, 5, 1])
    s = torch.tensor([90, 30, 0, 0, 4, 0])
    x_t = torch.randn((6, *IMAGE), generator=g, dtype=torch.float64)
    eps = torch.randn(x_t.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x_t.shape, generator=g, dtype=torch.float64)
    gamma = torch.tensor([0.2, 0.9, 0.5, 0.99, 0.0, 1.0], dtype=torch.float64)
    out = d.step(eps, x_t, t, s, "analytic", noise=z, clip=False, gamma=gamma)
    ab_t = torch.from_numpy(abar[t.numpy()]).reshape(-1, 1, 1, 1)
    ab_s = torch.from_numpy(abar[s.numpy()]).reshape(-1, 1, 1, 1)
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    beta = 1 - ab_t / ab_s
    a = ab_s.sqrt() * beta / (1 - ab_t)
    b = (1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t)
    var = (1 - ab_s) * beta / (1 - ab_t)
    extra = a**2 * (1 - ab_t) / ab_t * (1 - gamma.reshape(-1, 1, 1, 1))
    want = a * x0 + b * x_t + (var + extra).sqrt() * z
    torch.testing.assert_close(out.prev_sample, want, rtol=1e-10, atol=1e-10)

    def step(gam: float, clip: bool = False, **kw: Tensor) -> Tensor:
        args = {"x_t": x_t, "t": t, "s": s, **kw}
        gammas = torch.full((6,), gam, dtype=torch.float64)
        return d.step(eps, kind="analytic", noise=z, clip=clip, gamma=gammas, **args).prev_sample

    ddpm = d.step(eps, x_t, t, s, "ddpm", noise=z, clip=False).prev_sample
    assert torch.equal(step(1.0), ddpm) and torch.equal(step(1.7), ddpm)
    assert torch.equal(step(-0.3), step(0.0))
    # Unclipped, a step to 0 from t = 60 with Gamma 0 adds (1 - abar_60)/abar_60 > 1 ...
    assert (1 - abar[60]) / abar[60] > 1
    wide = (step(0.0) - x0) / z
    torch.testing.assert_close(
        wide[2], torch.full_like(wide[2], math.sqrt((1 - abar[60]) / abar[60]))
    )
    # ... and with clip at most a^2 = 1, then the image is clamped to [-1, 1].
    x0_clipped = d.step(eps, x_t, t, s, "ddpm", noise=z, clip=True).x0_hat
    torch.testing.assert_close(step(0.0, clip=True)[2], (x0_clipped[2] + z[2]).clamp(-1, 1))
    assert float(step(0.0, clip=True)[[2, 3, 5]].abs().max()) <= 1.0
    with pytest.raises(ValueError, match="gamma"):
        d.step(eps, x_t, t, s, "analytic", noise=z)
    with pytest.raises(ValueError, match="gamma"):
        d.step(eps, x_t, t, s, "analytic", noise=z, gamma=gamma[:3])


# --------------------------------------------------------------------------------------------
# 2. The same schedule and steps as diffusers.
# --------------------------------------------------------------------------------------------

T_DIFFUSERS = 100


def ddpm_scheduler(betas: np.ndarray, spacing: str = "leading") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas,
        variance_type="fixed_small",
        clip_sample=False,
        timestep_spacing=spacing,
    )


def ddim_scheduler(betas: np.ndarray, spacing: str = "leading") -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing=spacing,
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [100, 1000])
def test_alphas_cumprod_match_diffusers(schedule: str, T: int) -> None:
    """abar_1..abar_T equal diffusers' alphas_cumprod (float32) on the same betas."""
    d = make_diffusion(T, schedule)
    ours = torch.tensor([d.alpha_bar(t) for t in range(1, T + 1)], dtype=torch.float64)
    theirs = ddpm_scheduler(d.betas).alphas_cumprod.double()
    # float32 cumprod over T factors drifts by about T ulps; compare relative to that.
    torch.testing.assert_close(ours, theirs, rtol=T * 2e-7, atol=0)
    assert d.alpha_bar(0) == 1.0


def test_betas_match_diffusers_schedules() -> None:
    """Our linear schedule at T=1000 and our cosine schedule are diffusers' own."""
    linear = make_betas(ScheduleConfig(num_timesteps=1000))
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas.double()
    torch.testing.assert_close(torch.from_numpy(linear), theirs, rtol=1e-6, atol=0)
    for T in (100, 1000):
        cosine = make_betas(ScheduleConfig(num_timesteps=T, beta_schedule="cosine"))
        theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
        torch.testing.assert_close(torch.from_numpy(cosine), theirs.double(), rtol=1e-5, atol=0)


def test_q_sample_matches_add_noise() -> None:
    """Our forward process is diffusers' add_noise at index t - 1."""
    d = make_diffusion(T_DIFFUSERS)
    g = torch.Generator().manual_seed(9)
    x0 = torch.rand((6, *IMAGE), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 2, 17, 50, 99, 100])
    theirs = ddpm_scheduler(d.betas).add_noise(x0, noise, t - 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), theirs, rtol=1e-5, atol=1e-5)


class Pairs:
    """A batch to step with: x_t near the data manifold and a slightly wrong eps prediction."""

    def __init__(self, d: Diffusion, t: Tensor, dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        B = len(t)
        x0 = (torch.rand((B, *IMAGE), generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
        eps = torch.randn((B, *IMAGE), generator=g, dtype=torch.float64).to(dtype)
        self.x_t = d.q_sample(x0, t, eps)
        self.eps_hat = eps + 0.1 * torch.randn((B, *IMAGE), generator=g, dtype=dtype)
        self.t = t

    def model(self, x: Tensor, t: Tensor) -> Tensor:
        assert torch.equal(t, self.t) and x is self.x_t
        return self.eps_hat


def diffusers_schedule_in_float64(scheduler: DDPMScheduler | DDIMScheduler, d: Diffusion) -> None:
    """Give diffusers our float64 alphas_cumprod, so that only the step formulas differ."""
    scheduler.alphas_cumprod = torch.cumprod(1.0 - torch.from_numpy(d.betas), 0)


STEP_CASES = [
    # float64: diffusers adds sqrt(max(var, 1e-20)) * z = 1e-10 z on the last step, where var = 0.
    pytest.param(torch.float64, 1e-10, 1e-9, id="float64"),
    # float32: x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar) cancels near T, where
    # 1 / sqrt(abar_T) ~ 200, so float32 rounding grows to ~1e-5 absolute there.
    pytest.param(torch.float32, 1e-5, 5e-5, id="float32"),
]


def noise_like_diffusers(x_t: Tensor, seeds: Sequence[int]) -> Tensor:
    """What diffusers' step draws per sample from torch.Generator().manual_seed(seed)."""
    return torch.cat(
        [
            torch.randn(
                (1, *x_t.shape[1:]), generator=torch.Generator().manual_seed(s), dtype=x_t.dtype
            )
            for s in seeds
        ]
    )


@pytest.mark.parametrize(("dtype", "rtol", "atol"), STEP_CASES)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(
    ("steps", "spacing"),
    [(0, "leading"), (10, "leading"), (10, "trailing"), (7, "leading"), (7, "trailing")],
)
def test_ddpm_step_matches_diffusers(
    dtype: torch.dtype, rtol: float, atol: float, schedule: str, steps: int, spacing: str
) -> None:
    """Our ddpm step from t to s equals DDPMScheduler.step between diffusers' indices t-1, s-1.

    Every pair of the scheduler's chain is stepped in one batch with per-sample (t, s), and the
    noise is the draw diffusers makes from the same seeded generator.
    """
    d = make_diffusion(T_DIFFUSERS, schedule)
    sched = ddpm_scheduler(d.betas, spacing)
    if steps:
        sched.set_timesteps(steps)
    if dtype == torch.float64:
        diffusers_schedule_in_float64(sched, d)
    ks = [int(k) for k in sched.timesteps]
    prevs = [int(sched.previous_timestep(k)) for k in ks]
    t = torch.tensor([k + 1 for k in ks])
    s = torch.tensor([p + 1 for p in prevs])  # diffusers' "-1" (final alpha 1) is our s = 0
    assert torch.equal(s[:-1], t[1:]) and int(s[-1]) == 0  # one contiguous chain down to 0
    if spacing == "leading":
        gap = T_DIFFUSERS // steps if steps else 1
        assert bool((t[:-1] - s[:-1] == gap).all())
    batch = Pairs(d, t, dtype, seed=10)
    seeds = [1000 + i for i in range(len(ks))]
    out = d.step(
        batch.eps_hat,
        batch.x_t,
        t,
        s,
        "ddpm",
        noise=noise_like_diffusers(batch.x_t, seeds),
        clip=False,
    )
    for i, k in enumerate(ks):
        ref = sched.step(
            batch.eps_hat[i : i + 1],
            k,
            batch.x_t[i : i + 1],
            generator=torch.Generator().manual_seed(seeds[i]),
        )
        ctx = f"t={int(t[i])} s={int(s[i])}"
        torch.testing.assert_close(
            out.x0_hat[i : i + 1], ref.pred_original_sample, rtol=rtol, atol=atol, msg=ctx
        )
        torch.testing.assert_close(
            out.prev_sample[i : i + 1], ref.prev_sample, rtol=rtol, atol=atol, msg=ctx
        )


@pytest.mark.parametrize(("dtype", "rtol", "atol"), STEP_CASES)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("steps", "spacing"), [(10, "leading"), (10, "trailing"), (7, "trailing")])
def test_ddim_step_matches_diffusers(
    dtype: torch.dtype,
    rtol: float,
    atol: float,
    schedule: str,
    eta: float,
    steps: int,
    spacing: str,
) -> None:
    """Our ddim step from t to s equals DDIMScheduler.step between indices t-1 and s-1."""
    d = make_diffusion(T_DIFFUSERS, schedule)
    sched = ddim_scheduler(d.betas, spacing)
    sched.set_timesteps(steps)
    if dtype == torch.float64:
        diffusers_schedule_in_float64(sched, d)
    ks = [int(k) for k in sched.timesteps]
    t = torch.tensor([k + 1 for k in ks])
    # DDIM steps to k - T // steps and uses alpha 1 below index 0: our s = 0.
    s = torch.tensor([max(k - T_DIFFUSERS // steps + 1, 0) for k in ks])
    batch = Pairs(d, t, dtype, seed=11)
    noise = torch.randn(batch.x_t.shape, generator=torch.Generator().manual_seed(12), dtype=dtype)
    out = d.step(batch.eps_hat, batch.x_t, t, s, "ddim", eta=eta, noise=noise, clip=False)
    for i, k in enumerate(ks):
        ref = sched.step(
            batch.eps_hat[i : i + 1],
            k,
            batch.x_t[i : i + 1],
            eta=eta,
            variance_noise=noise[i : i + 1] if eta > 0 else None,
        )
        ctx = f"t={int(t[i])} s={int(s[i])}"
        torch.testing.assert_close(
            out.x0_hat[i : i + 1], ref.pred_original_sample, rtol=rtol, atol=atol, msg=ctx
        )
        torch.testing.assert_close(
            out.prev_sample[i : i + 1], ref.prev_sample, rtol=rtol, atol=atol, msg=ctx
        )


@pytest.mark.parametrize(("kind", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_clipped_step_matches_diffusers(kind: str, eta: float) -> None:
    """clip=True is clip_sample=True; for DDIM, eps is re-derived from the clamped x0_hat,
    which is diffusers' use_clipped_model_output=True."""
    d = make_diffusion(T_DIFFUSERS)
    t = torch.tensor([100, 60, 30, 10])
    s = torch.tensor([90, 50, 20, 0])
    batch = Pairs(d, t, torch.float64, seed=21)
    g = torch.Generator().manual_seed(22)
    batch.eps_hat = batch.eps_hat + torch.randn(
        batch.eps_hat.shape, generator=g, dtype=torch.float64
    )
    raw = d.step(batch.eps_hat, batch.x_t, t, s, kind, eta=eta, clip=False).x0_hat
    assert float(raw.abs().max()) > 1.5  # the clamp has work to do
    seeds = [2000 + i for i in range(len(t))]
    noise = noise_like_diffusers(batch.x_t, seeds)
    out = d.step(batch.eps_hat, batch.x_t, t, s, kind, eta=eta, noise=noise, clip=True)
    assert float(out.x0_hat.abs().max()) <= 1.0
    for i, (k, prev) in enumerate(zip((t - 1).tolist(), (s - 1).tolist(), strict=True)):
        x_t, eps_hat = batch.x_t[i : i + 1], batch.eps_hat[i : i + 1]
        if kind == "ddpm":
            sched = ddpm_scheduler(d.betas)
            sched.register_to_config(clip_sample=True)
            sched.set_timesteps(timesteps=[k, prev] if prev >= 0 else [k])
            diffusers_schedule_in_float64(sched, d)
            ref = sched.step(eps_hat, k, x_t, generator=torch.Generator().manual_seed(seeds[i]))
        else:
            sched = ddim_scheduler(d.betas)
            sched.register_to_config(clip_sample=True)
            sched.set_timesteps(10)  # prev = k - 10, as in t - s
            diffusers_schedule_in_float64(sched, d)
            z = noise[i : i + 1] if eta > 0 else None
            ref = sched.step(
                eps_hat, k, x_t, eta=eta, use_clipped_model_output=True, variance_noise=z
            )
        rows = slice(i, i + 1)
        torch.testing.assert_close(
            out.x0_hat[rows], ref.pred_original_sample, rtol=1e-10, atol=1e-9
        )
        torch.testing.assert_close(out.prev_sample[rows], ref.prev_sample, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize(("kind", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_chain_matches_diffusers_loop(kind: str, eta: float) -> None:
    """Our sample_loop over timesteps(T, 0, n) is diffusers' loop with "trailing" spacing.

    With T divisible by n, trailing spacing visits indices T-1, T-1-T/n, ..., T/n - 1 and then
    uses alpha 1: our T, T - T/n, ..., T/n, 0. Both draw one randn per step from one generator.
    """
    T, n = T_DIFFUSERS, 10
    d = make_diffusion(T, "cosine")
    model = gaussian_oracle(alpha_bars(d), MU, S0)
    x_T = torch.randn((8, *IMAGE), generator=torch.Generator().manual_seed(13))
    ours = d.sample_loop(
        model,
        x_T,
        d.timesteps(T, 0, n),
        kind,
        eta=eta,
        generator=torch.Generator().manual_seed(14),
        clip=False,
    )
    sched = (
        ddpm_scheduler(d.betas, "trailing")
        if kind == "ddpm"
        else ddim_scheduler(d.betas, "trailing")
    )
    sched.set_timesteps(n)
    assert [int(k) + 1 for k in sched.timesteps] == d.timesteps(T, 0, n)[:-1]
    g = torch.Generator().manual_seed(14)
    x = x_T
    for k in sched.timesteps:
        eps = model(x, torch.full((x.shape[0],), int(k) + 1))
        if kind == "ddpm":
            x = sched.step(eps, k, x, generator=g).prev_sample
        else:
            z = torch.randn(x.shape, generator=g)  # our loop draws noise even when eta = 0
            x = sched.step(eps, k, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# 3. The bridge q(x_c | x_t, x_0) and the server's loss.
# --------------------------------------------------------------------------------------------


def test_bridge_matches_the_ddpm_posterior() -> None:
    """For s = t - 1 the bridge is Ho et al.'s posterior (eq. 7); for s = 0 it is x_0 itself."""
    d = make_diffusion(1000)
    abar, beta = alpha_bars(d), d.betas
    t = torch.arange(2, 1001)
    br = d.bridge(t - 1, t, torch.zeros((len(t), *IMAGE), dtype=torch.float64))
    tt = t.numpy()
    a = np.sqrt(abar[tt - 1]) * beta[tt - 1] / (1 - abar[tt])
    b = np.sqrt(1 - beta[tt - 1]) * (1 - abar[tt - 1]) / (1 - abar[tt])
    var = (1 - abar[tt - 1]) / (1 - abar[tt]) * beta[tt - 1]
    for got, want in ((br.a, a), (br.b, b), (br.var, var)):
        assert got.shape == (len(t), 1, 1, 1)
        np.testing.assert_allclose(got.flatten().numpy(), want, rtol=1e-12)
    br0 = d.bridge(torch.zeros(3, dtype=torch.long), torch.tensor([1, 500, 1000]), br.a[:3])
    np.testing.assert_allclose(br0.a.flatten().numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(br0.b.flatten().numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(br0.var.flatten().numpy(), 0.0, atol=1e-12)


def test_least_squares_recovers_the_bridge() -> None:
    """Regressing the client's x_c on (x_0, x_t = renoise(x_c)) returns a, b and s^2.

    T=1000, c=300, t=700 as in docs/design.md section 2. x_c and x_t come from the code under test
    (q_sample then renoise), so this checks renoise and bridge against each other.
    """
    d = make_diffusion(1000)
    n = 1 << 22
    g = torch.Generator().manual_seed(15)
    x0 = torch.randn(n, generator=g, dtype=torch.float64)  # any law of x_0 will do
    c = torch.full((n,), 300)
    t = torch.full((n,), 700)
    x_c = d.q_sample(x0, c, torch.randn(n, generator=g, dtype=torch.float64))
    x_t = d.renoise(x_c, c, t, torch.randn(n, generator=g, dtype=torch.float64))
    X = torch.stack([x0, x_t], 1)  # (n, 2)
    coef = torch.linalg.solve(X.T @ X, X.T @ x_c)
    resid = x_c - X @ coef
    s2_hat = float(resid.pow(2).sum()) / (n - 2)
    se = torch.sqrt(s2_hat * torch.linalg.inv(X.T @ X).diagonal())

    br = d.bridge(c[:1], t[:1], x0[:1])
    a, b, s2 = float(br.a), float(br.b), float(br.var)
    assert abs(float(coef[0]) - a) <= Z * float(se[0]), (float(coef[0]), a)
    assert abs(float(coef[1]) - b) <= Z * float(se[1]), (float(coef[1]), b)
    assert abs(s2_hat - s2) <= Z * s2 * math.sqrt(2 / n), (s2_hat, s2)
    # docs/design.md's "3 decimals", and the data can tell: 5 se stays below 2e-3.
    assert max(float(se[0]), float(se[1])) * Z < 2e-3
    assert abs(float(coef[0]) - a) < 2e-3 and abs(float(coef[1]) - b) < 2e-3
    assert abs(s2_hat - s2) < 1e-3


def bridge_batch(d: Diffusion, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaussian data cut at mixed per-sample c (clients with different cut ratios), t in (c, T]."""
    g = torch.Generator().manual_seed(seed)
    T = d.num_timesteps
    x0 = MU + S0 * torch.randn((n, *IMAGE), generator=g, dtype=torch.float64)
    c = torch.tensor([d.t_cut(r) for r in (0.2, 0.5, 0.8)]).repeat(n // 3 + 1)[:n]
    t = TimestepSampler(T).sample(c, T, generator=g)
    x_c = d.q_sample(x0, c, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x_c, c, t, noise


def test_bridge_loss_is_minimised_by_the_posterior_mean() -> None:
    """The closed-form E[x_0 | x_t] beats scaled or shifted versions of itself, decisively.

    The same (x_c, c, t, noise) feed every model, so the comparison is paired: the difference of
    losses has expectation w a^2 E||x0_hat' - E[x_0 | x_t]||^2 > 0 and a small spread.
    """
    d = make_diffusion(100)
    abar = alpha_bars(d)
    oracle = gaussian_oracle(abar, MU, S0)
    ab = torch.from_numpy(abar)
    x_c, c, t, noise = bridge_batch(d, 60_000, seed=16)

    def perturbed(scale: float, shift: float) -> Callable[[Tensor, Tensor], Tensor]:
        def model(x: Tensor, tt: Tensor) -> Tensor:
            x0_hat = scale * d.x0_from_eps(x, tt, oracle(x, tt)) + shift
            a = ab[tt].reshape(-1, 1, 1, 1)
            return (x - a.sqrt() * x0_hat) / (1 - a).sqrt()

        return model

    best = d.bridge_loss(oracle, x_c, c, t, noise).per_sample
    for scale, shift in [(0.9, 0.0), (1.1, 0.0), (1.0, 0.05), (1.0, -0.05)]:
        other = d.bridge_loss(perturbed(scale, shift), x_c, c, t, noise).per_sample
        diff = other - best  # (B,)
        se = float(diff.std()) / math.sqrt(len(diff))
        assert float(diff.mean()) > Z * se, (scale, shift, float(diff.mean()), se)


@pytest.mark.parametrize(("c", "t"), [(20, 30), (30, 60), (50, 100), (80, 81)])
def test_bridge_loss_expectation(c: int, t: int) -> None:
    """E[loss] = min(1, gamma / lam) ((SNR_c - SNR_t) Var[x_0 | x_t] + 1) for the oracle.

    Per pixel, E||a x0_hat + b x_t - x_c||^2 = a^2 E(x0_hat - x_0)^2 + s^2 and a^2 / s^2 =
    SNR_c - SNR_t; the weight is min(1, gamma / lam) / s^2 with lam = SNR_c / SNR_t - 1.
    """
    d = make_diffusion(100)
    abar = alpha_bars(d)
    n = 4096
    g = torch.Generator().manual_seed(17)
    x0 = MU + S0 * torch.randn((n, *IMAGE), generator=g, dtype=torch.float64)
    cc, tt = torch.full((n,), c), torch.full((n,), t)
    x_c = d.q_sample(x0, cc, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    per = d.bridge_loss(gaussian_oracle(abar, MU, S0), x_c, cc, tt, noise, gamma=5.0).per_sample

    snr_c, snr_t = abar[c] / (1 - abar[c]), abar[t] / (1 - abar[t])
    post_var = S0**2 * (1 - abar[t]) / (abar[t] * S0**2 + 1 - abar[t])
    lam = snr_c / snr_t - 1
    want = min(1.0, 5.0 / lam) * ((snr_c - snr_t) * post_var + 1)
    se = float(per.std()) / math.sqrt(n)
    assert abs(float(per.mean()) - want) <= Z * se, (float(per.mean()), want, se)


def test_bridge_loss_fit_recovers_the_posterior_mean() -> None:
    """Fitting x0_hat = alpha x_t + beta through bridge_loss at one t gives E[x_0 | x_t].

    The loss is quadratic in (alpha, beta), so L-BFGS lands on the sample minimiser, which is
    the least-squares fit of (x_c - b x_t) / a on (x_t, 1); its standard errors set the bound.
    """
    d = make_diffusion(100)
    abar = alpha_bars(d)
    c, t, n = 30, 60, 4096
    g = torch.Generator().manual_seed(18)
    x0 = MU + S0 * torch.randn((n, *IMAGE), generator=g, dtype=torch.float64)
    cc, tt = torch.full((n,), c), torch.full((n,), t)
    x_c = d.q_sample(x0, cc, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # alpha, beta
    ab_t = abar[t]

    def model(x: Tensor, _t: Tensor) -> Tensor:
        x0_hat = params[0] * x + params[1]
        return (x - math.sqrt(ab_t) * x0_hat) / math.sqrt(1 - ab_t)

    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = d.bridge_loss(model, x_c, cc, tt, noise).loss
        loss.backward()
        return loss

    opt.step(closure)
    gain = math.sqrt(ab_t) * S0**2 / (ab_t * S0**2 + 1 - ab_t)
    want = torch.tensor([gain, MU * (1 - gain * math.sqrt(ab_t))], dtype=torch.float64)

    br = d.bridge(cc[:1], tt[:1], x0[:1])
    a, s2 = float(br.a), float(br.var)
    x_t = d.renoise(x_c, cc, tt, noise).flatten()
    post_var = S0**2 * (1 - ab_t) / (ab_t * S0**2 + 1 - ab_t)
    sigma = math.sqrt(s2 / a**2 + post_var)  # residual std of (x_c - b x_t) / a on E[x_0 | x_t]
    se_alpha = sigma / (math.sqrt(x_t.numel()) * float(x_t.std()))
    se_beta = sigma * math.sqrt(float(x_t.pow(2).mean()) / x_t.numel()) / float(x_t.std())
    got = params.detach()
    assert abs(float(got[0] - want[0])) <= Z * se_alpha, (got, want, se_alpha)
    assert abs(float(got[1] - want[1])) <= Z * se_beta, (got, want, se_beta)


# --------------------------------------------------------------------------------------------
# 4. renoise, input validation and the timestep sampler.
# --------------------------------------------------------------------------------------------


def test_renoise_has_the_marginal_of_q() -> None:
    """q_sample to c then renoise to t gives x_t ~ N(sqrt(abar_t) x_0, 1 - abar_t), per sample."""
    d = make_diffusion(100)
    abar = alpha_bars(d)
    n = 1 << 16
    g = torch.Generator().manual_seed(19)
    x0 = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, *IMAGE).repeat(n, 1, 1, 1)
    c = torch.randint(0, 100, (n,), generator=g)
    t = c + 1 + (torch.rand(n, generator=g, dtype=torch.float64) * (100 - c)).long()
    assert int(t.min()) >= 1 and int(t.max()) <= 100 and bool((t > c).all())
    x_c = d.q_sample(x0, c, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    x_t = d.renoise(x_c, c, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    ab = torch.from_numpy(abar)[t].reshape(-1, 1, 1, 1)
    z = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()  # should be N(0, 1), independent of x_0
    assert_moments(z, 0.0, 1.0, what="standardised x_t")
    # No pixel's x_0 leaks through beyond sqrt(abar_t) x_0: z is uncorrelated with x_0.
    corr = float((z * x0).mean() / x0.pow(2).mean().sqrt())
    assert abs(corr) <= Z / math.sqrt(z.numel())


def test_range_checks_raise_value_error() -> None:
    d = make_diffusion(100)
    x = torch.zeros((2, *IMAGE))
    noise = torch.zeros_like(x)

    def ts(*values: int) -> Tensor:
        return torch.tensor(values)

    d.q_sample(x, ts(0, 100), noise)  # the ends are fine
    for bad in (ts(5, 101), ts(-1, 5)):
        with pytest.raises(ValueError):
            d.q_sample(x, bad, noise)

    d.renoise(x, ts(0, 99), ts(1, 100), noise)
    for c, t in [(ts(10, 10), ts(20, 10)), (ts(10, 30), ts(20, 20)), (ts(10, 20), ts(20, 101))]:
        with pytest.raises(ValueError):
            d.renoise(x, c, t, noise)  # t <= c, t < c, t > T
    with pytest.raises(ValueError):
        d.renoise(x, ts(-1, 0), ts(5, 5), noise)

    d.bridge(ts(0, 99), ts(1, 100), x)
    for s, t in [
        (ts(5, 5), ts(6, 5)),
        (ts(7, 1), ts(6, 2)),
        (ts(5, 5), ts(6, 101)),
        (ts(-1, 0), ts(3, 3)),
    ]:
        with pytest.raises(ValueError):
            d.bridge(s, t, x)

    sampler = TimestepSampler(100)
    for low, high in [
        (ts(10, 100), 100),
        (ts(10, 20), ts(5, 30)),
        (ts(0, 0), 101),
        (ts(-1, 0), 10),
    ]:
        with pytest.raises(ValueError):
            sampler.sample(low, high)

    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            d.t_cut(ratio)
    for start, stop in [(5, 5), (4, 5), (101, 0), (10, -1)]:
        with pytest.raises(ValueError):
            d.timesteps(start, stop)


def test_t_cut_rounds_and_stays_inside() -> None:
    d = make_diffusion(100)
    assert [d.t_cut(r) for r in (0.2, 0.5, 0.8, 0.301, 0.299)] == [20, 50, 80, 30, 30]
    assert d.t_cut(0.001) == 1 and d.t_cut(0.999) == 99


def test_timestep_sampler_stays_in_range_and_is_uniform() -> None:
    """Draws lie in (low, high], per sample, and hit each value about equally often."""
    T = 100
    sampler = TimestepSampler(T)
    n = 60_000
    low = torch.tensor([0, 30, 80, 99]).repeat(n // 4)
    high = torch.tensor([30, 100, 100, 100]).repeat(n // 4)
    t = sampler.sample(low, high, generator=torch.Generator().manual_seed(20))
    assert t.shape == low.shape and t.dtype == torch.long
    assert bool((t > low).all()) and bool((t <= high).all())
    for lo, hi in [(0, 30), (30, 100), (80, 100), (99, 100)]:
        sel = t[(low == lo) & (high == hi)]
        counts = torch.bincount(sel - lo - 1, minlength=hi - lo).double()
        assert len(counts) == hi - lo and bool((counts > 0).all()), (lo, hi)
        k = hi - lo
        p = 1.0 / k
        expected, se = len(sel) * p, math.sqrt(len(sel) * p * (1 - p))
        assert float((counts - expected).abs().max()) <= Z * se + 1e-9, (lo, hi)
    # An int high and a seeded generator: reproducible draws.
    a = sampler.sample(torch.zeros(50, dtype=torch.long), T, torch.Generator().manual_seed(1))
    b = sampler.sample(torch.zeros(50, dtype=torch.long), T, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and int(a.min()) >= 1 and int(a.max()) <= T


# --------------------------------------------------------------------------------------------
# 5. The timestep lists the two sides walk.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "stop", "steps"),
    [
        (100, 0, 0),
        (100, 0, 10),
        (100, 0, 7),
        (100, 30, 7),
        (30, 0, 7),
        (1000, 300, 50),
        (300, 0, 299),
        (300, 0, 300),
        (300, 0, 301),
        (5, 4, 3),
        (2, 0, 1),
    ],
)
def test_timesteps_lists(start: int, stop: int, steps: int) -> None:
    d = make_diffusion(1000)
    ts = d.timesteps(start, stop, steps)
    assert ts[0] == start and ts[-1] == stop
    assert all(a > b for a, b in zip(ts[:-1], ts[1:], strict=False))
    assert all(isinstance(v, int) for v in ts)
    span = start - stop
    hops = span if steps <= 0 or steps >= span else steps
    assert len(ts) == hops + 1
    # Hops are as even as integers allow.
    gaps = [a - b for a, b in zip(ts[:-1], ts[1:], strict=False)]
    assert max(gaps) - min(gaps) <= 1


def test_server_and_client_lists_meet_at_the_cut() -> None:
    d = make_diffusion(1000)
    c = d.t_cut(0.3)
    server, client = d.timesteps(1000, c, 20), d.timesteps(c, 0, 20)
    assert server[-1] == client[0] == c
    whole = server + client[1:]
    assert whole[0] == 1000 and whole[-1] == 0 and len(whole) == 41
