"""The training loop both sides share: skips non-finite steps on the device, resumes exactly."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn

from collafuse.common.training import TrainLoop


def _loop(seed: int = 0) -> TrainLoop:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return TrainLoop(
        model, lr=1e-2, weight_decay=0.0, ema_decay=0.9, seed=3, device=torch.device("cpu")
    )


def _loss(loop: TrainLoop, scale: float = 1.0) -> torch.Tensor:
    gen = loop.generator()
    x = torch.randn((16, 4), generator=gen)
    y = torch.randn((16, 1), generator=gen)
    return (loop.model(x) - y).pow(2).mean() * scale


def test_a_non_finite_step_leaves_the_weights_and_counts() -> None:
    loop = _loop()
    assert math.isfinite(float(loop.update(_loss(loop))))
    before = {k: v.clone() for k, v in loop.model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in loop.optimizer.state.values()]
    kept = loop.last_loss
    assert not math.isfinite(float(loop.update(_loss(loop, math.inf))))
    assert loop.step == 2 and loop.skipped == 1 and loop.last_loss == kept
    after = loop.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The optimizer's moments did not move either: the fused AdamW skipped the whole update.
    assert all(
        torch.equal(m, s["exp_avg"])
        for m, s in zip(moments, loop.optimizer.state.values(), strict=True)
    )
    # A NaN loss (not just an infinite one) is skipped too, and training goes on afterwards.
    loop.update(_loss(loop, math.nan))
    assert loop.skipped == 2
    assert math.isfinite(float(loop.update(_loss(loop)))) and loop.skipped == 2
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())


def test_a_resumed_loop_continues_as_an_uninterrupted_one() -> None:
    straight = _loop()
    for _ in range(6):
        straight.update(_loss(straight))
    first = _loop()
    for _ in range(3):
        first.update(_loss(first))
    state = first.state()
    resumed = _loop(seed=99)  # other initial weights: everything must come from the state
    resumed.load(state)
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    for _ in range(3):
        resumed.update(_loss(resumed))
    assert resumed.step == 6 and resumed.last_loss == straight.last_loss
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_optimizer_state_without_fused_is_loaded_as_fused() -> None:
    loop = _loop()
    loop.update(_loss(loop))
    state = loop.state()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None  # as a checkpoint written before the loop used fused AdamW
        group["foreach"] = True
    other = _loop()
    other.load(state)
    assert all(g["fused"] and g["foreach"] is None for g in other.optimizer.param_groups)
    other.update(_loss(other, math.inf))  # would raise without the fused implementation
    assert other.skipped == 1


def test_bf16_runs_the_network_under_autocast_and_keeps_float32_state() -> None:
    fp32, bf16 = _loop(), _loop()
    bf16.bf16 = True
    assert not fp32.bf16  # auto: bf16 on CUDA only
    with bf16.autocast():
        assert bf16.model(torch.ones(2, 4)).dtype == torch.bfloat16
    for _ in range(3):
        a = float(fp32.update(fp32.loss(lambda net: (net(torch.ones(8, 4)) - 1).pow(2).mean())))
        b = float(bf16.update(bf16.loss(lambda net: (net(torch.ones(8, 4)) - 1).pow(2).mean())))
        assert math.isclose(a, b, rel_tol=0.05)  # bfloat16 keeps about 3 significant digits
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in bf16.optimizer.state.values())


@pytest.mark.slow
def test_a_compiled_loop_computes_what_the_eager_one_does() -> None:
    eager = _loop()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    compiled = TrainLoop(
        model,
        lr=1e-2,
        weight_decay=0.0,
        ema_decay=0.9,
        seed=3,
        device=torch.device("cpu"),
        compile=True,
    )
    for _ in range(3):
        a = float(eager.update(eager.loss(lambda net: _loss_of(net, eager))))
        b = float(compiled.update(compiled.loss(lambda net: _loss_of(net, compiled))))
        assert math.isclose(a, b, rel_tol=1e-4)
    # Compiled where a C compiler exists (inductor needs one); without, it fell back to eager
    # with a warning. Either way it trained as the eager loop did.
    assert compiled.compiled or shutil.which("cc") is None
    assert compiled.step == 3
    state = compiled.model.state_dict()
    assert all(torch.allclose(v, state[k], atol=1e-5) for k, v in eager.model.state_dict().items())


def _loss_of(net: nn.Module, loop: TrainLoop) -> torch.Tensor:
    gen = loop.generator()
    x = torch.randn((16, 4), generator=gen)
    y = torch.randn((16, 1), generator=gen)
    return (net(x) - y).pow(2).mean()
