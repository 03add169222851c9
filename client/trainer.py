"""The client's local trainer: a small denoiser on its own images, for timesteps 1..t_cut only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from collafuse.common.checkpoint import load_checkpoint, save_atomic
from collafuse.common.config import ClientConfig, ScheduleConfig, config_record
from collafuse.common.diffusion import Diffusion, TimestepSampler
from collafuse.common.export import client_target, warm_start_state
from collafuse.common.nets import UNetDenoiser, build_unet, count_parameters
from collafuse.common.training import OnLoop, TrainLoop

log = logging.getLogger("collafuse.client.trainer")


class LocalTrainer(OnLoop):
    """Trains with the eps loss on t in (t_floor, t_cut]; resumes from its atomic checkpoint.

    A client uses t_floor = 0. Studies reuse it for full-chain baselines (t_cut = T), optionally
    conditioned on a label per image (num_class_embeds).
    """

    def __init__(
        self,
        config: ClientConfig,
        schedule: ScheduleConfig,
        t_cut: int,
        checkpoint_path: Path,
        num_class_embeds: int | None = None,
        t_floor: int = 0,
    ) -> None:
        self.config = config
        self.schedule = schedule
        self.diffusion = Diffusion.from_config(schedule)
        self.t_cut = t_cut
        self.t_floor = t_floor
        self.checkpoint_path = checkpoint_path
        # AdamW's usual weight decay (0.01): the client config has no field for it.
        self.loop = TrainLoop(
            build_unet(config.model, config.image, num_class_embeds),
            lr=config.train.lr,
            weight_decay=0.01,
            ema_decay=config.train.ema_decay,
            seed=config.train.seed,
            device=torch.device("cpu"),
        )
        self.model = self.loop.model
        self.ema = self.loop.ema
        self.optimizer = self.loop.optimizer
        self.seconds = 0.0
        self.num_parameters = count_parameters(self.model)
        self.timesteps = TimestepSampler(self.diffusion.num_timesteps)
        state = load_checkpoint(checkpoint_path)
        if state is not None:
            self._resume(state)
            if config.init_from is not None:
                log.info(
                    "init_from %s ignored: the client resumes from its own checkpoint %s",
                    config.init_from,
                    checkpoint_path,
                )
        elif config.init_from is not None:
            self._warm_start(config.init_from, num_class_embeds)

    def _warm_start(self, folder: Path, num_class_embeds: int | None) -> None:
        """Start model and EMA from an exported folder that fits this schedule and cut."""
        target = client_target(self.config, self.diffusion.hash, self.t_cut, num_class_embeds)
        state, manifest = warm_start_state(folder, target)
        self.model.load_state_dict(state)
        self.ema.load_state_dict(state)
        log.info(
            "starting from %s: the client model of step %d exported from %s",
            folder,
            manifest.source.step,
            manifest.source.path,
        )

    def _resume(self, state: dict[str, Any]) -> None:
        if state["schedule_hash"] != self.diffusion.hash or state["t_cut"] != self.t_cut:
            # A model trained for another cut would hand over at the wrong noise level.
            raise ValueError(
                f"client checkpoint {self.checkpoint_path} was trained for t_cut={state['t_cut']} "
                f"on another schedule or cut; remove it to retrain for t_cut={self.t_cut}"
            )
        self.loop.load(state)
        self.seconds = float(state.get("seconds", 0.0))
        log.info("resumed local model at step %d", self.step)

    def save(self) -> None:
        """Atomic checkpoint with the schedule, the cut and the config."""
        save_atomic(
            {
                **self.loop.state(),
                "seconds": self.seconds,
                "t_cut": self.t_cut,
                "schedule": self.schedule.model_dump(mode="json"),
                "schedule_hash": self.diffusion.hash,
                "record": config_record(self.config),
            },
            self.checkpoint_path,
        )

    def train_step(self, images: Tensor, labels: Tensor | None = None) -> float:
        """One AdamW step of the eps loss on a random batch, t uniform in (t_floor, t_cut].

        A batch with a non-finite loss or gradient leaves the weights as they were (the shared
        loop skips it) and returns that non-finite loss.
        """
        cfg = self.config.train
        gen = self.loop.generator()
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        x0 = images[idx]  # (B, C, H, W)
        floor = torch.full((len(idx),), self.t_floor, dtype=torch.long)
        t = self.timesteps.sample(floor, self.t_cut, gen)
        noise = torch.randn(x0.shape, generator=gen)
        cond = None if labels is None else labels[idx]
        loss = self.loop.loss(
            lambda net: self.diffusion.eps_loss(UNetDenoiser(net, cond), x0, t, noise).loss
        )
        return float(self.loop.update(loss))

    def train(
        self,
        images: Tensor,
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int, float], None] | None = None,
        labels: Tensor | None = None,
    ) -> None:
        """Train up to config.train.steps in total, checkpointing as it goes."""
        cfg = self.config.train
        while self.step < cfg.steps and not should_stop():
            started = time.perf_counter()
            loss = self.train_step(images, labels)
            self.seconds += time.perf_counter() - started
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
            if progress is not None:
                progress(self.step, loss)


def load_client_model(
    checkpoint_path: Path, config: ClientConfig
) -> tuple[nn.Module, dict[str, Any]]:
    """The EMA weights of a trained client model and its checkpoint record."""
    state = load_checkpoint(checkpoint_path)
    if state is None:
        raise FileNotFoundError(
            f"no client checkpoint at {checkpoint_path}; run `collafuse client run` first"
        )
    model = build_unet(config.model, config.image)
    model.load_state_dict(state["ema"])
    return model.eval().requires_grad_(False), state
