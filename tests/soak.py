"""`make soak`: the fault suite's slow scenarios outside pytest, with a table of figures.

Runs, against servers on 127.0.0.1 only:
  fuzz    N malformed requests to every method of collafuse.v1.CollaFuse;
  load    K client threads for D seconds (register, acked uploads, synthesis, status), then a
          server restart;
  faults  a server process killed (SIGKILL) during upload+training and during synthesis,
          stopped (SIGSTOP) during synthesis, terminated (SIGTERM) with half-open calls;
  loop    SIGKILL at random moments, several times, while a client uploads and synthesizes.
It prints what each scenario measured and every invariant with PASS or FAIL, and exits 0 only
when all hold (1 otherwise, 2 on bad usage). The scenario logic lives in tests/test_faults.py,
which the pytest suite runs at small sizes.

    .venv/bin/python tests/soak.py                      # the full soak: about 3 min (2 cores)
    .venv/bin/python tests/soak.py --only fuzz --fuzz 2000
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

# Run as a script from the repository root: make the test modules importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from test_faults import (
    FUZZ_RSS_BOUND_MIB,
    Check,
    FuzzReport,
    KillLoopReport,
    LoadReport,
    fault_kill_loop,
    run_fuzz,
    run_load,
    run_process_faults,
)

SCENARIOS = ("fuzz", "load", "faults", "loop")
"""In this order: the fuzz first, so its memory readings start from a fresh process."""


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    for n, row in enumerate(cells):
        print("  ".join(_cell(c, w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(text: str, width: int) -> str:
    """Numbers to the right, words to the left."""
    try:
        float(text.lstrip("+"))
    except ValueError:
        return text.ljust(width)
    return text.rjust(width)


def _by_method(counts: Counter[tuple[str, str]]) -> tuple[list[str], list[list[object]]]:
    """A method x status code table, with totals."""
    methods = sorted({m for m, _ in counts})
    codes = sorted({c for _, c in counts}, key=lambda c: (c != "OK", c))
    rows: list[list[object]] = []
    for m in methods:
        row: list[object] = [m, *(counts.get((m, c), 0) for c in codes)]
        rows.append([*row, sum(counts.get((m, c), 0) for c in codes)])
    rows.append(
        ["all", *(sum(counts.get((m, c), 0) for m in methods) for c in codes), sum(counts.values())]
    )
    return ["method", *codes, "total"], rows


def show_load(r: LoadReport) -> None:
    header, rows = _by_method(r.rpcs)
    calls = sum(r.rpcs.values())
    _table(
        f"Load: {r.clients} clients for {r.duration_s:g} s, RPCs by method and status ({calls / r.duration_s:.0f} calls/s)",
        header,
        rows,
    )
    _table(
        "Load: images acknowledged vs pooled",
        ["figure", "images"],
        [
            ["sum over acks of accepted + duplicate", r.ack_sum],
            ["distinct ids acknowledged", sum(r.acked.values())],
            ["distinct ids sent", sum(r.sent.values())],
            ["refused by the guard (honest cuts)", r.rejected],
            ["pooled at the end (Pool.count)", sum(r.pooled.values())],
            ["pooled at the end (GetStatus)", sum(r.pooled_status.values())],
            [
                f"pooled after restart (GetStatus; restart {r.restart_s:.1f} s)",
                sum(r.pooled_after_restart.values()),
            ],
        ],
    )


def show_fuzz(r: FuzzReport) -> None:
    header, rows = _by_method(r.codes)
    _table(f"Fuzz: {r.inputs} inputs in {r.seconds:.0f} s, by method and status", header, rows)
    _table(
        "Fuzz: inputs by kind (first message)",
        ["kind", "inputs"],
        r.kinds.most_common(),
    )
    trace = ", ".join(f"{n}: {mib:.1f}" for n, mib in r.rss_trace)
    _table(
        "Fuzz: memory and details",
        ["figure", "value"],
        [
            ["RSS at start (MiB)", f"{r.rss_start_mib:.1f}"],
            ["RSS after warm-up (MiB)", f"{r.rss_warm_mib:.1f}"],
            ["RSS at end (MiB)", f"{r.rss_end_mib:.1f}"],
            [
                "RSS growth after warm-up (MiB)",
                f"{r.rss_growth_mib:+.1f} (bound {FUZZ_RSS_BOUND_MIB:g})",
            ],
            ["RSS trace (inputs: MiB)", trace],
            ["longest error details (bytes)", r.max_details_bytes],
            [
                "undecodable requests counted by the server",
                "n/a" if r.malformed_counted is None else r.malformed_counted,
            ],
        ],
    )
    for example in r.bad_examples:
        print(f"  bad: {example}")


def show_loop(r: KillLoopReport) -> None:
    restarts = ", ".join(f"{s:.1f}" for s in r.restart_s)
    _table(
        f"SIGKILL loop: {r.rounds} kills",
        ["figure", "value"],
        [
            ["kills while an upload stream was open", r.kills_in_upload],
            ["kills while a synthesis was in flight", r.kills_in_synthesis],
            ["restart to first answer (s)", restarts],
            ["images acknowledged", r.images_acked],
            ["images pooled at the end", r.images_pooled],
            ["syntheses by status", dict(r.syntheses)],
        ],
    )


def _run(name: str, fn: Callable[[], list[Check]], checks: list[Check]) -> None:
    started = time.monotonic()
    print(f"\n# {name} ...", flush=True)
    try:
        got = fn()
    except Exception as exc:  # a scenario that breaks is a failed invariant, not a crash
        traceback.print_exc()
        got = [Check(name, "the scenario runs to the end", False, repr(exc)[:500])]
    checks += got
    failed = sum(not c.ok for c in got)
    print(
        f"# {name}: {len(got) - failed}/{len(got)} invariants hold ({time.monotonic() - started:.0f} s)",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=32, help="load: client threads (32)")
    p.add_argument("--duration", type=float, default=60.0, help="load: seconds (60)")
    p.add_argument("--fuzz", type=int, default=10_000, help="fuzz: inputs (10000)")
    p.add_argument("--kills", type=int, default=5, help="loop: SIGKILLs (5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", action="append", choices=SCENARIOS, help="run only these (repeatable)")
    p.add_argument("--keep", type=Path, help="keep data dirs and server logs under this folder")
    args = p.parse_args(argv)
    if min(args.clients, args.fuzz, args.kills) < 1 or args.duration <= 0:
        p.error("sizes must be positive")
    torch.set_num_threads(1)
    # The fuzz makes the server warn by design; errors (an INTERNAL is logged) still show.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    chosen = args.only or list(SCENARIOS)
    checks: list[Check] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="collafuse-soak-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"soak: {', '.join(chosen)}; data under {root}", flush=True)
        if "fuzz" in chosen:

            def fuzz() -> list[Check]:
                r = run_fuzz(root / "fuzz", args.fuzz, args.seed)
                show_fuzz(r)
                return r.checks

            _run(f"fuzz ({args.fuzz} inputs)", fuzz, checks)
        if "load" in chosen:

            def load() -> list[Check]:
                r = run_load(root / "load", args.clients, args.duration, args.seed)
                show_load(r)
                return r.checks

            _run(f"load ({args.clients} clients, {args.duration:g} s)", load, checks)
        if "faults" in chosen:
            _run("process faults", lambda: run_process_faults(root / "faults", slow=True), checks)
        if "loop" in chosen:

            def loop() -> list[Check]:
                r = fault_kill_loop(root / "loop", args.kills, args.seed)
                show_loop(r)
                return r.checks

            _run(f"SIGKILL loop ({args.kills} kills)", loop, checks)
    _table(
        "Invariants",
        ["scenario", "invariant", "result", "detail"],
        [[c.scenario, c.invariant, "PASS" if c.ok else "FAIL", c.detail[:160]] for c in checks],
    )
    failed = [c for c in checks if not c.ok]
    print(
        f"\nsoak: {len(checks) - len(failed)} of {len(checks)} invariants hold "
        f"({time.monotonic() - started:.0f} s): {'PASS' if not failed else 'FAIL'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
