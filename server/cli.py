"""`collafuse server` and `collafuse status`: start a server, read a server's status."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from collafuse.common.config import ServerConfig, load_config
from collafuse.server.app import start_server

log = logging.getLogger("collafuse.server")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the server's subcommands."""
    p = sub.add_parser("server", help="run the CollaFuse server (ingest, training, synthesis)")
    p.add_argument("--config", type=Path, help="TOML file with a ServerConfig")
    p.add_argument("--data-dir", type=Path, help="where the pool and checkpoints live")
    p.add_argument("--listen", help="HOST:PORT to listen on (port 0 picks a free port)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC (loopback/tests)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set train.batch_size=32 (repeatable)",
    )
    p.set_defaults(func=run_server)

    t = sub.add_parser("token", help="make a client token and the line for the server's token file")
    t.add_argument("client_id", help="the client the token is for")
    t.add_argument("--out", type=Path, required=True, help="file to write the token to (mode 0600)")
    t.set_defaults(func=run_token)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Config file, then --set overrides, then the dedicated flags."""
    overrides = list(args.set)
    if args.data_dir is not None:
        overrides.append(f"data_dir={str(args.data_dir)!r}")
    if args.listen is not None:
        overrides.append(f"listen={args.listen!r}")
    if args.insecure:
        overrides.append("insecure=true")
    if args.tls_cert is not None:
        overrides.append(f"tls_cert={str(args.tls_cert)!r}")
    if args.tls_key is not None:
        overrides.append(f"tls_key={str(args.tls_key)!r}")
    return load_config(ServerConfig, args.config, overrides)


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then checkpoint and exit 0."""
    config = server_config_from_args(args)
    running = start_server(config)
    print(f"collafuse server listening on {running.address}", flush=True)
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    done.wait()
    log.info("shutting down: writing a final checkpoint")
    running.stop()
    return 0


def run_token(args: argparse.Namespace) -> int:
    """Write a new token for the client and print the server-side line."""
    from collafuse.common.serde import check_client_id
    from collafuse.server.auth import hash_token, new_token

    check_client_id(args.client_id)
    token = new_token()
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    print(f"wrote the token for {args.client_id} to {args.out}; give that file to the client")
    print("add this line to the server's auth_tokens file:")
    print(f'{args.client_id} = "{hash_token(token)}"')
    return 0
