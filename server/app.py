"""Assembles and runs one CollaFuse server process: pool, trainer, sampler, gRPC service.

gRPC runs on asyncio in a thread of its own, so a call that waits (a slow upload, a half-open
stream, a long synthesis) holds no thread; the trainer and the sampler have their threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from collafuse.common.checkpoint import checkpoint_files
from collafuse.common.config import ServerConfig, is_loopback
from collafuse.common.diffusion import Diffusion
from collafuse.common.export import server_target, warm_start_state
from collafuse.common.files import InsecureFileError, private_dir, read_private_bytes
from collafuse.common.limits import server_options
from collafuse.common.nets import pick_device
from collafuse.common.obs import MetricsEndpoint, serve_metrics
from collafuse.server.audit import AuditLog, ReceiptSigner
from collafuse.server.auth import Authenticator
from collafuse.server.errors import StartupError
from collafuse.server.interceptor import Gate
from collafuse.server.metrics import server_registry
from collafuse.server.pool import DiskFullError, Pool, PoolCorruptError
from collafuse.server.sampler import BatchingSampler
from collafuse.server.service import CollaFuseService
from collafuse.server.servicer import CollaFuseServicer
from collafuse.server.trainer import Trainer
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

log = logging.getLogger("collafuse.server")
SERVICE_NAME = "collafuse.v1.CollaFuse"
# Its own health entry: synthesis keeps serving while training is down, and says so here.
TRAINER_HEALTH = "collafuse.v1.Trainer"
T = TypeVar("T")


class _LoopThread:
    """An asyncio event loop running in a daemon thread, driven from synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class RunningServer:
    """A started server; stop() shuts it down cleanly and writes a final checkpoint."""

    config: ServerConfig
    port: int
    grpc_server: grpc.aio.Server
    service: CollaFuseService
    trainer: Trainer
    sampler: BatchingSampler
    pool: Pool
    health: HealthServicer
    auth: Authenticator
    gate: Gate
    audit: AuditLog
    _loop: _LoopThread
    metrics: MetricsEndpoint | None = None
    """The /metrics listener (config.metrics_listen), or None."""

    @property
    def address(self) -> str:
        """host:port clients can dial."""
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving within `grace` seconds, then stop the trainer (final checkpoint)."""
        if self.metrics is not None:
            self.metrics.stop()  # first: a scrape must not read a pool being closed
        try:
            self._loop.run(self._stop_serving(grace), timeout=grace + 10)
        except Exception:  # a stuck stream must not keep the checkpoint from being written
            log.exception("gRPC shutdown did not finish; continuing")
        self.trainer.stop()
        self.sampler.stop()
        self.service.close()
        self.pool.close()
        self.audit.close()
        self._loop.close()

    async def _stop_serving(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        for task in asyncio.all_tasks():
            if task.get_name() == TRAINER_HEALTH:
                task.cancel()

    def wait(self) -> None:
        """Block until the gRPC server terminates."""
        self._loop.run(self.grpc_server.wait_for_termination())


async def _watch_trainer(health: HealthServicer, trainer: Trainer) -> None:
    """Mirror the trainer's state into its health entry once a second."""
    status = health_pb2.HealthCheckResponse
    last = None
    while True:
        state = trainer.state
        up = not state.startswith(("failed", "restarting"))
        if up != last:
            await health.set(TRAINER_HEALTH, status.SERVING if up else status.NOT_SERVING)
            if last is not None:
                log.log(logging.INFO if up else logging.WARNING, "trainer: %s", state)
            last = up
        await asyncio.sleep(1.0)


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual when tls_client_ca is set), or None for loopback plaintext."""
    if config.insecure:
        if config.auth_tokens is not None and not is_loopback(config.listen):
            raise StartupError(
                "auth_tokens over plaintext would expose the tokens on the network; "
                "serve TLS, or use tokens with --insecure on loopback only"
            )
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise StartupError(
            "TLS needs tls_cert and tls_key (PEM files, e.g. from `collafuse pki issue-server`); "
            "pass --tls-cert/--tls-key, or --insecure for plaintext on loopback"
        )
    if config.tls_client_ca is None and config.auth_tokens is None:
        raise StartupError(
            "a TLS server must know its clients: set tls_client_ca (mutual TLS with "
            "certificates from `collafuse pki issue`) or auth_tokens (from `collafuse token`)"
        )
    try:
        key = read_private_bytes(config.tls_key, "TLS private key")
        cert = config.tls_cert.read_bytes()
        roots = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    except InsecureFileError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot read TLS files: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=roots, require_client_auth=roots is not None
    )


def _authenticator(config: ServerConfig) -> Authenticator:
    try:
        return Authenticator(
            mutual_tls=config.tls_client_ca is not None,
            token_file=config.auth_tokens,
            revoked=config.tls_revoked,
            admins=config.admins,
        )
    except (ValueError, OSError) as exc:
        raise StartupError(str(exc)) from None


def _warm_start(config: ServerConfig, trainer: Trainer, diffusion: Diffusion) -> None:
    """Load config.init_from into the model and EMA when the server has no checkpoint yet.

    Runs before the sampler is built, so the first weights it serves are the folder's.
    """
    folder = config.init_from
    if folder is None:
        return
    if trainer.step or checkpoint_files(trainer.checkpoint_path):
        log.info(
            "init_from %s ignored: the server resumes from its own checkpoint %s (step %d)",
            folder,
            trainer.checkpoint_path,
            trainer.step,
        )
        return
    state, manifest = warm_start_state(folder, server_target(config, diffusion.hash))
    trainer.model.load_state_dict(state)
    trainer.ema.load_state_dict(state)
    # The rollback point after a non-finite step must be these weights, not the random ones.
    trainer._remember_good()
    trainer.hub.publish(trainer.ema.state_dict(), trainer.step)
    log.info(
        "starting from %s: the server model of step %d exported from %s (sha256 %s)",
        folder,
        manifest.source.step,
        manifest.source.path,
        manifest.source.sha256[:16],
    )


def start_server(
    config: ServerConfig,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    start_over: bool = False,
    pool_full_check: bool = False,
) -> RunningServer:
    """Open the data dir, resume from its checkpoint, and start serving."""
    if config.threads:
        torch.set_num_threads(config.threads)
    credentials = _credentials(config)
    auth = _authenticator(config)
    device = pick_device(config.device)
    data_dir = private_dir(config.data_dir)
    diffusion = Diffusion.from_config(config.schedule)
    try:
        pool = Pool(data_dir / "pool.sqlite", full_check=pool_full_check)
    except (PoolCorruptError, DiskFullError) as exc:
        raise StartupError(str(exc)) from None
    try:
        trainer = Trainer(
            config,
            diffusion,
            pool,
            device,
            data_dir / "checkpoints" / "server.pt",
            start_over=start_over,
        )
    except ValueError as exc:
        pool.close()
        raise StartupError(str(exc)) from None
    try:
        _warm_start(config, trainer, diffusion)
    except ValueError as exc:  # WarmStartError: the folder does not fit this configuration
        pool.close()
        raise StartupError(str(exc)) from None
    sampler = BatchingSampler(
        diffusion,
        trainer.hub,
        config.sampler.max_batch,
        device,
        slice_size=config.sampler.slice_size,
        interactive_n=config.sampler.interactive_n,
        interactive_batch=config.sampler.interactive_batch,
        precision=config.sampler.precision,
        compile=config.sampler.compile,
        gamma_samples=trainer.gamma_samples,  # the analytic sampler's Gamma_t, from the pool
    )
    if config.sampler.compile:
        log.info("compiling the synthesis network before serving (sampler.compile = true)")
    try:
        sampler.prepare(config.image.shape)
    except Exception as exc:
        pool.close()
        raise StartupError(f"cannot compile the synthesis network: {exc}") from None
    audit = AuditLog(data_dir / "audit.log")
    receipts = ReceiptSigner(data_dir / "receipt.key")
    service = CollaFuseService(config, diffusion, pool, trainer, sampler, device, receipts)
    metrics: MetricsEndpoint | None = None
    rpc_metrics = None
    if config.metrics_listen:
        registry, rpc_metrics = server_registry(service)
        try:
            metrics = serve_metrics(config.metrics_listen, registry)
        except OSError as exc:
            pool.close()
            audit.close()
            raise StartupError(f"cannot serve metrics on {config.metrics_listen}: {exc}") from None
    gate = Gate(auth, config.limits, audit, service.counters, rpc_metrics)
    loop = _LoopThread()

    async def build() -> tuple[grpc.aio.Server, HealthServicer, int]:
        server = grpc.aio.server(
            options=server_options(),
            interceptors=[gate, *interceptors],
            maximum_concurrent_rpcs=config.limits.max_concurrent_rpcs,
        )
        pb_grpc.add_CollaFuseServicer_to_server(CollaFuseServicer(service), server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if credentials is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, credentials)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        asyncio.get_running_loop().create_task(_watch_trainer(health, trainer), name=TRAINER_HEALTH)
        return server, health, port

    try:
        server, health, port = loop.run(build(), timeout=60)
    except Exception as exc:
        if metrics is not None:
            metrics.stop()
        loop.close()
        pool.close()
        audit.close()
        raise StartupError(f"cannot listen on {config.listen}: {exc}") from None
    sampler.start()
    trainer.start()
    running = RunningServer(
        config, port, server, service, trainer, sampler, pool, health, auth, gate, audit, loop
    )
    running.metrics = metrics
    # The chosen port, for scripts that started us on port 0.
    info = {"address": running.address, "port": port, "pid": os.getpid()}
    if metrics is not None:
        info["metrics_port"] = metrics.port
        log.info("metrics on %s", metrics.url)
    tmp = data_dir / "server.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(data_dir / "server.json")
    if credentials is None:
        transport = "plaintext on loopback" if is_loopback(config.listen) else "PLAINTEXT"
    else:
        transport = "mutual TLS" if config.tls_client_ca else "TLS"
    log.info(
        "serving on %s (%s%s, %s, %d parameters, step %d)",
        running.address,
        transport,
        ", client tokens required" if config.auth_tokens else "",
        device,
        trainer.num_parameters,
        trainer.step,
    )
    return running


def read_server_info(data_dir: Path) -> dict[str, object]:
    """The address file a running server wrote into its data dir."""
    info: dict[str, object] = json.loads((data_dir / "server.json").read_text())
    return info
