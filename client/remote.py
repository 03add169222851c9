"""The client's view of the server: a channel and one typed method per RPC."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from collafuse.common import serde
from collafuse.common.config import ClientConfig
from collafuse.common.domain import (
    CutBatch,
    Registration,
    ServerStatus,
    Session,
    SynthesisChunk,
    SynthesisRequest,
    UploadResult,
)
from collafuse.common.limits import channel_options
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

# Deadlines per call, in seconds; uploads and synthesis scale with their size.
UNARY_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 3600.0


def open_channel(address: str, insecure: bool, tls_ca: Path | None = None) -> grpc.Channel:
    """A channel with the shared limits and retry policy; TLS unless insecure."""
    if insecure:
        return grpc.insecure_channel(address, options=channel_options())
    roots = tls_ca.read_bytes() if tls_ca is not None else None
    return grpc.secure_channel(
        address, grpc.ssl_channel_credentials(root_certificates=roots), options=channel_options()
    )


def read_token(path: Path | None) -> str | None:
    """A client token from its file (first line), or None."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the client token file {path}: {exc}") from None
    if not token:
        raise ValueError(f"the client token file {path} is empty")
    return token


class Remote:
    """Typed calls to a CollaFuse server, each carrying the client's token if it has one."""

    def __init__(self, channel: grpc.Channel, token: str | None = None) -> None:
        self.channel = channel
        self.stub = pb_grpc.CollaFuseStub(channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    @classmethod
    def for_client(cls, config: ClientConfig) -> Remote:
        """A connection as the configured client (address, TLS, token)."""
        channel = open_channel(config.server, config.insecure, config.tls_ca)
        return cls(channel, read_token(config.auth_token_file))

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def register(self, reg: Registration) -> Session:
        """Register (idempotent) and learn the schedule and t_cut."""
        reply = self.stub.Register(
            serde.registration_to_proto(reg),
            timeout=UNARY_TIMEOUT_S,
            wait_for_ready=True,
            metadata=self.metadata,
        )
        return serde.session_from_proto(reply)

    def upload(self, batches: Iterable[CutBatch]) -> UploadResult:
        """Stream cut images; the answer counts accepted, duplicate and rejected images."""
        reply = self.stub.UploadCuts(
            (serde.cut_batch_to_proto(b) for b in batches),
            timeout=STREAM_TIMEOUT_S,
            metadata=self.metadata,
        )
        return serde.upload_result_from_proto(reply)

    def synthesize(self, req: SynthesisRequest) -> Iterator[SynthesisChunk]:
        """Stream x_{t_cut} chunks for a synthesis request."""
        for msg in self.stub.Synthesize(
            serde.synthesis_request_to_proto(req), timeout=STREAM_TIMEOUT_S, metadata=self.metadata
        ):
            yield serde.synthesis_chunk_from_proto(msg)

    def status(self, timeout: float = UNARY_TIMEOUT_S) -> ServerStatus:
        """The server's status."""
        return serde.status_from_proto(
            self.stub.GetStatus(serde.status_request(), timeout=timeout, metadata=self.metadata)
        )
