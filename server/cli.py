"""`collafuse server` and `collafuse status`: start a server, read a server's status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import tomllib
from pathlib import Path
from types import FrameType

import grpc

from collafuse.common.config import (
    DEVICE_CHOICES,
    ConfigError,
    DeviceError,
    ServerConfig,
    load_config,
)
from collafuse.server.errors import StartupError

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
        "--device",
        metavar="DEVICE",
        help=f"where the model runs: {DEVICE_CHOICES} (default: the config's device, auto); "
        "cuda and cuda:N refuse to start without that GPU",
    )
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
    # Optional, so that `collafuse server --config ...` still starts a server.
    psub = p.add_subparsers(dest="server_command", metavar="{health}")
    h = psub.add_parser(
        "health",
        help="ask the server running on this machine whether it is SERVING (exit 0) or not "
        "(exit 1), over the transport its config names: a probe for containers",
    )
    h.add_argument("--config", type=Path, required=True, help="the server's TOML config")
    h.add_argument(
        "--tls-cert",
        type=Path,
        help="a certificate its CA issued (`collafuse pki issue`), needed under mutual TLS",
    )
    h.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (mode 0600)")
    h.add_argument(
        "--tls-ca",
        type=Path,
        help="CA certificate that signed the server's (default: the config's tls_client_ca)",
    )
    h.add_argument(
        "--service",
        default="",
        help="health entry to ask for: '' (the whole server, the default), "
        "collafuse.v1.CollaFuse, or collafuse.v1.Trainer (NOT_SERVING while training is down)",
    )
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    h.set_defaults(func=run_health)

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
    """Defaults < config file < COLLAFUSE_SERVER_* environment < --set < the dedicated flags.

    The flags become `--set` overrides with their values as TOML basic strings (json.dumps
    writes one), so a path keeps its backslashes and quotes exactly.
    """
    overrides = list(args.set)
    if args.data_dir is not None:
        overrides.append(f"data_dir={json.dumps(str(args.data_dir))}")
    if args.listen is not None:
        overrides.append(f"listen={json.dumps(args.listen)}")
    if args.insecure:
        overrides.append("insecure=true")
    if args.tls_cert is not None:
        overrides.append(f"tls_cert={json.dumps(str(args.tls_cert))}")
    if args.tls_key is not None:
        overrides.append(f"tls_key={json.dumps(str(args.tls_key))}")
    if args.tls_client_ca is not None:
        overrides.append(f"tls_client_ca={json.dumps(str(args.tls_client_ca))}")
    if args.tls_revoked is not None:
        overrides.append(f"tls_revoked={json.dumps(str(args.tls_revoked))}")
    if args.allow_insecure_remote:
        overrides.append("allow_insecure_remote=true")
    if args.device is not None:
        overrides.append(f"device={json.dumps(args.device)}")
    return load_config(ServerConfig, args.config, overrides, env=os.environ)


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then checkpoint and exit 0; SIGHUP reloads tokens."""
    config = server_config_from_args(args)
    os.umask(0o077)  # everything the server writes is private to its user
    try:
        from collafuse.server.app import start_server  # torch and the model: not for --help

        running = start_server(
            config, start_over=args.start_over, pool_full_check=args.full_pool_check
        )
    except DeviceError as exc:
        # The config names a GPU this machine cannot give: a refusal to start like the others.
        raise StartupError(str(exc)) from None
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


def run_health(args: argparse.Namespace) -> int:
    """Exit 0 when the local server's health service answers SERVING, 1 otherwise."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # The environment as well, as `collafuse server` reads it: the probe must dial the address
    # the server listens on.
    config = load_config(ServerConfig, args.config, env=os.environ)
    what = args.service or "the server"
    address = _local_address(config)
    if address is None:
        print(f"{what}: not running (no address file in {config.data_dir})")
        return 1
    channel = _health_channel(config, address, args)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        )
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "ERROR"
        print(f"{what} at {address}: {name}" + (f": {details}" if details else ""))
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{what} at {address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _local_address(config: ServerConfig) -> str | None:
    """Where a server with this config answers on this machine; None when it left no address.

    A wildcard listen address is dialled on loopback (as RunningServer.address does); for port
    0 the port is read from the address file the running server wrote into its data dir.
    """
    host, _, port = config.listen.rpartition(":")
    if port == "0":
        from collafuse.server.app import read_server_info

        try:
            return str(read_server_info(config.data_dir)["address"])
        except (OSError, ValueError, KeyError):
            return None
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _health_channel(config: ServerConfig, address: str, args: argparse.Namespace) -> grpc.Channel:
    """A channel over the transport the server's config names, with the probe's identity."""
    from collafuse.common.files import InsecureFileError, read_private_bytes

    if config.insecure:
        return grpc.insecure_channel(address)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if config.tls_client_ca is not None and args.tls_cert is None:
        # Mutual TLS ends the handshake before any call, the health check included.
        raise ConfigError(
            f"{args.config} requires client certificates (tls_client_ca), so the probe needs "
            "one: pass --tls-cert and --tls-key of an identity its CA issued "
            "(`collafuse pki issue probe ...`)"
        )
    if config.tls_cert is None:
        raise ConfigError(f"{args.config} names no tls_cert: the server serves TLS with one")
    ca = args.tls_ca or config.tls_client_ca
    try:
        roots = ca.read_bytes() if ca is not None else None
        cert = args.tls_cert.read_bytes() if args.tls_cert is not None else None
        key = read_private_bytes(args.tls_key, "TLS private key") if args.tls_key else None
    except InsecureFileError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS files: {exc}") from None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=cert
    )
    # The probe dials loopback, a name the server's certificate need not carry, so it checks
    # the name that certificate does carry; the chain is still verified against the CA.
    name = _certificate_name(config.tls_cert)
    return grpc.secure_channel(address, credentials, [("grpc.ssl_target_name_override", name)])


def _certificate_name(path: Path) -> str:
    """The first host a PEM certificate names: a DNS or IP subject alternative name, else its CN."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the server certificate {path}: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not names:
        raise ConfigError(f"the server certificate {path} names no host")
    return names[0]
