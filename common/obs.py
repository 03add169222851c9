"""Operations plumbing both sides share: the Prometheus /metrics endpoint and JSON log lines."""

from __future__ import annotations

import datetime
import json
import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

LOG_FORMATS = ("text", "json")
# The log format when no --log-format is given: `collafuse` reads it from the environment, so
# the processes that `collafuse demo` or a service manager starts log alike.
LOG_FORMAT_ENV = "COLLAFUSE_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP listener; stop() closes its socket."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """Where a scraper reads the metrics."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve `registry` on HOST:PORT (port 0 picks a free one) in a daemon thread."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    server, thread = start_http_server(int(port), addr=host, registry=registry)
    return MetricsEndpoint(host, int(server.server_port), server, thread)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and exception text if any.

    Log collectors (Loki, Elasticsearch, journald's JSON export) read these without a parsing
    rule, and a message that spans lines (a traceback) stays one record.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: int, log_format: str) -> None:
    """Log to stderr at `level`, as text lines or as JSON objects (LOG_FORMATS)."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level, handlers=[handler])
