"""Server request handling on domain objects; the gRPC servicer only converts and maps errors.

Every method takes the caller's Identity, established by the gate before the handler ran.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from collafuse.common.config import ServerConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import (
    CutBatch,
    ForgetResult,
    Registration,
    ScheduleInfo,
    ServerStatus,
    Session,
    SynthesisChunk,
    SynthesisRequest,
    UploadAck,
    UploadResult,
)
from collafuse.common.limits import CHUNK_BYTES, MAX_MESSAGE_BYTES
from collafuse.server.audit import ReceiptSigner
from collafuse.server.auth import Identity
from collafuse.server.policy import Policy, PolicyError, Refusal
from collafuse.server.pool import ClientRecord, DiskFullError, Pool, PoolFullError
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
    malformed: int = 0


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
        receipts: ReceiptSigner,
    ) -> None:
        self.config = config
        self.receipts = receipts
        self.diffusion = diffusion
        self.pool = pool
        self.trainer = trainer
        self.sampler = sampler
        self.device = device
        self.policy = Policy(config.policy, config.image, diffusion)
        self.schedule = ScheduleInfo(config.schedule, diffusion.hash)
        self.started = time.monotonic()
        self.counters = Counters()
        # Upload commits run here, beside the streams' checks; one thread, as SQLite has one
        # writer (the pool's lock serialises them anyway).
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-writer")

    def close(self) -> None:
        """Wait for the upload commits in progress (call before closing the pool)."""
        self.writer.shutdown(wait=True)

    def _registered(self, client_id: str) -> ClientRecord:
        record = self.pool.client(client_id)
        if record is None:
            raise PolicyError(
                Refusal.FAILED_PRECONDITION,
                f"client {client_id} is not registered; call Register first",
            )
        return record

    def register(self, reg: Registration, caller: Identity) -> Session:
        """Admit a client (idempotent) and tell it the schedule and its t_cut."""
        self.counters.requests += 1
        caller.check_acts_as(reg.client_id)
        t_cut = self.policy.check_registration(reg)
        try:
            record = self.pool.register(
                reg.client_id, t_cut, reg.cut_ratio, self.config.policy.max_clients
            )
        except PoolFullError as exc:
            raise PolicyError(Refusal.RESOURCE_EXHAUSTED, str(exc)) from None
        except DiskFullError as exc:
            raise PolicyError(Refusal.RESOURCE_EXHAUSTED, f"{exc}; retry later") from None
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

    def open_upload(self, caller: Identity) -> UploadStream:
        """State of one upload stream; feed it each message as it arrives."""
        self.counters.requests += 1
        return UploadStream(self, caller)

    async def synthesize(
        self, req: SynthesisRequest, caller: Identity
    ) -> AsyncIterator[SynthesisChunk]:
        """Run T..t_cut for the client and stream x_{t_cut} in chunks of about CHUNK_BYTES.

        The sampler thread wakes this coroutine when a job is done, so a waiting request holds
        no thread; when the caller goes away the jobs are cancelled at the sampler's next step.
        """
        self.counters.requests += 1
        caller.check_acts_as(req.client_id)
        record = await asyncio.to_thread(self._registered, req.client_id)
        if req.n > self.config.policy.max_synthesize_n:
            raise PolicyError(
                Refusal.INVALID_ARGUMENT,
                f"n={req.n} exceeds the limit of {self.config.policy.max_synthesize_n} per request",
            )
        if req.mixture and not self.config.policy.allow_mixture:
            raise PolicyError(
                Refusal.PERMISSION_DENIED,
                "this server does not sample the mixture of all clients (policy.allow_mixture); "
                "ask for your own distribution",
            )
        T = self.diffusion.num_timesteps
        timesteps = self.diffusion.timesteps(T, record.t_cut, req.num_steps)
        label = unconditional_label(self.config) if req.mixture else record.client_index
        loop = asyncio.get_running_loop()
        # Samples [offset, n) only: sample i depends on the seed and i alone, so a resumed
        # request gets exactly what the interrupted one would have sent.
        jobs = self.sampler.submit(
            req.n - req.offset,
            req.seed,
            timesteps,
            req.sampler,
            req.eta,
            label,
            self.config.image.shape,
            first_index=req.offset,
        )
        per_chunk = max(1, CHUNK_BYTES // (4 * math.prod(self.config.image.shape)))
        offset = req.offset
        try:
            for job in jobs:
                ready = asyncio.Event()
                job.on_done.append(functools.partial(loop.call_soon_threadsafe, ready.set))
                if not job.done.is_set():
                    await ready.wait()
                if job.error is not None:
                    raise job.error
                samples = job.x
                if samples is None:  # a finished job always holds its samples
                    raise RuntimeError("the sampler finished a job without samples")
                for lo in range(0, job.n, per_chunk):
                    part = samples[lo : lo + per_chunk]
                    yield SynthesisChunk(
                        timestep=record.t_cut,
                        offset=offset,
                        total=req.n,
                        samples=part,
                        model_version=job.model_version,
                    )
                    offset += part.shape[0]
            self.counters.samples += req.n - req.offset
        finally:
            for job in jobs:
                job.cancelled = True

    def status(self, caller: Identity) -> ServerStatus:
        """Model version, training step and uptime; pools: the caller's own (admins: all)."""
        pools = self.pool.pools()
        if not caller.sees_everything:
            pools = [p for p in pools if p.client_id == caller.name]
        return ServerStatus(
            model_version=self.trainer.hub.version,
            train_step=self.trainer.step,
            uptime_s=time.monotonic() - self.started,
            pools=pools,
            last_loss=self.trainer.last_loss,
            device=str(self.device),
            model_parameters=self.trainer.num_parameters,
            requests_served=self.counters.requests,
            schedule=self.schedule,
            nonfinite_steps=self.trainer.nonfinite_steps,
            trainer_state=self.trainer.state,
            trainer_restarts=self.trainer.restarts,
            malformed_requests=self.counters.malformed,
        )

    def forget(self, client_id: str, caller: Identity) -> ForgetResult:
        """Delete a client's cut images from the pool and the trainer's memory.

        Models already trained on them are not retrained; the answer names those versions.
        """
        self.counters.requests += 1
        caller.check_acts_as(client_id)
        record = self._registered(client_id)
        # The pool first: then no refresh of the trainer can bring the rows back.
        try:
            deleted = self.pool.forget(client_id)
        except DiskFullError as exc:
            raise PolicyError(Refusal.RESOURCE_EXHAUSTED, f"{exc}; retry later") from None
        trained = self.trainer.forget(record.client_index)
        log.info(
            "forgot %d cut images of %s (trained into versions %s)", deleted, client_id, trained
        )
        first, last = trained or (0, 0)
        return ForgetResult(
            deleted=deleted,
            trained_from_version=first,
            trained_to_version=last,
            receipt=self.receipts.sign("forget", client_id, [str(deleted)]),
        )


UPLOAD_COMMIT_BYTES = 16 << 20
"""An upload stream waits for its commit in progress once this many more checked bytes queue
behind it, so at most about twice this much waits in memory per stream."""


@dataclass
class UploadStream:
    """One upload stream: every message is checked as it arrives and stored in group commits.

    Commits run on the service's writer thread while the stream checks its next messages: the
    first checked message is committed at once, and whatever is checked meanwhile goes into
    the next commit (one fsync for many messages, and none on the checking thread's path).
    UploadCuts answers once, after `finish` has committed the rest; Upload acknowledges each
    message only after its commit. Either way nothing is acknowledged before it is durable.
    Calls come one at a time (the servicer awaits each); only the writer runs beside them.
    """

    service: CollaFuseService
    caller: Identity
    client_id: str = ""
    record: ClientRecord | None = None
    accepted: int = 0
    duplicate: int = 0
    acknowledged: list[str] = field(default_factory=list)
    rejections: list[tuple[str, str]] = field(default_factory=list)
    pool_size: int | None = None  # the client's pool after the last message that stored images
    # Checked images not yet committed: (ids, cuts) per message, and their bytes.
    _waiting: list[tuple[list[str], Tensor]] = field(default_factory=list)
    _waiting_bytes: int = 0
    # The commit on the writer thread, and how many images it carries.
    _writing: Future[tuple[list[str], int, int]] | None = None
    _writing_count: int = 0

    def add(self, batch: CutBatch, commit: bool = False) -> None:
        """Check one message's cut images and queue them for a commit; with `commit`, return
        only once they are durable."""
        svc = self.service
        if self.client_id and batch.client_id != self.client_id:
            raise PolicyError(Refusal.INVALID_ARGUMENT, "one upload stream carries one client")
        if self.record is None:
            self.caller.check_acts_as(batch.client_id)
            self.record = svc._registered(batch.client_id)
            self.client_id = batch.client_id
        verdicts = svc.policy.check_batch(batch, self.record.t_cut)
        n = len(verdicts)
        keep = [i for i, v in enumerate(verdicts) if v is None]
        self.rejections += [
            (batch.image_ids[i], v) for i, v in enumerate(verdicts) if v is not None
        ]
        limit = svc.config.limits.max_rejected_per_upload
        if len(self.rejections) >= limit:
            svc.counters.rejected += len(self.rejections)
            raise PolicyError(
                Refusal.RESOURCE_EXHAUSTED,
                f"the guard refused {len(self.rejections)} images of this stream "
                f"(limits.max_rejected_per_upload = {limit}); the first: "
                f"{self.rejections[0][1]}",
            )
        self.pool_size = None
        if not keep:
            return
        if self._writing is not None and self._writing.done():
            self._collect()
        # The pool's count, then the commit in progress if it had not finished by then: a
        # commit updates the count before it reports done, so nothing is counted twice.
        held = svc.pool.count(self.client_id)
        if self._writing is not None:
            if self._writing.done():
                held = svc.pool.count(self.client_id)
            else:
                held += self._writing_count
        held += sum(len(ids) for ids, _ in self._waiting)
        quota = svc.config.policy.max_images_per_client
        if held + len(keep) > quota:
            raise PolicyError(
                Refusal.RESOURCE_EXHAUSTED,
                f"client {self.client_id} holds {held} images; {len(keep)} more exceed the quota "
                f"of {quota} (policy.max_images_per_client)",
            )
        cuts = batch.cuts if len(keep) == n else batch.cuts[keep]
        self._waiting.append(([batch.image_ids[i] for i in keep], cuts))
        self._waiting_bytes += cuts.numel() * cuts.element_size()
        if commit:
            self.flush()
        elif self._writing is None:
            self._start()
        elif self._waiting_bytes >= UPLOAD_COMMIT_BYTES:
            self._collect()
            self._start()

    def flush(self) -> None:
        """Return once every image queued so far is committed."""
        if self._writing is not None:
            self._collect()
        if self._waiting:
            self._start()
            self._collect()

    def _start(self) -> None:
        """Hand every waiting image to the writer thread as one transaction."""
        assert self.record is not None and self._writing is None
        ids = [i for part, _ in self._waiting for i in part]
        parts = [c for _, c in self._waiting]
        cuts = parts[0] if len(parts) == 1 else torch.cat(parts)
        self._waiting.clear()
        self._waiting_bytes = 0
        pool, client_id, t_cut = self.service.pool, self.client_id, self.record.t_cut

        def store() -> tuple[list[str], int, int]:
            return ids, *pool.add(client_id, t_cut, ids, cuts)

        self._writing = self.service.writer.submit(store)
        self._writing_count = len(ids)

    def _collect(self) -> None:
        """Wait for the commit in progress and count what it stored."""
        assert self._writing is not None
        writing, self._writing = self._writing, None
        self._writing_count = 0
        try:
            ids, a, d = writing.result()
        except DiskFullError as exc:
            # Nothing of that commit was stored; every message acknowledged before is kept.
            raise PolicyError(Refusal.RESOURCE_EXHAUSTED, f"{exc}; retry later") from None
        self.accepted += a
        self.duplicate += d
        self.acknowledged += ids
        self.pool_size = self.service.pool.count(self.client_id)  # kept in memory: no scan

    def acknowledge(self, index: int, batch: CutBatch) -> UploadAck:
        """Store one message (as `add`) and answer for it alone, with a receipt."""
        before = (self.accepted, self.duplicate, len(self.rejections), len(self.acknowledged))
        self.add(batch, commit=True)
        stored = self.acknowledged[before[3] :]
        rejections = self.rejections[before[2] :]
        svc = self.service
        pool_size = self.pool_size
        if pool_size is None:  # this message stored nothing: ask the pool
            pool_size = svc.pool.count(self.client_id)
        return UploadAck(
            message=index,
            accepted=self.accepted - before[0],
            duplicate=self.duplicate - before[1],
            rejected=len(rejections),
            rejections=rejections,
            pool_size=pool_size,
            receipt=svc.receipts.sign("upload", self.client_id, stored) if stored else "",
        )

    def finish(self) -> UploadResult:
        """Commit what waits, then the answer, with a receipt for every image it acknowledged."""
        self.flush()
        svc = self.service
        svc.counters.accepted += self.accepted
        svc.counters.rejected += len(self.rejections)
        if self.rejections:
            log.warning(
                "refused %d images from %s: %s",
                len(self.rejections),
                self.client_id,
                self.rejections[0][1],
            )
        return UploadResult(
            accepted=self.accepted,
            duplicate=self.duplicate,
            rejected=len(self.rejections),
            rejections=self.rejections,
            pool_size=svc.pool.count(self.client_id) if self.client_id else 0,
            receipt=svc.receipts.sign("upload", self.client_id, self.acknowledged)
            if self.acknowledged
            else "",
        )
