"""Prometheus metrics of a server: every call by method and code, and gauges read at scrape time.

Calls are counted where they happen (the gate, `server/interceptor.py`); everything else (pool
sizes, training step and loss, sampler counts, model version) is read from the live objects when
Prometheus scrapes, so the hot paths carry no metrics code and a value is never stale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collafuse import __version__

if TYPE_CHECKING:
    from collafuse.server.service import CollaFuseService

log = logging.getLogger("collafuse.server.metrics")

# Upload and Synthesize streams last minutes; unary calls milliseconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class RpcMetrics:
    """Per-call counters and latencies, fed by the gate as each call ends."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            "collafuse_rpc_handled",
            "Calls to the CollaFuse service that ended, by method and gRPC status code "
            "(refusals by the gate included)",
            ["method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "collafuse_rpc_handling_seconds",
            "Time from a call's arrival to its end, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "collafuse_rpc_in_flight",
            "Calls admitted by the gate and not yet ended, by method",
            ["method"],
            registry=registry,
        )

    def started(self, method: str) -> None:
        """A call passed the gate."""
        self.in_flight.labels(method).inc()

    def ended(self, method: str) -> None:
        """A call that passed the gate ended."""
        self.in_flight.labels(method).dec()

    def finished(self, method: str, code: str, seconds: float) -> None:
        """A call ended with this status code (OK, or a grpc.StatusCode name)."""
        self.handled.labels(method, code).inc()
        self.seconds.labels(method).observe(seconds)


class ServerCollector(Collector):
    """Reads the server's state when scraped: pool, trainer, sampler, request counters."""

    def __init__(self, service: CollaFuseService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        yield from self._pool()
        trainer = svc.trainer
        yield _gauge(
            "collafuse_model_version",
            "Version of the weights serving synthesis",
            trainer.hub.version,
        )
        yield _gauge("collafuse_train_step", "Training steps of the shared denoiser", trainer.step)
        yield _gauge(
            "collafuse_train_last_loss",
            "Bridge loss of the last training step (NaN before the first)",
            trainer.last_loss,
        )
        yield _counter(
            "collafuse_train_nonfinite_steps",
            "Training steps skipped or rolled "
            "back because the loss, gradients or weights were not finite",
            trainer.nonfinite_steps,
        )
        up = not trainer.state.startswith(("failed", "restarting"))
        yield _gauge(
            "collafuse_trainer_up",
            "1 while the trainer runs or waits for data, 0 while it is failed or restarting",
            int(up),
        )
        yield _counter(
            "collafuse_trainer_restarts", "Restarts of a failed trainer", trainer.restarts
        )
        data = trainer.data
        yield _gauge(
            "collafuse_train_pool_budget_bytes",
            "Memory the trainer may hold cut images in (train.pool_memory_mib)",
            data.memory_bytes,
        )
        yield _gauge(
            "collafuse_train_pool_resident_images",
            "Cut images the trainer holds in memory: the whole pool, or its current chunk",
            data.resident,
        )
        yield _gauge(
            "collafuse_train_pool_streaming",
            "1 once the pool outgrew the budget and is streamed from disk in chunks",
            int(data.streaming),
        )
        yield _counter(
            "collafuse_train_pool_chunks_loaded",
            "Chunks of the pool read from disk while streaming",
            data.chunks_loaded,
        )
        yield _counter(
            "collafuse_train_pool_late_chunks",
            "Times a chunk had been trained for its passes before the next one was read",
            data.late_swaps,
        )
        sampler = svc.sampler
        yield _counter(
            "collafuse_sampler_forward_calls",
            "Network calls of the synthesis sampler",
            sampler.forward_calls,
        )
        yield _counter(
            "collafuse_sampler_samples_stepped",
            "Samples advanced one step by the "
            "sampler; divided by forward_calls, the mean batch size",
            sampler.samples_stepped,
        )
        yield _gauge(
            "collafuse_sampler_max_batch",
            "Largest number of samples in one network call",
            sampler.max_batch,
        )
        yield _gauge(
            "collafuse_sampler_queue_depth",
            "Synthesis jobs waiting or running, as of the sampler's last step",
            sampler.queue_depth,
        )
        counters = svc.counters
        yield _counter(
            "collafuse_upload_images_accepted", "Cut images stored from uploads", counters.accepted
        )
        yield _counter(
            "collafuse_upload_images_rejected",
            "Cut images the upload guard refused",
            counters.rejected,
        )
        yield _counter(
            "collafuse_synthesis_samples", "Samples streamed to clients", counters.samples
        )
        yield _counter(
            "collafuse_malformed_requests",
            "Requests whose bytes were not a valid collafuse.v1 message",
            counters.malformed,
        )
        info = GaugeMetricFamily(
            "collafuse_build_info", "The running code version", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info

    def _pool(self) -> Iterator[Metric]:
        try:
            pools = self.service.pool.pools()
        except Exception:
            # A pool that cannot be read (disk trouble, shutting down) must not take every other
            # metric of the scrape with it; its absence is the signal.
            log.warning("metrics: cannot read the pool", exc_info=True)
            return
        per_client = GaugeMetricFamily(
            "collafuse_pool_client_images",
            "Cut images in the pool, per client",
            labels=["client_id"],
        )
        for p in pools:
            per_client.add_metric([p.client_id], p.num_images)
        yield per_client
        yield _gauge(
            "collafuse_pool_images",
            "Cut images in the pool, all clients",
            sum(p.num_images for p in pools),
        )
        yield _gauge("collafuse_pool_clients", "Registered clients", len(pools))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def server_registry(service: CollaFuseService) -> tuple[CollectorRegistry, RpcMetrics]:
    """A registry of its own per server (tests run several in one process), with its collectors."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(service))
    ProcessCollector(registry=registry)  # CPU seconds, resident memory, open files
    return registry, RpcMetrics(registry)
