"""Thin gRPC servicer: decode with serde, call the service, encode, map errors to status codes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc

from collafuse.common import serde
from collafuse.common.domain import CutBatch
from collafuse.server.policy import PolicyError, Refusal
from collafuse.server.service import CollaFuseService
from collafuse.v1 import collafuse_pb2 as pb
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

log = logging.getLogger("collafuse.server.grpc")

_CODES = {
    Refusal.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}
R = TypeVar("R")


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, serde.WireError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, PolicyError):
        context.abort(_CODES[exc.kind], str(exc))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}: {exc}")


def _guard(context: grpc.ServicerContext, fn: Callable[[], R]) -> R:
    try:
        return fn()
    except (serde.WireError, PolicyError, Exception) as exc:
        _abort(context, exc)


class CollaFuseServicer(pb_grpc.CollaFuseServicer):
    """Maps the four RPCs onto CollaFuseService."""

    def __init__(self, service: CollaFuseService) -> None:
        self.service = service

    def _caller(self, context: grpc.ServicerContext) -> str | None:
        """The authenticated client id (None when the server runs without tokens)."""
        return self.service.auth.identify(context.invocation_metadata())

    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterResponse:
        def register() -> pb.RegisterResponse:
            caller = self._caller(context)  # authenticate before reading the request
            reg = serde.registration_from_proto(request)
            return serde.session_to_proto(self.service.register(reg, caller))

        return _guard(context, register)

    def UploadCuts(
        self, request_iterator: Iterator[pb.UploadCutsRequest], context: grpc.ServicerContext
    ) -> pb.UploadCutsResponse:
        batches: Iterator[CutBatch] = (serde.cut_batch_from_proto(m) for m in request_iterator)

        def upload() -> pb.UploadCutsResponse:
            caller = self._caller(context)
            return serde.upload_result_to_proto(self.service.upload(batches, caller))

        return _guard(context, upload)

    def Synthesize(
        self, request: pb.SynthesizeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SynthesizeChunk]:
        try:
            caller = self._caller(context)
            req = serde.synthesis_request_from_proto(request)
            for chunk in self.service.synthesize(req, context.is_active, caller):
                yield serde.synthesis_chunk_to_proto(chunk)
        except Exception as exc:
            _abort(context, exc)

    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetStatusResponse:
        def status() -> pb.GetStatusResponse:
            self._caller(context)
            return serde.status_to_proto(self.service.status())

        return _guard(context, status)
