"""Prometheus metrics of a client daemon, read from its status when scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collafuse import __version__

if TYPE_CHECKING:
    from collafuse.client.daemon import ClientStatus

# Every phase the daemon reports, so a dashboard sees each series from the start (0 or 1).
PHASES = (
    "starting",
    "registered",
    "uploading",
    "training",
    "idle",
    "done",
    "refused",
    "stopped",
)


class ClientCollector(Collector):
    """The daemon's status (the same numbers as status.json) as metrics."""

    def __init__(self, status: ClientStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status
        phase = GaugeMetricFamily(
            "collafuse_client_phase", "1 for the phase the daemon is in", labels=["phase"]
        )
        for name in (*PHASES, *([s.phase] if s.phase not in PHASES else [])):
            phase.add_metric([name], int(name == s.phase))
        yield phase
        yield CounterMetricFamily(
            "collafuse_client_released_bytes",
            "Bytes of cut images released to the server, per the ledger (after each upload)",
            value=s.bytes_released,
        )
        yield CounterMetricFamily(
            "collafuse_client_released_images",
            "Cut images the server has acknowledged (each released once, ever)",
            value=s.uploaded,
        )
        yield GaugeMetricFamily("collafuse_client_images", "Local images", value=s.images)
        yield GaugeMetricFamily(
            "collafuse_client_train_step", "Local training step", value=s.train_step
        )
        yield GaugeMetricFamily(
            "collafuse_client_train_steps", "Local training steps configured", value=s.train_steps
        )
        yield GaugeMetricFamily(
            "collafuse_client_train_last_loss",
            "Loss of the last local training step (NaN before the first)",
            value=s.last_loss,
        )
        yield CounterMetricFamily(
            "collafuse_client_reconnects",
            "Reconnections after the server was away",
            value=s.reconnects,
        )
        yield GaugeMetricFamily(
            "collafuse_client_t_cut",
            "This client's cut timestep (0 before registering)",
            value=s.t_cut,
        )
        yield GaugeMetricFamily(
            "collafuse_client_server_model_version",
            "The server's model version at the last check",
            value=s.server_model_version,
        )
        info = GaugeMetricFamily(
            "collafuse_build_info", "The running code version", labels=["version", "client_id"]
        )
        info.add_metric([__version__, s.client_id], 1)
        yield info


def client_registry(status: ClientStatus) -> CollectorRegistry:
    """A registry of the daemon's metrics and its process's."""
    registry = CollectorRegistry()
    registry.register(ClientCollector(status))
    ProcessCollector(registry=registry)  # CPU seconds, resident memory, open files
    return registry
