"""`collafuse pool ...`: check a server's pool file and salvage a damaged one.

Exit codes: 0 the pool is sound (check) or the new pool was written (salvage), 1 the pool is
damaged or salvage failed, 2 bad usage (no such file, --out exists).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from collafuse.common.config import ConfigError

if TYPE_CHECKING:
    from collafuse.server.pool import PoolCheck


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `collafuse pool` and its subcommands."""
    p = sub.add_parser("pool", help="check a server's pool of cut images, salvage a damaged one")
    psub = p.add_subparsers(dest="pool_command", required=True)

    c = psub.add_parser("check", help="check a pool file for damage (exit 1 when damaged)")
    c.add_argument("path", type=Path, help="the pool, e.g. DATA_DIR/pool.sqlite")
    c.add_argument(
        "--full",
        action="store_true",
        help="PRAGMA integrity_check (also checks every index; slower) instead of quick_check",
    )
    c.set_defaults(func=run_check)

    s = psub.add_parser(
        "salvage", help="copy every readable row of a damaged pool into a new pool file"
    )
    s.add_argument("path", type=Path, help="the damaged pool, e.g. DATA_DIR/pool.sqlite")
    s.add_argument("--out", type=Path, required=True, help="the new pool file (must not exist)")
    s.set_defaults(func=run_salvage)


def _report(check: PoolCheck) -> None:
    what = "integrity_check" if check.full else "quick_check"
    if check.ok:
        print(f"{check.path}: ok ({what})")
        return
    print(f"{check.path}: DAMAGED, {what} found {len(check.problems)} problem(s):")
    for line in check.problems:
        print(f"  {line}")


def run_check(args: argparse.Namespace) -> int:
    """Check the pool; exit 1 when it is damaged."""
    path: Path = args.path
    if not path.is_file():
        raise ConfigError(f"no pool file at {path}")
    from collafuse.server.pool import check_pool, salvage_command  # torch: not for --help

    check = check_pool(path, full=args.full)
    _report(check)
    if not check.ok:
        print(f"salvage what is readable: {salvage_command(path)}")
        return 1
    return 0


def run_salvage(args: argparse.Namespace) -> int:
    """Copy the readable rows, print the counts and how to put the new pool in place."""
    path: Path = args.path
    out: Path = args.out
    if not path.is_file():
        raise ConfigError(f"no pool file at {path}")
    try:
        from collafuse.server.pool import salvage_pool

        report = salvage_pool(path, out)
    except (FileExistsError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(f"copied {report.clients} clients and {report.cuts} cut images into {out}")
    print(
        f"skipped: {report.unreadable_clients} client and {report.unreadable_cuts} cut row ids "
        f"that could not be read, {report.malformed} rows with impossible contents, "
        f"{report.orphaned} cut images whose client was lost"
    )
    _report(report.check)
    if not report.check.ok:
        return 1
    print("to use it: stop the server, move the damaged pool and its side files out of the way,")
    print("then move the new pool in place (the old -wal file must not meet the new pool):")
    print(f"  mv {path} {path}.damaged")
    print(f"  mv {path}-wal {path}.damaged-wal 2>/dev/null; rm -f {path}-shm")
    print(f"  mv {out} {path}")
    print("client daemons that find fewer of their images than were acknowledged upload again")
    return 0
