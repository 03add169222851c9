"""Background trainer of the shared denoiser on the pool of cut images (bridge loss, EMA)."""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from collafuse.common.checkpoint import load_checkpoint, save_atomic
from collafuse.common.config import ServerConfig, config_record
from collafuse.common.diffusion import Diffusion, TimestepSampler
from collafuse.common.nets import UNetDenoiser, build_unet, count_parameters, ema_update
from collafuse.server.pool import Pool

log = logging.getLogger("collafuse.server.trainer")


class ModelHub:
    """The weights that serve synthesis, swapped in by the trainer under a lock."""

    def __init__(self, model: nn.Module, version: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.version = version
        self.lock = threading.Lock()

    def publish(self, state: dict[str, Tensor], version: int) -> None:
        """Load new weights; callers of the model hold `lock` while they use it."""
        with self.lock:
            self.model.load_state_dict(state)
            self.version = version


def unconditional_label(config: ServerConfig) -> int:
    """The label that stands for "no particular client" (the mixture)."""
    return config.policy.max_clients


def build_server_unet(config: ServerConfig) -> nn.Module:
    """The server's network: one embedding per client plus the unconditional token."""
    return build_unet(config.model, config.image, num_class_embeds=config.policy.max_clients + 1)


class Trainer:
    """Trains on the pool in a thread; resumes from and writes atomic checkpoints."""

    def __init__(
        self,
        config: ServerConfig,
        diffusion: Diffusion,
        pool: Pool | None,
        device: torch.device,
        checkpoint_path: Path,
    ) -> None:
        self.config = config
        self.diffusion = diffusion
        self.pool = pool
        self.device = device
        self.checkpoint_path = checkpoint_path
        self.model = build_server_unet(config).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
        )
        self.step = 0
        self.last_loss = math.nan
        self.num_parameters = count_parameters(self.model)
        self.timesteps = TimestepSampler(diffusion.num_timesteps)
        self._resume()
        self.hub = ModelHub(copy.deepcopy(self.ema), version=self.step)
        self._cuts = torch.empty(0, device=device)
        self._t_cut = torch.empty(0, dtype=torch.long)
        self._labels = torch.empty(0, dtype=torch.long)
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.train_seconds = 0.0

    # ----- checkpoints ---------------------------------------------------------------------

    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint_path)
        if state is None:
            return
        saved = state["record"]["config"]
        if saved["model"] != self.config.model.model_dump(mode="json"):
            raise ValueError(
                f"checkpoint {self.checkpoint_path} was made with model {saved['model']}, "
                "which differs from the configured one; use another data dir or the same model"
            )
        if state["schedule_hash"] != self.diffusion.hash:
            raise ValueError(f"checkpoint {self.checkpoint_path} was made with another schedule")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.last_loss = float(state.get("last_loss", math.nan))
        log.info("resumed server model at step %d from %s", self.step, self.checkpoint_path)

    def save(self) -> None:
        """Write an atomic checkpoint of model, EMA, optimizer, step and config."""
        save_atomic(
            {
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "last_loss": self.last_loss,
                "schedule_hash": self.diffusion.hash,
                "record": config_record(self.config),
            },
            self.checkpoint_path,
        )

    # ----- data ------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Pull cut images that arrived since the last refresh; returns the pool size."""
        if self.pool is not None:
            rows = self.pool.read_since(self._seq)
            if rows.cuts.numel():
                self.add_cuts(rows.cuts, rows.t_cut, rows.client_index)
                self._seq = rows.last_seq
        return int(self._t_cut.numel())

    def add_cuts(self, cuts: Tensor, t_cut: Tensor, client_index: Tensor) -> None:
        """Add cut images (N, C, H, W) with their t_cut and client index, each (N,)."""
        old = self._cuts.reshape(-1, *cuts.shape[1:])
        self._cuts = torch.cat([old, cuts.to(self.device)])
        self._t_cut = torch.cat([self._t_cut, t_cut.long()])
        self._labels = torch.cat([self._labels, client_index.long()])

    # ----- training --------------------------------------------------------------------------

    def train_step(self) -> float:
        """One AdamW step of the bridge loss on a random batch of the pool."""
        cfg = self.config.train
        # Seeded per step so a resumed run draws what an uninterrupted one would.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        n = self._t_cut.numel()
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)  # with replacement
        x_c = self._cuts[idx.to(self._cuts.device)]  # (B, C, H, W)
        c = self._t_cut[idx]  # (B,)
        t = self.timesteps.sample(c, self.diffusion.num_timesteps, generator=gen)  # (B,) in (c, T]
        labels = self._labels[idx].clone()
        drop = torch.rand(labels.shape, generator=gen) < cfg.p_uncond
        labels[drop] = unconditional_label(self.config)
        noise = torch.randn(x_c.shape, generator=gen).to(self.device)
        self.model.train()
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else nullcontext()
        )
        with autocast:
            out = self.diffusion.bridge_loss(
                UNetDenoiser(self.model, labels.to(self.device)),
                x_c,
                c,
                t,
                noise,
                gamma=cfg.loss_gamma,
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.float().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        ema_update(self.ema, self.model, cfg.ema_decay)
        self.step += 1
        self.last_loss = float(out.loss.detach())
        return self.last_loss

    def _run(self) -> None:
        cfg = self.config.train
        while not self._stop.is_set():
            size = self.refresh()
            if size < cfg.min_pool or (cfg.max_steps and self.step >= cfg.max_steps):
                self._stop.wait(0.5)
                continue
            started = time.perf_counter()
            loss = self.train_step()
            self.train_seconds += time.perf_counter() - started
            if self.step % cfg.publish_every == 0:
                self.hub.publish(self.ema.state_dict(), self.step)
            if self.step % cfg.checkpoint_every == 0:
                self.save()
                log.info("step %d loss %.4f pool %d (checkpoint written)", self.step, loss, size)

    def start(self) -> None:
        """Train in a background thread until stop()."""
        self._thread = threading.Thread(target=self._guarded_run, name="trainer", daemon=True)
        self._thread.start()

    def _guarded_run(self) -> None:
        try:
            self._run()
        except Exception:  # the service keeps serving what it has; the log says why
            log.exception("trainer stopped on an error")

    def stop(self) -> None:
        """Stop training and write a final checkpoint."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.step:
            self.save()
            self.hub.publish(self.ema.state_dict(), self.step)
