"""The fault suite: load, fuzz, and real server processes killed, stopped and terminated.

Every scenario is a plain function that returns its figures and its checks (invariant,
pass/fail, detail): the tests below assert the checks, `tests/soak.py` runs the slow sizes and
prints the figures. Everything talks to 127.0.0.1 only, every call carries a deadline, and every
loop is bounded in count and in time.

Invariants:
- load: no call ends INTERNAL or UNKNOWN, and every acknowledged image is in the pool, before
  and after a server restart;
- fuzz: malformed requests to every method get a deliberate status code (never INTERNAL or
  UNKNOWN), short error details, bounded memory growth, and the server keeps serving;
- processes: after SIGKILL during upload, training and synthesis, a restart on the same data
  dir holds every acknowledged image, resumes training at or after the last checkpoint and
  synthesizes; SIGSTOP only delays a synthesis; SIGTERM with half-open calls exits 0 within a
  bound and writes the final checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_integration import tiny_client_config, tiny_server_config

from collafuse.client.daemon import ClientDaemon
from collafuse.client.remote import CallDetails, Remote, RewriteCalls
from collafuse.client.synth import SynthesisResult, synthesize
from collafuse.common import serde
from collafuse.common.config import ClientConfig, ServerConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import (
    CutBatch,
    Registration,
    ServerStatus,
    SynthesisChunk,
    SynthesisRequest,
)
from collafuse.common.limits import channel_options
from collafuse.server.app import RunningServer, start_server
from collafuse.v1 import collafuse_pb2 as pb
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

R = TypeVar("R")
SERVICE = "collafuse.v1.CollaFuse"
IMAGE_SHAPE = (1, 8, 8)
CUT_RATIO = 0.4
CALL_DEADLINE_S = 30.0
"""No call of this suite waits longer, whatever deadline the code under test asks for."""
BAD_CODES = frozenset({"INTERNAL", "UNKNOWN"})
"""A status code that means the server did not handle what it was sent."""
FUZZ_ALLOWED = frozenset(
    {
        "OK",
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
    }
)
"""Deliberate answers to malformed input (OK for inputs that are valid by chance)."""
MAX_DETAILS_BYTES = 1024
"""Error details stay short whatever the request held (the servicer quotes <= 1000 chars)."""
FUZZ_RSS_BOUND_MIB = 32.0
"""Growth of resident memory (in-process server and fuzz client together) allowed after the
warm-up.

Why this bound: what the server legitimately keeps from one input is tiny, a pool row of a
valid-by-chance upload (two 8x8 float32 images, also held by the trainer) and an audit line,
which is on disk. Measured on this machine (2 cores, RSS read after gc and malloc_trim): RSS
grows by about 40 MiB during the warm-up (allocator arenas of the gRPC, sampler and fuzz
threads, SQLite's page cache, the sampler's first batches), then by 8 MiB over the 7,500 inputs
after the warm-up of a 10,000-input run, and by 9 MiB over 18,750 inputs of a 25,000-input run
(+2.6, +0.6, +4.5, +1.7 MiB per quarter: noise on a plateau, not a slope); tracemalloc saw the
Python heap grow by 31 KiB over 9,000 inputs. 32 MiB is four times the growth observed, and is
what a leak of about 4.4 KiB per call (a retained call, context or request) would add over the
7,500 inputs after the warm-up, so such a leak fails while allocator noise does not.
"""
FUZZ_WARMUP = 500
"""Inputs sent before the first memory reading (at least a quarter of them), so caches and
arenas have grown to size."""


# ----- checks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One invariant of one scenario, with what was measured."""

    scenario: str
    invariant: str
    ok: bool
    detail: str = ""


def check(checks: list[Check], scenario: str, invariant: str, ok: bool, detail: str = "") -> bool:
    checks.append(Check(scenario, invariant, bool(ok), detail))
    return bool(ok)


def assert_checks(checks: Sequence[Check]) -> None:
    failed = [c for c in checks if not c.ok]
    assert not failed, "\n".join(f"{c.scenario}: {c.invariant}: {c.detail}" for c in failed)


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.1) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


# ----- client side helpers --------------------------------------------------------------------


def _cap_deadline(seconds: float) -> RewriteCalls:
    """Caps every call's deadline, so the client's hour-long stream deadlines cannot hang a test."""

    def cap(d: CallDetails) -> CallDetails:
        return d._replace(timeout=seconds if d.timeout is None else min(d.timeout, seconds))

    return RewriteCalls(cap)


def raw_channel(address: str) -> grpc.Channel:
    """A plaintext loopback channel with its own connection (no shared subchannel pool)."""
    assert address.startswith("127.0.0.1:"), address
    options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    return grpc.insecure_channel(address, options=options)


def remote(address: str, deadline_s: float = CALL_DEADLINE_S) -> Remote:
    """The client's typed Remote on its own connection, every deadline capped."""
    return Remote(grpc.intercept_channel(raw_channel(address), _cap_deadline(deadline_s)))


def honest_cuts(diffusion: Diffusion, t_cut: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n cut images as an honest client makes them: x0 uniform in [-1, 1], fresh noise."""
    x0 = torch.rand((n, *IMAGE_SHAPE), generator=gen) * 2 - 1  # (n, 1, 8, 8)
    noise = torch.randn(x0.shape, generator=gen)
    return diffusion.q_sample(x0, torch.full((n,), t_cut), noise)


def rss_mib() -> float:
    """Resident memory of this process (VmRSS), MiB, after a garbage collection.

    glibc's free memory is handed back to the system first (malloc_trim), so the reading
    follows live memory rather than what the allocator happens to keep.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: only less precise
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def status_via(address: str, timeout: float = 3.0) -> ServerStatus | None:
    """GetStatus, or None when the server does not answer."""
    r = remote(address, timeout)
    try:
        return r.status(timeout=timeout)
    except grpc.RpcError:
        return None
    finally:
        r.close()


def is_serving(address: str) -> bool:
    channel = raw_channel(address)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
        )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def pools_of(status: ServerStatus | None) -> dict[str, int]:
    return {} if status is None else {p.client_id: p.num_images for p in status.pools}


def server_config(
    data_dir: Path,
    *,
    train: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    threads: int = 0,
) -> ServerConfig:
    """The tests' tiny server with a few fields changed."""
    base = tiny_server_config(data_dir, **(train or {})).model_dump(mode="json")
    base["threads"] = threads
    for key, extra in (("policy", policy), ("limits", limits)):
        if extra:
            base[key] = {**base[key], **extra}
    return ServerConfig.model_validate(base)


# ----- uploads with acknowledgements ----------------------------------------------------------


class Uploader:
    """One client uploading honest cut images in messages through `Remote.upload_acked`.

    Messages are made up front (ids `<client>/<m>/<k>`), sent `pace_s` apart, and the
    acknowledged ids recorded as the acks arrive. With `resume`, a broken stream is reopened
    at the first message not yet acknowledged, as the daemon does, up to `max_attempts` times.
    """

    def __init__(
        self,
        address: str,
        client_id: str,
        t_cut: int,
        diffusion: Diffusion,
        *,
        messages: int,
        per_message: int = 16,
        pace_s: float = 0.0,
        resume: bool = False,
        max_attempts: int = 1,
        seed: int = 0,
    ) -> None:
        self.address = address
        self.client_id = client_id
        gen = torch.Generator().manual_seed(seed)
        self.batches = [
            CutBatch(
                client_id,
                t_cut,
                [f"{client_id}/{m}/{k}" for k in range(per_message)],
                honest_cuts(diffusion, t_cut, per_message, gen),
            )
            for m in range(messages)
        ]
        self.pace_s = pace_s
        self.resume = resume
        self.max_attempts = max_attempts
        self.acked: list[str] = []
        """Ids acknowledged (accepted or duplicate), in order."""
        self.acked_messages = 0
        self.next_message = 0
        """First message not yet acknowledged."""
        self.sent = 0
        """Messages handed to gRPC (sent or about to be): an upper bound on what is stored."""
        self.rejected = 0
        self.codes: Counter[str] = Counter()
        """Status code of each stream."""
        self.protocol_errors: list[str] = []
        self.in_call = False
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"upload-{client_id}", daemon=True)

    @property
    def done(self) -> bool:
        return self.next_message >= len(self.batches)

    @property
    def sent_ids(self) -> int:
        return sum(len(b.image_ids) for b in self.batches[: self.sent])

    def start(self) -> Uploader:
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _messages(self, first: int) -> Iterator[CutBatch]:
        for m in range(first, len(self.batches)):
            if self.stop.is_set():
                return
            if self.pace_s and m > first:
                self.stop.wait(self.pace_s)
            self.sent = max(self.sent, m + 1)
            yield self.batches[m]

    def _run(self) -> None:
        r = remote(self.address)
        try:
            for _ in range(self.max_attempts):
                if self.done or self.stop.is_set():
                    return
                first = self.next_message
                self.in_call = True
                try:
                    for ack in r.upload_acked(self._messages(first)):
                        self._take(first, ack)
                    self.codes["OK"] += 1
                except grpc.RpcError as exc:
                    self.codes[exc.code().name] += 1
                finally:
                    self.in_call = False
                if not self.resume:
                    return
                self.stop.wait(0.3)
        finally:
            r.close()

    def _take(self, first: int, ack: Any) -> None:
        index = first + ack.message
        if index != self.next_message:
            self.protocol_errors.append(f"ack for message {index}, expected {self.next_message}")
            return
        batch = self.batches[index]
        refused = {image_id for image_id, _ in ack.rejections}
        kept = [i for i in batch.image_ids if i not in refused]
        if ack.accepted + ack.duplicate != len(kept) or ack.rejected != len(refused):
            self.protocol_errors.append(f"ack {ack} does not add up for {len(batch.image_ids)}")
        self.acked += kept
        self.rejected += len(refused)
        self.acked_messages += 1
        self.next_message = index + 1


def resend_acknowledged(address: str, uploader: Uploader) -> tuple[int, int, str]:
    """Send every fully acknowledged message again: (accepted, duplicate, status code).

    An image the server holds comes back as a duplicate, so duplicate == acknowledged and
    accepted == 0 prove, through the protocol, that each acknowledged image is in the pool.
    """
    batches = uploader.batches[: uploader.acked_messages]
    accepted = duplicate = 0
    r = remote(address, 60.0)
    try:
        for ack in r.upload_acked(iter(batches)):
            accepted += ack.accepted
            duplicate += ack.duplicate
        return accepted, duplicate, "OK"
    except grpc.RpcError as exc:
        return accepted, duplicate, exc.code().name
    finally:
        r.close()


# ----- 1. load --------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """Figures of one load run."""

    clients: int
    duration_s: float
    rpcs: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(method, status code) -> calls."""
    ack_sum: int = 0
    """Sum over all acks of accepted + duplicate (re-sent messages count again)."""
    acked: dict[str, int] = field(default_factory=dict)
    """Distinct ids acknowledged, per client."""
    sent: dict[str, int] = field(default_factory=dict)
    """Distinct ids handed to an upload stream, per client."""
    rejected: int = 0
    pooled: dict[str, int] = field(default_factory=dict)
    """Pool per client at the end (Pool.count), before the restart."""
    pooled_status: dict[str, int] = field(default_factory=dict)
    """The same read through GetStatus (a server without auth shows every pool)."""
    pooled_after_restart: dict[str, int] = field(default_factory=dict)
    restart_s: float = 0.0
    checks: list[Check] = field(default_factory=list)


@dataclass
class _LoadClient:
    """What one load thread saw."""

    client_id: str
    rpcs: Counter[tuple[str, str]] = field(default_factory=Counter)
    acked: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)
    ack_sum: int = 0
    rejected: int = 0
    protocol_errors: list[str] = field(default_factory=list)

    def call(self, method: str, fn: Callable[[], R]) -> R | None:
        try:
            result = fn()
        except grpc.RpcError as exc:
            self.rpcs[(method, exc.code().name)] += 1
            return None
        except Exception as exc:  # a broken answer: counted, reported, not raised
            self.rpcs[(method, f"client:{type(exc).__name__}")] += 1
            self.protocol_errors.append(f"{method}: {exc!r}")
            return None
        self.rpcs[(method, "OK")] += 1
        return result

    def upload(self, r: Remote, batches: list[CutBatch]) -> None:
        seen = 0
        try:
            for ack in r.upload_acked(iter(batches)):
                batch = batches[ack.message]
                self.sent.update(batch.image_ids)
                refused = {i for i, _ in ack.rejections}
                kept = [i for i in batch.image_ids if i not in refused]
                if ack.accepted + ack.duplicate != len(kept) or ack.rejected != len(refused):
                    self.protocol_errors.append(f"Upload: ack {ack} does not add up")
                self.acked.update(kept)
                self.ack_sum += ack.accepted + ack.duplicate
                self.rejected += len(refused)
                seen += 1
        except grpc.RpcError as exc:
            # Messages after the last ack may or may not be stored: count them as sent.
            for b in batches:
                self.sent.update(b.image_ids)
            self.rpcs[("Upload", exc.code().name)] += 1
            return
        if seen != len(batches):
            self.protocol_errors.append(f"Upload: {seen} acks for {len(batches)} messages")
        self.rpcs[("Upload", "OK")] += 1


def _chunks(r: Remote, req: SynthesisRequest) -> list[SynthesisChunk]:
    return list(r.synthesize(req))


def _load_client(
    address: str,
    out: _LoadClient,
    diffusion: Diffusion,
    stop_at: float,
    seed: int,
    max_rounds: int = 100_000,
) -> None:
    """Register, upload in several acked messages, synthesize, read status; until stop_at."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    r = remote(address)
    t_cut = 0
    previous: CutBatch | None = None
    try:
        for rnd in range(max_rounds):
            if time.monotonic() >= stop_at:
                return
            if not t_cut or rng.random() < 0.1:  # registering again is idempotent
                reg = Registration(out.client_id, IMAGE_SHAPE, CUT_RATIO)
                session = out.call("Register", functools.partial(r.register, reg))
                if session is None:
                    time.sleep(0.05)
                    continue
                t_cut = session.t_cut
            batches = [
                CutBatch(
                    out.client_id,
                    t_cut,
                    [f"{out.client_id}/{rnd}/{m}/{k}" for k in range(8)],
                    honest_cuts(diffusion, t_cut, 8, gen),
                )
                for m in range(rng.randint(2, 4))
            ]
            if previous is not None and rng.random() < 0.25:  # a message sent again
                batches.insert(rng.randrange(len(batches) + 1), previous)
            out.upload(r, batches)
            previous = batches[-1]
            n = rng.randint(1, 4)
            req = SynthesisRequest(out.client_id, n, seed=rnd, num_steps=3)
            chunks = out.call("Synthesize", functools.partial(_chunks, r, req))
            if chunks is not None:
                got = sum(int(c.samples.shape[0]) for c in chunks)
                if got != n or any(c.timestep != t_cut for c in chunks):
                    out.protocol_errors.append(f"Synthesize: {got} samples for n={n}")
            out.call("GetStatus", r.status)
    finally:
        r.close()


def run_load(data_dir: Path, clients: int, duration_s: float, seed: int = 0) -> LoadReport:
    """K client threads, each on its own connection, for duration_s; then restart the server."""
    report = LoadReport(clients, duration_s)
    name = f"load K={clients} D={duration_s:g}s"
    config = server_config(
        data_dir,
        train={"max_steps": 200, "checkpoint_every": 50},
        policy={"max_clients": max(16, clients)},
    )
    diffusion = Diffusion.from_config(config.schedule)
    running: RunningServer | None = start_server(config)
    try:
        assert running is not None
        outs = [_LoadClient(f"load-{i}") for i in range(clients)]
        stop_at = time.monotonic() + duration_s
        threads = [
            threading.Thread(
                target=_load_client,
                args=(running.address, outs[i], diffusion, stop_at, seed * 1000 + i),
                name=f"load-{i}",
                daemon=True,
            )
            for i in range(clients)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=max(0.0, stop_at - time.monotonic()) + 2 * CALL_DEADLINE_S)
        stuck = [th.name for th in threads if th.is_alive()]
        check(report.checks, name, "every client thread ends", not stuck, f"stuck: {stuck}")
        for o in outs:
            report.rpcs.update(o.rpcs)
            report.ack_sum += o.ack_sum
            report.acked[o.client_id] = len(o.acked)
            report.sent[o.client_id] = len(o.sent)
            report.rejected += o.rejected
        bad = {k: v for k, v in report.rpcs.items() if k[1] in BAD_CODES}
        check(report.checks, name, "no INTERNAL or UNKNOWN status", not bad, f"{bad}")
        errors = [e for o in outs for e in o.protocol_errors]
        check(report.checks, name, "answers match the requests", not errors, f"{errors[:5]}")
        idle = [o.client_id for o in outs if not o.acked]
        check(report.checks, name, "every client got uploads acknowledged", not idle, f"{idle}")

        report.pooled = {o.client_id: running.pool.count(o.client_id) for o in outs}
        report.pooled_status = pools_of(status_via(running.address, 10))
        _pool_checks(report, report.pooled, "before restart", name)
        check(
            report.checks,
            name,
            "GetStatus shows the same pools",
            all(report.pooled_status.get(c) == n for c, n in report.pooled.items()),
            f"status {sum(report.pooled_status.values())} vs pool {sum(report.pooled.values())}",
        )
        started = time.monotonic()
        running.stop()
        running = None
        running = start_server(config)
        report.restart_s = time.monotonic() - started
        report.pooled_after_restart = pools_of(status_via(running.address, 10))
        _pool_checks(report, report.pooled_after_restart, "after restart", name)
    finally:
        if running is not None:
            running.stop()
    return report


def _pool_checks(report: LoadReport, pooled: dict[str, int], when: str, name: str) -> None:
    short = {c: (a, pooled.get(c, 0)) for c, a in report.acked.items() if pooled.get(c, 0) < a}
    check(
        report.checks,
        name,
        f"every acknowledged image is in the pool {when}",
        not short,
        f"acked {sum(report.acked.values())}, pooled {sum(pooled.values())}; short: {short}",
    )
    extra = {
        c: (report.sent[c], pooled.get(c, 0))
        for c in report.sent
        if pooled.get(c, 0) > report.sent[c]
    }
    check(report.checks, name, f"the pool holds nothing unsent {when}", not extra, f"{extra}")


# ----- 2. fuzz --------------------------------------------------------------------------------


def _service_methods() -> tuple[tuple[str, str], ...]:
    """Every method of the service with its multicallable kind, read from the descriptor."""
    out = []
    for m in pb.DESCRIPTOR.services_by_name["CollaFuse"].methods:
        kind = {
            (False, False): "unary_unary",
            (True, False): "stream_unary",
            (False, True): "unary_stream",
            (True, True): "stream_stream",
        }[(m.client_streaming, m.server_streaming)]
        out.append((m.name, kind))
    return tuple(out)


FUZZ_METHODS = _service_methods()
"""(name, kind) for every RPC of collafuse.v1.CollaFuse, including any added later."""
FUZZ_CLIENT = "fuzz-0"
FUZZ_CALL_S = 15.0


@dataclass
class FuzzReport:
    """Figures of one fuzz run."""

    inputs: int
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(method, status code) -> inputs."""
    kinds: Counter[str] = field(default_factory=Counter)
    """Mutation kind -> inputs."""
    bad_examples: list[str] = field(default_factory=list)
    max_details_bytes: int = 0
    rss_start_mib: float = 0.0
    rss_warm_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_trace: list[tuple[int, float]] = field(default_factory=list)
    """(inputs sent, RSS MiB) after the warm-up and after each quarter of the rest."""
    malformed_counted: int | None = None
    """Requests the server counted as undecodable (GetStatus), where it reports them."""
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_end_mib - self.rss_warm_mib


def _seed_messages(diffusion: Diffusion, t_cut: int) -> dict[str, list[Message]]:
    """Valid requests for every method; the fuzz mutates their serialized bytes."""
    gen = torch.Generator().manual_seed(1)
    upload = pb.UploadCutsRequest(
        client_id=FUZZ_CLIENT,
        t_cut=t_cut,
        image_ids=["a", "b"],
        cuts=serde.tensor_to_proto(honest_cuts(diffusion, t_cut, 2, gen)),
    )
    half = pb.UploadCutsRequest()
    half.CopyFrom(upload)
    half.cuts.CopyFrom(serde.tensor_to_proto(honest_cuts(diffusion, t_cut, 2, gen), "float16"))
    half.image_ids[:] = ["c", "d"]
    seeds: dict[str, list[Message]] = {
        "Register": [
            pb.RegisterRequest(client_id=FUZZ_CLIENT, image_shape=[1, 8, 8], cut_ratio=CUT_RATIO),
            pb.RegisterRequest(
                client_id="fuzz-1",
                image_shape=[1, 8, 8],
                cut_ratio=0.6,
                exposure="fresh",
                schedule_hash=diffusion.hash,
                num_images=10,
            ),
        ],
        "UploadCuts": [upload, half],
        "Upload": [upload, half],
        "Synthesize": [
            pb.SynthesizeRequest(client_id=FUZZ_CLIENT, n=2, seed=3, num_steps=2),
            pb.SynthesizeRequest(
                client_id=FUZZ_CLIENT, n=3, seed=4, sampler=pb.SAMPLER_DDIM, num_steps=3, offset=1
            ),
        ],
        "GetStatus": [pb.GetStatusRequest()],
        "Forget": [pb.ForgetRequest(client_id="fuzz-victim")],
    }
    # A method added later is fuzzed from an empty message of its request type.
    for m in pb.DESCRIPTOR.services_by_name["CollaFuse"].methods:
        seeds.setdefault(m.name, [message_factory.GetMessageClass(m.input_type)()])
    return seeds


_EDGE_INTS = (0, 1, -1, 2, 7, 8, 64, 2**31 - 1, -(2**31))
_EDGE_INT64 = (*_EDGE_INTS, 2**62, 2**63 - 1, -(2**63))
_EDGE_UINT64 = (0, 1, 2**32, 2**63, 2**64 - 1)
_EDGE_DOUBLES = (0.0, -0.0, 0.5, 1.0, -1.0, 1e-300, 1e300, math.inf, -math.inf, math.nan)
_EDGE_STRINGS = (
    "",
    "a",
    "fuzz-0",
    "x" * 65,
    "y" * 5000,
    "\x00",
    "é" * 70,
    "../../etc/passwd",
    "float64",
    "float16",
)


def _edge_value(fd: FieldDescriptor, rng: random.Random) -> Any:
    t = fd.type
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_ENUM):
        return rng.choice((*_EDGE_INTS, 3, 99))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return rng.choice(_EDGE_INT64)
    if t == FieldDescriptor.TYPE_UINT64:
        return rng.choice(_EDGE_UINT64)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return rng.choice(_EDGE_DOUBLES)
    if t == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FieldDescriptor.TYPE_STRING:
        return rng.choice(_EDGE_STRINGS)
    if t == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice((0, 1, 3, 255, 256, 512, 4096)))
    if fd.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return rng.choice(_EDGE_DOUBLES)
    if fd.cpp_type in (FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64):
        return rng.choice((0, 1, 2**32 - 1))
    return rng.choice((0, 1, -1, 2**31 - 1))


def _structured(msg: Message, rng: random.Random, depth: int = 0) -> None:
    """Set one field (in place) to an edge value: still decodes, probes the checks behind."""
    fields: list[Any] = list(msg.DESCRIPTOR.fields)
    if not fields:
        return
    fd: FieldDescriptor = rng.choice(fields)
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        sub = getattr(msg, fd.name)
        if depth < 2 and rng.random() < 0.8:
            _structured(sub, rng, depth + 1)
        else:
            msg.ClearField(fd.name)
        return
    if fd.is_repeated:
        values = getattr(msg, fd.name)
        del values[:]
        count = rng.choice((0, 1, 2, 3, 4, 5, 100, 1000))
        if fd.type == FieldDescriptor.TYPE_STRING and count and rng.random() < 0.5:
            values.extend([rng.choice(("", "a", "z" * 200))] * count)
        else:
            values.extend(_edge_value(fd, rng) for _ in range(min(count, 100)))
        return
    setattr(msg, fd.name, _edge_value(fd, rng))


def _mutate_bytes(data: bytes, rng: random.Random, others: Sequence[bytes]) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = rng.choice(
        ("flip", "flip", "set", "insert", "delete", "truncate", "dup", "splice", "varint", "tag")
    )
    if kind == "flip" and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "set" and b:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    elif kind == "insert":
        at = rng.randint(0, len(b))
        b[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == "delete" and b:
        at = rng.randrange(len(b))
        del b[at : at + rng.randint(1, 64)]
    elif kind == "truncate" and b:
        del b[rng.randrange(len(b)) :]
    elif kind == "dup" and b:
        at = rng.randrange(len(b))
        b += b[at : at + rng.randint(1, 256)]
    elif kind == "splice":
        other = rng.choice(others)
        b = b[: rng.randint(0, len(b))] + other[rng.randint(0, len(other)) :]
    elif kind == "varint":  # an overlong or huge varint where one may be expected
        at = rng.randint(0, len(b))
        b[at:at] = bytes([0xFF] * rng.randint(1, 11)) + bytes([rng.choice((0x01, 0x7F))])
    elif kind == "tag":  # a field with an unknown number or a wrong wire type
        field_no = rng.choice((1, 2, 3, 4, 5, 15, 16, 999, 2**29 - 1))
        wire = rng.choice((0, 1, 2, 3, 4, 5, 6, 7))
        b += _varint(field_no << 3 | wire) + rng.randbytes(rng.randint(0, 12))
    return bytes(b), kind


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fuzz_payload(
    method: str, seeds: dict[str, list[Message]], rng: random.Random
) -> tuple[bytes, str]:
    """One malformed (or, by chance, valid) serialized request for `method`, and its kind."""
    mine = seeds[method]
    r = rng.random()
    if r < 0.25:
        size = rng.choice((0, 1, 2, 5, 16, 64, 256, 1024, 4096, rng.randint(0, 65536)))
        return rng.randbytes(size), "random"
    if r < 0.45:
        msg = type(mine[0])()
        msg.CopyFrom(rng.choice(mine))
        for _ in range(rng.randint(1, 3)):
            _structured(msg, rng)
        return msg.SerializeToString(), "structured"
    if r < 0.5:  # concatenation merges messages: valid bytes, odd content
        parts = [rng.choice(mine).SerializeToString() for _ in range(2)]
        return b"".join(parts), "concat"
    everything = [m.SerializeToString() for ms in seeds.values() for m in ms]
    if r < 0.55:  # another method's message
        return rng.choice(everything), "foreign"
    data = rng.choice(mine).SerializeToString()
    kinds = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        data, kind = _mutate_bytes(data, rng, everything)
        kinds.append(kind)
    return data, "bytes:" + kinds[0]


def _fuzz_call(multi: Any, kind: str, messages: list[bytes]) -> tuple[str, str]:
    """Send raw bytes through a multicallable; the final status code and details."""
    try:
        if kind == "unary_unary":
            multi(messages[0], timeout=FUZZ_CALL_S)
        elif kind == "stream_unary":
            multi(iter(messages), timeout=FUZZ_CALL_S)
        else:
            request = messages[0] if kind == "unary_stream" else iter(messages)
            call = multi(request, timeout=FUZZ_CALL_S)
            for count, _ in enumerate(call):
                if count >= 1000:  # bounded: no request here asks for more
                    call.cancel()
                    return "client:too-many-replies", ""
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def _fuzz_range(
    address: str,
    seeds: dict[str, list[Message]],
    indices: range,
    seed: int,
    report: FuzzReport,
    lock: threading.Lock,
) -> None:
    channel = raw_channel(address)
    paths = {name: f"/{SERVICE}/{name}" for name, _ in FUZZ_METHODS}
    # No serializers: the fuzz sends and receives raw bytes.
    multis = {name: getattr(channel, kind)(paths[name], None, None) for name, kind in FUZZ_METHODS}
    kinds = dict(FUZZ_METHODS)
    try:
        for i in indices:
            rng = random.Random(f"{seed}:{i}")
            name, kind = FUZZ_METHODS[i % len(FUZZ_METHODS)]
            count = 1
            if kind in ("stream_unary", "stream_stream"):
                count = rng.choice((0, 1, 1, 1, 2, 3))
            payloads = [fuzz_payload(name, seeds, rng) for _ in range(count)]
            messages = [p for p, _ in payloads]
            code, details = _fuzz_call(multis[name], kinds[name], messages)
            size = len(details.encode())
            with lock:
                report.codes[(name, code)] += 1
                report.kinds[payloads[0][1] if payloads else "empty-stream"] += 1
                report.max_details_bytes = max(report.max_details_bytes, size)
                if (code not in FUZZ_ALLOWED or size > MAX_DETAILS_BYTES) and len(
                    report.bad_examples
                ) < 20:
                    shown = [m[:120].hex() for m in messages]
                    report.bad_examples.append(
                        f"input {i} {name} -> {code} ({size} B details: {details[:200]!r}); "
                        f"messages (hex, first 120 bytes): {shown}"
                    )
    finally:
        channel.close()


def _malformed_requests(address: str) -> int | None:
    channel = raw_channel(address)
    try:
        reply = pb_grpc.CollaFuseStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
        value = getattr(reply, "malformed_requests", None)
        return None if value is None else int(value)
    except grpc.RpcError:
        return None
    finally:
        channel.close()


def run_fuzz(data_dir: Path, inputs: int, seed: int = 0, workers: int = 3) -> FuzzReport:
    """Send `inputs` malformed requests, round-robin over every method, to an in-process server."""
    report = FuzzReport(inputs)
    name = f"fuzz {inputs} inputs"
    # The trainer waits (min_pool) so the fuzz has the CPU; synthesis requests are kept small
    # (max_synthesize_n) so a valid-by-chance request costs milliseconds, not seconds.
    config = server_config(
        data_dir,
        train={"min_pool": 10**9},
        policy={"max_synthesize_n": 64, "max_clients": 1000},
    )
    diffusion = Diffusion.from_config(config.schedule)
    running = start_server(config)
    try:
        r = remote(running.address)
        session = r.register(Registration(FUZZ_CLIENT, IMAGE_SHAPE, CUT_RATIO))
        r.register(Registration("fuzz-victim", IMAGE_SHAPE, CUT_RATIO))
        seeds = _seed_messages(diffusion, session.t_cut)
        lock = threading.Lock()
        started = time.monotonic()
        gc.collect()
        report.rss_start_mib = rss_mib()

        def phase(lo: int, hi: int) -> None:
            step = max(1, math.ceil((hi - lo) / workers))
            threads = [
                threading.Thread(
                    target=_fuzz_range,
                    args=(running.address, seeds, range(a, min(a + step, hi)), seed, report, lock),
                    daemon=True,
                )
                for a in range(lo, hi, step)
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=30 + (hi - lo) * 2 * FUZZ_CALL_S / workers)

        warm = max(min(FUZZ_WARMUP, inputs // 2), inputs // 4)
        phase(0, warm)
        gc.collect()
        report.rss_warm_mib = rss_mib()
        report.rss_trace.append((warm, report.rss_warm_mib))
        quarter = max(1, math.ceil((inputs - warm) / 4))
        for lo in range(warm, inputs, quarter):
            phase(lo, min(lo + quarter, inputs))
            gc.collect()
            report.rss_trace.append((min(lo + quarter, inputs), rss_mib()))
        report.rss_end_mib = rss_mib()
        report.seconds = time.monotonic() - started
        report.malformed_counted = _malformed_requests(running.address)

        sent = sum(report.codes.values())
        check(
            report.checks, name, "every input got an answer", sent == inputs, f"{sent} of {inputs}"
        )
        bad = {k: v for k, v in report.codes.items() if k[1] in BAD_CODES}
        check(
            report.checks,
            name,
            "zero INTERNAL and zero UNKNOWN",
            not bad,
            f"{bad}; {report.bad_examples[:3]}",
        )
        other = {k: v for k, v in report.codes.items() if k[1] not in FUZZ_ALLOWED | BAD_CODES}
        check(report.checks, name, "only deliberate status codes", not other, f"{other}")
        check(
            report.checks,
            name,
            f"error details at most {MAX_DETAILS_BYTES} bytes",
            report.max_details_bytes <= MAX_DETAILS_BYTES,
            f"longest {report.max_details_bytes} bytes",
        )
        check(
            report.checks,
            name,
            f"RSS grows < {FUZZ_RSS_BOUND_MIB:g} MiB after warm-up",
            report.rss_growth_mib < FUZZ_RSS_BOUND_MIB,
            f"{report.rss_warm_mib:.1f} -> {report.rss_end_mib:.1f} MiB "
            f"({report.rss_growth_mib:+.1f} MiB over {inputs - warm} inputs)",
        )
        check(
            report.checks,
            name,
            "health reports SERVING after the fuzz",
            is_serving(running.address),
        )
        # A real client still gets real answers.
        ok = True
        detail = ""
        try:
            r.register(Registration("after-fuzz", IMAGE_SHAPE, CUT_RATIO))
            gen = torch.Generator().manual_seed(9)
            batch = CutBatch(
                "after-fuzz",
                session.t_cut,
                ["p", "q", "r"],
                honest_cuts(diffusion, session.t_cut, 3, gen),
            )
            acks = list(r.upload_acked([batch]))
            chunks = list(r.synthesize(SynthesisRequest("after-fuzz", 3, seed=1, num_steps=4)))
            got = sum(int(c.samples.shape[0]) for c in chunks)
            pooled = running.pool.count("after-fuzz")
            ok = len(acks) == 1 and acks[0].accepted == 3 and got == 3 and pooled == 3
            detail = f"acks {acks[:1]}, samples {got}, pooled {pooled}"
        except grpc.RpcError as exc:
            ok, detail = False, f"{exc.code().name}: {exc.details()}"
        check(report.checks, name, "a real client is served after the fuzz", ok, detail)
        r.close()
    finally:
        running.stop()
    return report


# ----- 3. real processes ----------------------------------------------------------------------

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
START_TIMEOUT_S = 120.0
TERM_BOUND_S = 20.0


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """A TOML document for a (JSON-mode) config dump: scalars first, then sub-tables."""
    lines = [f"[{prefix}]"] if prefix else []
    tables = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + "\n"
    for key, value in tables:
        out += _toml(value, f"{prefix}.{key}" if prefix else key)
    return out


def fault_server_config(data_dir: Path, **train: Any) -> ServerConfig:
    """The process server: one torch thread, a checkpoint every 5 steps, open-ended training."""
    return server_config(
        data_dir,
        train={"batch_size": 8, "checkpoint_every": 5, "publish_every": 5, **train},
        threads=1,
    )


class ServerProcess:
    """`collafuse server --config FILE` as a child process, restarted on the same port."""

    def __init__(self, root: Path, config: ServerConfig) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.toml = root / "server.toml"
        self.toml.write_text(_toml(config.model_dump(mode="json")))
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def checkpoint(self) -> Path:
        return self.data_dir / "checkpoints" / "server.pt"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Start (on the previous port after the first time); seconds until it answers."""
        started = time.monotonic()
        info = self.data_dir / "server.json"
        info.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "collafuse",
                    "server",
                    "--config",
                    str(self.toml),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=ENV,
            )
        self.starts += 1
        proc = self.proc

        def written() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {self.log_tail()}")
            try:
                data = json.loads(info.read_text())
            except (OSError, ValueError):
                return False
            return bool(data.get("pid") == proc.pid)

        assert wait_until(written, START_TIMEOUT_S, 0.2), f"no server.json: {self.log_tail()}"
        self.port = int(json.loads(info.read_text())["port"])
        answering = wait_until(lambda: status_via(self.address) is not None, 60, 0.2)
        assert answering, f"server does not answer: {self.log_tail()}"
        return time.monotonic() - started

    def status(self, timeout: float = 5.0) -> ServerStatus | None:
        return status_via(self.address, timeout)

    def train_step(self) -> int:
        """The training step GetStatus reports; -1 when the server does not answer."""
        st = self.status()
        return -1 if st is None else st.train_step

    def requests_served(self) -> int:
        st = self.status()
        return -1 if st is None else st.requests_served

    def send(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.send(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=30)

    def checkpoint_step(self) -> int | None:
        """The step of the checkpoint file on disk, None without one."""
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError, OSError):
            return None
        return int(state["step"])

    def resumed_steps(self) -> list[int]:
        """Steps the server's log says it resumed from, one per start that resumed."""
        return [int(m) for m in re.findall(r"resumed server model at step (\d+)", self.log_text())]

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def close(self) -> None:
        """Kill whatever is still running (test teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _register(address: str, client_id: str) -> int:
    r = remote(address)
    try:
        return r.register(Registration(client_id, IMAGE_SHAPE, CUT_RATIO)).t_cut
    finally:
        r.close()


def fault_kill_during_upload_and_training(
    server: ServerProcess, messages: int = 200, seed: int = 0
) -> list[Check]:
    """SIGKILL while a client uploads and the trainer trains; restart; check pool and step.

    The upload resumes afterwards from the first unacknowledged message, as the daemon does,
    and must then hold every image exactly once.
    """
    checks: list[Check] = []
    name = "SIGKILL during upload+training"
    diffusion = Diffusion.from_config(server.config.schedule)
    client_id = f"kill-{server.starts}-{seed}"
    t_cut = _register(server.address, client_id)
    up = Uploader(
        server.address, client_id, t_cut, diffusion, messages=messages, pace_s=0.03, seed=seed
    )
    up.start()
    base = server.checkpoint_step() or 0

    def mid_flight() -> bool:
        st = server.status()
        ckpt = server.checkpoint_step() or 0
        return (
            up.acked_messages >= 5 and st is not None and ckpt >= base + 5 and st.train_step > ckpt
        )

    ready = wait_until(mid_flight, 90, 0.2)
    before = server.status()
    during_upload = up.in_call and not up.done
    server.kill()
    saved = server.checkpoint_step()
    up.join(CALL_DEADLINE_S + 5)
    acked, sent = len(up.acked), up.sent_ids
    check(
        checks,
        name,
        "killed while uploading and training",
        ready and during_upload,
        f"acked {up.acked_messages}/{messages} messages, train step {before and before.train_step}, checkpoint {saved}",
    )
    check(
        checks,
        name,
        "the interrupted upload saw UNAVAILABLE",
        up.codes.get("UNAVAILABLE", 0) == 1,
        f"{dict(up.codes)}",
    )

    restart_s = server.start()
    after = server.status()
    pooled = pools_of(after).get(client_id, 0)
    check(
        checks,
        name,
        "acknowledged <= pooled <= sent after restart",
        acked <= pooled <= sent,
        f"acknowledged {acked}, pooled {pooled}, sent {sent} (restart {restart_s:.1f}s)",
    )
    accepted, duplicate, code = resend_acknowledged(server.address, up)
    check(
        checks,
        name,
        "every acknowledged image is in the pool (re-sent: all duplicate)",
        code == "OK" and accepted == 0 and duplicate == acked,
        f"re-sent {acked}: accepted {accepted}, duplicate {duplicate}, {code}",
    )
    step = after.train_step if after is not None else -1
    check(
        checks,
        name,
        "training resumes at or after the last checkpoint",
        saved is not None and step >= saved,
        f"checkpoint step {saved}, status train_step {step}",
    )
    resumed = server.resumed_steps()
    if resumed:
        check(
            checks,
            name,
            "the log's resume step is the checkpoint's",
            resumed[-1] == saved,
            f"log: resumed at {resumed[-1]}, file: {saved}",
        )
    moved = wait_until(lambda: server.train_step() > step, 60, 0.2)
    check(checks, name, "training continues after the restart", moved, f"from step {step}")

    # The rest of the upload, resumed where the acks stopped: every image exactly once.
    rest = Uploader(server.address, client_id, t_cut, diffusion, messages=messages, seed=seed)
    rest.next_message = rest.acked_messages = up.acked_messages
    rest.start()
    finished = rest.join(120)
    total = messages * len(up.batches[0].image_ids)
    final = pools_of(server.status()).get(client_id, 0)
    check(
        checks,
        name,
        "the resumed upload completes with every image once",
        finished and rest.done and final == total,
        f"pooled {final} of {total}, resumed stream {dict(rest.codes)}",
    )
    return checks


def prepare_client(server: ServerProcess, state_dir: Path, index: int = 0) -> ClientConfig:
    """A client daemon that uploads, trains its model and exits (for synthesize())."""
    config = tiny_client_config(state_dir, server.address, index)
    code = ClientDaemon(config).run()
    assert code == 0, f"client daemon exited {code}"
    return config


def _synth_thread(
    config: ClientConfig, n: int, seed: int
) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["result"] = synthesize(config, n, seed=seed, server_steps=0)
        except Exception as exc:  # reported by the checks
            out["error"] = repr(exc)
        out["seconds"] = time.monotonic() - started

    th = threading.Thread(target=run, name="synthesize", daemon=True)
    th.start()
    return th, out


def _synth_ok(out: dict[str, Any], n: int) -> tuple[bool, str]:
    result: SynthesisResult | None = out.get("result")
    if result is None:
        return False, f"error: {out.get('error', 'did not finish')}"
    images = result.images
    ok = tuple(images.shape) == (n, *IMAGE_SHAPE) and bool(torch.isfinite(images).all())
    return (
        ok,
        f"{tuple(images.shape)} in {out['seconds']:.1f}s, model version {result.model_version}",
    )


def _await_request(
    server: ServerProcess, th: threading.Thread, before: int, timeout: float = 30
) -> bool:
    """Wait until the server has counted a request after `before` while `th` still runs.

    No other client talks to the server meanwhile, so that request is the Synthesize call of
    `th`; True when it arrived and the synthesis is still going.
    """
    arrived = wait_until(
        lambda: server.requests_served() > before or not th.is_alive(), timeout, 0.05
    )
    return arrived and th.is_alive()


def _server_seconds(out: dict[str, Any]) -> float:
    """How long the client waited for the server's half of its synthesis."""
    result: SynthesisResult | None = out.get("result")
    return -1.0 if result is None else result.server_seconds


def fault_sigstop_during_synthesis(
    server: ServerProcess, client: ClientConfig, n: int = 128, stop_s: float = 3.0
) -> list[Check]:
    """SIGSTOP the server for stop_s while a client synthesizes, then SIGCONT.

    The client's wait for the server's half must span the stop: it started before SIGSTOP and
    ended after SIGCONT, so its server_seconds are at least stop_s.
    """
    checks: list[Check] = []
    name = "SIGSTOP during synthesis"
    before = server.requests_served()
    th, out = _synth_thread(client, n, seed=11)
    arrived = _await_request(server, th, before)
    server.send(signal.SIGSTOP)
    try:
        time.sleep(stop_s)
    finally:
        server.send(signal.SIGCONT)
    th.join(120)
    ok, detail = _synth_ok(out, n)
    waited = _server_seconds(out)
    check(checks, name, "stopped after the server received the request", arrived)
    check(
        checks,
        name,
        "the server's half spanned the stop",
        waited >= stop_s,
        f"client waited {waited:.1f}s for the server, stopped {stop_s:g}s",
    )
    check(checks, name, "the synthesis completes after SIGCONT", ok, detail)
    check(checks, name, "the server answers after SIGCONT", server.status() is not None)
    return checks


def fault_kill_during_synthesis(
    server: ServerProcess, client: ClientConfig, n: int = 256
) -> list[Check]:
    """SIGKILL while a client synthesizes; restart on the same port; the synthesis completes.

    The client (collafuse.client.synth.synthesize) waits for the server and resumes from the
    first sample it has not received; its wait must span the restart.
    """
    checks: list[Check] = []
    name = "SIGKILL during synthesis"
    before = server.requests_served()
    th, out = _synth_thread(client, n, seed=12)
    arrived = _await_request(server, th, before)
    server.kill()
    time.sleep(1.0)
    restart_s = server.start()
    th.join(180)
    ok, detail = _synth_ok(out, n)
    waited = _server_seconds(out)
    check(checks, name, "killed after the server received the request", arrived)
    check(
        checks,
        name,
        "the server's half spanned the kill and restart",
        waited >= restart_s,
        f"client waited {waited:.1f}s for the server, restart took {restart_s:.1f}s",
    )
    check(checks, name, "the client's synthesis completes after the restart", ok, detail)
    fresh = _synth_thread(client, 8, seed=13)
    fresh[0].join(120)
    ok, detail = _synth_ok(fresh[1], 8)
    check(checks, name, "a new synthesis works after the restart", ok, detail)
    return checks


def fault_sigterm_with_half_open_calls(
    server: ServerProcess, open_calls: int = 3, bound_s: float = TERM_BOUND_S
) -> list[Check]:
    """SIGTERM while client streams are open and silent: exit 0 in time, final checkpoint."""
    checks: list[Check] = []
    name = "SIGTERM with half-open calls"
    release = threading.Event()

    def silent() -> Iterator[bytes]:
        release.wait(60)  # bounded: released below, or gives up after a minute
        return
        yield b""  # a generator that sends nothing

    channel = raw_channel(server.address)
    try:
        # No serializers: the silent iterators never yield a message.
        uploads = channel.stream_unary(f"/{SERVICE}/UploadCuts", None, None)
        streams = channel.stream_stream(f"/{SERVICE}/Upload", None, None)
        futures = [uploads.future(silent(), timeout=60) for _ in range(open_calls)]
        duplex = streams(silent(), timeout=60)
        time.sleep(1.0)  # the calls reach the server and wait in the gate
        st = server.status()
        before = st.train_step if st is not None else -1
        signalled = time.time()
        started = time.monotonic()
        server.send(signal.SIGTERM)
        assert server.proc is not None
        try:
            rc: int | None = server.proc.wait(timeout=bound_s + 30)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - started
        release.set()
        codes: Counter[str] = Counter()
        for fut in futures:
            try:
                fut.result(timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
            except grpc.FutureTimeoutError:
                codes["client:still-open"] += 1
        duplex.cancel()
    finally:
        release.set()
        channel.close()
    check(
        checks,
        name,
        f"exits within {bound_s:g}s",
        rc is not None and took <= bound_s,
        f"{took:.1f}s, rc {rc}",
    )
    check(
        checks,
        name,
        "exit status 0",
        rc == 0,
        f"rc {rc}" + (f": {server.log_tail(600)}" if rc else ""),
    )
    check(
        checks,
        name,
        "the half-open calls were ended",
        "client:still-open" not in codes,
        f"{dict(codes)}",
    )
    saved = server.checkpoint_step()
    try:
        mtime = server.checkpoint.stat().st_mtime
    except OSError:
        mtime = 0.0
    final = saved == before or (mtime >= signalled - 0.01 and saved is not None and saved >= before)
    check(
        checks,
        name,
        "the final checkpoint is written",
        final,
        f"status step before SIGTERM {before}, checkpoint step {saved}, "
        f"written {mtime - signalled:+.2f}s after the signal",
    )
    return checks


@dataclass
class KillLoopReport:
    """Figures of the repeated SIGKILL loop."""

    rounds: int
    kills_in_upload: int = 0
    kills_in_synthesis: int = 0
    restart_s: list[float] = field(default_factory=list)
    images_acked: int = 0
    images_pooled: int = 0
    syntheses: Counter[str] = field(default_factory=Counter)
    checks: list[Check] = field(default_factory=list)


def fault_kill_loop(root: Path, rounds: int = 5, seed: int = 0) -> KillLoopReport:
    """Kill the server `rounds` times at random moments while clients upload and synthesize."""
    report = KillLoopReport(rounds)
    name = f"SIGKILL loop x{rounds}"
    server = ServerProcess(root, fault_server_config(root / "data"))
    rng = random.Random(seed)
    diffusion = Diffusion.from_config(server.config.schedule)
    synth_stop = threading.Event()
    synth_busy = threading.Event()
    up: Uploader | None = None
    synth_th: threading.Thread | None = None
    try:
        server.start()
        t_cut = _register(server.address, "looper")
        up = Uploader(
            server.address,
            "looper",
            t_cut,
            diffusion,
            messages=rounds * 80,
            pace_s=0.03,
            resume=True,
            max_attempts=100 * rounds + 100,
            seed=seed,
        )
        up.start()

        def synth_loop() -> None:
            r = remote(server.address, 20)
            try:
                for i in range(10_000):
                    if synth_stop.is_set():
                        return
                    synth_busy.set()
                    try:
                        req = SynthesisRequest("looper", 16, seed=i, num_steps=0)
                        got = sum(int(c.samples.shape[0]) for c in r.synthesize(req))
                        report.syntheses["OK" if got == 16 else "client:short"] += 1
                    except grpc.RpcError as exc:
                        report.syntheses[exc.code().name] += 1
                        synth_stop.wait(0.3)
                    finally:
                        synth_busy.clear()
            finally:
                r.close()

        synth_th = threading.Thread(target=synth_loop, name="synth-loop", daemon=True)
        synth_th.start()
        for rnd in range(rounds):
            time.sleep(rng.uniform(1.0, 4.0))
            report.kills_in_upload += up.in_call and not up.done
            report.kills_in_synthesis += synth_busy.is_set()
            acked = len(up.acked)
            server.kill()
            saved = server.checkpoint_step()
            report.restart_s.append(server.start())
            st = server.status()
            pooled = pools_of(st).get("looper", 0)
            step = st.train_step if st is not None else -1
            check(
                report.checks,
                name,
                f"round {rnd + 1}: acknowledged images pooled",
                pooled >= acked,
                f"acked {acked}, pooled {pooled}",
            )
            check(
                report.checks,
                name,
                f"round {rnd + 1}: resumes at or after the checkpoint",
                saved is None or step >= saved,
                f"checkpoint {saved}, step {step}",
            )
        finished = up.join(rounds * 80 * 0.05 + 120)
        synth_stop.set()
        synth_th.join(60)
        total = len(up.batches) * len(up.batches[0].image_ids)
        report.images_acked = len(up.acked)
        report.images_pooled = pools_of(server.status()).get("looper", 0)
        check(
            report.checks,
            name,
            "the upload finishes across the kills",
            finished and up.done,
            f"{up.acked_messages}/{len(up.batches)} messages, streams {dict(up.codes)}",
        )
        check(
            report.checks,
            name,
            "every image pooled exactly once",
            report.images_pooled == total == report.images_acked,
            f"acked {report.images_acked}, pooled {report.images_pooled}, of {total}",
        )
        bad = {k: v for k, v in (up.codes + report.syntheses).items() if k in BAD_CODES}
        check(report.checks, name, "no INTERNAL or UNKNOWN", not bad, f"{bad}")
        check(
            report.checks, name, "acks add up", not up.protocol_errors, f"{up.protocol_errors[:3]}"
        )
        check(
            report.checks,
            name,
            "synthesis works after the last restart",
            report.syntheses["OK"] > 0 and _one_synthesis(server.address, "looper"),
            f"{dict(report.syntheses)}",
        )
        report.checks += fault_sigterm_with_half_open_calls(server)
    finally:
        synth_stop.set()
        if up is not None:
            up.stop.set()
        server.close()
    return report


def _one_synthesis(address: str, client_id: str) -> bool:
    r = remote(address)
    try:
        got = sum(
            int(c.samples.shape[0])
            for c in r.synthesize(SynthesisRequest(client_id, 4, seed=1, num_steps=5))
        )
        return got == 4
    except grpc.RpcError:
        return False
    finally:
        r.close()


def run_process_faults(root: Path, slow: bool = False) -> list[Check]:
    """The process faults on one server: SIGKILL in upload+training, SIGSTOP (and, slow, SIGKILL)
    during synthesis, and SIGTERM with half-open calls."""
    server = ServerProcess(root / "proc", fault_server_config(root / "proc" / "data"))
    checks: list[Check] = []
    try:
        server.start()
        checks += fault_kill_during_upload_and_training(server)
        client = prepare_client(server, root / "client")
        checks += fault_sigstop_during_synthesis(server, client)
        if slow:
            checks += fault_kill_during_synthesis(server, client)
        checks += fault_sigterm_with_half_open_calls(server)
    finally:
        server.close()
    return checks


# ----- the tests ------------------------------------------------------------------------------


def test_load_short(tmp_path: Path) -> None:
    report = run_load(tmp_path / "server", clients=8, duration_s=5.0)
    assert_checks(report.checks)
    assert report.rpcs[("Upload", "OK")] >= 8


@pytest.mark.slow
def test_load_slow(tmp_path: Path) -> None:
    report = run_load(tmp_path / "server", clients=32, duration_s=60.0)
    assert_checks(report.checks)


def test_fuzz_short(tmp_path: Path) -> None:
    report = run_fuzz(tmp_path / "server", inputs=1000)
    assert_checks(report.checks)
    # Every method was reached, and the fuzz did get past the decoder sometimes.
    assert {m for m, _ in report.codes} == {m for m, _ in FUZZ_METHODS}
    assert report.codes[("Register", "OK")] + report.codes[("Synthesize", "OK")] > 0


@pytest.mark.slow
def test_fuzz_slow(tmp_path: Path) -> None:
    report = run_fuzz(tmp_path / "server", inputs=10_000)
    assert_checks(report.checks)


def test_process_faults_short(tmp_path: Path) -> None:
    assert_checks(run_process_faults(tmp_path))


@pytest.mark.slow
def test_process_faults_slow(tmp_path: Path) -> None:
    assert_checks(run_process_faults(tmp_path, slow=True))


@pytest.mark.slow
def test_kill_loop(tmp_path: Path) -> None:
    report = fault_kill_loop(tmp_path, rounds=5)
    assert_checks(report.checks)
