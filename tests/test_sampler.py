"""The server's batching sampler: one network call per step across requests, exact hand-off."""

from __future__ import annotations

import threading

import torch

from collafuse.common.config import ImageConfig, ScheduleConfig, UNetConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.nets import UNetDenoiser, build_unet
from collafuse.server.sampler import NOISE_BLOCK, BatchingSampler, Job, sample_noise
from collafuse.server.trainer import ModelHub


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
