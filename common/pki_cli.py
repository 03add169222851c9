"""`collafuse pki ...`: create a CA, issue client kits and server certificates, revoke."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from collafuse.common import pki
from collafuse.common.config import ConfigError


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `collafuse pki` and its subcommands."""
    p = sub.add_parser("pki", help="identities for mutual TLS: a CA, client kits, revocation")
    psub = p.add_subparsers(dest="pki_command", required=True)

    init = psub.add_parser("init", help="create a new CA (ca.crt, ca.key, revoked.txt)")
    init.add_argument("--ca-dir", type=Path, required=True, help="directory for the CA (0700)")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    init.set_defaults(func=run_init)

    issue = psub.add_parser("issue", help="write a client's startup kit (cert, key, config)")
    issue.add_argument("client_id", help="the client's id; it becomes the certificate's name")
    issue.add_argument("--ca-dir", type=Path, required=True, help="the CA's directory")
    issue.add_argument("--out", type=Path, required=True, help="new directory for the kit")
    issue.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    issue.add_argument(
        "--server",
        default="127.0.0.1:50051",
        help="HOST:PORT the client dials, written to its config (default 127.0.0.1:50051)",
    )
    issue.set_defaults(func=run_issue)

    srv = psub.add_parser("issue-server", help="write a server certificate and key")
    srv.add_argument("hosts", nargs="+", metavar="HOST", help="DNS names or IPs clients dial")
    srv.add_argument("--ca-dir", type=Path, required=True, help="the CA's directory")
    srv.add_argument("--out", type=Path, required=True, help="directory for server.crt/.key")
    srv.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    srv.set_defaults(func=run_issue_server)

    rev = psub.add_parser("revoke", help="add a certificate to the CA's denylist")
    rev.add_argument("cert", type=Path, help="the certificate to revoke (e.g. KIT/client.crt)")
    rev.add_argument("--ca-dir", type=Path, required=True, help="the CA's directory")
    rev.set_defaults(func=run_revoke)


def run_init(args: argparse.Namespace) -> int:
    """Create the CA and say what to do next."""
    try:
        files = pki.init_ca(args.ca_dir, days=args.days)
    except pki.PkiError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"wrote the CA certificate {files.cert}")
    print(f"wrote the CA key {files.key} (mode 0600; keep it offline, it signs every identity)")
    print(f"wrote the empty denylist {files.revoked}")
    print("next: issue the server's certificate and a kit per client:")
    print(f"  collafuse pki issue-server HOST --ca-dir {files.ca_dir} --out SERVER_DIR")
    print(f"  collafuse pki issue CLIENT_ID --ca-dir {files.ca_dir} --out KIT_DIR")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    """Write a client's startup kit and say how to hand it over."""
    try:
        kit = pki.issue_client(
            args.ca_dir, args.client_id, args.out, days=args.days, server_address=args.server
        )
    except pki.PkiError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"wrote the startup kit for {args.client_id} to {kit.out_dir}:")
    for path in (kit.ca_cert, kit.cert, kit.key, kit.config):
        print(f"  {path.name}")
    print(f"certificate fingerprint (sha256): {kit.fingerprint}")
    print(
        f"next: give {kit.out_dir} to the client (keep client.key private; the config names "
        f"absolute paths, so place the kit at the same path or edit client.toml); it runs "
        f"`collafuse client run --config {kit.config}` after adding its [data] section"
    )
    return 0


def run_issue_server(args: argparse.Namespace) -> int:
    """Write the server's certificate and say how to start the server with mutual TLS."""
    try:
        files = pki.issue_server(args.ca_dir, list(args.hosts), args.out, days=args.days)
    except pki.PkiError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"wrote {files.cert}, {files.key} (mode 0600) and {files.ca_cert} for {args.hosts}")
    settings = {
        "tls_cert": files.cert,
        "tls_key": files.key,
        "tls_client_ca": files.ca_cert,
        "tls_revoked": Path(args.ca_dir).absolute() / pki.REVOKED,
    }
    print("next: put these lines in the server's config to serve mutual TLS with this CA:")
    for key, path in settings.items():
        print(f"  {key} = {json.dumps(str(path), ensure_ascii=False)}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    """Add the certificate to the denylist and say how the server picks it up."""
    try:
        fp = pki.revoke(args.ca_dir, args.cert)
    except pki.PkiError as exc:
        raise ConfigError(str(exc)) from exc
    denylist = Path(args.ca_dir).absolute() / pki.REVOKED
    print(f"revoked {args.cert}: fingerprint {fp} is in {denylist}")
    print(
        "a server whose `tls_revoked` setting points at this file reloads it without a restart "
        "and refuses the certificate from then on; copy the file there if the server reads "
        "another copy"
    )
    return 0
