"""`collafuse config show`: the effective configuration and where each value came from."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from collafuse.common.config import (
    ClientConfig,
    ServerConfig,
    config_toml,
    load_config_layers,
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `collafuse config`."""
    c = sub.add_parser("config", help="inspect configurations")
    csub = c.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser(
        "show",
        help="print the effective config as TOML, each value commented with its origin "
        "(default < file < env < flag)",
    )
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("--server", action="store_true", help="a ServerConfig (collafuse server)")
    which.add_argument("--client", action="store_true", help="a ClientConfig (collafuse client)")
    show.add_argument("--config", type=Path, help="TOML file, as given to the server or client")
    show.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override, as given to the server or client (repeatable)",
    )
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    """Print the config that `collafuse server` or `collafuse client` would run with."""
    model = ServerConfig if args.server else ClientConfig
    loaded = load_config_layers(model, args.config, args.set, env=os.environ)
    print(config_toml(loaded), end="")
    return 0
