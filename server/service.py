"""Server request handling on domain objects; the gRPC servicer only converts and maps errors."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from collafuse.common.config import ServerConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import (
    CutBatch,
    Registration,
    ScheduleInfo,
    ServerStatus,
    Session,
    SynthesisChunk,
    SynthesisRequest,
    UploadResult,
)
from collafuse.common.limits import CHUNK_BYTES, MAX_MESSAGE_BYTES
from collafuse.server.auth import Authenticator
from collafuse.server.policy import Policy, PolicyError, Refusal
from collafuse.server.pool import Pool, PoolFullError
from collafuse.server.sampler import BatchingSampler
from collafuse.server.trainer import Trainer, unconditional_label

log = logging.getLogger("collafuse.server")


@dataclass
class Counters:
    """Request counters for status and logs."""

    requests: int = 0
    accepted: int = 0
    rejected: int = 0
    samples: int = 0


class CollaFuseService:
    """Register, upload, synthesize and status, on domain objects."""

    def __init__(
        self,
        config: ServerConfig,
        diffusion: Diffusion,
        pool: Pool,
        trainer: Trainer,
        sampler: BatchingSampler,
        device: torch.device,
        auth: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.auth = auth or Authenticator()
        self.diffusion = diffusion
        self.pool = pool
        self.trainer = trainer
        self.sampler = sampler
        self.device = device
        self.policy = Policy(config.policy, config.image, diffusion)
        self.schedule = ScheduleInfo(config.schedule, diffusion.hash)
        self.started = time.monotonic()
        self.counters = Counters()

    def register(self, reg: Registration, caller: str | None = None) -> Session:
        """Admit a client (idempotent) and tell it the schedule and its t_cut."""
        self.counters.requests += 1
        self.auth.check(caller, reg.client_id)
        t_cut = self.policy.check_registration(reg)
        try:
            record = self.pool.register(
                reg.client_id, t_cut, reg.cut_ratio, self.config.policy.max_clients
            )
        except PoolFullError as exc:
            raise PolicyError(Refusal.RESOURCE_EXHAUSTED, str(exc)) from None
        except ValueError as exc:
            raise PolicyError(Refusal.FAILED_PRECONDITION, str(exc)) from None
        log.info("registered %s as index %d at t_cut=%d", reg.client_id, record.client_index, t_cut)
        return Session(
            schedule=self.schedule,
            t_cut=t_cut,
            model_version=self.trainer.hub.version,
            client_index=record.client_index,
            max_message_bytes=MAX_MESSAGE_BYTES,
            release_snr=self.diffusion.snr(t_cut),
        )

    def upload(self, batches: Iterable[CutBatch], caller: str | None = None) -> UploadResult:
        """Store cut images that pass the guard; each message is durable before the next."""
        self.counters.requests += 1
        accepted = duplicate = 0
        rejections: list[tuple[str, str]] = []
        client_id = ""
        for batch in batches:
            if client_id and batch.client_id != client_id:
                raise PolicyError(Refusal.INVALID_ARGUMENT, "one upload stream carries one client")
            client_id = batch.client_id
            self.auth.check(caller, client_id)
            record = self.pool.client(client_id)
            if record is None:
                raise PolicyError(
                    Refusal.FAILED_PRECONDITION,
                    f"client {client_id} is not registered; call Register first",
                )
            verdicts = self.policy.check_batch(batch, record.t_cut)
            keep = [i for i, v in enumerate(verdicts) if v is None]
            rejections += [(batch.image_ids[i], v) for i, v in enumerate(verdicts) if v is not None]
            if not keep:
                continue
            held = self.pool.count(client_id)
            if held + len(keep) > self.config.policy.max_images_per_client:
                raise PolicyError(
                    Refusal.RESOURCE_EXHAUSTED,
                    f"client {client_id} holds {held} images; {len(keep)} more exceed the quota "
                    f"of {self.config.policy.max_images_per_client}",
                )
            a, d = self.pool.add(
                client_id, record.t_cut, [batch.image_ids[i] for i in keep], batch.cuts[keep]
            )
            accepted += a
            duplicate += d
        self.counters.accepted += accepted
        self.counters.rejected += len(rejections)
        if rejections:
            log.warning(
                "refused %d images from %s: %s", len(rejections), client_id, rejections[0][1]
            )
        return UploadResult(
            accepted=accepted,
            duplicate=duplicate,
            rejected=len(rejections),
            rejections=rejections,
            pool_size=self.pool.count(client_id) if client_id else 0,
        )

    def synthesize(
        self,
        req: SynthesisRequest,
        is_active: Callable[[], bool] = lambda: True,
        caller: str | None = None,
    ) -> Iterator[SynthesisChunk]:
        """Run T..t_cut for the client and stream x_{t_cut} in chunks of about CHUNK_BYTES."""
        self.counters.requests += 1
        self.auth.check(caller, req.client_id)
        record = self.pool.client(req.client_id)
        if record is None:
            raise PolicyError(
                Refusal.FAILED_PRECONDITION,
                f"client {req.client_id} is not registered; call Register first",
            )
        if req.n > self.config.policy.max_synthesize_n:
            raise PolicyError(
                Refusal.INVALID_ARGUMENT,
                f"n={req.n} exceeds the limit of {self.config.policy.max_synthesize_n} per request",
            )
        T = self.diffusion.num_timesteps
        timesteps = self.diffusion.timesteps(T, record.t_cut, req.num_steps)
        label = unconditional_label(self.config) if req.mixture else record.client_index
        jobs = self.sampler.submit(
            req.n, req.seed, timesteps, req.sampler, req.eta, label, self.config.image.shape
        )
        per_chunk = max(1, CHUNK_BYTES // (4 * math.prod(self.config.image.shape)))
        offset = 0
        try:
            for job in jobs:
                while not job.done.wait(0.2):
                    if not is_active():
                        return
                if job.error is not None:
                    raise job.error
                for lo in range(0, job.n, per_chunk):
                    part = job.x[lo : lo + per_chunk]
                    yield SynthesisChunk(
                        timestep=record.t_cut,
                        offset=offset,
                        total=req.n,
                        samples=part,
                        model_version=job.model_version,
                    )
                    offset += part.shape[0]
            self.counters.samples += req.n
        finally:
            for job in jobs:
                job.cancelled = True

    def status(self) -> ServerStatus:
        """Model version, training step, pools and uptime."""
        return ServerStatus(
            model_version=self.trainer.hub.version,
            train_step=self.trainer.step,
            uptime_s=time.monotonic() - self.started,
            pools=self.pool.pools(),
            last_loss=self.trainer.last_loss,
            device=str(self.device),
            model_parameters=self.trainer.num_parameters,
            requests_served=self.counters.requests,
            schedule=self.schedule,
        )
