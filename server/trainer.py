"""Background trainer of the shared denoiser on the pool of cut images (bridge loss, EMA)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from collafuse.common.checkpoint import (
    checkpoint_files,
    fsync_dir,
    load_latest,
    save_atomic,
    write_bytes_atomic,
)
from collafuse.common.config import ServerConfig, config_record
from collafuse.common.diffusion import Diffusion, TimestepSampler
from collafuse.common.files import private_dir
from collafuse.common.nets import UNetDenoiser, build_unet, count_parameters
from collafuse.common.training import OnLoop, TrainLoop, load_optimizer
from collafuse.server.pool import Pool
from collafuse.server.training_set import TrainingSet, memory_budget

log = logging.getLogger("collafuse.server.trainer")

SNAPSHOT_EVERY = 50
"""Refresh the last-good snapshot at a publish at most every this many steps (and at every
checkpoint): a copy of model, EMA and AdamW state to CPU costs four copies of the weights."""


def _tensors(obj: object) -> Iterator[Tensor]:
    """Every tensor inside nested dicts, lists and tuples (a state dict)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def all_finite(obj: object) -> bool:
    """True when every floating-point tensor inside `obj` holds only finite values.

    One max-abs norm per tensor (a fused foreach op, NaN propagates) and one sync per device
    and dtype, without a boolean copy of every tensor: about twice as fast as isfinite().all().
    An optimizer's state mixes devices (AdamW keeps its step counters on the CPU beside
    moments on the GPU), so tensors are grouped.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in _tensors(obj):
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    for tensors in groups.values():
        norms = torch._foreach_norm(tensors, math.inf)
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            return False
    return True


CHECK_EVERY_ON_ACCELERATOR = 16
"""Steps between the trainer's checks of its weights on a GPU: each check waits for the device."""


def _to_cpu(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor copied to CPU memory."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass(frozen=True)
class GoodState:
    """The last training state known to be finite, kept in CPU memory for a rollback."""

    step: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Any]


@dataclass(frozen=True)
class GammaDraw:
    """Samples of q(x_t) from the pool, for Analytic-DPM's Gamma_t (server/sampler.py)."""

    x_t: Tensor
    """(n, C, H, W) on the trainer's device."""
    ok: Tensor
    """0-d bool on the device: False when no cut image of the label had c < t, and x_t means
    nothing (kept on the device so that drawing never waits for it)."""


class ModelHub:
    """The weights that serve synthesis, swapped in by the trainer under a lock.

    A chain runs on one version from start to end: the sampler pins the version a chain
    starts on, and when the trainer publishes while chains are pinned to the current weights,
    the hub keeps a copy of those on the device until the last of them is unpinned.
    """

    def __init__(self, model: nn.Module, version: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.version = version
        self.lock = threading.Lock()
        self._pins: dict[int, int] = {}
        self._retired: dict[int, dict[str, Tensor]] = {}

    def publish(self, state: dict[str, Tensor], version: int) -> None:
        """Load new weights; callers of the model hold `lock` while they use it."""
        with self.lock:
            if self._pins.get(self.version) and self.version not in self._retired:
                self._retired[self.version] = {
                    k: v.detach().clone() for k, v in self.model.state_dict().items()
                }
            self.model.load_state_dict(state)
            self.version = version
            self._retired.pop(version, None)

    def pin(self) -> int:
        """The current version, kept available until unpin(version)."""
        with self.lock:
            self._pins[self.version] = self._pins.get(self.version, 0) + 1
            return self.version

    def unpin(self, version: int) -> None:
        """A chain on `version` ended; its weights go once no chain needs them."""
        with self.lock:
            left = self._pins.get(version, 0) - 1
            if left > 0:
                self._pins[version] = left
            else:
                self._pins.pop(version, None)
                self._retired.pop(version, None)

    def weights(self, version: int) -> dict[str, Tensor] | None:
        """The weights of a pinned older version; None for the current one. Hold `lock`."""
        if version == self.version:
            return None
        return self._retired[version]

    @property
    def retired_versions(self) -> list[int]:
        """Older versions still kept for running chains."""
        with self.lock:
            return sorted(self._retired)


def unconditional_label(config: ServerConfig) -> int:
    """The label that stands for "no particular client" (the mixture)."""
    return config.policy.max_clients


def build_server_unet(config: ServerConfig) -> nn.Module:
    """The server's network: one embedding per client plus the unconditional token."""
    return build_unet(config.model, config.image, num_class_embeds=config.policy.max_clients + 1)


class Trainer(OnLoop):
    """Trains on the pool in a thread; resumes from and writes atomic checkpoints."""

    def __init__(
        self,
        config: ServerConfig,
        diffusion: Diffusion,
        pool: Pool | None,
        device: torch.device,
        checkpoint_path: Path,
        *,
        start_over: bool = False,
    ) -> None:
        self.config = config
        self.diffusion = diffusion
        self.pool = pool
        self.device = device
        self.checkpoint_path = checkpoint_path
        self.loop = TrainLoop(
            build_server_unet(config),
            lr=config.train.lr,
            weight_decay=config.train.weight_decay,
            ema_decay=config.train.ema_decay,
            seed=config.train.seed,
            device=device,
            precision=config.train.precision,
            compile=config.train.compile,
        )
        self.model = self.loop.model
        self.ema = self.loop.ema
        self.optimizer = self.loop.optimizer
        self._nonfinite_host = 0
        self._nonfinite_seen = 0
        self.check_every = 1 if device.type == "cpu" else CHECK_EVERY_ON_ACCELERATOR
        """Steps between finiteness checks of the weights (each check reads them back)."""
        self.num_parameters = count_parameters(self.model)
        self.timesteps = TimestepSampler(diffusion.num_timesteps)
        self.trained_since: dict[int, int] = {}
        """Per client index, the step after which its cut images were in the training set, so
        Forget can name the model versions that saw them (kept in the checkpoint)."""
        self.start_over = start_over
        """Move earlier checkpoints and their history aside and train from step 0."""
        self.history_path = checkpoint_path.parent / "history.json"
        """Records the last saved step, so a lost checkpoint is refused, not silently replaced."""
        self.restarts = 0
        """Times the training loop was restarted after an error (for GetStatus and health)."""
        self._trouble: tuple[str, float | None] | None = None
        """(reason, monotonic time of the restart or None) while the loop is down after an error."""
        self._last_error: str | None = None
        self._resume()
        self._good: GoodState | None = None
        self._remember_good()
        if self._good is None:  # a checkpoint written before this defence may hold NaN
            self._roll_back("the resumed checkpoint holds non-finite weights")
            self._remember_good()
        self.hub = ModelHub(copy.deepcopy(self.ema), version=self.step)
        self.data = TrainingSet(
            pool,
            device,
            memory_bytes=memory_budget(device, config.train.pool_memory_mib),
            passes=config.train.chunk_passes,
            batch_size=config.train.batch_size,
            seed=config.train.seed,
        )
        """The cut images training draws from: the pool, whole or in streamed chunks."""
        # Guards the training set: the training thread reads it, Forget removes rows from it.
        self._data_lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.train_seconds = 0.0
        self._writer: threading.Thread | None = None

    # ----- checkpoints ---------------------------------------------------------------------

    RESUME_REMEDY = (
        "restore {path} from a backup, or start the server with --start-over, which moves the "
        "checkpoint files aside and trains from step 0"
    )
    """What a damaged checkpoint's error tells the operator to do."""

    def _resume(self) -> None:
        if self.start_over:
            self._start_afresh()
            return
        loaded = load_latest(self.checkpoint_path, self.RESUME_REMEDY)  # CheckpointError: damaged
        history = self._read_history()
        if loaded is None:
            if history is not None:
                raise ValueError(self._lost_checkpoint_message(history))
            return
        state, path = loaded.state, loaded.path
        try:
            saved = state["record"]["config"]
            schedule_hash = state["schedule_hash"]
        except (KeyError, TypeError):
            raise ValueError(
                f"{path} is not a server checkpoint (no config record or schedule); "
                "point the server at another data dir, or start over with --start-over"
            ) from None
        if saved["model"] != self.config.model.model_dump(mode="json"):
            raise ValueError(
                f"checkpoint {path} was made with model {saved['model']}, "
                "which differs from the configured one; use another data dir or the same model"
            )
        if schedule_hash != self.diffusion.hash:
            raise ValueError(f"checkpoint {path} was made with another schedule")
        self.loop.load(state)
        self.trained_since = {int(k): int(v) for k, v in state.get("trained_since", {}).items()}
        recorded = history.get("step") if history is not None else None
        if history is None:
            self._record_history()  # a checkpoint from before the record existed
        elif isinstance(recorded, int) and recorded > self.step:
            log.warning(
                "%s records a checkpoint of step %d, but the newest intact one is %s: training "
                "resumes at step %d, and the training from there to step %d is lost",
                self.history_path,
                recorded,
                path,
                self.step,
                recorded,
            )
        log.info("resumed server model at step %d from %s", self.step, path)

    def _read_history(self) -> dict[str, Any] | None:
        """The training record next to the checkpoints; None when there is none.

        An unreadable record still says that training happened: it reads as an empty dict.
        """
        try:
            text = self.history_path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _record_history(self, step: int | None = None) -> None:
        """Note, next to the checkpoints, that training reached the saved step."""
        record = {
            "checkpoint": self.checkpoint_path.name,
            "step": self.step if step is None else step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_bytes_atomic((json.dumps(record) + "\n").encode(), self.history_path)

    def _lost_checkpoint_message(self, history: dict[str, Any]) -> str:
        step = history.get("step")
        when = f" at step {step}" if isinstance(step, int) else ""
        saved_at = f" ({history['saved_at']})" if isinstance(history.get("saved_at"), str) else ""
        return (
            f"the checkpoint {self.checkpoint_path} is missing, but {self.history_path} records "
            f"one saved{when}{saved_at}: the checkpoints were deleted or moved, and starting at "
            f"step 0 would silently throw that training away. Restore {self.checkpoint_path} "
            "from a backup, or start the server with --start-over to train from step 0 "
            "(the record is moved aside)"
        )

    def _start_afresh(self) -> None:
        """--start-over: move the history record and every checkpoint aside, start at step 0."""
        candidates = (self.history_path, *checkpoint_files(self.checkpoint_path))
        old = [p for p in candidates if p.exists()]
        if not old:
            log.info("--start-over: no earlier checkpoint or history; training starts at step 0")
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        directory = private_dir(self.checkpoint_path.parent)
        aside = Path(tempfile.mkdtemp(prefix=f"before-start-over-{stamp}-", dir=directory))
        for p in old:
            os.replace(p, aside / p.name)
        fsync_dir(aside)
        fsync_dir(aside.parent)
        log.warning(
            "--start-over: moved %s into %s; training starts at step 0",
            ", ".join(p.name for p in old),
            aside,
        )

    def save(self, background: bool = False) -> bool:
        """Write an atomic checkpoint of model, EMA, optimizer, step and config.

        Refuses (logs an error, writes nothing, returns False) when any weight, EMA weight or
        optimizer moment is non-finite: a resumed server would otherwise serve NaN, and the
        previous checkpoint on disk is still a good one.

        background: copy the state to host memory, make that copy the rollback point, and
        leave serialising, hashing and fsync to a writer thread, so training goes on meanwhile
        (a later save first waits for the write before it). Returns True once queued; a failed
        write is logged, and the checkpoint before it stays.
        """
        self.wait_for_checkpoint()
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if not all_finite(state):
            log.error(
                "not writing checkpoint at step %d: the model holds non-finite values; %s keeps "
                "the last good one",
                self.step,
                self.checkpoint_path,
            )
            return False
        step = self.step
        extra = {
            "step": step,
            "last_loss": self.last_loss,
            "trained_since": dict(self.trained_since),
            "schedule_hash": self.diffusion.hash,
            "record": config_record(self.config),
        }
        if not background:
            save_atomic({**state, **extra}, self.checkpoint_path)
            self._record_history(step)
            return True
        host = _to_cpu(state)
        self._good = GoodState(step, host["model"], host["ema"], host["optimizer"])

        def write() -> None:
            try:
                save_atomic({**host, **extra}, self.checkpoint_path)
                self._record_history(step)
                log.info("step %d: checkpoint written", step)
            except Exception:
                log.exception("could not write the checkpoint of step %d; the last one stays", step)

        self._writer = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._writer.start()
        return True

    def wait_for_checkpoint(self) -> None:
        """Block until a checkpoint being written in the background is on disk."""
        writer = self._writer
        if writer is not None:
            writer.join()
            self._writer = None

    # ----- non-finite defence ----------------------------------------------------------------

    def _remember_good(self) -> None:
        """Copy model, EMA and optimizer state to CPU as the rollback point, if all finite."""
        model, ema = self.model.state_dict(), self.ema.state_dict()
        optimizer = self.optimizer.state_dict()
        if not all_finite((model, ema, optimizer)):
            log.error(
                "step %d holds non-finite weights; keeping the older rollback point", self.step
            )
            return
        self._good = GoodState(self.step, _to_cpu(model), _to_cpu(ema), _to_cpu(optimizer))

    def _roll_back(self, why: str) -> None:
        """Restore model, EMA and optimizer from the last good snapshot.

        The step counter stays where it is: it seeds the batch draws, so going back would draw
        the same poisoned batch again. Without a snapshot (a resumed checkpoint that was already
        non-finite) the weights start afresh.
        """
        self._nonfinite_host += 1
        good = self._good
        if good is None:
            fresh = build_server_unet(self.config).to(self.device)
            self.model.load_state_dict(fresh.state_dict())
            self.ema.load_state_dict(fresh.state_dict())
            self.optimizer.state.clear()
            log.warning(
                "step %d: %s; no finite state known, restarting from fresh weights", self.step, why
            )
            return
        self.model.load_state_dict(good.model)
        self.ema.load_state_dict(good.ema)
        # A fresh copy: on CPU load_state_dict keeps the tensors it is given, and AdamW would
        # then update the snapshot in place.
        load_optimizer(self.optimizer, _to_cpu(good.optimizer))
        log.warning(
            "step %d: %s; rolled back to the weights of step %d (%d non-finite steps so far)",
            self.step,
            why,
            good.step,
            self.nonfinite_steps,
        )

    def _publish(self) -> bool:
        """Hand the EMA weights to the sampler, unless they are non-finite."""
        state = self.ema.state_dict()
        if not all_finite(state):
            log.error("not publishing step %d: the EMA weights are non-finite", self.step)
            return False
        self.hub.publish(state, self.step)
        return True

    # ----- data ------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Pull cut images that arrived since the last refresh; returns the pool size."""
        with self._data_lock:
            for label in self.data.refresh(self.step):
                self.trained_since.setdefault(label, self.step)
            return self.data.size

    def add_cuts(self, cuts: Tensor, t_cut: Tensor, client_index: Tensor) -> None:
        """Add cut images (N, C, H, W) with their t_cut and client index, each (N,)."""
        with self._data_lock:
            self.data.add(cuts, t_cut, client_index)
            for label in client_index.unique().tolist():
                self.trained_since.setdefault(int(label), self.step)

    def forget(self, client_index: int) -> tuple[int, int] | None:
        """Drop a client's cut images from memory; the steps whose models saw them, if any.

        Call after deleting them from the pool, so no refresh can bring them back.
        """
        with self._data_lock:
            self.data.forget(client_index)
            since = self.trained_since.pop(client_index, None)
            if since is None or self.step <= since:
                return None
            return since + 1, self.step

    def gamma_samples(self, t: int, n: int, label: int, seed: int) -> GammaDraw | None:
        """n draws of q(x_t) from the pool: cut images re-noised from their c to t, exactly.

        label is a client index (that client's cut images, its conditional) or the
        unconditional label (every client's). Only cuts with c < t can be re-noised to t.
        Rows are drawn with replacement by a generator seeded with `seed`, without reading
        anything back from the device. None when the pool is empty. While the pool is streamed
        the draw comes from the chunk in memory, a uniform random share of the pool.
        """
        gen = torch.Generator(self.device).manual_seed(seed)
        with self._data_lock:
            held = self.data.held()
            size = len(held)
            if size == 0:
                return None
            eligible = held.t_cut < t
            if label != unconditional_label(self.config):
                eligible &= held.labels == label
            # Inverse-CDF draw over the eligible rows: sync-free, unlike nonzero or multinomial.
            cdf = eligible.to(torch.float64 if self.device.type != "mps" else torch.float32)
            cdf = cdf.cumsum(0)
            u = torch.rand(n, generator=gen, device=self.device, dtype=cdf.dtype) * cdf[-1]
            idx = torch.searchsorted(cdf, u, right=True).clamp(max=size - 1)
            x_c, c = held.cuts[idx], held.t_cut[idx]
        ok = cdf[-1] > 0
        # Without an eligible row the draw is flagged, and c is kept below t so renoise accepts it.
        c = c.clamp(max=t - 1)
        noise = torch.randn(x_c.shape, generator=gen, device=self.device)
        x_t = self.diffusion.renoise(x_c, c, torch.full_like(c, t), noise)
        return GammaDraw(x_t, ok)

    # ----- training --------------------------------------------------------------------------

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped for a non-finite loss or gradient norm, plus steps whose weights came
        out non-finite and were rolled back; GetStatus reports it."""
        return self._nonfinite_host + self.loop.skipped

    def train_step(self) -> Tensor:
        """One step of the bridge loss on a random batch of the pool; returns the loss.

        The batch is drawn on the device and the update is the shared loop's (common/training.py),
        so nothing here reads a device value back to the host: the loss comes back as a 0-d
        tensor, a non-finite step is dropped on the device, and the weights are checked for
        non-finite values every `check_every` steps, rolled back to the last good copy if any.
        """
        cfg = self.config.train
        gen = self.loop.generator()
        dev = self.device
        B = cfg.batch_size
        x_c, c, client = self.data.batch(B, gen)  # (B, C, H, W), (B,), (B,); with replacement
        t = self.timesteps.sample(c, self.diffusion.num_timesteps, generator=gen)  # (B,) in (c, T]
        drop = torch.rand((B,), generator=gen, device=dev) < cfg.p_uncond
        labels = torch.where(drop, unconditional_label(self.config), client)
        noise = torch.randn(x_c.shape, generator=gen, device=dev)
        loss = self.loop.update(
            self.loop.loss(
                lambda net: (
                    self.diffusion.bridge_loss(
                        UNetDenoiser(net, labels), x_c, c, t, noise, gamma=cfg.loss_gamma
                    ).loss
                )
            )
        )
        if self.step % self.check_every == 0:
            self._check()
        return loss

    def _check(self) -> None:
        """Read back the skip count and the weights' finiteness; roll back if needed."""
        skipped = self.loop.skipped
        if skipped > self._nonfinite_seen:
            log.warning(
                "step %d: %d step(s) skipped for a non-finite loss or gradient (a poisoned cut "
                "image in the batch?); %d non-finite steps so far",
                self.step,
                skipped - self._nonfinite_seen,
                self.nonfinite_steps,
            )
            self._nonfinite_seen = skipped
        # A finite step can still overflow (a huge learning rate, float16 state): never keep it.
        if not all_finite((self.model.state_dict(), self.ema.state_dict())):
            self._roll_back("the update made weights non-finite")

    def _run(self) -> None:
        cfg = self.config.train
        while not self._stop.is_set():
            with self._data_lock:
                size = self.refresh()
                idle = size < cfg.min_pool or bool(cfg.max_steps and self.step >= cfg.max_steps)
                if not idle:
                    started = time.perf_counter()
                    loss = self.train_step()
                    self.train_seconds += time.perf_counter() - started
            if idle:
                self._stop.wait(0.5)
                continue
            # train_step leaves only finite weights behind; _publish and save check again.
            if self.step % cfg.publish_every == 0 and self._publish():
                good = self._good
                if good is None or self.step - good.step >= SNAPSHOT_EVERY:
                    self._remember_good()
            # The write runs beside training; save() made its host copy the rollback point.
            if self.step % cfg.checkpoint_every == 0 and self.save(background=True):
                log.info("step %d loss %.4f pool %d (writing a checkpoint)", self.step, loss, size)

    RESTART_BACKOFF_S = 1.0
    """Wait before the first restart after an error; it doubles with each further one."""
    MAX_RESTART_BACKOFF_S = 60.0
    """The longest wait between restarts; a loop that ran this long starts over at 1 s."""

    def start(self) -> None:
        """Train in a background thread, restarting after errors, until stop()."""
        self._thread = threading.Thread(target=self._guarded_run, name="trainer", daemon=True)
        self._thread.start()

    @property
    def state(self) -> str:
        """What the trainer is doing, in words: "waiting for data", "training", "finished",
        "failed: <reason>", "restarting in Ns after: <reason>" or "stopped"."""
        trouble = self._trouble
        if trouble is not None:
            reason, restart_at = trouble
            if restart_at is None:
                return f"failed: {reason}"
            left = max(0, math.ceil(restart_at - time.monotonic()))
            return f"restarting in {left}s after: {reason}"
        if self._stop.is_set():
            return "stopped"
        cfg = self.config.train
        if cfg.max_steps and self.step >= cfg.max_steps:
            return "finished"
        if self.data.size < cfg.min_pool:
            return "waiting for data"
        return "training"

    @staticmethod
    def _reason(exc: BaseException) -> str:
        """A one-line reason for the state: the exception's type and first line."""
        lines = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        return text if len(text) <= 160 else text[:157] + "..."

    def _guarded_run(self) -> None:
        """Run the training loop; when it raises, log it, back off and run it again.

        The server keeps serving the last published weights meanwhile. The wait starts at
        RESTART_BACKOFF_S and doubles up to MAX_RESTART_BACKOFF_S, so a persistent fault (a
        full disk, a broken GPU) neither spins nor floods the log; it waits on the stop event,
        so stop() is prompt.
        """
        delay = self.RESTART_BACKOFF_S
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._run()
                return  # _run returns only after stop()
            except Exception as exc:
                reason = self._reason(exc)
                self._trouble = (reason, None)
                if time.monotonic() - started >= self.MAX_RESTART_BACKOFF_S:
                    delay = self.RESTART_BACKOFF_S  # it ran well for a while: a fresh fault
                self._log_failure(exc, reason, delay)
            except BaseException as exc:  # SystemExit and the like: the loop is gone for good
                self._trouble = (self._reason(exc), None)
                raise
            self._trouble = (reason, time.monotonic() + delay)
            if self._stop.wait(delay):
                break
            self.restarts += 1
            self._trouble = None
            log.info("training loop restarted at step %d (restart %d)", self.step, self.restarts)
            delay = min(delay * 2, self.MAX_RESTART_BACKOFF_S)
        self._trouble = None

    def _log_failure(self, exc: Exception, reason: str, delay: float) -> None:
        """The traceback once per distinct error; a repeat of the same one gets a single line."""
        if reason == self._last_error:
            log.error(
                "training loop failed again at step %d (%s); restarting in %gs",
                self.step,
                reason,
                delay,
            )
            return
        self._last_error = reason
        log.error(
            "training loop failed at step %d; restarting in %gs (restart %d)",
            self.step,
            delay,
            self.restarts + 1,
            exc_info=exc,
        )

    def stop(self) -> None:
        """Stop training (promptly, also while waiting to restart); write a final checkpoint."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.data.close()
        if self.step:
            try:
                self.save()
            except Exception:  # the previous checkpoint stays; shutdown must go on
                log.exception("could not write the final checkpoint at step %d", self.step)
            self._publish()
