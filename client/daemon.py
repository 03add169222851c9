"""The client daemon: register, upload cut images once, train locally, stay connected.

Every phase resumes after a crash: the ledger says which cut images the server acknowledged,
the local checkpoint holds the training step, and a lost server is redialled with backoff.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from collafuse.client.ledger import Ledger, LedgerError, Release
from collafuse.client.metrics import client_registry
from collafuse.client.remote import Remote
from collafuse.client.secret import image_noise, load_or_create_secret, wire_id
from collafuse.client.trainer import LocalTrainer
from collafuse.common.checkpoint import checkpoint_files
from collafuse.common.config import ClientConfig, ConfigError
from collafuse.common.data import LocalData, load_local_data
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import CutBatch, ForgetResult, Registration, Session, UploadResult
from collafuse.common.export import WarmStartError, check_fits, client_target, read_manifest
from collafuse.common.files import private_dir
from collafuse.common.obs import MetricsEndpoint, serve_metrics
from collafuse.common.store import DISK_FULL_MARKER

log = logging.getLogger("collafuse.client")
R = TypeVar("R")

# Status codes that mean "the server is not there right now": wait and redial.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class ClientRefused(RuntimeError):
    """The server refused this client for a reason retrying will not fix."""


@dataclass
class ClientStatus:
    """What the daemon writes to state_dir/status.json for people and scripts to read."""

    client_id: str
    phase: str = "starting"
    t_cut: int = 0
    images: int = 0
    uploaded: int = 0
    rejected: int = 0
    bytes_released: int = 0
    train_step: int = 0
    train_steps: int = 0
    last_loss: float = math.nan
    train_seconds: float = 0.0
    upload_seconds: float = 0.0
    reconnects: int = 0
    server_model_version: int = 0
    model_parameters: int = 0
    last_error: str = ""
    updated_at: float = 0.0


def state_paths(config: ClientConfig) -> dict[str, Path]:
    """Where a client keeps its files."""
    d = config.state_dir
    return {
        "secret": d / "secret.key",
        "ledger": d / "ledger.sqlite",
        "checkpoint": d / "checkpoints" / "client.pt",
        "status": d / "status.json",
        "session": d / "session.json",
    }


def compute_cuts(data: LocalData, secret: bytes, diffusion: Diffusion, t_cut: int) -> torch.Tensor:
    """x_c = sqrt(abar_c) x_0 + sqrt(1 - abar_c) eps1, eps1 seeded by the secret per image."""
    eps1 = torch.stack([image_noise(secret, i, tuple(data.images.shape[1:])) for i in data.ids])
    c = torch.full((data.images.shape[0],), t_cut, dtype=torch.long)
    return diffusion.q_sample(data.images, c, eps1)


class ClientDaemon:
    """Runs one client until it is done (exit_when_done) or stopped."""

    def __init__(self, config: ClientConfig, stop: threading.Event | None = None) -> None:
        self.config = config
        self.paths = state_paths(config)
        # The data first: a wrong data path must fail before a state dir, a secret and a
        # ledger are made for a client that cannot run.
        self.data = load_local_data(config.data, config.image)
        private_dir(config.state_dir)  # ledger, secret and checkpoints: this user's only
        self.secret = load_or_create_secret(self.paths["secret"])
        self.ledger = Ledger(self.paths["ledger"])
        self.stop_event = stop or threading.Event()
        self.status = ClientStatus(client_id=config.client_id, train_steps=config.train.steps)
        self.status.images = int(self.data.images.shape[0])
        self.remote: Remote | None = None
        self.session: Session | None = None
        # Per message of the current upload stream: (ledger seq, wire id, local id) per image.
        self._sent: list[list[tuple[int, str, str]]] = []
        self._ledger_error: LedgerError | None = None  # why the current stream's ledger refused
        self.metrics: MetricsEndpoint | None = None  # the /metrics listener while run() runs

    # ----- status --------------------------------------------------------------------------

    def write_status(self, **changes: object) -> None:
        """Update and atomically rewrite status.json."""
        for k, v in changes.items():
            setattr(self.status, k, v)
        self.status.updated_at = time.time()
        tmp = self.paths["status"].with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.status), indent=2))
        os.replace(tmp, self.paths["status"])

    # ----- connection ----------------------------------------------------------------------

    def _connect(self) -> Remote:
        if self.remote is None:
            self.remote = Remote.for_client(self.config)
        return self.remote

    def _with_retry(self, what: str, call: Callable[[Remote], R]) -> R:
        """Run a call, redialling with exponential backoff while the server is away."""
        delay = 0.5
        failed = False
        while True:
            if self.stop_event.is_set():
                raise InterruptedError("stopped")
            try:
                result = call(self._connect())
                if failed:
                    self.write_status(reconnects=self.status.reconnects + 1, last_error="")
                    log.info("%s: reconnected to %s", what, self.config.server)
                return result
            except grpc.RpcError as exc:
                code = exc.code()
                # A server whose disk is full stored nothing of the refused call and recovers
                # once its operator frees space: wait for it as for a server that is away.
                disk_full = code == grpc.StatusCode.RESOURCE_EXHAUSTED and DISK_FULL_MARKER in (
                    exc.details() or ""
                )
                if code not in _TRANSIENT and not disk_full:
                    raise ClientRefused(f"{what} refused: {code.name}: {exc.details()}") from None
                failed = True
                why = "its disk is full" if disk_full else "unavailable"
                self.write_status(
                    last_error=f"{what}: {code.name} ({why}), retrying in {delay:.1f}s"
                )
                log.warning("%s: server %s (%s); retrying in %.1fs", what, why, code.name, delay)
                if self.remote is not None:
                    self.remote.close()
                    self.remote = None
                self.stop_event.wait(delay)
                delay = min(delay * 2, self.config.max_backoff_s)

    def register(self) -> Session:
        """Register (idempotent); the session carries the schedule and this client's own t_cut.

        The server only supplies the schedule, which the client checks against its hash; the
        client then computes t_cut and the release SNR itself and refuses (ClientRefused,
        nothing released) if the server's answer disagrees or the cut is cleaner than
        config.max_release_snr allows (docs/design.md section 4, item 3).
        """
        cfg = self.config
        reg = Registration(
            client_id=cfg.client_id,
            image_shape=cfg.image.shape,
            cut_ratio=cfg.cut_ratio,
            exposure=cfg.exposure,
            num_images=self.status.images,
        )
        answer = self._with_retry("register", lambda r: r.register(reg))
        diffusion = Diffusion.from_config(answer.schedule.config)
        if diffusion.hash != answer.schedule.hash:
            raise ClientRefused(
                f"the server's schedule hash {answer.schedule.hash} does not match the betas it "
                f"describes ({diffusion.hash}); client and server code disagree"
            )
        session = self._own_session(answer, diffusion)
        self.session = session
        self.paths["session"].write_text(
            json.dumps(
                {
                    "schedule": session.schedule.config.model_dump(mode="json"),
                    "schedule_hash": session.schedule.hash,
                    "t_cut": session.t_cut,
                    "client_index": session.client_index,
                    "release_snr": session.release_snr,
                }
            )
        )
        self.write_status(
            phase="registered", t_cut=session.t_cut, server_model_version=session.model_version
        )
        log.info(
            "registered as index %d: T=%d, t_cut=%d, release SNR %.3g",
            session.client_index,
            session.schedule.config.num_timesteps,
            session.t_cut,
            session.release_snr,
        )
        return session

    def _own_session(self, answer: Session, diffusion: Diffusion) -> Session:
        """The server's answer with t_cut and release SNR replaced by the client's own.

        A server that answers with a smaller t_cut (or a schedule whose cut is nearly clean)
        would otherwise receive the images barely noised; the client trusts only the schedule
        it verified and its own configuration.
        """
        cfg = self.config
        t_cut = diffusion.t_cut(cfg.cut_ratio)
        snr = diffusion.snr(t_cut)
        T = diffusion.num_timesteps
        if snr > cfg.max_release_snr:
            t_min = diffusion.equivalent_timestep(cfg.max_release_snr)
            raise ClientRefused(
                f"cut_ratio {cfg.cut_ratio} gives t_cut={t_cut} of T={T} on the server's "
                f"schedule, with release SNR {snr:.3g} above this client's max_release_snr "
                f"{cfg.max_release_snr:g}; nothing was released. Raise cut_ratio to at least "
                f"{t_min / T:.3f} (t_cut >= {t_min}), or raise max_release_snr if you accept "
                "cleaner releases"
            )
        if answer.t_cut != t_cut:
            raise ClientRefused(
                f"the server answered t_cut={answer.t_cut}, but cut_ratio {cfg.cut_ratio} on its "
                f"own schedule (T={T}) gives t_cut={t_cut}; nothing was released. The server "
                "is misconfigured or not to be trusted: check its version and policy"
            )
        # Both sides compute the SNR in float64 from the same betas; the wire carries a double.
        if not math.isclose(answer.release_snr, snr, rel_tol=1e-9, abs_tol=1e-12):
            raise ClientRefused(
                f"the server reports release SNR {answer.release_snr:.6g} at t_cut={t_cut}, "
                f"this client computes {snr:.6g} from the same schedule; nothing was released. "
                "Client and server code disagree: check the server's version"
            )
        return replace(answer, t_cut=t_cut, release_snr=snr)

    def _check_init_from(self, session: Session) -> None:
        """Refuse an init_from folder that does not fit, before anything is uploaded.

        LocalTrainer loads the folder only after the upload; a folder for another cut or model
        would otherwise be found out once the images had already been released.
        """
        folder = self.config.init_from
        if folder is None or checkpoint_files(self.paths["checkpoint"]):
            return
        try:
            manifest = read_manifest(folder)
            target = client_target(self.config, session.schedule.hash, session.t_cut)
            check_fits(manifest, target, folder)
        except WarmStartError as exc:
            self.write_status(phase="refused", last_error=str(exc))
            raise

    # ----- upload --------------------------------------------------------------------------

    def _releases(self, idx: list[int], cuts: torch.Tensor, t_cut: int) -> list[Release]:
        """The ledger rows for the cut images cuts[idx]: ids, size and a hash of the bytes."""
        per_image = 4 * math.prod(cuts.shape[1:])
        return [
            Release(
                local_id=self.data.ids[i],
                wire_id=wire_id(self.secret, self.data.ids[i]),
                t_cut=t_cut,
                bytes=per_image,
                sha256=hashlib.sha256(cuts[i].numpy().tobytes()).hexdigest(),
            )
            for i in idx
        ]

    def _batches(self, pending: list[int], cuts: torch.Tensor, t_cut: int) -> Iterator[CutBatch]:
        per_image = 4 * math.prod(cuts.shape[1:])
        per_msg = max(1, self.config.upload_chunk_bytes // per_image)
        for lo in range(0, len(pending), per_msg):
            idx = pending[lo : lo + per_msg]
            releases = self._releases(idx, cuts, t_cut)
            # The ledger row is written before the tensor leaves the machine; a retried stream
            # gets the rows of its first try back, and a conflicting release stops the stream
            # here, before this batch is yielded to gRPC.
            try:
                seqs = self.ledger.record(releases)
            except LedgerError as exc:
                self._ledger_error = exc
                raise
            wire = [r.wire_id for r in releases]
            # One entry per message, in order: the server acknowledges message k by index.
            self._sent.append(
                [(seq, r.wire_id, r.local_id) for seq, r in zip(seqs, releases, strict=True)]
            )
            yield CutBatch(
                client_id=self.config.client_id, t_cut=t_cut, image_ids=wire, cuts=cuts[idx]
            )

    def upload(self, session: Session, everything: bool = False) -> None:
        """Upload every cut image the server has not acknowledged (all of them if everything)."""
        started = time.perf_counter()
        diffusion = Diffusion.from_config(session.schedule.config)
        cuts = compute_cuts(self.data, self.secret, diffusion, session.t_cut)
        acked = set() if everything else self.ledger.acknowledged_ids()
        pending = [i for i, lid in enumerate(self.data.ids) if lid not in acked]
        self.write_status(phase="uploading", uploaded=len(self.data.ids) - len(pending))
        if not pending:
            return
        # The ledger must agree before anything is sent: an image it holds at another t_cut or
        # with other bytes is never released again.
        try:
            self.ledger.check(self._releases(pending, cuts, session.t_cut))
        except LedgerError as exc:
            raise ClientRefused(f"nothing was uploaded: {exc}") from None
        log.info("uploading %d cut images at t_cut=%d", len(pending), session.t_cut)

        done: set[str] = set()  # local ids acknowledged during this upload
        totals = {"accepted": 0, "duplicate": 0, "rejected": 0, "pool_size": 0}
        rejections: list[tuple[str, str]] = []

        def attempt(remote: Remote) -> None:
            # Each message is acknowledged once it is durable on the server, so a retried
            # stream resumes after the last acknowledged message; re-sent bytes are no new
            # release (the ledger returns the rows of the first try).
            todo = [i for i in pending if self.data.ids[i] not in done]
            self._sent = []
            self._ledger_error = None
            try:
                for ack in remote.upload_acked(self._batches(todo, cuts, session.t_cut)):
                    rows = self._sent[ack.message]
                    refused = {rid for rid, _ in ack.rejections}
                    kept = [(seq, local) for seq, wid, local in rows if wid not in refused]
                    self.ledger.acknowledge([seq for seq, _ in kept], ack.receipt)
                    done.update(local for _, local in kept)
                    for key in ("accepted", "duplicate", "rejected"):
                        totals[key] += getattr(ack, key)
                    totals["pool_size"] = ack.pool_size
                    rejections.extend(ack.rejections)
                    self.write_status(uploaded=len(acked) + len(done))
            except grpc.RpcError:
                # gRPC turns an exception in the request iterator into a CANCELLED call; report
                # the ledger's reason instead of that.
                if self._ledger_error is not None:
                    raise ClientRefused(f"upload stopped: {self._ledger_error}") from None
                raise

        self._with_retry("upload", attempt)
        result = UploadResult(
            accepted=totals["accepted"],
            duplicate=totals["duplicate"],
            rejected=totals["rejected"],
            rejections=rejections,
            pool_size=totals["pool_size"],
        )
        summary = self.ledger.summary()
        self.write_status(
            uploaded=summary.images_acknowledged,
            rejected=result.rejected,
            bytes_released=summary.bytes_released,
            upload_seconds=self.status.upload_seconds + time.perf_counter() - started,
        )
        log.info(
            "server accepted %d, duplicate %d, rejected %d; it holds %d of ours",
            result.accepted,
            result.duplicate,
            result.rejected,
            result.pool_size,
        )
        if result.rejected:
            reason = result.rejections[0][1] if result.rejections else "see the server log"
            raise ClientRefused(f"the server rejected {result.rejected} cut images: {reason}")

    # ----- training ------------------------------------------------------------------------

    def train(self, session: Session) -> LocalTrainer:
        """Train the local model to config.train.steps (resumes)."""
        trainer = LocalTrainer(
            self.config, session.schedule.config, session.t_cut, self.paths["checkpoint"]
        )
        self.write_status(phase="training", model_parameters=trainer.num_parameters)
        every = max(1, self.config.train.steps // 20)

        def progress(step: int, loss: float) -> None:
            # Every step in memory, for /metrics scrapes; status.json only now and then.
            self.status.train_step, self.status.last_loss = step, loss
            if step % every == 0 or step == self.config.train.steps:
                self.write_status(train_step=step, last_loss=loss, train_seconds=trainer.seconds)
                log.info("local step %d/%d loss %.4f", step, self.config.train.steps, loss)

        trainer.train(self.data.images, self.stop_event.is_set, progress)
        trainer.save()
        self.write_status(
            train_step=trainer.step, last_loss=trainer.last_loss, train_seconds=trainer.seconds
        )
        return trainer

    # ----- main loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Register, upload, train, then idle with heartbeats; returns an exit code."""
        try:
            if self.config.metrics_listen:
                self._serve_metrics()
            session = self.register()
            self._check_init_from(session)
            self.upload(session)
            self.train(session)
            self.write_status(phase="done" if self.config.exit_when_done else "idle")
            while not self.config.exit_when_done and not self.stop_event.is_set():
                self.heartbeat(session)
                self.stop_event.wait(self.config.heartbeat_s)
            return 0
        except InterruptedError:
            return 0
        except ClientRefused as exc:
            self.write_status(phase="refused", last_error=str(exc))
            log.error("%s", exc)
            return 1
        finally:
            if self.status.phase not in ("done", "refused"):
                self.write_status(phase="stopped")
            if self.metrics is not None:
                self.metrics.stop()
            if self.remote is not None:
                self.remote.close()
            self.ledger.close()

    def _serve_metrics(self) -> None:
        try:
            self.metrics = serve_metrics(self.config.metrics_listen, client_registry(self.status))
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.config.metrics_listen}: {exc}"
            ) from None
        log.info("metrics on %s", self.metrics.url)

    def forget(self) -> ForgetResult:
        """Ask the server to delete our cut images; the ledger records its answer."""
        result = self._with_retry("forget", lambda r: r.forget(self.config.client_id))
        self.ledger.record_forget(
            result.deleted, result.trained_from_version, result.trained_to_version, result.receipt
        )
        return result

    def heartbeat(self, session: Session) -> None:
        """Check in with the server; re-upload if it lost what it had acknowledged."""
        status = self._with_retry("status", lambda r: r.status())
        ours = next((p for p in status.pools if p.client_id == self.config.client_id), None)
        self.write_status(server_model_version=status.model_version)
        if self.ledger.forgotten():
            return  # the server deleted our images at our request: never send them again
        if ours is None or ours.num_images < self.status.uploaded:
            # The server lost our registration or pool (e.g. a new data dir): release the same
            # fixed-exposure tensors again; the server de-duplicates by id.
            log.warning("the server holds fewer of our images than it acknowledged; re-uploading")
            self.upload(self.register(), everything=True)
            self.write_status(phase="idle")
