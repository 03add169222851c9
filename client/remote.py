"""The client's view of the server: a channel and one typed method per RPC."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from collafuse.common import serde
from collafuse.common.config import ClientConfig, is_loopback
from collafuse.common.domain import (
    CutBatch,
    ForgetResult,
    Registration,
    ServerStatus,
    Session,
    SynthesisChunk,
    SynthesisRequest,
    UploadAck,
    UploadResult,
)
from collafuse.common.files import read_private_bytes
from collafuse.common.limits import channel_options
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

# Deadlines per call, in seconds; uploads and synthesis scale with their size.
UNARY_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 3600.0


def open_channel(
    address: str,
    insecure: bool,
    tls_ca: Path | None = None,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A channel with the shared limits and retry policy.

    TLS unless insecure; with tls_cert/tls_key the client proves its identity (mutual TLS). A
    token travels as call credentials, which gRPC sends only over TLS; on a plaintext channel
    it is sent only to a loopback address, never across a network.
    """
    if insecure:
        if tls_cert is not None or tls_key is not None:
            raise ValueError("insecure contradicts tls_cert/tls_key: choose plaintext or TLS")
        if token is not None and not is_loopback(address):
            raise ValueError(
                f"refusing to send the client token in plaintext to {address}; use TLS"
            )
        channel = grpc.insecure_channel(address, options=channel_options())
        if token is None:
            return channel
        return grpc.intercept_channel(channel, _with_token(token))
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")
    try:
        roots = tls_ca.read_bytes() if tls_ca is not None else None
        cert = tls_cert.read_bytes() if tls_cert is not None else None
        key = read_private_bytes(tls_key, "TLS private key") if tls_key is not None else None
    except OSError as exc:
        raise ValueError(f"cannot read the TLS files: {exc}") from None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=cert
    )
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    return grpc.secure_channel(address, credentials, options=channel_options())


class CallDetails(
    NamedTuple(
        "CallDetails",
        [
            ("method", str),
            ("timeout", float | None),
            ("metadata", Any),
            ("credentials", Any),
            ("wait_for_ready", bool | None),
            ("compression", Any),
        ],
    ),
    grpc.ClientCallDetails,
):
    """Call details a client interceptor can rebuild with changes (`_replace`)."""

    @classmethod
    def of(cls, details: grpc.ClientCallDetails) -> CallDetails:
        """A copy of gRPC's call details."""
        return cls(
            details.method,
            details.timeout,
            details.metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )


class RewriteCalls(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A client interceptor that passes every call's details through `rewrite`."""

    def __init__(self, rewrite: Callable[[CallDetails], CallDetails]) -> None:
        self.rewrite = rewrite

    def _details(self, details: grpc.ClientCallDetails) -> CallDetails:
        return self.rewrite(CallDetails.of(details))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _with_token(token: str) -> RewriteCalls:
    """Adds the bearer token to calls on a plaintext loopback channel (tests, development)."""
    header = ("authorization", f"Bearer {token}")
    return RewriteCalls(lambda d: d._replace(metadata=[*(d.metadata or []), header]))


def read_token(path: Path | None) -> str | None:
    """A client token from its file (first line), or None; the file must be private."""
    if path is None:
        return None
    try:
        token = read_private_bytes(path, "client token file").decode().strip()
    except UnicodeDecodeError:
        raise ValueError(f"the client token file {path} is not text") from None
    if not token:
        raise ValueError(f"the client token file {path} is empty")
    return token


class Remote:
    """Typed calls to a CollaFuse server, each carrying the client's token if it has one."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.CollaFuseStub(channel)

    @classmethod
    def for_client(cls, config: ClientConfig) -> Remote:
        """A connection as the configured client (address, TLS, client certificate, token)."""
        channel = open_channel(
            config.server,
            config.insecure,
            config.tls_ca,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            token=read_token(config.auth_token_file),
        )
        return cls(channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def register(self, reg: Registration) -> Session:
        """Register (idempotent) and learn the schedule and t_cut."""
        reply = self.stub.Register(
            serde.registration_to_proto(reg),
            timeout=UNARY_TIMEOUT_S,
            wait_for_ready=True,
        )
        return serde.session_from_proto(reply)

    def upload(self, batches: Iterable[CutBatch]) -> UploadResult:
        """Stream cut images; the answer counts accepted, duplicate and rejected images."""
        reply = self.stub.UploadCuts(
            (serde.cut_batch_to_proto(b) for b in batches),
            timeout=STREAM_TIMEOUT_S,
        )
        return serde.upload_result_from_proto(reply)

    def upload_acked(self, batches: Iterable[CutBatch]) -> Iterator[UploadAck]:
        """Stream cut images; each message is acknowledged once it is durable on the server."""
        call = self.stub.Upload(
            (serde.cut_batch_to_proto(b) for b in batches), timeout=STREAM_TIMEOUT_S
        )
        try:
            for msg in call:
                yield serde.upload_ack_from_proto(msg)
        finally:
            call.cancel()

    def synthesize(self, req: SynthesisRequest) -> Iterator[SynthesisChunk]:
        """Stream x_{t_cut} chunks; closing the iterator early cancels the call at once."""
        call = self.stub.Synthesize(
            serde.synthesis_request_to_proto(req), timeout=STREAM_TIMEOUT_S, wait_for_ready=True
        )
        try:
            for msg in call:
                yield serde.synthesis_chunk_from_proto(msg)
        finally:
            call.cancel()  # a no-op once the stream has ended; stops a server that sends on

    def forget(self, client_id: str) -> ForgetResult:
        """Ask the server to delete this client's cut images."""
        reply = self.stub.Forget(serde.forget_request_to_proto(client_id), timeout=UNARY_TIMEOUT_S)
        return serde.forget_result_from_proto(reply)

    def status(self, timeout: float = UNARY_TIMEOUT_S) -> ServerStatus:
        """The server's status."""
        return serde.status_from_proto(self.stub.GetStatus(serde.status_request(), timeout=timeout))
