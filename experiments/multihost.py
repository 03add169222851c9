"""`collafuse demo-multihost`: the demo across network namespaces on a shaped bridge (needs root).

One namespace per host (a server and N clients) plus one holding a Linux bridge, joined by veth
links with an Ethernet MTU. Each client's link is rate-limited both ways with `tc ... tbf`; a
relay on the server host holds every chunk for the configured one-way delay (so the kernel needs
no netem). Identities are provisioned as `collafuse pki` does, the server certificate naming the
server's bridge address. The server and every client daemon run as they would on separate
machines (`ip netns exec`); the demo then synthesizes for every client across its link and
writes a summary with the bytes that crossed each link. Every namespace is deleted on exit, and
leftovers of a crashed run with the same name are deleted at start.

Run as `python -m collafuse.experiments.multihost relay|watch|synth ...`, this module is also the
small helper processes the demo starts inside the namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from collafuse.common.config import ConfigError

if TYPE_CHECKING:
    from collafuse.client.demo import Proc

log = logging.getLogger("collafuse.experiments.multihost")

# The demo module pulls in torch and gRPC; it is imported inside the functions that need it so
# that the relay, a pure-asyncio process, starts in a fraction of a second.

MTU = 1500
"""Ethernet MTU on every veth: a veth defaults to 64 KiB, and tbf drops what exceeds its burst."""
SERVER_PORT = 50051
RELAY_PORT_BASE = 50100
"""The relay listens for client i on the server's address at RELAY_PORT_BASE + i."""
SHAPER_LATENCY_MS = 200
"""How long a packet may wait in a tbf queue before it is dropped (sets the queue length)."""
DEFAULT_NAME = "cfmh"
_NAME = re.compile(r"[a-z][a-z0-9]{0,9}")
_OWN_NETNS = re.compile(r"(sw|srv|probe|c\d+)")
RELAY_CHUNK = 64 * 1024
RELAY_QUEUE_CHUNKS = 64
"""Chunks waiting in the relay per direction, at most; then it stops reading (backpressure)."""
RELAY_CONNECT_TIMEOUT_S = 10.0
WATCH_EVERY_S = 2.0
STOP_GRACE_S = 30.0
"""How long a stopped process may take to exit (the server writes a final checkpoint)."""
COMMAND_TIMEOUT_S = 30.0


class NetworkError(RuntimeError):
    """An `ip` or `tc` command failed; the message names it and quotes its error."""


def _run(cmd: list[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a short command, return its stdout; NetworkError when it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"`{' '.join(cmd)}`: {exc}") from None
    if done.returncode != 0:
        raise NetworkError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


# ----- the network -------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One machine of the demo: its namespace, bridge address and link."""

    role: str
    """"server" or the client's id."""
    netns: str
    address: str
    port: str
    """Its link's end in the switch namespace, a port of the bridge."""
    rate_mbit: float | None
    """The link's rate each way; None leaves it unshaped."""


@dataclass(frozen=True)
class Topology:
    """The namespaces, addresses and links of one run."""

    name: str
    subnet: ipaddress.IPv4Network
    switch: str
    """The namespace holding the bridge."""
    server: Host
    clients: list[Host]
    delay_ms: float

    @property
    def hosts(self) -> list[Host]:
        """The server, then the clients."""
        return [self.server, *self.clients]

    def namespaces(self) -> list[str]:
        """Every namespace this run creates."""
        return [self.switch, *(h.netns for h in self.hosts)]

    def relay_address(self, i: int) -> str:
        """HOST:PORT that client i dials: the relay in front of the server."""
        return f"{self.server.address}:{RELAY_PORT_BASE + i}"


def check_name(name: str) -> str:
    """The namespace prefix: short, so that it is easy to recognise in `ip netns list`."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"--name {name!r}: use 1 to 10 lower-case letters and digits, starting with a letter"
        )
    return name


def plan(
    name: str, subnet: str, clients: int, rate: float, poor_rate: float, delay_ms: float
) -> Topology:
    """Addresses and link rates: server at the first address, client i at the (i+2)-th; the
    last client gets the poor link."""
    check_name(name)
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise ConfigError(f"--subnet {subnet!r}: {exc}") from None
    # Private only: the addresses exist inside the demo's namespaces, but a public range there
    # would still confuse anyone reading the logs.
    if not net.is_private:
        raise ConfigError(f"--subnet {subnet}: use a private range such as 10.77.0.0/24")
    if clients < 1:
        raise ConfigError("--clients must be at least 1")
    if net.num_addresses - 2 < clients + 1:
        raise ConfigError(f"--subnet {subnet} has too few addresses for {clients} clients")
    if not (rate > 0 and poor_rate > 0):
        raise ConfigError("--rate and --poor-rate must be positive (Mbit/s)")
    if not 0 <= delay_ms <= 10_000:
        raise ConfigError("--delay-ms must lie in 0..10000")
    hosts = list(net.hosts())
    server = Host("server", f"{name}-srv", str(hosts[0]), "srv", None)
    members = [
        Host(
            f"client-{i}",
            f"{name}-c{i}",
            str(hosts[1 + i]),
            f"c{i}",
            poor_rate if i == clients - 1 else rate,
        )
        for i in range(clients)
    ]
    return Topology(name, net, f"{name}-sw", server, members, delay_ms)


def _tbf(netns: str, dev: str, rate_mbit: float) -> list[str]:
    kbit = max(8, round(rate_mbit * 1000))
    # Ten full frames, or 10 ms at the rate: tbf needs a burst of at least one frame, and a
    # burst well above that keeps TCP from stalling on a token bucket that is always empty.
    burst = max(10 * MTU, kbit * 1000 // 8 // 100)
    return [
        "tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf",
        "rate", f"{kbit}kbit", "burst", str(burst), "latency", f"{SHAPER_LATENCY_MS}ms",
    ]  # fmt: skip


def build(topo: Topology) -> None:
    """Create the namespaces, the bridge, one veth link per host, addresses and shaping.

    Nothing is created in the namespace this process runs in: each link is made inside the
    switch namespace with its peer placed straight into the host's namespace.
    """
    for ns in topo.namespaces():
        _run(["ip", "netns", "add", ns])
    sw = topo.switch
    _run(["ip", "-n", sw, "link", "add", "br0", "mtu", str(MTU), "type", "bridge"])
    # No IPv6 link-local addresses: their neighbour discovery would show up in the byte counts.
    _run(["ip", "-n", sw, "link", "set", "br0", "addrgenmode", "none"])
    _run(["ip", "-n", sw, "link", "set", "br0", "up"])
    for host in topo.hosts:
        _run(
            ["ip", "-n", sw, "link", "add", host.port, "mtu", str(MTU), "type", "veth",
             "peer", "name", "eth0", "netns", host.netns, "mtu", str(MTU)]
        )  # fmt: skip
        _run(["ip", "-n", sw, "link", "set", host.port, "addrgenmode", "none"])
        _run(["ip", "-n", sw, "link", "set", host.port, "master", "br0", "up"])
        _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", host.netns, "link", "set", "eth0", "addrgenmode", "none"])
        _run(
            ["ip", "-n", host.netns, "addr", "add",
             f"{host.address}/{topo.subnet.prefixlen}", "dev", "eth0"]
        )  # fmt: skip
        _run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
        if host.rate_mbit is not None:
            _run(_tbf(host.netns, "eth0", host.rate_mbit))  # the host's uploads
            _run(_tbf(sw, host.port, host.rate_mbit))  # what the host downloads


def list_namespaces(name: str) -> list[str]:
    """The namespaces of runs named `name` that exist now (a running or a crashed one)."""
    out = _run(["ip", "-j", "netns", "list"]).strip()
    names = [str(e["name"]) for e in json.loads(out)] if out else []
    prefix = f"{name}-"
    return [n for n in names if n.startswith(prefix) and _OWN_NETNS.fullmatch(n[len(prefix) :])]


def _netns_pids(netns: str) -> list[int]:
    try:
        return [int(p) for p in _run(["ip", "netns", "pids", netns]).split()]
    except NetworkError:
        return []  # the namespace went away meanwhile


def teardown(name: str) -> list[str]:
    """Delete every namespace of runs named `name`, ending the processes still inside them.

    Those processes were started by this demo (an earlier run that crashed, or this run's
    children that did not stop); they get SIGTERM, then SIGKILL after a grace. Deleting a
    namespace deletes its links, and with them their peers. Returns the names deleted.
    """
    found = list_namespaces(name)
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = {pid for ns in found for pid in _netns_pids(ns)}
        for pid in pids:
            with suppress(ProcessLookupError):  # it exited meanwhile
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = {pid for ns in found for pid in _netns_pids(ns)}
        if not pids:
            break
    failed = []
    for ns in found:  # every one is tried, so that one failure leaves no others behind
        try:
            _run(["ip", "netns", "del", ns])
        except NetworkError as exc:
            failed.append(str(exc))
    if failed:
        raise NetworkError("; ".join(failed))
    return found


def missing_requirements(name: str = DEFAULT_NAME) -> str | None:
    """Why this machine cannot run the demo (root, `ip`, `tc`, namespaces, veth, bridge, tbf),
    or None. Builds and deletes a throw-away namespace `NAME-probe` to find out."""
    if os.geteuid() != 0:
        return "needs root (it creates network namespaces); run it with sudo"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian: apt-get install iproute2)"
    probe = f"{check_name(name)}-probe"
    try:
        if probe in list_namespaces(name):
            _run(["ip", "netns", "del", probe])
        _run(["ip", "netns", "add", probe])
        try:
            _run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"])
            _run(
                ["ip", "-n", probe, "link", "add", "v0", "mtu", str(MTU), "type", "veth",
                 "peer", "name", "v1", "mtu", str(MTU)]
            )  # fmt: skip
            _run(_tbf(probe, "v0", 1.0))
        finally:
            _run(["ip", "netns", "del", probe])
    except NetworkError as exc:
        return f"this machine cannot build the demo's network: {exc}"
    return None


@dataclass(frozen=True)
class LinkCounters:
    """What crossed one host's link, counted at the host's end.

    Bytes only: a veth counts offloaded segments of up to 64 KiB as one packet, so its packet
    counts say little about the frames on the link.
    """

    tx_bytes: int
    """Sent by the host (its uploads and requests)."""
    rx_bytes: int
    """Received by the host."""
    shaper_drops: int
    """Packets the rate limiter dropped, both directions (TCP sends them again)."""


def link_counters(topo: Topology, host: Host) -> LinkCounters:
    """The kernel's counters of the host's veth (`ip -s link`) and its tbf queues (`tc -s`)."""
    link = json.loads(_run(["ip", "-j", "-s", "-n", host.netns, "link", "show", "dev", "eth0"]))
    stats = link[0]["stats64"]
    drops = 0
    if host.rate_mbit is not None:
        for netns, dev in ((host.netns, "eth0"), (topo.switch, host.port)):
            qdiscs = json.loads(_run(["tc", "-j", "-s", "-n", netns, "qdisc", "show", "dev", dev]))
            drops += sum(int(q.get("drops", 0)) for q in qdiscs if q.get("kind") == "tbf")
    return LinkCounters(
        tx_bytes=int(stats["tx"]["bytes"]),
        rx_bytes=int(stats["rx"]["bytes"]),
        shaper_drops=drops,
    )


# ----- identities ----------------------------------------------------------------------------


def provision(out: Path, topo: Topology) -> dict[str, dict[str, str]]:
    """The demo's identities (`collafuse.client.demo.provision`), the server certificate naming
    the server's bridge address and each kit the address its client dials (its relay)."""
    from collafuse.client.demo import ADMIN
    from collafuse.client.demo import provision as provision_identities

    dials = {c.role: topo.relay_address(i) for i, c in enumerate(topo.clients)}
    dials[ADMIN] = f"{topo.server.address}:{SERVER_PORT}"
    return provision_identities(
        out,
        len(topo.clients),
        server_hosts=[topo.server.address],
        dials=dials,
        ca_name="CollaFuse multi-host demo CA",
    )


# ----- the demo ------------------------------------------------------------------------------


def add_multihost_command(sub: argparse._SubParsersAction) -> None:
    """Register `collafuse demo-multihost`."""
    p = sub.add_parser(
        "demo-multihost",
        help="the demo across network namespaces on a shaped bridge (root)",
        description="One network namespace per host joined by a bridge; each client's link is "
        "rate-limited (tc tbf) and delayed (a relay on the server host). Needs root. About 3 "
        "minutes on 2 CPU cores with the defaults.",
    )
    p.add_argument("--clients", type=int, default=3, help="number of client hosts")
    p.add_argument(
        "--subnet", default="10.77.0.0/24", help="private IPv4 range used inside the namespaces"
    )
    p.add_argument("--rate", type=float, default=20.0, help="each client link's Mbit/s, each way")
    p.add_argument(
        "--poor-rate", type=float, default=1.0, help="the last client's Mbit/s (the poor link)"
    )
    p.add_argument("--delay-ms", type=float, default=40.0, help="one-way delay of client links")
    p.add_argument(
        "--name",
        default=DEFAULT_NAME,
        help="prefix of the namespaces (NAME-srv, NAME-sw, NAME-c0, ...); leftovers of an "
        "earlier run with this name are deleted at start",
    )
    p.add_argument("--out", type=Path, default=Path("demo-multihost-out"), help="output directory")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo in --out (its files only)"
    )
    from collafuse.client.demo import add_size_arguments

    add_size_arguments(p, server_steps=300, client_steps=200, images_per_client=500, timeout=1800)
    p.set_defaults(func=run_multihost)


def _enter_parent_death_signal() -> None:
    # Runs in the child before exec: if the demo is killed outright, its children get SIGTERM
    # instead of serving on in a namespace nobody will delete until the next run.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn_in(netns: str, name: str, argv: list[str], log_dir: Path) -> Proc:
    """Start `python -m ARGV...` inside a namespace, output to LOG_DIR/NAME.log.

    `ip netns exec` replaces itself with the command, so the pid is the program's own. Children
    get their own session: Ctrl-C reaches the demo only, which stops them in order.
    """
    from collafuse.client.demo import Proc

    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as fh:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", *argv],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=_enter_parent_death_signal,  # the demo runs no threads of its own
        )
    return Proc(name, popen, log_path)


def _stop(procs: list[Proc]) -> None:
    """SIGTERM to every process still running, then SIGKILL to those that outlast the grace."""
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(timeout=10)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {}


def _wait_for_file(path: Path, proc: Proc, timeout: float, what: str, stop: _StopRequest) -> None:
    from collafuse.client.demo import DemoFailed, _check_alive

    deadline = time.monotonic() + timeout
    while not path.exists():  # bounded by the timeout
        stop.check()
        _check_alive([proc], set())
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what} did not start within {timeout:.0f}s")
        time.sleep(0.1)


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the demo cleans up and exits 130."""


class _StopRequest:
    """Records SIGINT and SIGTERM; the demo's waiting loops call check() between polls.

    The handler only records the signal: an exception raised from a handler can land inside
    a fork or a logging lock and be swallowed there, and the demo must stop at a point from
    which it can take the network down.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (only the main thread may)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Give SIGINT and SIGTERM back to whoever had them."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def check(self) -> None:
        """Raise _Interrupted once a signal arrived."""
        if self.signum:
            raise _Interrupted(f"stopped by {signal.Signals(self.signum).name}")


@dataclass(frozen=True)
class ClientReport:
    """One client host: its link, what it uploaded, how long that and its synthesis took."""

    client_id: str
    address: str
    rate_mbit: float
    delay_ms: float
    images: int
    t_cut: int
    bytes_uploaded: int
    """Cut-image payload, from the client's ledger."""
    upload_s: float
    upload_goodput_mbit: float
    local_train_s: float
    local_steps: int
    synthesis_samples: int
    synthesis_server_s: float
    """From the request to the last x_{t_cut} received: the server's chain plus the link."""
    synthesis_client_s: float
    link_after_training: LinkCounters
    link_total: LinkCounters
    grid: str


def _client_report(
    topo: Topology,
    i: int,
    out: Path,
    state: dict[str, Any],
    synth: dict[str, Any],
    after_training: LinkCounters,
    total: LinkCounters,
) -> ClientReport:
    from collafuse.client.ledger import Ledger

    host = topo.clients[i]
    ledger = Ledger(out / "clients" / host.role / "ledger.sqlite")
    try:
        released = ledger.summary().bytes_released
    finally:
        ledger.close()
    upload_s = float(state["upload_seconds"])
    return ClientReport(
        client_id=host.role,
        address=host.address,
        rate_mbit=host.rate_mbit or 0.0,
        delay_ms=topo.delay_ms,
        images=int(state["images"]),
        t_cut=int(state["t_cut"]),
        bytes_uploaded=released,
        upload_s=round(upload_s, 3),
        upload_goodput_mbit=round(released * 8 / upload_s / 1e6, 3) if upload_s > 0 else 0.0,
        local_train_s=round(float(state["train_seconds"]), 2),
        local_steps=int(state["train_step"]),
        synthesis_samples=int(synth["n"]),
        synthesis_server_s=round(float(synth["server_s"]), 3),
        synthesis_client_s=round(float(synth["client_s"]), 3),
        link_after_training=after_training,
        link_total=total,
        grid=str(synth["grid"]),
    )


def summary_markdown(s: dict[str, Any]) -> str:
    """The summary as a Markdown report with one table row per client link."""
    srv = s["server"]
    net = s["network"]
    lines = [
        "# CollaFuse multi-host demo summary",
        "",
        f"Network: {net['subnet']} on a bridge in namespace {net['switch']}; server "
        f"{net['server_address']} (namespace {net['server_netns']}), links MTU {net['mtu']}, "
        f"one-way delay {net['delay_ms']} ms on each client link (relay on the server host).",
        "",
        f"Server: {srv['model_parameters']:,} parameters on {srv['device']}, T={srv['T']}, "
        f"{srv['train_step']} training steps, model version {srv['model_version']}, final "
        f"bridge loss {srv['final_loss']}; its link sent {srv['link']['tx_bytes']:,} and "
        f"received {srv['link']['rx_bytes']:,} bytes.",
        "",
        "| client | address | Mbit/s | images | bytes uploaded | upload s | goodput Mbit/s"
        " | link bytes up | link bytes down | shaper drops | local train s | synth server+link s"
        " | synth client s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in s["clients"]:
        link = c["link_total"]
        lines.append(
            f"| {c['client_id']} | {c['address']} | {c['rate_mbit']:g} | {c['images']} | "
            f"{c['bytes_uploaded']:,} | {c['upload_s']} | {c['upload_goodput_mbit']} | "
            f"{link['tx_bytes']:,} | {link['rx_bytes']:,} | {link['shaper_drops']} | "
            f"{c['local_train_s']} | {c['synthesis_server_s']} | {c['synthesis_client_s']} |"
        )
    lines += [
        "",
        "Link bytes are the kernel's counters of each client's veth (`ip -s link`), headers and "
        "TLS included, for the whole run; `link_after_training` in summary.json holds them "
        "before synthesis.",
        "",
        "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in s["times_s"].items()),
        "",
    ]
    lines += [f"![{c['client_id']}](samples/{c['client_id']}/grid.png)" for c in s["clients"]]
    return "\n".join(lines) + "\n"


def _progress(
    server: dict[str, Any], max_steps: int, topo: Topology, states: list[dict[str, Any]]
) -> str:
    # The admin's watcher writes the server's status once it is up and has answered.
    srv = f"server step {server['train_step']}/{max_steps}" if server else "server starting"
    parts = [
        f"{host.role}: {st.get('phase', 'starting')} up {st.get('uploaded', 0)}/"
        f"{st.get('images', '?')} train {st.get('train_step', 0)}/{st.get('train_steps', '?')}"
        for host, st in zip(topo.clients, states, strict=True)
    ]
    return f"[{time.strftime('%H:%M:%S')}] {srv} | " + " | ".join(parts)


def _prepare_out(out: Path, overwrite: bool) -> None:
    earlier = [out / n for n in ("server", "clients", "samples", "logs", "pki", "synthesis")]
    if any(old.exists() for old in earlier):
        if not overwrite:
            raise ConfigError(
                f"{out} holds an earlier demo; choose another --out or pass --overwrite"
            )
        for old in earlier:
            shutil.rmtree(old, ignore_errors=True)
    for old in (
        out / n for n in ("summary.json", "summary.md", "server-status.json", "relay.json")
    ):
        old.unlink(missing_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)


def run_multihost(args: argparse.Namespace) -> int:
    """The whole demo; exit code 0 on success. The network is gone when it returns or raises."""
    topo = plan(args.name, args.subnet, args.clients, args.rate, args.poor_rate, args.delay_ms)
    for flag in ("server_steps", "client_steps", "samples", "timeout"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive")
    missing = missing_requirements(topo.name)
    if missing is not None:
        raise ConfigError(f"demo-multihost {missing}")
    out: Path = args.out.absolute()
    _prepare_out(out, args.overwrite)
    stop = _StopRequest()
    stop.install()
    procs: list[Proc] = []
    try:
        leftovers = teardown(topo.name)
        if leftovers:
            print(f"deleted the leftovers of an earlier run: {', '.join(leftovers)}")
        build(topo)
        return _run_demo(args, topo, out, procs, stop)
    finally:
        # Also after a failed build or a signal: whatever of the network exists goes.
        _stop(procs)
        gone = teardown(topo.name)
        print(f"deleted the demo's network: {', '.join(gone) or 'nothing left'}")
        stop.restore()


def _run_demo(
    args: argparse.Namespace, topo: Topology, out: Path, procs: list[Proc], stop: _StopRequest
) -> int:
    """Start every host's processes on the built network, wait, synthesize, summarise."""
    from collafuse.client.demo import ADMIN, DemoFailed, _check_alive, _client_status
    from collafuse.client.demo import write_configs as write_demo_configs

    t0 = time.monotonic()
    deadline = t0 + args.timeout
    logs = out / "logs"
    times: dict[str, float] = {}
    tls = provision(out, topo)
    server_toml, client_tomls = write_demo_configs(args, out, tls)
    rates = ", ".join(f"{c.role} {c.rate_mbit:g}" for c in topo.clients)
    print(
        f"CollaFuse multi-host demo: server {topo.server.address} + {len(topo.clients)} client "
        f"namespaces on {topo.subnet} (Mbit/s: {rates}; one-way delay {topo.delay_ms:g} ms; "
        f"mutual TLS); output in {out}"
    )
    server_listen = f"{topo.server.address}:{SERVER_PORT}"
    lifetime = str(args.timeout + 120)  # helpers end on their own should the demo vanish
    helper = "collafuse.experiments.multihost"

    # The server host: the relay in front of the server, the server, and the admin's watcher.
    relay_ready = out / "relay.json"
    argv = [helper, "relay", "--target", server_listen, "--delay-ms", str(topo.delay_ms),
            "--ready", str(relay_ready), "--max-seconds", lifetime]  # fmt: skip
    for i in range(len(topo.clients)):
        argv += ["--listen", topo.relay_address(i)]
    relay = _spawn_in(topo.server.netns, "relay", argv, logs)
    procs.append(relay)
    argv = ["collafuse", "server", "--config", str(server_toml),
            "--set", f"listen={server_listen!r}"]  # fmt: skip
    server = _spawn_in(topo.server.netns, "server", argv, logs)
    procs.append(server)
    status_file = out / "server-status.json"
    admin = tls[ADMIN]
    argv = [helper, "watch", "--server", server_listen, "--tls-ca", admin["tls_ca"],
            "--tls-cert", admin["tls_cert"], "--tls-key", admin["tls_key"],
            "--out", str(status_file), "--max-seconds", lifetime]  # fmt: skip
    watcher = _spawn_in(topo.server.netns, "status-watch", argv, logs)
    procs.append(watcher)
    _wait_for_file(relay_ready, relay, 60, "the relay", stop)

    # The client hosts: each daemon, and its synthesis, which loads (torch, its model) while
    # the others train and starts on a signal. Daemons that start before the server is up
    # redial with backoff, as they would on real machines.
    go = out / "synthesis" / "go"
    go.parent.mkdir(exist_ok=True)
    daemons: list[Proc] = []
    synths: list[Proc] = []
    for i, (host, path) in enumerate(zip(topo.clients, client_tomls, strict=True)):
        dial = topo.relay_address(i)
        argv = ["collafuse", "client", "run", "--config", str(path), "--set", f"server={dial!r}"]
        daemons.append(_spawn_in(host.netns, host.role, argv, logs))
        argv = [helper, "synth", "--config", str(path), "--server", dial,
                "--n", str(args.samples), "--seed", str(i), "--go", str(go),
                "--out", str(out / "samples" / host.role),
                "--result", str(out / "synthesis" / f"{host.role}.json"),
                "--max-seconds", lifetime]  # fmt: skip
        synths.append(_spawn_in(host.netns, f"synthesis-{host.role}", argv, logs))
    procs.extend(daemons + synths)
    may_exit = {p.name for p in daemons + synths}
    client_dirs = [out / "clients" / h.role for h in topo.clients]

    last_print = 0.0
    after_training: list[LinkCounters] | None = None
    while True:  # bounded by the deadline
        stop.check()
        _check_alive(procs, allow_exit_zero={d.name for d in daemons})
        states = [_client_status(d) for d in client_dirs]
        srv = _read_json(status_file)
        if "server_start_s" not in times and (
            _read_json(out / "server" / "server.json").get("pid") == server.popen.pid
        ):
            times["server_start_s"] = time.monotonic() - t0
            print(f"server listening on {server_listen} in {topo.server.netns}")
        if time.monotonic() - last_print > 5:
            print(_progress(srv, args.server_steps, topo, states), flush=True)
            last_print = time.monotonic()
        clients_done = all(d.popen.poll() == 0 for d in daemons) and all(
            s.get("phase") == "done" for s in states
        )
        if clients_done and after_training is None:
            times["clients_done_s"] = time.monotonic() - t0
            after_training = [link_counters(topo, h) for h in topo.clients]
        if after_training is not None and int(srv.get("model_version", 0)) >= args.server_steps:
            break
        if time.monotonic() > deadline:
            raise DemoFailed(f"the demo did not finish within {args.timeout:.0f}s")
        time.sleep(1.0)
    times["server_done_s"] = time.monotonic() - t0
    print(_progress(srv, args.server_steps, topo, states), flush=True)

    print(f"synthesizing {args.samples} images for each client across its link")
    started = time.monotonic()
    go.touch()
    while any(p.popen.poll() is None for p in synths):  # bounded by the deadline
        stop.check()
        _check_alive(procs, allow_exit_zero=may_exit)
        if time.monotonic() > deadline:
            raise DemoFailed(f"the demo did not finish within {args.timeout:.0f}s")
        time.sleep(0.2)
    _check_alive(procs, allow_exit_zero=may_exit)
    times["synthesis_s"] = time.monotonic() - started
    totals = [link_counters(topo, h) for h in topo.hosts]
    srv = _read_json(status_file)
    _stop([watcher, server, relay])
    times["total_s"] = time.monotonic() - t0

    reports = [
        _client_report(
            topo,
            i,
            out,
            states[i],
            _read_json(out / "synthesis" / f"{host.role}.json"),
            after_training[i],
            totals[1 + i],
        )
        for i, host in enumerate(topo.clients)
    ]
    summary = {
        "network": {
            "subnet": str(topo.subnet),
            "switch": topo.switch,
            "server_netns": topo.server.netns,
            "server_address": topo.server.address,
            "mtu": MTU,
            "delay_ms": topo.delay_ms,
            "client_netns": {c.role: c.netns for c in topo.clients},
        },
        "server": {
            "model_version": srv.get("model_version"),
            "train_step": srv.get("train_step"),
            "final_loss": srv.get("last_loss"),
            "model_parameters": srv.get("model_parameters", 0),
            "device": srv.get("device", "?"),
            "pool": srv.get("pools", {}),
            "T": srv.get("T"),
            "link": asdict(totals[0]),
        },
        "clients": [asdict(r) for r in reports],
        "times_s": {k: round(v, 1) for k, v in times.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = summary_markdown(summary)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


# ----- helper processes inside the namespaces ------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{text!r} is not HOST:PORT")
    return host, int(port)


async def _delayed_pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
) -> None:
    """Copy reader to writer, each chunk leaving delay_s after it arrived, order kept.

    A reader task timestamps chunks into a bounded queue, so the delay adds latency without
    capping throughput; a full queue stops the reading, and TCP pushes back on the sender.
    """
    loop = asyncio.get_running_loop()
    # None: the read failed (the peer reset); b"": the peer finished sending.
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(maxsize=RELAY_QUEUE_CHUNKS)

    async def receive() -> None:
        while True:  # ends at end of stream or a failed read
            try:
                data: bytes | None = await reader.read(RELAY_CHUNK)
            except OSError:
                data = None
            await queue.put((loop.time() + delay_s, data))
            if not data:
                return

    receiver = asyncio.create_task(receive())
    try:
        while True:  # ends with the stream, as receive() does
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if data is None:
                raise ConnectionResetError("the other side reset the connection")
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    finally:
        receiver.cancel()


async def _relay_connection(
    down_r: asyncio.StreamReader,
    down_w: asyncio.StreamWriter,
    *,
    target: tuple[str, int],
    delay_s: float,
) -> None:
    """One client connection: dial the target and pipe both ways with the delay."""
    try:
        up_r, up_w = await asyncio.wait_for(
            asyncio.open_connection(*target), RELAY_CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        log.warning("cannot reach %s:%d: %s", *target, exc)
        down_w.close()
        return
    pipes = [
        asyncio.create_task(_delayed_pipe(down_r, up_w, delay_s)),
        asyncio.create_task(_delayed_pipe(up_r, down_w, delay_s)),
    ]
    try:
        # Both directions end normally at end of stream; the first failure ends both.
        await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in pipes:
            task.cancel()
        for w in (up_w, down_w):
            w.close()


async def relay(
    listens: list[tuple[str, int]],
    target: tuple[str, int],
    delay_s: float,
    ready: Path,
    max_seconds: float,
) -> None:
    """Forward every listen address to target with delay_s each way, until SIGTERM or
    max_seconds; writes `ready` (JSON with the addresses) once every listener is bound."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    handler = partial(_relay_connection, target=target, delay_s=delay_s)
    servers = [await asyncio.start_server(handler, host, port) for host, port in listens]
    # The bound addresses, for callers that asked for port 0.
    bound = [s.sockets[0].getsockname()[:2] for s in servers]
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"listen": [f"{h}:{p}" for h, p in bound], "pid": os.getpid()}))
    os.replace(tmp, ready)
    log.info(
        "relaying %d addresses to %s:%d, %.0f ms each way", len(listens), *target, delay_s * 1e3
    )
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        log.info("relay ran its %.0f s; exiting", max_seconds)
    for s in servers:
        s.close()


def watch(
    server: str, tls_ca: Path, tls_cert: Path, tls_key: Path, out: Path, max_seconds: float
) -> int:
    """Write the server's GetStatus to `out` every few seconds (as the admin) until SIGTERM."""
    import grpc

    from collafuse.client.remote import Remote, open_channel

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    remote = Remote(open_channel(server, False, tls_ca, tls_cert=tls_cert, tls_key=tls_key))
    deadline = time.monotonic() + max_seconds
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                st = remote.status(timeout=10)
            except grpc.RpcError as exc:
                log.warning("status: %s", exc.code())
            else:
                record = {
                    "model_version": st.model_version,
                    "train_step": st.train_step,
                    "last_loss": round(st.last_loss, 4) if math.isfinite(st.last_loss) else None,
                    "device": st.device,
                    "model_parameters": st.model_parameters,
                    "trainer_state": st.trainer_state,
                    "pools": {p.client_id: p.num_images for p in st.pools},
                    "T": st.schedule.config.num_timesteps,
                    "requests_served": st.requests_served,
                    "at": time.time(),
                }
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(record))
                os.replace(tmp, out)
            stop.wait(WATCH_EVERY_S)
    finally:
        remote.close()
    return 0


def synth(
    config_path: Path,
    server: str,
    n: int,
    seed: int,
    go: Path,
    out: Path,
    result: Path,
    max_seconds: float,
) -> int:
    """Once `go` exists, synthesize n images as this client across its link; write the images
    and a JSON result. Exit 1 when `go` does not appear within max_seconds."""
    import torch

    from collafuse.client.synth import synthesize, write_images
    from collafuse.common.config import ClientConfig, load_config

    config = load_config(ClientConfig, config_path, [f"server={server!r}"])
    if config.threads:
        torch.set_num_threads(config.threads)
    deadline = time.monotonic() + max_seconds
    while not go.exists():  # bounded by max_seconds
        if time.monotonic() > deadline:
            log.error("%s did not appear within %.0f s", go, max_seconds)
            return 1
        time.sleep(0.2)
    started = time.perf_counter()
    res = synthesize(config, n, seed=seed)
    grid = write_images(res, out)
    record = {
        "client_id": config.client_id,
        "n": n,
        "t_cut": res.t_cut,
        "model_version": res.model_version,
        "server_s": res.server_seconds,
        "client_s": res.client_seconds,
        "wall_s": time.perf_counter() - started,
        "grid": str(grid),
    }
    result.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The helper processes: `relay`, `watch` and `synth`."""
    p = argparse.ArgumentParser(prog="python -m collafuse.experiments.multihost")
    sub = p.add_subparsers(dest="helper", required=True)
    r = sub.add_parser("relay", help="TCP relay that delays each chunk")
    r.add_argument("--listen", action="append", required=True, help="HOST:PORT (repeatable)")
    r.add_argument("--target", required=True, help="HOST:PORT to forward to")
    r.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    r.add_argument("--ready", type=Path, required=True, help="written once listening")
    r.add_argument("--max-seconds", type=float, required=True, help="exit after this long")
    w = sub.add_parser("watch", help="poll the server's status into a JSON file")
    w.add_argument("--server", required=True)
    w.add_argument("--tls-ca", type=Path, required=True)
    w.add_argument("--tls-cert", type=Path, required=True)
    w.add_argument("--tls-key", type=Path, required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--max-seconds", type=float, required=True, help="exit after this long")
    s = sub.add_parser("synth", help="synthesize as one client and write a JSON result")
    s.add_argument("--config", type=Path, required=True)
    s.add_argument("--server", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--go", type=Path, required=True, help="start once this file exists")
    s.add_argument("--max-seconds", type=float, required=True, help="wait this long at most")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.helper == "relay":
        listens = [_host_port(a) for a in args.listen]
        delay_s = args.delay_ms / 1000.0
        asyncio.run(relay(listens, _host_port(args.target), delay_s, args.ready, args.max_seconds))
        return 0
    if args.helper == "watch":
        return watch(
            args.server, args.tls_ca, args.tls_cert, args.tls_key, args.out, args.max_seconds
        )
    return synth(
        args.config,
        args.server,
        args.n,
        args.seed,
        args.go,
        args.out,
        args.result,
        args.max_seconds,
    )


if __name__ == "__main__":
    sys.exit(main())
