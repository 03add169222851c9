"""The server's batching sampler: one network call per step across requests, exact hand-off."""

from __future__ import annotations

import torch

from collafuse.common.config import ImageConfig, ScheduleConfig, UNetConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.nets import UNetDenoiser, build_unet
from collafuse.server.sampler import BatchingSampler, sample_generators
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

    # The same chain, one sample at a time, with the same per-sample generators.
    model = UNetDenoiser(hub.model, torch.tensor([2]))
    expected = []
    for g in sample_generators(5, 3):
        x = torch.randn((1, 1, 8, 8), generator=g)
        for t_now, t_next in zip(steps[:-1], steps[1:], strict=True):
            z = torch.randn((1, 1, 8, 8), generator=g)
            t, s = torch.tensor([t_now]), torch.tensor([t_next])
            with torch.inference_mode():
                x = d.step(model(x, t), x, t, s, kind="ddpm", noise=z).prev_sample
        expected.append(x)
    assert torch.allclose(got, torch.cat(expected), atol=1e-5)


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
