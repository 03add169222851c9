"""The samplers of both halves: the server's batching sampler (one network call per step across
requests, exact hand-off) and the client's finish_chain, with the analytic sampler's Gamma_t."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_diffusion import Z, alpha_bars, chain_moments, gaussian_oracle, make_diffusion, marginal
from test_integration import tiny_server_config
from torch import Tensor, nn

from collafuse.client.synth import finish_chain, local_gamma
from collafuse.common.config import ImageConfig, ScheduleConfig, UNetConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.nets import UNetDenoiser, build_unet
from collafuse.server.sampler import NOISE_BLOCK, BatchingSampler, GammaSource, Job, sample_noise
from collafuse.server.trainer import GammaDraw, ModelHub, Trainer, unconditional_label


def _hub() -> ModelHub:
    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(8, 16), attention_levels=(), norm_num_groups=4)
    return ModelHub(build_unet(cfg, ImageConfig(size=8), num_class_embeds=3), version=7)


def test_concurrent_requests_share_each_forward_pass() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    sampler = BatchingSampler(d, _hub(), max_batch=64, device=torch.device("cpu"))
    # Two clients with different cuts, samplers and step counts, queued before the worker runs.
    a = sampler.submit(3, 11, d.timesteps(40, 12, 6), "ddpm", 0.0, 0, (1, 8, 8))
    b = sampler.submit(5, 12, d.timesteps(40, 20, 6), "ddim", 0.0, 1, (1, 8, 8))
    sampler.start()
    for job in a + b:
        assert job.done.wait(60)
    sampler.stop()
    assert sampler.forward_calls == 6  # 6 steps each, every one shared
    assert sampler.samples_stepped == 6 * 8
    assert a[0].model_version == 7 and a[0].x.shape == (3, 1, 8, 8)


def test_batched_result_equals_the_plain_loop() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    hub = _hub()
    sampler = BatchingSampler(d, hub, max_batch=2, device=torch.device("cpu"))
    steps = d.timesteps(40, 15, 5)
    jobs = sampler.submit(3, 5, steps, "ddpm", 0.0, 2, (1, 8, 8))  # split into 2 + 1
    other = sampler.submit(1, 9, d.timesteps(40, 25, 3), "ddim", 0.5, 0, (1, 8, 8))
    sampler.start()
    for job in jobs + other:
        assert job.done.wait(60)
    sampler.stop()
    got = torch.cat([j.x for j in jobs])

    # The same chain, one sample at a time, each drawing its noise alone.
    model = UNetDenoiser(hub.model, torch.tensor([2]))
    cpu = torch.device("cpu")
    expected = []
    for i in range(3):
        x = sample_noise(5, i, i + 1, 0, (1, 8, 8), cpu)
        for k, (t_now, t_next) in enumerate(zip(steps[:-1], steps[1:], strict=True)):
            z = sample_noise(5, i, i + 1, k + 1, (1, 8, 8), cpu)
            t, s = torch.tensor([t_now]), torch.tensor([t_next])
            with torch.inference_mode():
                x = d.step(model(x, t), x, t, s, kind="ddpm", noise=z).prev_sample
        expected.append(x)
    assert torch.allclose(got, torch.cat(expected), atol=1e-5)


def test_noise_depends_on_the_seed_index_and_position_alone() -> None:
    cpu = torch.device("cpu")
    n = 2 * NOISE_BLOCK + 5
    whole = sample_noise(3, 0, n, 4, (1, 2, 2), cpu)
    # Any split of the range, across block boundaries too, draws the same rows.
    for lo, hi in [(0, 1), (NOISE_BLOCK - 2, NOISE_BLOCK + 3), (n - 1, n), (7, n)]:
        assert torch.equal(sample_noise(3, lo, hi, 4, (1, 2, 2), cpu), whole[lo:hi])
    assert not torch.allclose(sample_noise(3, 0, n, 5, (1, 2, 2), cpu), whole)  # position
    assert not torch.allclose(sample_noise(4, 0, n, 4, (1, 2, 2), cpu), whole)  # seed
    # Blocks differ from each other.
    assert not torch.allclose(whole[:NOISE_BLOCK], whole[NOISE_BLOCK : 2 * NOISE_BLOCK])


def _run(sampler: BatchingSampler, jobs: list[Job]) -> torch.Tensor:
    sampler.start()
    for job in jobs:
        assert job.done.wait(60)
    sampler.stop()
    assert all(j.error is None for j in jobs)
    return torch.cat([j.x for j in jobs if j.x is not None])


def test_a_sample_does_not_depend_on_slicing_offset_or_company() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    steps = d.timesteps(40, 10, 5)
    cpu = torch.device("cpu")
    single = BatchingSampler(d, _hub(), max_batch=64, device=cpu)
    alone = _run(single, single.submit(6, 21, steps, "ddpm", 0.0, 1, (1, 8, 8)))
    # Resumed from sample 2, cut in slices of 3, beside another client's request.
    sampler = BatchingSampler(d, _hub(), max_batch=5, device=cpu, slice_size=3)
    resumed = sampler.submit(4, 21, steps, "ddpm", 0.0, 1, (1, 8, 8), first_index=2)
    assert [(j.lo, j.hi) for j in resumed] == [(2, 3), (3, 6)]
    sampler.submit(7, 99, d.timesteps(40, 20, 3), "ddim", 0.3, 0, (1, 8, 8))
    assert torch.allclose(_run(sampler, resumed), alone[2:], atol=1e-5)


def test_a_chain_runs_on_the_version_it_started_on() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    steps = d.timesteps(40, 10, 8)
    cpu = torch.device("cpu")
    single = BatchingSampler(d, _hub(), max_batch=64, device=cpu)
    reference = _run(single, single.submit(2, 3, steps, "ddim", 0.0, 0, (1, 8, 8)))
    hub = _hub()
    sampler = BatchingSampler(d, hub, max_batch=64, device=cpu)
    first = sampler.submit(2, 3, steps, "ddim", 0.0, 0, (1, 8, 8))
    # Step by step on this thread: two steps on version 7, then the trainer publishes 8.
    sampler._step(first)
    sampler._step(first)
    new = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in hub.model.state_dict().items()
    }
    hub.publish(new, 8)
    assert hub.retired_versions == [7]
    later = sampler.submit(2, 3, steps, "ddim", 0.0, 0, (1, 8, 8))
    calls = sampler.forward_calls
    while not all(j.done.is_set() for j in first + later):
        sampler._step([j for j in first + later if not j.done.is_set()])
    # The 6 shared steps ran each version in its own call; the 2 after them, only the new one.
    assert sampler.forward_calls - calls == 6 * 2 + 2
    assert first[0].model_version == 7 and later[0].model_version == 8
    assert torch.allclose(first[0].x, reference, atol=1e-5)
    assert not torch.allclose(later[0].x, reference, atol=1e-3)
    assert hub.retired_versions == []  # freed with the last chain on it


def test_a_failing_request_fails_alone() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    sampler = BatchingSampler(d, _hub(), max_batch=64, device=torch.device("cpu"))
    steps = d.timesteps(40, 12, 4)
    good = sampler.submit(2, 1, steps, "ddpm", 0.0, 0, (1, 8, 8))
    # A label outside the embedding table: the network raises for this request only.
    bad = sampler.submit(1, 2, steps, "ddpm", 0.0, 99, (1, 8, 8))
    sampler.start()
    for job in good + bad:
        assert job.done.wait(60)
    sampler.stop()
    assert good[0].error is None and good[0].x is not None and good[0].x.shape == (2, 1, 8, 8)
    assert bad[0].error is not None


def test_cancelled_jobs_leave_the_batch_and_unpin() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    hub = _hub()
    sampler = BatchingSampler(d, hub, max_batch=64, device=torch.device("cpu"))
    steps = d.timesteps(40, 12, 30)
    jobs = sampler.submit(4, 1, steps, "ddpm", 0.0, 0, (1, 8, 8))
    sampler._step(jobs)
    hub.publish(hub.model.state_dict(), 8)
    assert hub.retired_versions == [7]
    for job in jobs:
        job.cancelled = True
    stepped = sampler.samples_stepped
    sampler.start()
    deadline = 100
    while hub.retired_versions and deadline:
        deadline -= 1
        threading.Event().wait(0.05)
    sampler.stop()
    assert hub.retired_versions == [] and sampler.samples_stepped == stepped


def test_a_small_request_is_not_held_up_by_a_large_one() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    sampler = BatchingSampler(
        d, _hub(), max_batch=64, device=torch.device("cpu"), slice_size=8, interactive_batch=4
    )
    steps = d.timesteps(40, 12, 10)
    big = sampler.submit(64, 1, steps, "ddpm", 0.0, 0, (1, 8, 8))
    small = sampler.submit(1, 2, steps, "ddpm", 0.0, 1, (1, 8, 8))
    assert [j.n for j in big] == [8] * 8  # sliced, so others can join at any step
    # The next steps: the small request goes first and the step stays small while it waits.
    picked = sampler.pick(big + small)
    assert picked[0] is small[0] and sum(j.n for j in picked) <= 4 + 1
    sampler.start()
    assert small[0].done.wait(60)
    finished_big = sum(j.done.is_set() for j in big)
    for job in big:
        assert job.done.wait(60)
    sampler.stop()
    # The small request finished after its 10 steps, before any slice of the large one.
    assert finished_big == 0
    # Alone (no interactive request), the large one fills whole batches.
    assert sum(j.n for j in sampler.pick(big)) == 64


def test_many_small_requests_are_batched_together() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    sampler = BatchingSampler(d, _hub(), max_batch=64, device=torch.device("cpu"))
    steps = d.timesteps(40, 12, 4)
    jobs = [j for k in range(32) for j in sampler.submit(2, k, steps, "ddim", 0.0, 0, (1, 8, 8))]
    assert sum(j.n for j in sampler.pick(jobs)) == 64  # all interactive: one full batch
    sampler.start()
    for job in jobs:
        assert job.done.wait(60)
    sampler.stop()
    assert sampler.forward_calls == 4


def test_a_large_request_is_not_starved_by_a_stream_of_small_ones() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    sampler = BatchingSampler(
        d,
        _hub(),
        max_batch=64,
        device=torch.device("cpu"),
        slice_size=8,
        interactive_batch=4,
        max_wait=3,
    )
    steps = d.timesteps(40, 12, 10)
    big = sampler.submit(32, 1, steps, "ddpm", 0.0, 0, (1, 8, 8))
    small = sampler.submit(1, 2, steps, "ddpm", 0.0, 1, (1, 8, 8))
    assert big[0] not in sampler.pick(big + small)  # the small one goes first...
    big[0].waited = 3  # ...until the large one has waited max_wait steps
    picked = sampler.pick(big + small)
    assert picked[0] is big[0] and small[0] in picked


# ----- the analytic sampler: Gamma_t on the server ---------------------------------------------


def _gamma_source(d: Diffusion, calls: list[tuple[int, int]]) -> GammaSource:
    """A stand-in for the trainer's pool: fixed images noised to t, the draw fixed by t alone."""
    images = torch.rand((40, 1, 8, 8), generator=torch.Generator().manual_seed(50)) * 2 - 1

    def source(t: int, n: int, label: int, seed: int) -> GammaDraw:
        calls.append((t, label))
        g = torch.Generator().manual_seed(t)
        x0 = images[torch.randint(0, len(images), (n,), generator=g)]
        x_t = d.q_sample(x0, torch.full((n,), t), torch.randn(x0.shape, generator=g))
        return GammaDraw(x_t, torch.tensor(True))

    return source


def test_analytic_requests_estimate_gamma_once_and_do_not_depend_on_batching() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    steps = d.timesteps(40, 10, 5)
    cpu = torch.device("cpu")
    calls: list[tuple[int, int]] = []
    single = BatchingSampler(d, _hub(), 64, cpu, gamma_samples=_gamma_source(d, calls), gamma_n=16)
    alone = _run(single, single.submit(6, 21, steps, "analytic", 0.0, 1, (1, 8, 8)))
    # One estimate per timestep the chain steps from, for this version and label.
    assert sorted(calls) == sorted((t, 1) for t in steps[:-1])
    assert single.gamma_estimates == len(steps) - 1

    # Resumed from sample 2 in slices of 3 beside other samplers, labels and a second analytic
    # request of the same label (which reuses the estimates): the same samples.
    calls.clear()
    sampler = BatchingSampler(
        d, _hub(), 5, cpu, slice_size=3, gamma_samples=_gamma_source(d, calls), gamma_n=16
    )
    resumed = sampler.submit(4, 21, steps, "analytic", 0.0, 1, (1, 8, 8), first_index=2)
    sampler.submit(3, 99, d.timesteps(40, 20, 3), "ddim", 0.3, 0, (1, 8, 8))
    sampler.submit(2, 98, steps, "ddpm", 0.0, 2, (1, 8, 8))
    sampler.submit(2, 97, steps, "analytic", 0.0, 1, (1, 8, 8))
    assert torch.allclose(_run(sampler, resumed), alone[2:], atol=1e-5)
    assert sorted(calls) == sorted((t, 1) for t in steps[:-1])

    # The plain loop with Diffusion.estimate_gamma on the same draws gives the same chain.
    hub = _hub()
    gamma = d.estimate_gamma(
        UNetDenoiser(hub.model, torch.full((16,), 1)),
        steps[:-1],
        lambda t: _gamma_source(d, [])(t, 16, 1, 0).x_t,
    )
    assert bool((gamma > 0).all()) and bool((gamma < 1.5).all())
    model = UNetDenoiser(hub.model, torch.tensor([1]))
    expected = []
    for i in range(6):
        x = sample_noise(21, i, i + 1, 0, (1, 8, 8), cpu)
        for k, (t_now, t_next) in enumerate(zip(steps[:-1], steps[1:], strict=True)):
            z = sample_noise(21, i, i + 1, k + 1, (1, 8, 8), cpu)
            t, s = torch.tensor([t_now]), torch.tensor([t_next])
            with torch.inference_mode():
                eps = model(x, t)
                x = d.step(eps, x, t, s, "analytic", noise=z, gamma=gamma[k : k + 1]).prev_sample
        expected.append(x)
    assert torch.allclose(alone, torch.cat(expected), atol=1e-5)
    # And the variance did something: ddpm on the same noise ends elsewhere.
    plain = BatchingSampler(d, _hub(), 64, cpu)
    ddpm = _run(plain, plain.submit(6, 21, steps, "ddpm", 0.0, 1, (1, 8, 8)))
    assert not torch.allclose(ddpm, alone, atol=1e-3)


def test_analytic_without_pool_data_is_ddpm_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    steps = d.timesteps(40, 12, 4)
    cpu = torch.device("cpu")
    plain = BatchingSampler(d, _hub(), 64, cpu)
    ddpm = _run(plain, plain.submit(3, 4, steps, "ddpm", 0.0, 0, (1, 8, 8)))
    # The same company as below, so that every network call sees the same batch.
    paired = BatchingSampler(d, _hub(), 64, cpu)
    jobs = paired.submit(3, 4, steps, "ddpm", 0.0, 0, (1, 8, 8))
    ddpm_in_company = _run(paired, jobs + paired.submit(2, 5, steps, "ddpm", 0.0, 1, (1, 8, 8)))
    for source in (None, lambda *_: None):  # no source; an empty pool
        sampler = BatchingSampler(d, _hub(), 64, cpu, gamma_samples=source)
        with caplog.at_level(logging.WARNING, logger="collafuse.server.sampler"):
            caplog.clear()
            first = sampler.submit(3, 4, steps, "analytic", 0.0, 0, (1, 8, 8))
            other = sampler.submit(2, 5, steps, "analytic", 0.0, 1, (1, 8, 8))
            got = _run(sampler, first + other)
        assert torch.equal(got, ddpm_in_company)  # Gamma = 1 is DDPM's variance, bit for bit
        assert sum("Gamma = 1" in r.getMessage() for r in caplog.records) == 1
    # A label whose cuts are all at or above t: flagged draws, Gamma = 1 as well.
    flagged = BatchingSampler(
        d,
        _hub(),
        64,
        cpu,
        gamma_samples=lambda t, n, *_: GammaDraw(torch.randn(n, 1, 8, 8), torch.tensor(False)),
    )
    assert torch.equal(
        _run(flagged, flagged.submit(3, 4, steps, "analytic", 0.0, 0, (1, 8, 8))), ddpm
    )


def test_gamma_is_estimated_per_model_version() -> None:
    d = Diffusion.from_config(ScheduleConfig(num_timesteps=40))
    steps = d.timesteps(40, 10, 4)
    hub = _hub()
    calls: list[tuple[int, int]] = []
    sampler = BatchingSampler(
        d, hub, 64, torch.device("cpu"), gamma_samples=_gamma_source(d, calls), gamma_n=8
    )
    first = sampler.submit(2, 3, steps, "analytic", 0.0, 0, (1, 8, 8))
    sampler._step(first)
    new = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in hub.model.state_dict().items()
    }
    hub.publish(new, 8)
    later = sampler.submit(2, 3, steps, "analytic", 0.0, 0, (1, 8, 8))
    while not all(j.done.is_set() for j in first + later):
        sampler._step([j for j in first + later if not j.done.is_set()])
    assert len(calls) == 2 * (len(steps) - 1)  # once on version 7, once on 8
    assert first[0].gamma is not None and later[0].gamma is not None
    assert not torch.allclose(first[0].gamma, later[0].gamma)
    sampler._forget_gammas([])  # no chain left: only the serving version's estimates stay
    assert list(sampler._gammas) == [8]


def test_trainer_draws_gamma_samples_from_its_pool(tmp_path: Path) -> None:
    """x_t comes from the label's own cut images with c < t, re-noised with q's marginal."""
    config = tiny_server_config(tmp_path / "server")
    d = Diffusion.from_config(config.schedule)
    trainer = Trainer(config, d, None, torch.device("cpu"), tmp_path / "ck" / "server.pt")
    assert trainer.gamma_samples(30, 8, 0, seed=1) is None  # an empty pool
    n = 64
    # Client 0 cut at 10 with every pixel +2, client 1 at 25 with every pixel -2.
    trainer.add_cuts(torch.full((n, 1, 8, 8), 2.0), torch.full((n,), 10), torch.zeros(n))
    trainer.add_cuts(torch.full((n, 1, 8, 8), -2.0), torch.full((n,), 25), torch.ones(n))
    abar = alpha_bars(d)
    for t, label, c, value in [(30, 0, 10, 2.0), (30, 1, 25, -2.0), (20, None, 10, 2.0)]:
        who = unconditional_label(config) if label is None else label
        draw = trainer.gamma_samples(t, 512, who, seed=2)
        assert draw is not None and bool(draw.ok) and draw.x_t.shape == (512, 1, 8, 8)
        # At t = 20 only client 0's cuts (c = 10 < 20) can be re-noised, whoever asks.
        r = abar[t] / abar[c]
        z = (draw.x_t.double() - math.sqrt(r) * value) / math.sqrt(1 - r)
        assert abs(float(z.mean())) <= Z / math.sqrt(z.numel()), (t, label)
        assert abs(float(z.var()) - 1) <= Z * math.sqrt(2 / z.numel()), (t, label)
    # The mixture at t = 30 draws from both clients.
    both = trainer.gamma_samples(30, 512, unconditional_label(config), seed=3)
    assert both is not None
    signs = both.x_t.flatten(1).mean(1) > 0
    assert 0 < int(signs.sum()) < 512
    # Reproducible by seed; no cut of client 1 lies below t = 20.
    one, two = (trainer.gamma_samples(30, 512, 0, seed=2) for _ in range(2))
    assert one is not None and two is not None and torch.equal(one.x_t, two.x_t)
    none = trainer.gamma_samples(20, 8, 1, seed=4)
    assert none is not None and not bool(none.ok)


# ----- the analytic sampler: Gamma_t on the client ---------------------------------------------


class _Oracle(nn.Module):
    """The Gaussian oracle of tests/test_diffusion.py behind the UNet's call signature."""

    def __init__(self, abar: Tensor, mu: float, s0: float) -> None:
        super().__init__()
        self.eps = gaussian_oracle(abar.numpy(), mu, s0)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(sample=self.eps(x, t))


def test_finish_chain_analytic_ends_on_the_data_variance() -> None:
    """From an exact x_{t_cut}, with Gamma_t estimated from the client's own images.

    Data N(0, 0.3^2) (clipping to [-1, 1] touches 0.1% of it), T = 1000, t_cut = 300 in 10
    hops: analytic ends on s0^2 within Z standard errors, ddpm on the same noise at 0.63 of it.
    """
    mu, s0, t_cut = 0.0, 0.3, 300
    d = make_diffusion(1000)
    abar = alpha_bars(d)
    model = _Oracle(torch.from_numpy(abar), mu, s0)
    g = torch.Generator().manual_seed(51)
    images = (mu + s0 * torch.randn((500, 1, 16, 16), generator=g)).clamp(-1, 1)
    m, v = marginal(abar[t_cut], mu, s0)
    x_cut = m + math.sqrt(v) * torch.randn((256, 1, 16, 16), generator=g)

    out = finish_chain(d, model, x_cut, t_cut, 10, "analytic", 0.0, 7, images=images)
    n = out.numel()
    assert abs(float(out.double().var()) - s0**2) <= Z * s0**2 * math.sqrt(2 / (n - 1))
    assert abs(float(out.double().mean()) - mu) <= Z * s0 / math.sqrt(n)
    assert float(out.abs().max()) <= 1.0  # an image, clamped like x0_hat
    again = finish_chain(d, model, x_cut, t_cut, 10, "analytic", 0.0, 7, images=images)
    assert torch.equal(out, again)

    ddpm = finish_chain(d, model, x_cut, t_cut, 10, "ddpm", 0.0, 7)
    exact = chain_moments(abar, mu, s0, (m, v), d.timesteps(t_cut, 0, 10), "ddpm")
    assert exact[1] / s0**2 < 0.7
    assert float(ddpm.double().var()) < s0**2 * (1 - Z * math.sqrt(2 / (n - 1)))
    with pytest.raises(ValueError, match="images"):
        finish_chain(d, model, x_cut, t_cut, 10, "analytic", 0.0, 7)


def test_local_gamma_matches_the_oracle_and_ignores_the_request() -> None:
    """The client's estimate from its images is the oracle's Gamma_t within its error."""
    mu, s0 = 0.0, 0.3
    d = make_diffusion(1000)
    abar = alpha_bars(d)
    model = _Oracle(torch.from_numpy(abar), mu, s0)
    images = s0 * torch.randn((500, 1, 16, 16), generator=torch.Generator().manual_seed(52))
    ts = [300, 150, 20, 1]
    got = local_gamma(d, UNetDenoiser(model), images, ts)
    assert torch.equal(got, local_gamma(d, UNetDenoiser(model), images, ts))  # a fixed draw
    scalars = 64 * 256  # GAMMA_IMAGES images of 256 pixels
    for t, value in zip(ts, got.tolist(), strict=True):
        want = (1 - abar[t]) / (abar[t] * s0**2 + 1 - abar[t])
        assert abs(value - want) <= Z * want * math.sqrt(2 / scalars), (t, value, want)
