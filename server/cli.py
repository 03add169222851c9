"""`collafuse server` and `collafuse status`: start a server, read a server's status."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import tomllib
from pathlib import Path
from types import FrameType

from collafuse.common.config import ConfigError, ServerConfig, load_config
from collafuse.server.app import start_server

log = logging.getLogger("collafuse.server")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the server's subcommands."""
    p = sub.add_parser("server", help="run the CollaFuse server (ingest, training, synthesis)")
    p.add_argument("--config", type=Path, help="TOML file with a ServerConfig")
    p.add_argument("--data-dir", type=Path, help="where the pool and checkpoints live")
    p.add_argument("--listen", help="HOST:PORT to listen on (port 0 picks a free port)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC (loopback only)")
    p.add_argument(
        "--allow-insecure-remote",
        action="store_true",
        help="with --insecure, also listen on a non-loopback address (private test networks)",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain of the server")
    p.add_argument("--tls-key", type=Path, help="PEM private key of the server (mode 0600)")
    p.add_argument(
        "--tls-client-ca", type=Path, help="CA certificate of the clients: require mutual TLS"
    )
    p.add_argument("--tls-revoked", type=Path, help="revoked-certificate list (pki revoke)")
    p.add_argument(
        "--start-over",
        action="store_true",
        help="train from step 0, moving the checkpoints and training record in "
        "DATA_DIR/checkpoints aside (for a lost or damaged checkpoint without a backup)",
    )
    p.add_argument(
        "--full-pool-check",
        action="store_true",
        help="check every page of the pool at start-up (PRAGMA integrity_check), not just quickly",
    )
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
    t.add_argument(
        "--expires", help="expiry as a TOML date-time, e.g. 2027-01-31T00:00:00Z (default: none)"
    )
    t.set_defaults(func=run_token)

    a = sub.add_parser("audit", help="check a server's audit log")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="recompute the hash chain of DATA_DIR/audit.log")
    v.add_argument("log", type=Path, help="the audit log, e.g. DATA_DIR/audit.log")
    v.set_defaults(func=run_audit_verify)


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
    if args.tls_client_ca is not None:
        overrides.append(f"tls_client_ca={str(args.tls_client_ca)!r}")
    if args.tls_revoked is not None:
        overrides.append(f"tls_revoked={str(args.tls_revoked)!r}")
    if args.allow_insecure_remote:
        overrides.append("allow_insecure_remote=true")
    return load_config(ServerConfig, args.config, overrides)


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then checkpoint and exit 0; SIGHUP reloads tokens."""
    config = server_config_from_args(args)
    os.umask(0o077)  # everything the server writes is private to its user
    running = start_server(config, start_over=args.start_over, pool_full_check=args.full_pool_check)
    print(f"collafuse server listening on {running.address}", flush=True)
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: running.auth.reload())
    done.wait()
    log.info("shutting down: writing a final checkpoint")
    running.stop()
    return 0


def run_token(args: argparse.Namespace) -> int:
    """Write a new token for the client and print the server-side line."""
    from collafuse.common.serde import check_client_id
    from collafuse.server.auth import hash_token, new_token

    check_client_id(args.client_id)
    if args.expires is not None:
        try:
            tomllib.loads(f"v = {args.expires}")
        except tomllib.TOMLDecodeError:
            raise ConfigError(
                f"--expires {args.expires!r} is not a TOML date-time such as 2027-01-31T00:00:00Z"
            ) from None
    token = new_token()
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    print(f"wrote the token for {args.client_id} to {args.out}; give that file to the client")
    print("add this to the server's auth_tokens file:")
    if args.expires is None:
        print(f'{args.client_id} = "{hash_token(token)}"')
    else:
        print(f'[{args.client_id}]\nhash = "{hash_token(token)}"\nexpires = {args.expires}')
    return 0


def run_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the audit log's chain is intact, 1 with the first broken line otherwise."""
    from collafuse.server.audit import verify_chain

    check = verify_chain(args.log)
    print(f"{args.log}: {'OK' if check.ok else 'BROKEN'}: {check.message}")
    return 0 if check.ok else 1
