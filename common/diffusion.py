"""Stateless DDPM math of the exact CollaFuse split (docs/design.md §2); the network is an argument.

Timesteps are integers in 1..T and always tensors of shape (B,): every sample of a batch may sit
at its own timestep. Index 0 stands for clean data (abar_0 = 1), so a chain that ends at 0 ends
at an image. The denoiser is any callable `(x_t, t) -> eps_hat`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from collafuse.common.config import SAMPLERS, SamplerKind, ScheduleConfig

# (x_t (B, C, H, W), t (B,) int64) -> predicted noise (B, C, H, W)
Denoiser = Callable[[Tensor, Tensor], Tensor]


def make_betas(config: ScheduleConfig) -> np.ndarray:
    """Betas b_1..b_T as float64, shape (T,)."""
    T = config.num_timesteps
    if config.beta_schedule == "linear":
        # Stated for T=1000; rescaling keeps abar at a given *ratio* t/T about the same for any T.
        scale = 1000.0 / T
        return np.linspace(scale * config.beta_start, scale * config.beta_end, T, dtype=np.float64)
    # Cosine schedule of Nichol & Dhariwal (2021), betas capped at 0.999.
    s = 0.008
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)


def schedule_hash(betas: np.ndarray) -> str:
    """A short sha256 of the betas, rounded so that both ends agree across platforms."""
    rounded = np.round(np.asarray(betas, dtype=np.float64), 12)
    return hashlib.sha256(rounded.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Bridge:
    """q(x_s | x_t, x_0) = N(a x_0 + b x_t, var I) for s < t; each tensor has shape (B, 1, 1, 1)."""

    a: Tensor
    b: Tensor
    var: Tensor


@dataclass(frozen=True)
class StepOutput:
    """One reverse step from t to s."""

    prev_sample: Tensor
    """x_s, shape (B, C, H, W)."""
    x0_hat: Tensor
    """The model's estimate of x_0 used for the step, shape (B, C, H, W)."""


@dataclass(frozen=True)
class LossOutput:
    """A training loss and its per-sample terms."""

    loss: Tensor
    """Scalar mean over the batch."""
    per_sample: Tensor
    """Shape (B,)."""


def draws_noise(kind: SamplerKind, eta: float) -> bool:
    """Whether a reverse step of this sampler adds noise: all but deterministic DDIM (eta = 0)."""
    return kind != "ddim" or eta != 0.0


def _checkable(t: Tensor) -> bool:
    """Whether the argument checks may read `t`'s values: only on the host. Reading values back
    would stall an accelerator at every step; the sampler and trainer draw device timesteps
    from lists and ranges already checked on the host."""
    return t.device.type == "cpu"


class Diffusion:
    """The schedule and every formula on it; server and client share one and pass their model."""

    def __init__(self, betas: np.ndarray) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1)")
        self.betas = betas
        self.num_timesteps = len(betas)
        # abar[0] = 1 stands for clean data; abar[t] = prod_{s<=t} (1 - b_s) for t in 1..T.
        abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
        self._abar = torch.from_numpy(abar)  # float64, shape (T + 1,)
        # The table on each accelerator it was asked for there, so a step on a GPU indexes a
        # GPU table instead of copying coefficients from the host every time.
        self._abar_on: dict[torch.device, Tensor] = {}
        self.hash = schedule_hash(betas)

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> Diffusion:
        """Build from a schedule config."""
        return cls(make_betas(config))

    # ----- schedule quantities -------------------------------------------------------------

    def t_cut(self, cut_ratio: float) -> int:
        """t_cut = round(c * T), kept inside 1..T-1 so both sides own at least one step."""
        if not 0.0 < cut_ratio < 1.0:
            raise ValueError(f"cut_ratio must lie in (0, 1), got {cut_ratio}")
        return min(max(round(cut_ratio * self.num_timesteps), 1), self.num_timesteps - 1)

    def alpha_bar(self, t: int) -> float:
        """abar_t for one integer timestep (abar_0 = 1)."""
        self._check_range(torch.tensor([t]), 0)
        return float(self._abar[t])

    def snr(self, t: int) -> float:
        """Signal-to-noise ratio abar_t / (1 - abar_t) of one release at timestep t."""
        a = self.alpha_bar(t)
        return math.inf if a >= 1.0 else a / (1.0 - a)

    def equivalent_timestep(self, snr: float) -> int:
        """The smallest timestep whose SNR is at most `snr` (T if none is)."""
        for t in range(1, self.num_timesteps + 1):
            if self.snr(t) <= snr:
                return t
        return self.num_timesteps

    def _check_range(self, t: Tensor, low: int) -> None:
        if not _checkable(t):
            return
        if t.numel() and (int(t.min()) < low or int(t.max()) > self.num_timesteps):
            raise ValueError(f"timesteps must lie in {low}..{self.num_timesteps}")

    def _coef(self, values: Tensor, like: Tensor) -> Tensor:
        """Broadcast per-sample float64 values (B,) to (B, 1, 1, 1) in the dtype of `like`."""
        return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1))).to(like.device)

    def _abar_at(self, t: Tensor) -> Tensor:
        """abar at each timestep, float64 on t's device (float32 where float64 is missing)."""
        if t.device.type == "cpu":
            return self._abar[t.detach().long()]
        table = self._abar_on.get(t.device)
        if table is None:
            dtype = torch.float32 if t.device.type == "mps" else torch.float64
            table = self._abar_on.setdefault(t.device, self._abar.to(t.device, dtype))
        return table[t.detach().long()]

    # ----- forward process -----------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        self._check_range(t, 0)
        ab = self._abar_at(t)
        return self._coef(ab.sqrt(), x0) * x0 + self._coef((1 - ab).sqrt(), x0) * noise

    def renoise(self, x_c: Tensor, c: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """From a cut image x_c, draw x_t (t > c) with the marginal q(x_t | x_0), exactly.

        The forward process is Markov: x_t = sqrt(r) x_c + sqrt(1 - r) eps2, r = abar_t / abar_c.
        """
        self._check_range(c, 0)
        self._check_range(t, 1)
        if _checkable(t) and bool((t <= c).any()):
            raise ValueError("renoise needs t > c for every sample")
        r = self._abar_at(t) / self._abar_at(c)
        return self._coef(r.sqrt(), x_c) * x_c + self._coef((1 - r).sqrt(), x_c) * noise

    def bridge(self, s: Tensor, t: Tensor, like: Tensor) -> Bridge:
        """Coefficients of q(x_s | x_t, x_0) for s < t, broadcast like `like`.

        With r = abar_t / abar_s:
        a = sqrt(abar_s)(1 - r)/(1 - abar_t), b = sqrt(r)(1 - abar_s)/(1 - abar_t),
        var = (1 - abar_s)(1 - r)/(1 - abar_t). The DDPM posterior is the case s = t - 1.
        """
        self._check_range(s, 0)
        self._check_range(t, 1)
        if _checkable(t) and bool((s >= t).any()):
            raise ValueError("bridge needs s < t for every sample")
        ab_s, ab_t = self._abar_at(s), self._abar_at(t)
        r = ab_t / ab_s
        a = ab_s.sqrt() * (1 - r) / (1 - ab_t)
        b = r.sqrt() * (1 - ab_s) / (1 - ab_t)
        var = (1 - ab_s) * (1 - r) / (1 - ab_t)
        return Bridge(self._coef(a, like), self._coef(b, like), self._coef(var, like))

    # ----- parameterisation ----------------------------------------------------------------

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        ab = self._abar_at(t)
        return (x_t - self._coef((1 - ab).sqrt(), x_t) * eps) / self._coef(ab.sqrt(), x_t)

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        ab = self._abar_at(t)
        return (x_t - self._coef(ab.sqrt(), x_t) * x0) / self._coef((1 - ab).sqrt(), x_t)

    # ----- losses ----------------------------------------------------------------------------

    def eps_loss(self, model: Denoiser, x0: Tensor, t: Tensor, noise: Tensor) -> LossOutput:
        """The textbook DDPM loss ||eps_hat(x_t, t) - eps||^2 (the client's, on t <= t_cut)."""
        x_t = self.q_sample(x0, t, noise)
        per = (model(x_t, t) - noise).pow(2).flatten(1).mean(1)
        return LossOutput(per.mean(), per)

    def bridge_loss(
        self, model: Denoiser, x_c: Tensor, c: Tensor, t: Tensor, noise: Tensor, gamma: float = 5.0
    ) -> LossOutput:
        """The server's loss on cut images alone: regress x_c through q(x_c | x_t, x_0).

        loss = w ||a x0_hat(x_t, t) + b x_t - x_c||^2, minimised by x0_hat = E[x_0 | x_t].
        Per pixel, E||a x0_hat + b x_t - x_c||^2 / var = (SNR_c - SNR_t) E||x0_hat - x_0||^2 + 1;
        we weight in x_c space with w = min(1, gamma / lam) / var, lam = SNR_c / SNR_t - 1, the
        eps-MSE weight lam bounded by gamma (min-SNR style). Near t = c, a -> 0 and the step
        barely depends on x0_hat, and the weight fades with it. The bridge noise alone
        contributes min(1, gamma / lam) per pixel, so the loss never reaches 0.
        """
        x_t = self.renoise(x_c, c, t, noise)
        br = self.bridge(c, t, x_c)
        eps_hat = model(x_t, t)
        x0_hat = self.x0_from_eps(x_t, t, eps_hat)
        resid = (br.a * x0_hat + br.b * x_t - x_c).pow(2).flatten(1).mean(1)
        ab_c, ab_t = self._abar_at(c), self._abar_at(t)
        lam = (ab_c / (1 - ab_c)) / (ab_t / (1 - ab_t)) - 1
        var = (1 - ab_c) * (1 - ab_t / ab_c) / (1 - ab_t)
        w = torch.clamp(gamma / lam, max=1.0) / var
        per = resid * w.to(resid.device, resid.dtype)
        return LossOutput(per.mean(), per)

    # ----- reverse process -------------------------------------------------------------------

    def step(
        self,
        eps_hat: Tensor,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        kind: SamplerKind = "ddpm",
        eta: float = 0.0,
        noise: Tensor | None = None,
        clip: bool = True,
        gamma: Tensor | None = None,
    ) -> StepOutput:
        """One reverse step from t to s < t per sample, given the model's eps_hat at (x_t, t).

        The caller runs the network (batched however it likes); s = 0 returns the x_0 estimate
        (analytic: a draw around it).
        ddpm: ancestral, x_s ~ q(x_s | x_t, x0_hat) (the DDPM posterior for any stride).
        ddim: x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
        sigma = eta * sqrt(var) (Song et al. 2021).
        analytic: ddpm's mean with Analytic-DPM's optimal isotropic variance (Bao et al. 2022),
        var + a^2 x0_posterior_var(t, gamma); `gamma` (B,) holds Gamma_t = E||eps_hat||^2 / d
        per sample (estimate_gamma). With clip, x_0 is known to lie in [-1, 1], so the added
        variance is at most a^2 (their bound) and a final x_0 is clamped like x0_hat.
        """
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}; use one of {', '.join(SAMPLERS)}")
        if kind == "analytic" and (gamma is None or gamma.shape != t.shape):
            raise ValueError("the analytic sampler needs gamma, Gamma_t of shape (B,) like t")
        br = self.bridge(s, t, x_t)
        x0_hat = self.x0_from_eps(x_t, t, eps_hat)
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps_hat = self.eps_from_x0(x_t, t, x0_hat)
        if noise is None and draws_noise(kind, eta):
            noise = torch.randn_like(x_t)
        if kind == "ddpm":
            assert noise is not None
            prev = br.a * x0_hat + br.b * x_t + br.var.sqrt() * noise
        elif kind == "ddim":
            ab_s = self._coef(self._abar_at(s), x_t)
            sigma = eta * br.var.sqrt()
            dir_coef = (1 - ab_s - sigma**2).clamp(min=0).sqrt()
            prev = ab_s.sqrt() * x0_hat + dir_coef * eps_hat
            if noise is not None and eta != 0.0:
                prev = prev + sigma * noise
        elif kind == "analytic":
            assert noise is not None and gamma is not None
            extra = self.x0_posterior_var(t, gamma)
            if clip:
                extra = extra.clamp(max=1.0)  # Var[x_0 | x_t] <= ((1 - (-1)) / 2)^2 per pixel
            var = br.var + br.a**2 * self._coef(extra, x_t)
            prev = br.a * x0_hat + br.b * x_t + var.sqrt() * noise
            if clip:
                # Only a step to s = 0 ends on an image; the others stay noisy states.
                final = (s == 0).reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.device)
                prev = torch.where(final, prev.clamp(-1.0, 1.0), prev)
        else:
            raise ValueError(f"sampler {kind!r} is registered but has no step")
        return StepOutput(prev, x0_hat)

    def x0_posterior_var(self, t: Tensor, gamma: Tensor) -> Tensor:
        """The mean Var[x_0 | x_t] per pixel implied by Gamma_t: (1 - abar_t)/abar_t (1 - Gamma_t).

        Var[x_0 | x_t] = (1 - abar_t)/abar_t Var[eps | x_t], whose mean over pixels and x_t is
        E||eps||^2 / d - E||E[eps | x_t]||^2 / d = 1 - Gamma_t. Gamma_t is clamped to [0, 1]
        (an estimate may stray outside), so the result lies in [0, (1 - abar_t)/abar_t].
        Shape (B,) like t, in abar's dtype on t's device.
        """
        ab = self._abar_at(t)
        return (1 - ab) / ab * (1 - gamma.to(ab.dtype).clamp(0.0, 1.0))

    def estimate_gamma(
        self,
        model: Denoiser,
        timesteps: Sequence[int],
        draw: Callable[[int], Tensor],
        max_batch: int = 0,
    ) -> Tensor:
        """Gamma_t = E||eps_hat(x_t, t)||^2 / d at each timestep: a Monte Carlo mean.

        draw(t) returns samples x_t (n, C, H, W) of the data's marginal q(x_t), the samples the
        mean runs over; a model call takes whole timesteps, up to max_batch rows (0: one
        timestep a call). Returns (K,) in float64 (float32 on mps) on the samples' device,
        unclamped; nothing is read back to the host.
        """
        if not timesteps:
            raise ValueError("need at least one timestep")
        self._check_range(torch.tensor(list(timesteps)), 1)
        means: list[Tensor] = []
        pending: list[tuple[Tensor, Tensor]] = []  # (x_t, t) of the timesteps of the next call

        def run() -> None:
            x = torch.cat([p[0] for p in pending])
            t = torch.cat([p[1] for p in pending])
            with torch.inference_mode():
                eps = model(x, t)
            dtype = torch.float32 if eps.device.type == "mps" else torch.float64
            per = eps.to(dtype).pow(2).flatten(1).mean(1)  # (N,) ||eps_hat||^2 / d per sample
            for part in per.split([p[0].shape[0] for p in pending]):
                means.append(part.mean())
            pending.clear()

        rows = 0
        for t_now in timesteps:
            x = draw(t_now)
            if pending and rows + x.shape[0] > max_batch:
                run()
                rows = 0
            pending.append((x, torch.full((x.shape[0],), t_now, dtype=torch.long, device=x.device)))
            rows += x.shape[0]
        run()
        return torch.stack(means)

    def timesteps(self, start: int, stop: int, num_steps: int = 0) -> list[int]:
        """Descending timesteps from `start` to `stop`, both included, in `num_steps` hops.

        num_steps = 0 (or at least start - stop) visits every timestep. The server runs
        T..t_cut and the client t_cut..0, so the hand-off lands exactly on t_cut.
        """
        if not 0 <= stop < start <= self.num_timesteps:
            raise ValueError(f"need 0 <= stop < start <= T, got start={start}, stop={stop}")
        span = start - stop
        if num_steps <= 0 or num_steps >= span:
            return list(range(start, stop - 1, -1))
        points = np.round(np.linspace(start, stop, num_steps + 1)).astype(int)
        return sorted({int(p) for p in points}, reverse=True)

    def sample_loop(
        self,
        model: Denoiser,
        x_start: Tensor,
        timesteps: Sequence[int],
        kind: SamplerKind = "ddpm",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip: bool = True,
        progress: Callable[[int, int], None] | None = None,
        gamma: Tensor | None = None,
    ) -> Tensor:
        """Run the reverse chain from x_start at timesteps[0] through each listed timestep.

        The analytic sampler takes gamma (K,), Gamma_t at the first K = len(timesteps) - 1
        timesteps (estimate_gamma), on x_start's device.
        """
        if len(timesteps) < 2:
            raise ValueError("need at least two timesteps (a start and a stop)")
        if gamma is not None and gamma.shape != (len(timesteps) - 1,):
            raise ValueError(f"gamma needs one value per step ({len(timesteps) - 1})")
        x = x_start
        B = x.shape[0]
        total = len(timesteps) - 1
        for i, (t_now, t_next) in enumerate(itertools.pairwise(timesteps)):
            t = torch.full((B,), t_now, dtype=torch.long, device=x.device)
            s = torch.full((B,), t_next, dtype=torch.long, device=x.device)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            eps_hat = model(x, t)
            g = None if gamma is None else gamma[i].expand(B)
            x = self.step(
                eps_hat, x, t, s, kind=kind, eta=eta, noise=z, clip=clip, gamma=g
            ).prev_sample
            if progress is not None:
                progress(i + 1, total)
        return x


class TimestepSampler:
    """Draws training timesteps uniformly in (low, high] per sample: the one place the cut lives."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def sample(
        self, low: Tensor, high: Tensor | int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Integers t with low < t <= high, shape (B,) like `low`.

        The server draws (t_cut, T]; the client draws (0, t_cut].
        """
        low = low.long()
        hi = torch.as_tensor(high, dtype=torch.long, device=low.device).expand_as(low)
        if _checkable(low) and (
            bool((hi <= low).any()) or int(hi.max()) > self.num_timesteps or int(low.min()) < 0
        ):
            raise ValueError("need 0 <= low < high <= T for every sample")
        u = torch.rand(low.shape, generator=generator, dtype=torch.float64, device=low.device)
        return low + 1 + torch.floor(u * (hi - low).double()).long().clamp(max=(hi - low - 1))
