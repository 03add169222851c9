"""The gate every call passes before a handler runs: identity, limits, audit.

Authentication happens here, before the request body is read: unary requests are served as
client streams (the wire format is the same), so the gate can identify the caller, count its
open calls and apply its rate limit first, and then wait for the body only as long as
`limits.idle_timeout_s`. The servicer sees the caller's Identity, never its credentials.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from collafuse.common.config import LimitsConfig
from collafuse.server.audit import AuditLog
from collafuse.server.auth import Authenticator, Identity
from collafuse.server.policy import PolicyError, Refusal

if TYPE_CHECKING:
    from collafuse.server.metrics import RpcMetrics
    from collafuse.server.service import Counters

log = logging.getLogger("collafuse.server.gate")

STATUS_CODES = {
    Refusal.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
# Probes (Kubernetes, load balancers) carry no client identity; health reveals nothing else.
_OPEN_SERVICES = ("/grpc.health.v1.Health/",)


@dataclass
class CallInfo:
    """What the gate knows about the current call; handlers add counts for the audit log."""

    identity: Identity
    rpc: str
    counts: dict[str, int | str] = field(default_factory=dict)


_CALL: contextvars.ContextVar[CallInfo] = contextvars.ContextVar("collafuse_call")


def current_call() -> CallInfo:
    """The gate's record of the call this handler serves."""
    return _CALL.get()


class _Undecodable:
    """Stands in for a request message whose bytes do not parse, so the gate can refuse it."""


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data) if deserializer is not None else data
        except Exception:
            return _Undecodable()

    return parse


class _Buckets:
    """Token buckets per caller: rate_per_s refill, rate_burst capacity."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> bool:
        now = time.monotonic()
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._state[key] = (tokens, now)
            return False
        self._state[key] = (tokens - 1.0, now)
        if len(self._state) > 100_000:  # forget idle callers rather than grow without bound
            self._state = {k: v for k, v in self._state.items() if now - v[1] < 60}
        return True


class Gate(grpc.aio.ServerInterceptor):
    """Identify, limit and audit every call to the CollaFuse service."""

    def __init__(
        self,
        auth: Authenticator,
        limits: LimitsConfig,
        audit: AuditLog | None,
        counters: Counters | None = None,
        metrics: RpcMetrics | None = None,
    ) -> None:
        self.auth = auth
        self.limits = limits
        self.audit = audit
        self._buckets = _Buckets(limits.rate_per_s, limits.rate_burst)
        self._streams: dict[str, int] = {}
        self.refused = 0
        """Calls refused before a handler ran (no identity)."""
        self.counters = counters
        self.metrics = metrics
        """Counts and times every call by method and outcome (the /metrics endpoint)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_OPEN_SERVICES):
            return handler
        rpc = method.rsplit("/", 1)[-1]
        parse = _tolerant(handler.request_deserializer)
        out = handler.response_serializer
        if handler.response_streaming:
            # Typed as Any: the stubs describe synchronous handlers, these are coroutines.
            inner_stream: Any = handler.unary_stream or handler.stream_stream
            client_streams = handler.request_streaming

            async def stream_out(requests: AsyncIterator[Any], ctx: Any) -> AsyncIterator[Any]:
                async with self._gate(rpc, ctx, streaming=True):
                    arg = self._timed(requests, ctx) if client_streams else None
                    if arg is None:
                        arg = await self._first(requests, ctx)
                    async for reply in inner_stream(arg, ctx):
                        yield reply

            return grpc.stream_stream_rpc_method_handler(stream_out, parse, out)
        inner: Any = handler.unary_unary or handler.stream_unary
        client_streams = handler.request_streaming

        async def unary_out(requests: AsyncIterator[Any], ctx: Any) -> Any:
            async with self._gate(rpc, ctx, streaming=client_streams):
                if client_streams:
                    return await inner(self._timed(requests, ctx), ctx)
                return await inner(await self._first(requests, ctx), ctx)

        return grpc.stream_unary_rpc_method_handler(unary_out, parse, out)

    # ----- the gate ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _gate(self, rpc: str, ctx: Any, streaming: bool) -> AsyncIterator[CallInfo]:
        started = time.monotonic()
        try:
            identity = self.auth.identify(ctx.auth_context(), ctx.invocation_metadata())
        except PolicyError as exc:
            self._record("?", rpc, STATUS_CODES[exc.kind].name, started, peer=ctx.peer())
            self.refused += 1
            await ctx.abort(STATUS_CODES[exc.kind], str(exc))
        who = identity.name or "anonymous"
        # Per-identity limits need identities: an unauthenticated (loopback) server has none,
        # and connections are no substitute (gRPC shares one among a process's channels), so
        # there only max_concurrent_rpcs and the idle deadline apply.
        key = identity.name
        if key is not None and not self._buckets.take(key):
            self._record(who, rpc, "RESOURCE_EXHAUSTED", started, limit="rate")
            await ctx.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{who} exceeds {self.limits.rate_per_s:g} calls/s (burst "
                f"{self.limits.rate_burst}; limits.rate_per_s); slow down and retry",
            )
        if streaming and key is not None:
            if self._streams.get(key, 0) >= self.limits.max_streams_per_client:
                self._record(who, rpc, "RESOURCE_EXHAUSTED", started, limit="streams")
                await ctx.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{who} already has {self.limits.max_streams_per_client} open streams "
                    "(limits.max_streams_per_client); wait for one to finish",
                )
            self._streams[key] = self._streams.get(key, 0) + 1
        call = CallInfo(identity, rpc)
        token = _CALL.set(call)
        if self.metrics is not None:
            self.metrics.started(rpc)
        verdict = "OK"
        try:
            yield call
        except grpc.aio.AbortError:
            code = ctx.code()
            verdict = code.name if isinstance(code, grpc.StatusCode) else "ABORTED"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            verdict = "CANCELLED"
            raise
        except BaseException:
            verdict = "INTERNAL"
            raise
        finally:
            _CALL.reset(token)
            if streaming and key is not None:
                self._streams[key] -= 1
                if not self._streams[key]:
                    del self._streams[key]
            if self.metrics is not None:
                self.metrics.ended(rpc)
            self._record(who, rpc, verdict, started, **call.counts)

    def _record(self, who: str, rpc: str, verdict: str, started: float, **fields: Any) -> None:
        """Every outcome of a call passes here once: the audit line and the call metrics."""
        seconds = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.finished(rpc, verdict, seconds)
        if self.audit is not None:
            self.audit.append(who, rpc, verdict, ms=round(1000 * seconds), **fields)

    async def _next(self, it: AsyncIterator[Any], ctx: Any) -> Any:
        """The next request message within the idle limit; StopAsyncIteration at the end."""
        try:
            msg = await asyncio.wait_for(it.__anext__(), self.limits.idle_timeout_s)
        except TimeoutError:
            await ctx.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"no request message for {self.limits.idle_timeout_s:g} s "
                "(limits.idle_timeout_s); the call was closed",
            )
        if isinstance(msg, _Undecodable):
            # Counted (GetStatus malformed_requests) rather than logged one by one.
            if self.counters is not None:
                self.counters.malformed += 1
            await ctx.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request is not a valid collafuse.v1 message; check the client version",
            )
        return msg

    async def _first(self, requests: AsyncIterator[Any], ctx: Any) -> Any:
        """The single message of a unary request."""
        try:
            return await self._next(requests.__aiter__(), ctx)
        except StopAsyncIteration:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")

    async def _timed(self, requests: AsyncIterator[Any], ctx: Any) -> AsyncIterator[Any]:
        """A request stream whose every message must arrive within the idle limit."""
        it = requests.__aiter__()
        while True:
            try:
                msg = await self._next(it, ctx)
            except StopAsyncIteration:
                return
            yield msg
