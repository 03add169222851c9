"""The `collafuse` command: dispatches to the server, client and demo subcommands.

Exit codes: 0 success, 1 runtime failure (the message says what failed), 2 bad usage or
configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from collafuse import __version__


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    from collafuse.client import cli as client_cli
    from collafuse.common import config_cli, export_cli, pki_cli
    from collafuse.common.obs import LOG_FORMAT_ENV, LOG_FORMATS
    from collafuse.experiments import cli as experiment_cli
    from collafuse.server import cli as server_cli
    from collafuse.server import pool_cli

    parser = argparse.ArgumentParser(prog="collafuse", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"collafuse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help=f"text lines, or one JSON object per line (default: ${LOG_FORMAT_ENV}, else text)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    server_cli.add_commands(sub)
    client_cli.add_commands(sub)
    experiment_cli.add_commands(sub)
    pki_cli.add_commands(sub)
    pool_cli.add_commands(sub)
    config_cli.add_commands(sub)
    export_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    import grpc

    from collafuse.common.config import ConfigError
    from collafuse.common.obs import LOG_FORMAT_ENV, LOG_FORMATS, configure_logging
    from collafuse.server.errors import StartupError

    args = build_parser().parse_args(argv)
    log_format = args.log_format or os.environ.get(LOG_FORMAT_ENV) or "text"
    if log_format not in LOG_FORMATS:
        print(
            f"collafuse: environment variable {LOG_FORMAT_ENV}={log_format!r} is not one of "
            f"{', '.join(LOG_FORMATS)}",
            file=sys.stderr,
        )
        return 2
    configure_logging(logging.DEBUG if args.verbose else logging.INFO, log_format)
    try:
        code: int = args.func(args)
    except (ConfigError, StartupError) as exc:
        # A server that cannot start as configured is a configuration error: the message says
        # what to change.
        print(f"collafuse: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as exc:
        # The server's own words, not the call object's repr.
        code = exc.code() if hasattr(exc, "code") else None
        name = code.name if code is not None else "ERROR"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"collafuse: the server answered {name}: {details}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.verbose:
            raise
        print(f"collafuse: error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
