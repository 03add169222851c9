"""Named wire limits and channel options, set identically on both ends."""

from __future__ import annotations

import json

# Hard cap on one gRPC message in either direction. Uploads and samples stream in chunks of
# about CHUNK_BYTES, so this only bounds a single image plus framing.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
MAX_IMAGE_ID_LENGTH = 128
MAX_IMAGE_PIXELS = 4 * 512 * 512

# Retries live in the channel's service config, not in hand-written loops: UNAVAILABLE on a
# unary call is retried with backoff (e.g. while a server restarts).
_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": "collafuse.v1.CollaFuse", "method": "Register"},
                {"service": "collafuse.v1.CollaFuse", "method": "GetStatus"},
            ],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def channel_options() -> list[tuple[str, object]]:
    """Options for client channels."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
        # Cloud load balancers drop idle TCP connections after a few minutes; ping first.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def server_options() -> list[tuple[str, object]]:
    """Options for the server."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
    ]
