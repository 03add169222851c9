"""The training loop both sides share: fused AdamW, EMA, clipping, seeded steps, non-finite skips.

The server's trainer (bridge loss on cut images) and the client's (eps loss on its own images)
differ in their data and loss only; everything a step does after the loss is here, once.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn

from collafuse.common.nets import ema_update

log = logging.getLogger("collafuse.training")

CLIP_NORM = 1.0
"""Gradients are clipped to this global norm."""


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as the loop runs it: fused, so a step can be dropped on the device (found_inf)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load optimizer state, keeping the fused implementation.

    A state dict carries its param groups' options, and a checkpoint written before the loop
    used the fused AdamW would switch it back to one that cannot skip a step on the device.
    """
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"] = True
        group["foreach"] = None


class TrainLoop:
    """Model, EMA copy, optimizer and step counter, and the update that follows a loss.

    Nothing in `update` reads a device value back to the host, so a GPU never waits for the
    Python thread: a step with a non-finite loss or gradient norm is dropped by the fused
    optimizer (found_inf) and counted on the device; the EMA still takes its step, towards
    unchanged weights. The loss of the last kept step and the count are read on demand.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        ema_decay: float,
        seed: int,
        device: torch.device,
        precision: Literal["auto", "fp32", "bf16"] = "auto",
        compile: bool = False,
    ) -> None:
        self.device = device
        self.model = model.to(device)
        self.bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        """Forward and backward run under bfloat16 autocast."""
        self._compiled: nn.Module | None = None
        self._compile_proven = False
        if compile:
            # Compiled lazily, at the first step; the weights stay those of `model`.
            self._compiled = torch.compile(self.model)  # type: ignore[assignment]
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = make_optimizer(self.model, lr, weight_decay)
        self.ema_decay = ema_decay
        self.seed = seed
        self.step = 0
        self._generator = torch.Generator(device)
        self._last_loss = torch.tensor(math.nan, device=device)
        self._skipped = torch.zeros((), dtype=torch.long, device=device)

    def generator(self) -> torch.Generator:
        """The step's generator on the device, seeded by (seed, step): a resumed run draws what
        an uninterrupted one would."""
        return self._generator.manual_seed(self.seed * 1_000_003 + self.step)

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast when the loop runs in bf16 (by default on CUDA), else nothing."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @property
    def compiled(self) -> bool:
        """Whether steps run the torch.compile'd network."""
        return self._compiled is not None

    def loss(self, compute: Callable[[nn.Module], Tensor]) -> Tensor:
        """compute(network) in training mode under the loop's autocast: the compiled network
        when compile was asked for and it compiles, else the model itself.

        A compilation that fails (no C compiler, an unsupported op) falls back to the eager
        model once, with a warning; an error after the compiled network has run is raised.
        """
        self.model.train()
        with self.autocast():
            if self._compiled is None:
                return compute(self.model)
            try:
                out = compute(self._compiled)
            except Exception as exc:
                if self._compile_proven:
                    raise
                log.warning(
                    "torch.compile of the training network failed (%s: %s); training uncompiled",
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                )
                self._compiled = None
                return compute(self.model)
            self._compile_proven = True
            return out

    def update(self, loss: Tensor) -> Tensor:
        """Backward, clip, AdamW (skipped on the device when not finite), EMA; step += 1.

        Returns the loss, detached, as a 0-d tensor on the device.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss.float()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM, foreach=True)
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        self.optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
        self.optimizer.step()
        ema_update(self.ema, self.model, self.ema_decay)
        self._skipped += bad
        self._last_loss = torch.where(bad, self._last_loss, loss.detach())
        self.step += 1
        return loss.detach()

    @property
    def last_loss(self) -> float:
        """The loss of the last step that was not skipped (NaN before the first)."""
        return float(self._last_loss)

    @last_loss.setter
    def last_loss(self, value: float) -> None:
        self._last_loss = torch.tensor(value, device=self.device)

    @property
    def skipped(self) -> int:
        """Steps dropped for a non-finite loss or gradient norm since this loop was built."""
        return int(self._skipped)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the loop."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "last_loss": self.last_loss,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Resume from `state()` as saved in a checkpoint."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        load_optimizer(self.optimizer, state["optimizer"])
        self.step = int(state["step"])
        self.last_loss = float(state.get("last_loss", math.nan))


class OnLoop:
    """A trainer's step counter and last loss, kept by its TrainLoop (`self.loop`)."""

    loop: TrainLoop

    @property
    def step(self) -> int:
        """Training steps taken (skipped ones included)."""
        return self.loop.step

    @step.setter
    def step(self, value: int) -> None:
        # Studies set it to draw distinct batches in each round of a federated run.
        self.loop.step = value

    @property
    def last_loss(self) -> float:
        """The loss of the last step that was not skipped (NaN before the first)."""
        return self.loop.last_loss
