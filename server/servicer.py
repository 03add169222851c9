"""Thin asyncio gRPC servicer: decode with serde, call the service, encode, map errors to codes.

Blocking work (SQLite commits, the guard) runs in worker threads so the event loop keeps
serving other calls; the caller's Identity comes from the gate (`current_call`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import NoReturn, TypeVar

import grpc
import grpc.aio

from collafuse.common import serde
from collafuse.server.interceptor import STATUS_CODES, current_call
from collafuse.server.policy import PolicyError
from collafuse.server.service import CollaFuseService
from collafuse.v1 import collafuse_pb2 as pb
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

log = logging.getLogger("collafuse.server.grpc")
R = TypeVar("R")
# Error messages quote at most this much of anything a caller sent.
MAX_DETAIL_CHARS = 1000


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Map a refusal to its status code; anything else is INTERNAL and logged once."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, serde.WireError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:MAX_DETAIL_CHARS])
    if isinstance(exc, PolicyError):
        await context.abort(STATUS_CODES[exc.kind], str(exc)[:MAX_DETAIL_CHARS])
    log.error("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}")


class CollaFuseServicer(pb_grpc.CollaFuseServicer):
    """Maps the RPCs onto CollaFuseService."""

    def __init__(self, service: CollaFuseService) -> None:
        self.service = service

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], R]) -> R:
        try:
            return await asyncio.to_thread(fn)
        except Exception as exc:
            await _abort(context, exc)

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        caller = current_call().identity

        def register() -> pb.RegisterResponse:
            reg = serde.registration_from_proto(request)
            return serde.session_to_proto(self.service.register(reg, caller))

        return await self._call(context, register)

    async def UploadCuts(
        self,
        request_iterator: AsyncIterator[pb.UploadCutsRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadCutsResponse:
        call = current_call()
        upload = self.service.open_upload(call.identity)
        try:
            async for msg in request_iterator:
                batch = serde.cut_batch_from_proto(msg)
                # Checked now, committed in groups: durable before the answer, memory bounded.
                await asyncio.to_thread(upload.add, batch)
            result = await asyncio.to_thread(upload.finish)
        except Exception as exc:
            call.counts.update(accepted=upload.accepted, rejected=len(upload.rejections))
            await _abort(context, exc)
        call.counts.update(
            accepted=result.accepted, duplicate=result.duplicate, rejected=result.rejected
        )
        return serde.upload_result_to_proto(result)

    async def Upload(
        self,
        request_iterator: AsyncIterator[pb.UploadCutsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.UploadAck]:
        call = current_call()
        upload = self.service.open_upload(call.identity)
        index = 0
        try:
            async for msg in request_iterator:
                batch = serde.cut_batch_from_proto(msg)
                # Durable before it is acknowledged and before the next message is read.
                ack = await asyncio.to_thread(upload.acknowledge, index, batch)
                yield serde.upload_ack_to_proto(ack)
                index += 1
            await asyncio.to_thread(upload.finish)  # totals for the counters and the log
        except Exception as exc:
            await _abort(context, exc)
        finally:
            call.counts.update(
                messages=index,
                accepted=upload.accepted,
                duplicate=upload.duplicate,
                rejected=len(upload.rejections),
            )

    async def Synthesize(
        self, request: pb.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SynthesizeChunk]:
        call = current_call()
        sent = 0
        try:
            req = serde.synthesis_request_from_proto(request)
            call.counts["n"] = req.n
            async for chunk in self.service.synthesize(req, call.identity):
                yield serde.synthesis_chunk_to_proto(chunk)
                sent += chunk.samples.shape[0]
        except Exception as exc:
            await _abort(context, exc)
        finally:
            call.counts["sent"] = sent

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatusResponse:
        caller = current_call().identity
        return await self._call(context, lambda: serde.status_to_proto(self.service.status(caller)))

    async def Forget(
        self, request: pb.ForgetRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForgetResponse:
        call = current_call()

        def forget() -> pb.ForgetResponse:
            result = self.service.forget(serde.forget_request_from_proto(request), call.identity)
            call.counts["deleted"] = result.deleted
            return serde.forget_result_to_proto(result)

        return await self._call(context, forget)
