"""Assembles and runs one CollaFuse server process: pool, trainer, sampler, gRPC service."""

from __future__ import annotations

import json
import logging
import os
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collafuse.common.config import ServerConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.limits import server_options
from collafuse.common.nets import pick_device
from collafuse.server.auth import Authenticator
from collafuse.server.pool import Pool
from collafuse.server.sampler import BatchingSampler
from collafuse.server.service import CollaFuseService
from collafuse.server.servicer import CollaFuseServicer
from collafuse.server.trainer import Trainer
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

log = logging.getLogger("collafuse.server")
SERVICE_NAME = "collafuse.v1.CollaFuse"


class StartupError(RuntimeError):
    """The server cannot start as configured; the message says what to change."""


@dataclass
class RunningServer:
    """A started server; stop() shuts it down cleanly and writes a final checkpoint."""

    config: ServerConfig
    port: int
    grpc_server: grpc.Server
    service: CollaFuseService
    trainer: Trainer
    sampler: BatchingSampler
    pool: Pool
    health: health.HealthServicer

    @property
    def address(self) -> str:
        """host:port clients can dial."""
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving, then stop the trainer (final checkpoint) and the sampler."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        self.trainer.stop()
        self.sampler.stop()
        self.pool.close()

    def wait(self) -> None:
        """Block until the gRPC server terminates."""
        self.grpc_server.wait_for_termination()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.insecure:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise StartupError(
            "TLS needs tls_cert and tls_key (PEM files); pass --tls-cert/--tls-key, "
            "or --insecure for plaintext on a trusted network such as loopback"
        )
    try:
        return grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())]
        )
    except OSError as exc:
        raise StartupError(f"cannot read TLS files: {exc}") from None


def start_server(
    config: ServerConfig, interceptors: list[grpc.ServerInterceptor] | None = None
) -> RunningServer:
    """Open the data dir, resume from its checkpoint, and start serving."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    credentials = _credentials(config)
    diffusion = Diffusion.from_config(config.schedule)
    pool = Pool(data_dir / "pool.sqlite")
    try:
        trainer = Trainer(config, diffusion, pool, device, data_dir / "checkpoints" / "server.pt")
    except ValueError as exc:
        pool.close()
        raise StartupError(str(exc)) from None
    sampler = BatchingSampler(diffusion, trainer.hub, config.sampler.max_batch, device)
    try:
        auth = Authenticator.from_file(config.auth_tokens)
    except ValueError as exc:
        pool.close()
        raise StartupError(str(exc)) from None
    service = CollaFuseService(config, diffusion, pool, trainer, sampler, device, auth)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc"),
        options=server_options(),
        interceptors=interceptors or [],
    )
    pb_grpc.add_CollaFuseServicer_to_server(CollaFuseServicer(service), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port(config.listen)
    else:
        port = server.add_secure_port(config.listen, credentials)
    if port == 0:
        pool.close()
        raise StartupError(f"cannot listen on {config.listen} (address in use or invalid?)")
    sampler.start()
    trainer.start()
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(config, port, server, service, trainer, sampler, pool, health_servicer)
    # The chosen port, for scripts that started us on port 0.
    info = {"address": running.address, "port": port, "pid": os.getpid()}
    tmp = data_dir / "server.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(data_dir / "server.json")
    log.info(
        "serving on %s (%s%s, %s, %d parameters, step %d)",
        running.address,
        "insecure" if credentials is None else "TLS",
        ", client tokens required" if auth.enabled else "",
        device,
        trainer.num_parameters,
        trainer.step,
    )
    return running


def read_server_info(data_dir: Path) -> dict[str, object]:
    """The address file a running server wrote into its data dir."""
    info: dict[str, object] = json.loads((data_dir / "server.json").read_text())
    return info
