"""`collafuse client ...`, `collafuse status` and `collafuse demo`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from collafuse.common.config import SAMPLERS, ClientConfig, load_config

log = logging.getLogger("collafuse.client")


def _sets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="TOML file with a ClientConfig")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set train.steps=100 (repeatable)",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the client-side subcommands."""
    client = sub.add_parser("client", help="run a client daemon or synthesize images")
    csub = client.add_subparsers(dest="client_command", required=True)

    run = csub.add_parser("run", help="register, upload cut images, train locally, stay connected")
    _sets(run)
    run.set_defaults(func=run_client)

    syn = csub.add_parser("synthesize", help="ask the server for x_t_cut and finish locally")
    _sets(syn)
    syn.add_argument("--n", type=int, default=64, help="number of images")
    syn.add_argument("--out", type=Path, required=True, help="directory for the PNG files")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--sampler", choices=SAMPLERS, help="default: synth.sampler")
    syn.add_argument("--server-steps", type=int, help="steps T..t_cut (0 = all)")
    syn.add_argument("--client-steps", type=int, help="steps t_cut..0 (0 = all)")
    syn.add_argument("--mixture", action="store_true", help="all clients' mixture")
    syn.set_defaults(func=run_synthesize)

    fg = csub.add_parser("forget", help="ask the server to delete this client's cut images")
    _sets(fg)
    fg.set_defaults(func=run_forget)

    st = csub.add_parser("status", help="this client's status and release ledger")
    _sets(st)
    st.set_defaults(func=run_client_status)

    ss = sub.add_parser("status", help="a server's status")
    ss.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    ss.add_argument("--insecure", action="store_true")
    ss.add_argument("--tls-ca", type=Path, help="CA certificate that signed the server's")
    ss.add_argument("--tls-cert", type=Path, help="your certificate (mutual TLS)")
    ss.add_argument("--tls-key", type=Path, help="your private key (mutual TLS)")
    ss.add_argument("--token-file", type=Path, help="a client token, for servers that need one")
    ss.set_defaults(func=run_server_status)

    from collafuse.client.demo import add_demo_command

    add_demo_command(sub)


def _client_config(args: argparse.Namespace) -> ClientConfig:
    # Defaults < config file < COLLAFUSE_CLIENT_* environment < --set.
    return load_config(ClientConfig, args.config, args.set, env=os.environ)


def run_client(args: argparse.Namespace) -> int:
    """Run the daemon until done or SIGTERM/SIGINT."""
    from collafuse.client.daemon import ClientDaemon

    config = _client_config(args)
    if config.threads:
        import torch  # here, not at the top: parsing the command line needs no torch

        torch.set_num_threads(config.threads)
    os.umask(0o077)  # everything the daemon writes is private to its user
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return ClientDaemon(config, stop).run()


def run_forget(args: argparse.Namespace) -> int:
    """Delete this client's cut images on the server and record the answer in the ledger."""
    from collafuse.client.daemon import ClientDaemon

    result = ClientDaemon(_client_config(args)).forget()
    print(
        f"the server deleted {result.deleted} cut images (receipt {result.receipt}); "
        + (
            f"model versions {result.trained_from_version} to {result.trained_to_version} were "
            "trained while they were in its pool and are not retrained"
            if result.trained_to_version
            else "no model version was trained on them"
        )
    )
    return 0


def run_synthesize(args: argparse.Namespace) -> int:
    """Write --n images and a grid to --out."""
    from collafuse.client.synth import synthesize, write_images

    config = _client_config(args)
    if config.threads:
        import torch  # here, not at the top: parsing the command line needs no torch

        torch.set_num_threads(config.threads)
    result = synthesize(
        config,
        args.n,
        seed=args.seed,
        sampler=args.sampler,
        server_steps=args.server_steps,
        client_steps=args.client_steps,
        mixture=True if args.mixture else None,
    )
    grid = write_images(result, args.out)
    print(
        f"wrote {args.n} images and {grid} (t_cut={result.t_cut}, server model version "
        f"{result.model_version}, server {result.server_seconds:.1f}s, client "
        f"{result.client_seconds:.1f}s)"
    )
    return 0


def run_client_status(args: argparse.Namespace) -> int:
    """Print status.json and the ledger summary."""
    from dataclasses import asdict

    from collafuse.client.daemon import state_paths
    from collafuse.client.ledger import Ledger

    config = _client_config(args)
    paths = state_paths(config)
    status = json.loads(paths["status"].read_text()) if paths["status"].exists() else {}
    ledger = Ledger(paths["ledger"])
    try:
        status["ledger"] = asdict(ledger.summary())
    finally:
        ledger.close()
    print(json.dumps(status, indent=2))
    return 0


def run_server_status(args: argparse.Namespace) -> int:
    """Print a server's status as JSON."""
    from dataclasses import asdict

    from collafuse.client.remote import Remote, open_channel, read_token

    remote = Remote(
        open_channel(
            args.server,
            args.insecure,
            args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=read_token(args.token_file),
        )
    )
    try:
        status = remote.status(timeout=10)
    finally:
        remote.close()
    out = asdict(status)
    out["schedule"] = {
        **status.schedule.config.model_dump(mode="json"),
        "hash": status.schedule.hash,
    }
    print(json.dumps(out, indent=2))
    return 0
