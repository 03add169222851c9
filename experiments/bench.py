"""`collafuse bench`: the server's hot paths, each against a bare baseline, side by side in one run.

Every figure is a ratio of two measurements taken in the same run on the same machine, the two
sides alternated and the medians taken, so other jobs on the machine slow both sides alike.
The server is the real one (`start_server`, insecure loopback, port 0, a temporary data dir);
its clients are a separate process (`_load_main`), as real clients are, so their decoding does
not compete with the server for its interpreter lock. docs/benchmarks.md says what each figure
means and what it should reach.

P1 served synthesis / bare forward, P2 batching gain, P3 trainer / bare training loop (also
under synthesis), P4 the client's chain and daemon, P5 upload / raw gRPC streaming, P6 latency
of a small request beside a large one / alone.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collafuse.common.config import (
    CLIENT_UNET,
    SERVER_UNET,
    ImageConfig,
    LimitsConfig,
    PolicyConfig,
    SamplerConfig,
    ScheduleConfig,
    ServerConfig,
    ServerTrainConfig,
    UNetConfig,
)
from collafuse.common.diffusion import Diffusion
from collafuse.common.limits import channel_options, server_options
from collafuse.common.metrics import count_flops
from collafuse.common.nets import build_unet, ema_update
from collafuse.common.training import make_optimizer

Say = Callable[[str], None]

# ----- what a run measures ---------------------------------------------------------------------

# The GPU run's network: about the DDPM CIFAR-10 UNet (Ho et al. 2020), at 32x32x3.
LARGE_UNET = UNetConfig(
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    attention_levels=(1,),
    norm_num_groups=32,
)
TINY_UNET = UNetConfig(block_out_channels=(8, 16), attention_levels=(), norm_num_groups=4)
MODEL_PRESETS: dict[str, tuple[UNetConfig, ImageConfig]] = {
    "tiny": (TINY_UNET, ImageConfig(channels=1, size=16)),
    "server": (SERVER_UNET, ImageConfig(channels=1, size=28)),
    "large": (LARGE_UNET, ImageConfig(channels=3, size=32)),
}
"""--model choices: (server UNet, image shape). `server` is the repository's default."""

# Peak RSS of a command: fork it from this small interpreter and read its rusage. Not from the
# bench itself: at exec Linux keeps the peak RSS of the image it replaces (the forked copy of
# the parent) in the child's ru_maxrss, so getrusage(RUSAGE_CHILDREN) or wait4 in the bench
# would report the bench's own size (1.2 GiB) for any child. Here that floor is this
# interpreter's few MiB. argv: FILE to write the KiB to, then the python arguments.
_PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""

IDLE_POOL = 1 << 40
"""train.min_pool of the bench server: its background trainer never starts, so it does not
compete with what is measured; P3 calls train_step() itself."""

BENCH_MAX_RELEASE_SNR = 1.0
"""policy.max_release_snr of the bench server and client.max_release_snr of its daemon: the
limit before the defaults became 0.1, so the bench's cut of 0.3 (SNR 0.66 at T=1000) is admitted
and its figures stay comparable with the earlier ones."""


def _step_batch(s: BenchSettings, device: torch.device) -> int:
    """The server's samples per step: sampler.max_batch, or the device's default when 0."""
    from collafuse.server.sampler import default_max_batch

    return s.max_batch or default_max_batch(device)


@dataclass(frozen=True)
class BenchSettings:
    """How much of each figure one run measures; all of it lands in the JSON."""

    model_preset: str
    """Key of MODEL_PRESETS: the server UNet and the image shape."""
    clients: tuple[int, ...]
    """P1: numbers K of concurrent clients."""
    batching_clients: tuple[int, ...]
    """P2: numbers K of clients whose requests run concurrently and then one after another."""
    n: int
    """Samples per synthesis request (P1, P2, P3's load)."""
    steps: int
    """DDIM steps T..t_cut per synthesis request (P1, P2, P3's load, P6)."""
    reps: int
    """Alternated repetitions of each pair of sides; figures are ratios of medians."""
    max_batch: int
    """sampler.max_batch of the server."""
    train_batch: int
    """P3: train.batch_size of the server, and the bare loop's batch."""
    train_steps: int
    """P3: training steps per timed sample."""
    load_clients: int
    """P3: concurrent clients requesting synthesis during the 'under synthesis' samples."""
    chain_images: int
    """P4: images per chain."""
    chain_steps: int
    """P4: DDIM steps of a full chain T..0; the client's chain t_cut..0 takes the same stride."""
    daemon_images: int
    """P4: images of the client daemon whose peak RSS is read."""
    daemon_train_steps: int
    """P4: local training steps of that daemon."""
    upload_images: int
    """P5: cut images per upload stream."""
    fair_big_n: int
    """P6: samples of the large request."""
    fair_reps: int
    """P6: requests timed beside a large one (the small one alone is timed reps + 1 times)."""
    compile: bool
    """The server compiles its synthesis network (sampler.compile), and on CUDA P1 also
    compares with a torch.compile'd bf16 forward."""
    timesteps: int = 1000
    """T of the schedule."""
    cut_ratio: float = 0.3
    """Every client's cut ratio. 0.3, below the default policy's 0.486, keeps the figures
    comparable with those in docs/benchmarks.md; the bench server and daemon admit it with
    BENCH_MAX_RELEASE_SNR (a throughput bench releases no private data)."""

    @property
    def model(self) -> UNetConfig:
        """The server UNet."""
        return MODEL_PRESETS[self.model_preset][0]

    @property
    def image(self) -> ImageConfig:
        """The image shape."""
        return MODEL_PRESETS[self.model_preset][1]


def default_settings(device: torch.device, quick: bool, model: str = "auto") -> BenchSettings:
    """Settings sized to finish in 3 minutes on 2 CPU cores, 8 on a GPU, well under 1 in quick."""
    if quick:
        s = BenchSettings(
            model_preset="tiny",
            clients=(1, 4),
            batching_clients=(4,),
            n=1,
            steps=3,
            reps=2,
            max_batch=256,
            train_batch=8,
            train_steps=2,
            load_clients=2,
            chain_images=1,
            chain_steps=20,
            daemon_images=32,
            daemon_train_steps=2,
            upload_images=96,
            fair_big_n=64,
            fair_reps=1,
            compile=False,
        )
    elif device.type == "cuda":
        s = BenchSettings(
            model_preset="large",
            clients=(1, 8, 64),
            batching_clients=(8, 64),
            n=4,
            steps=20,
            reps=3,
            max_batch=0,
            train_batch=64,
            train_steps=10,
            load_clients=8,
            chain_images=1,
            chain_steps=100,
            daemon_images=256,
            daemon_train_steps=20,
            upload_images=4000,
            fair_big_n=1024,
            fair_reps=3,
            compile=True,
        )
    else:
        s = BenchSettings(
            model_preset="server",
            clients=(1, 8, 64),
            batching_clients=(8, 64),
            n=1,
            steps=4,
            reps=3,
            max_batch=0,
            train_batch=16,
            train_steps=2,
            load_clients=8,
            chain_images=1,
            chain_steps=100,
            daemon_images=64,
            daemon_train_steps=10,
            upload_images=2000,
            # 128 samples outlast the n=1 request many times over (about 3 s against 0.2),
            # which leaves time for 3 repetitions: one swung by +-15%.
            fair_big_n=128,
            fair_reps=3,
            compile=False,
        )
    if model != "auto":
        s = replace(s, model_preset=model)
    return s


def bench_server_config(
    s: BenchSettings, data_dir: Path, device: str, threads: int
) -> ServerConfig:
    """Insecure loopback on port 0, no auth, limits out of the way, the trainer idle."""
    return ServerConfig(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        insecure=True,
        device=device,
        threads=threads,
        schedule=ScheduleConfig(num_timesteps=s.timesteps),
        image=s.image,
        model=s.model,
        train=ServerTrainConfig(batch_size=s.train_batch, min_pool=IDLE_POOL),
        # Room for every bench client; max_clients also sizes the label embedding (a lookup).
        policy=PolicyConfig(
            max_clients=max(s.clients) + 8,
            max_synthesize_n=s.fair_big_n,
            max_release_snr=BENCH_MAX_RELEASE_SNR,
        ),
        sampler=SamplerConfig(max_batch=s.max_batch, compile=s.compile),
        limits=LimitsConfig(rate_per_s=1e6, rate_burst=1_000_000, max_streams_per_client=1024),
    )


# ----- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One measured figure: a ratio (or a size) with what it was measured at."""

    part: str
    """P1 .. P6."""
    name: str
    """What the value is, in a few words."""
    value: float
    target: str
    """The goal, e.g. '>= 0.9', or '' where there is none on this device."""
    met: bool | None
    """Whether value meets target; None without a target."""
    note: str
    """The raw rates behind the value, for the table."""
    detail: dict[str, Any] = field(default_factory=dict)
    """Raw measurements and the settings they were taken at."""


def _target(value: float, op: str, bound: float | None) -> tuple[str, bool | None]:
    if bound is None:
        return "", None
    return f"{op} {bound:g}", (value >= bound if op == ">=" else value <= bound)


@dataclass(frozen=True)
class BenchReport:
    """Everything a run produced; `to_json` is what --out holds."""

    device: dict[str, Any]
    settings: dict[str, Any]
    figures: list[Figure]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The JSON document: device, settings, figures grouped by part, time taken."""
        parts: dict[str, list[dict[str, Any]]] = {}
        for f in self.ordered():
            parts.setdefault(f.part, []).append(
                {
                    "name": f.name,
                    "value": f.value,
                    "target": f.target,
                    "met": f.met,
                    "note": f.note,
                    **f.detail,
                }
            )
        return {
            "device": self.device,
            "settings": self.settings,
            "figures": parts,
            "seconds": round(self.seconds, 1),
        }

    def ordered(self) -> list[Figure]:
        """The figures by part, P1 first, in the order measured within a part."""
        return sorted(self.figures, key=lambda f: f.part)

    def table(self) -> str:
        """A plain-text table, one figure a line."""
        rows = [("", "figure", "value", "target", "met", "measured")]
        for f in self.ordered():
            met = "" if f.met is None else ("yes" if f.met else "NO")
            rows.append((f.part, f.name, _fmt(f.value), f.target, met, f.note))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r[:5], widths, strict=True)]
            lines.append("  ".join([*cells, r[5]]).rstrip())
        return "\n".join(lines)


def dumps(doc: dict[str, Any]) -> str:
    """JSON with two-space indents and each list of numbers or strings on one line."""
    text = json.dumps(doc, indent=2, allow_nan=False)
    return re.sub(
        r"\[\s+([^\[\]{}]*?)\s+\]",
        lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",\n")) + "]",
        text,
    )


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if x >= 0.01 else f"{x:.2e}"


def describe_device(device: torch.device) -> dict[str, Any]:
    """Device name (GPU, or the CPU model from /proc/cpuinfo), cores, threads, versions."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "unknown CPU"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "type": device.type,
        "name": name,
        "code": code_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
    }


def code_version() -> str:
    """The package version, plus the git commit (and "+dirty") when run from a checkout."""
    from collafuse import __version__

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__} ({commit})" if commit else __version__


# ----- helpers ---------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn(), the device's queue drained before and after."""
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def honest_cuts(diffusion: Diffusion, t_cut: int, n: int, image: ImageConfig, seed: int) -> Tensor:
    """Cut images the upload guard accepts: smooth x0 in [-1, 1] noised to t_cut. (n, C, H, W)"""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand((n, image.channels, 4, 4), generator=gen) * 2 - 1
    x0 = F.interpolate(low, size=(image.size, image.size), mode="bilinear", align_corners=True)
    noise = torch.randn(x0.shape, generator=gen)
    return diffusion.q_sample(x0, torch.full((n,), t_cut, dtype=torch.long), noise)


# ----- the client side: a separate process ----------------------------------------------------


class BenchError(RuntimeError):
    """A bench step failed; the message says which and why."""


def _client_channel(address: str) -> grpc.Channel:
    # A connection of its own per client, as separate client machines have (gRPC otherwise
    # shares one connection among a process's channels to the same address).
    return grpc.insecure_channel(
        address, options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    )


class _Load:
    """Client calls run in the load process, each command answering with its timings."""

    def __init__(self) -> None:
        from collafuse.client.remote import Remote

        self._remote_cls = Remote
        self.remotes: dict[tuple[str, str], Any] = {}
        self._loop_stop = threading.Event()
        self._loop_threads: list[threading.Thread] = []
        self._loop_done = 0
        self._lock = threading.Lock()
        self._loop_errors: list[str] = []
        self._big: threading.Thread | None = None
        self._big_result: list[float | str] = []

    def _remote(self, address: str, cid: str) -> Any:
        key = (address, cid)
        if key not in self.remotes:
            self.remotes[key] = self._remote_cls(_client_channel(address))
        return self.remotes[key]

    def _request(self, address: str, cid: str, n: int, steps: int, seed: int) -> float:
        from collafuse.common.domain import SynthesisRequest

        req = SynthesisRequest(cid, n, seed, sampler="ddim", num_steps=steps)
        started = time.perf_counter()
        got = sum(int(c.samples.shape[0]) for c in self._remote(address, cid).synthesize(req))
        if got != n:
            raise BenchError(f"{cid} received {got} of {n} samples")
        return time.perf_counter() - started

    def synth(
        self, address: str, ids: list[str], n: int, steps: int, seed: int, concurrent: bool
    ) -> dict[str, Any]:
        """K requests at once (released together) or one after another: wall and latencies."""
        if not concurrent:
            started = time.perf_counter()
            lat = [self._request(address, cid, n, steps, seed) for cid in ids]
            return {"wall_s": time.perf_counter() - started, "latency_s": lat}
        gate = threading.Barrier(len(ids) + 1)
        lat = [math.nan] * len(ids)
        errors: list[str] = []

        def one(i: int) -> None:
            gate.wait()
            try:
                lat[i] = self._request(address, ids[i], n, steps, seed)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ids))]
        for th in threads:
            th.start()
        gate.wait()
        started = time.perf_counter()
        for th in threads:
            th.join()
        wall = time.perf_counter() - started
        if errors:
            raise BenchError(f"{len(errors)} of {len(ids)} requests failed: {errors[0]}")
        return {"wall_s": wall, "latency_s": lat}

    def loop_start(self, address: str, ids: list[str], n: int, steps: int) -> None:
        """Keep one request per client in flight until loop_stop."""
        self._loop_stop.clear()
        self._loop_done = 0
        self._loop_errors = []

        def run(cid: str) -> None:
            while not self._loop_stop.is_set():
                try:
                    self._request(address, cid, n, steps, 0)
                    with self._lock:
                        self._loop_done += 1
                except Exception as exc:
                    self._loop_errors.append(f"{type(exc).__name__}: {exc}")
                    return

        self._loop_threads = [threading.Thread(target=run, args=(c,)) for c in ids]
        for th in self._loop_threads:
            th.start()

    def loop_stop(self) -> int:
        """Stop the loop after the requests in flight; how many requests completed."""
        self._loop_stop.set()
        for th in self._loop_threads:
            th.join()
        if self._loop_errors:
            raise BenchError(f"synthesis load failed: {self._loop_errors[0]}")
        return self._loop_done

    def big_start(self, address: str, cid: str, n: int, steps: int) -> None:
        """Start one large request in the background."""
        self._big_result = []

        def run() -> None:
            try:
                self._big_result.append(self._request(address, cid, n, steps, 1))
            except Exception as exc:
                self._big_result.append(f"{type(exc).__name__}: {exc}")

        self._big = threading.Thread(target=run)
        self._big.start()

    def big_join(self) -> float:
        """Wait for the large request; its latency."""
        if self._big is not None:
            self._big.join()
        result = self._big_result[0] if self._big_result else "never started"
        if isinstance(result, str):
            raise BenchError(f"the large request failed: {result}")
        return result

    def upload(self, address: str, method: str, messages: list[bytes], acked: bool) -> float:
        """Stream pre-serialized messages to `method` (stream-unary, or stream-stream when
        acked); wall seconds until the answer (every acknowledgement) arrived."""
        with grpc.insecure_channel(address, options=channel_options()) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            started = time.perf_counter()
            if acked:
                call = channel.stream_stream(method, None, None)(iter(messages), timeout=600)
                acks = sum(1 for _ in call)
                if acks != len(messages):
                    raise BenchError(f"{method}: {acks} acknowledgements for {len(messages)}")
            else:
                channel.stream_unary(method, None, None)(iter(messages), timeout=600)
            return time.perf_counter() - started

    def close(self) -> None:
        for remote in self.remotes.values():
            remote.close()


def _load_main(conn: Connection) -> None:
    """The load process: run commands from the bench until it says quit."""
    torch.set_num_threads(1)
    load = _Load()
    try:
        while True:
            cmd, args = conn.recv()
            if cmd == "quit":
                break
            try:
                conn.send(("ok", getattr(load, cmd)(*args)))
            except Exception as exc:
                conn.send(("error", f"{cmd}: {type(exc).__name__}: {exc}"))
    finally:
        load.close()


class LoadProcess:
    """The bench's side of the load process: one command at a time, each with a deadline."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process running gRPC threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_load_main, args=(child,), name="bench-load", daemon=True)
        self.proc.start()
        child.close()

    def send(self, cmd: str, *args: Any) -> None:
        """Start a command; answer() collects its result."""
        self.conn.send((cmd, args))

    def answer(self, timeout: float = 600.0) -> Any:
        """The result of the command sent last."""
        if not self.conn.poll(timeout):
            raise BenchError(f"the load process did not answer within {timeout:g}s")
        status, value = self.conn.recv()
        if status != "ok":
            raise BenchError(str(value))
        return value

    def call(self, cmd: str, *args: Any, timeout: float = 600.0) -> Any:
        """Run a command and wait for its result."""
        self.send(cmd, *args)
        return self.answer(timeout)

    def close(self) -> None:
        """Ask the process to quit; terminate it if it does not."""
        with suppress(OSError):
            self.conn.send(("quit", ()))
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        self.conn.close()


def _trainer_main(conn: Connection, config_json: str, threads: int) -> None:
    """A server trainer in a process of its own (P3's GIL figure): steps when told, timed."""
    if threads:
        torch.set_num_threads(threads)
    from collafuse.server.trainer import Trainer

    config = ServerConfig.model_validate_json(config_json)
    device = torch.device(conn.recv())
    cuts, t_cut, labels, steps = conn.recv()
    with tempfile.TemporaryDirectory() as tmp:
        diffusion = Diffusion.from_config(config.schedule)
        trainer = Trainer(config, diffusion, None, device, Path(tmp) / "server.pt")
        trainer.add_cuts(cuts, torch.full((cuts.shape[0],), t_cut), labels)

        def run() -> None:
            for _ in range(steps):
                trainer.train_step()

        run()  # warm-up
        conn.send("ready")
        while conn.recv() == "go":
            conn.send(_timed(run, device))


# ----- a trivial gRPC servicer: P5's baseline -------------------------------------------------

RAW_METHOD = "/bench.Raw/Count"


class RawSink:
    """An in-process grpc.aio server whose one method counts the messages of a client stream."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="raw-sink", daemon=True)
        self._thread.start()
        self.server, port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.address = f"127.0.0.1:{port}"

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        async def count(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
            n = 0
            async for _ in requests:
                n += 1
            return n.to_bytes(8, "little")

        server = grpc.aio.server(options=server_options())
        handler = grpc.method_handlers_generic_handler(
            "bench.Raw", {"Count": grpc.stream_unary_rpc_method_handler(count)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def close(self) -> None:
        """Stop the server and its loop."""
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


# ----- the bench -------------------------------------------------------------------------------


class Bench:
    """Runs P1..P6 against one server; `run()` returns the report."""

    def __init__(
        self,
        settings: BenchSettings,
        work_dir: Path,
        device: str = "auto",
        threads: int = 0,
        say: Say = print,
    ) -> None:
        self.s = settings
        self.work_dir = work_dir
        self.config = bench_server_config(settings, work_dir / "server", device, threads)
        self._say = say
        self._started = time.perf_counter()
        self.figures: list[Figure] = []

    def say(self, text: str) -> None:
        """A progress line with the time since the start."""
        self._say(f"[{time.perf_counter() - self._started:6.1f}s] {text}")

    def add(
        self,
        part: str,
        name: str,
        value: float,
        note: str,
        detail: dict[str, Any],
        op: str = ">=",
        bound: float | None = None,
    ) -> None:
        """Record a figure and print it."""
        target, met = _target(value, op, bound)
        self.figures.append(Figure(part, name, value, target, met, note, detail))
        self.say(f"{part} {name}: {_fmt(value)} {target} ({note})")

    def run(self) -> BenchReport:
        """Start the server and the load process, measure P1..P6, stop everything."""
        from collafuse.client.remote import Remote
        from collafuse.common.domain import Registration
        from collafuse.server.app import start_server

        load = LoadProcess()  # starts importing while the server starts
        self.say(f"starting the server ({self.s.model_preset} model {self.s.image.shape})")
        server = start_server(self.config)
        self.server = server
        self.device = server.trainer.device
        self.diffusion = server.trainer.diffusion
        self.t_cut = self.diffusion.t_cut(self.s.cut_ratio)
        self.load = load
        try:
            self.ids = [f"bench-{i:03d}" for i in range(max(self.s.clients))]
            remote = Remote(_client_channel(server.address))
            try:
                for cid in [*self.ids, "bench-big", "bench-small", "bench-upload"]:
                    remote.register(Registration(cid, self.s.image.shape, self.s.cut_ratio))
            finally:
                remote.close()
            self.say(
                f"server on {server.address}, {server.trainer.device}, "
                f"{server.trainer.num_parameters:,} parameters, "
                f"{torch.get_num_threads()} torch threads, t_cut={self.t_cut}"
            )
            self.synthesis()
            self.fairness()
            self.training()
            self.streaming()
            self.upload()
            self.client()
        finally:
            load.close()
            server.stop()
        return BenchReport(
            device=describe_device(self.device),
            settings=self.settings_json(),
            figures=self.figures,
            seconds=time.perf_counter() - self._started,
        )

    def settings_json(self) -> dict[str, Any]:
        """The run's settings and the server config it ran."""
        s = self.s
        out: dict[str, Any] = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()
        }
        out["model"] = s.model.model_dump(mode="json")
        out["image"] = s.image.model_dump(mode="json")
        out["server_parameters"] = self.server.trainer.num_parameters
        out["t_cut"] = self.t_cut
        out["sampler"] = "ddim"
        out["server_config"] = self.config.model_dump(mode="json", exclude={"data_dir"})
        return out

    # ----- P1 and P2 ---------------------------------------------------------------------------

    def _forward(
        self, model: nn.Module, batch: int, calls: int, autocast: AbstractContextManager[Any]
    ) -> float:
        """Seconds per bare forward call at `batch`, as the sampler calls the model."""
        shape = self.s.image.shape
        x = torch.randn((batch, *shape), device=self.device)
        t = torch.full((batch,), self.t_cut + 1, dtype=torch.long, device=self.device)
        labels = torch.zeros(batch, dtype=torch.long, device=self.device)

        def run() -> None:
            with torch.inference_mode(), autocast:
                for _ in range(calls):
                    model(x, t, class_labels=labels).sample.float()

        return _timed(run, self.device) / calls

    def synthesis(self) -> None:
        """P1 served / bare forward per K; P2 concurrent vs one after another."""
        s, server = self.s, self.server
        hub = server.trainer.hub
        address = server.address
        bare_calls = max(2, min(s.steps, 3))
        compiled: nn.Module | None = None
        bf16: AbstractContextManager[Any] = nullcontext()
        if s.compile and self.device.type == "cuda":
            self.say("compiling a bf16 copy of the model (torch.compile) for P1's second baseline")
            compiled = torch.compile(copy.deepcopy(hub.model))  # type: ignore[assignment]
            bf16 = torch.autocast("cuda", dtype=torch.bfloat16)
        for k in s.clients:
            ids = self.ids[:k]
            total = k * s.n
            step_batch = _step_batch(s, self.device)
            batch = min(total, step_batch)
            calls_needed = math.ceil(total / step_batch) * s.steps
            # Warm-up: connections, allocator, the batch shape (and compilation).
            self.load.call("synth", address, ids, s.n, s.steps, 0, True)
            with hub.lock:
                self._forward(hub.model, batch, 1, server.sampler.autocast())
                if compiled is not None:
                    try:
                        self._forward(compiled, batch, 2, bf16)
                    except Exception as exc:  # no compiler on the machine: keep the rest
                        self.say(f"torch.compile failed ({type(exc).__name__}: {exc}); skipped")
                        compiled = None
            served, bare, bare_c, seq, calls = [], [], [], [], []
            for r in range(s.reps):
                before = server.sampler.forward_calls
                served.append(
                    self.load.call("synth", address, ids, s.n, s.steps, 0, True)["wall_s"]
                )
                calls.append(server.sampler.forward_calls - before)
                with hub.lock:
                    bare.append(
                        self._forward(hub.model, batch, bare_calls, server.sampler.autocast())
                    )
                    if compiled is not None:
                        bare_c.append(self._forward(compiled, batch, bare_calls, bf16))
                if k in s.batching_clients:
                    seq.append(
                        self.load.call("synth", address, ids, s.n, s.steps, 0, False)["wall_s"]
                    )
                self.say(
                    f"P1 K={k} rep {r + 1}/{s.reps}: served {served[-1]:.3f}s "
                    f"({calls[-1]} forward calls), bare {bare[-1] * calls_needed:.3f}s"
                    + (f", one after another {seq[-1]:.3f}s" if seq else "")
                )
            image_steps = total * s.steps
            served_rate = image_steps / _median(served)
            bare_rate = batch / _median(bare)
            common = {
                "clients": k,
                "n": s.n,
                "steps": s.steps,
                "batch": batch,
                "served_wall_s": served,
                "forward_calls": calls,
                "forward_calls_needed": calls_needed,
                "bare_forward_s": bare,
                "served_image_steps_per_s": served_rate,
                "bare_image_steps_per_s": bare_rate,
            }
            bound = 0.85 if self.device.type == "cuda" else 0.9
            self.add(
                "P1",
                f"served/bare forward, K={k}",
                served_rate / bare_rate,
                f"served {served_rate:.4g} vs bare {bare_rate:.4g} image-steps/s at batch "
                f"{batch}; {_median(calls):g} forward calls for {calls_needed}",
                {
                    **common,
                    "baseline": f"eager, {server.sampler.precision} as the sampler runs",
                    "served_compiled": server.sampler.compile,
                },
                bound=bound,
            )
            if compiled is not None:
                c_rate = batch / _median(bare_c)
                self.add(
                    "P1",
                    f"served/compiled bf16 forward, K={k}",
                    served_rate / c_rate,
                    f"served {served_rate:.4g} vs compiled bf16 {c_rate:.4g} image-steps/s",
                    {
                        **common,
                        "bare_forward_s": bare_c,
                        "bare_image_steps_per_s": c_rate,
                        "baseline": "torch.compile, bf16 autocast",
                    },
                    bound=bound,
                )
            if k in s.batching_clients:
                gain = _median(seq) / _median(served)
                self.add(
                    "P2",
                    f"batching gain, K={k}",
                    gain,
                    f"one after another {_median(seq):.3f}s, concurrent {_median(served):.3f}s",
                    {
                        "clients": k,
                        "n": s.n,
                        "steps": s.steps,
                        "concurrent_wall_s": served,
                        "sequential_wall_s": seq,
                    },
                    bound=8.0 if self.device.type == "cuda" and k >= 64 else None,
                )

    # ----- P6 ----------------------------------------------------------------------------------

    def fairness(self) -> None:
        """P6: latency of an n=1 request beside another client's large request, over alone."""
        s, server = self.s, self.server
        address = server.address
        small = ["bench-small"]

        def alone() -> float:
            return float(self.load.call("synth", address, small, 1, s.steps, 0, True)["wall_s"])

        alone()  # warm-up
        lone, beside, big = [alone()], [], []
        for r in range(s.fair_reps):
            before = server.sampler.forward_calls
            self.load.call("big_start", address, "bench-big", s.fair_big_n, s.steps)
            deadline = time.monotonic() + 600
            while server.sampler.forward_calls == before and time.monotonic() < deadline:
                time.sleep(0.002)  # the large request has taken its first step
            beside.append(alone())
            big.append(self.load.call("big_join"))
            lone.append(alone())
            self.say(
                f"P6 rep {r + 1}/{s.fair_reps}: n=1 alone {lone[-1]:.3f}s, beside "
                f"n={s.fair_big_n} {beside[-1]:.3f}s (the large one took {big[-1]:.3f}s)"
            )
        ratio = _median(beside) / _median(lone)
        self.add(
            "P6",
            "n=1 latency beside a large request / alone",
            ratio,
            f"{_median(beside):.3f}s beside n={s.fair_big_n} vs {_median(lone):.3f}s alone "
            f"(the large request: {_median(big):.3f}s)",
            {
                "big_n": s.fair_big_n,
                "steps": s.steps,
                "max_batch": _step_batch(s, self.device),
                "alone_s": lone,
                "beside_s": beside,
                "big_s": big,
            },
            op="<=",
            bound=2.0,
        )

    # ----- P3 ----------------------------------------------------------------------------------

    def training(self) -> None:
        """P3: trainer steps/s over a bare loop; and under synthesis over alone."""
        s, server = self.s, self.server
        trainer = server.trainer
        device = self.device
        pool_size = max(512, 4 * s.train_batch)
        cuts = honest_cuts(self.diffusion, self.t_cut, pool_size, s.image, seed=3)
        labels = torch.arange(pool_size) % 4
        trainer.add_cuts(cuts, torch.full((pool_size,), self.t_cut), labels)
        step_bare = self._bare_trainer(cuts.to(device), labels.to(device))

        def trainer_steps() -> None:
            for _ in range(s.train_steps):
                trainer.train_step()

        def bare_steps() -> None:
            for _ in range(s.train_steps):
                step_bare()

        trainer_steps()  # warm-up both
        bare_steps()
        load_ids = self.ids[: s.load_clients] or ["bench-small"]
        # On CUDA, the same trainer in a process of its own, with its own interpreter lock. Not
        # on a CPU: there the two processes' thread pools compete for the same cores (their
        # waits spin), which swamps what the lock costs (the quick bench's tiny model ran 19x
        # slower in a process of its own).
        own = None
        if device.type == "cuda":
            ctx = multiprocessing.get_context("spawn")
            conn, child = ctx.Pipe()
            own = ctx.Process(
                target=_trainer_main,
                args=(child, self.config.model_dump_json(), self.config.threads),
                name="bench-trainer",
                daemon=True,
            )
            own.start()
            child.close()
            conn.send(str(device))
            conn.send((cuts, self.t_cut, labels, s.train_steps))
            if not conn.poll(600) or conn.recv() != "ready":
                raise BenchError("the separate trainer process did not start")
        alone, bare, busy, served, apart = [], [], [], [], []
        for r in range(s.reps):
            alone.append(_timed(trainer_steps, device))
            bare.append(_timed(bare_steps, device))
            before = server.sampler.forward_calls
            self.load.call("loop_start", server.address, load_ids, s.n, s.steps)
            deadline = time.monotonic() + 600
            while server.sampler.forward_calls == before and time.monotonic() < deadline:
                time.sleep(0.002)  # synthesis is under way
            busy.append(_timed(trainer_steps, device))
            if own is not None:
                conn.send("go")  # the same steps in the other process, the same load running
                if not conn.poll(600):
                    raise BenchError("the separate trainer process did not answer")
                apart.append(conn.recv())
            served.append(self.load.call("loop_stop"))
            self.say(
                f"P3 rep {r + 1}/{s.reps}: {s.train_steps} trainer steps {alone[-1]:.3f}s, bare "
                f"{bare[-1]:.3f}s, under synthesis {busy[-1]:.3f}s"
                + (f" ({apart[-1]:.3f}s in a process of its own)" if apart else "")
                + f" ({served[-1]} requests)"
            )
        if own is not None:
            conn.send("quit")
            own.join(timeout=30)
            if own.is_alive():
                own.terminate()
        rate = s.train_steps / _median(alone)
        bare_rate = s.train_steps / _median(bare)
        busy_rate = s.train_steps / _median(busy)
        common = {
            "batch": s.train_batch,
            "steps_per_sample": s.train_steps,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        }
        self.add(
            "P3",
            "trainer/bare training loop",
            rate / bare_rate,
            f"{rate:.3g} vs {bare_rate:.3g} steps/s at batch {s.train_batch}",
            {
                **common,
                "trainer_s": alone,
                "bare_s": bare,
                "trainer_steps_per_s": rate,
                "bare_steps_per_s": bare_rate,
            },
            bound=0.9,
        )
        self.add(
            "P3",
            "trainer under synthesis/alone",
            busy_rate / rate,
            f"{busy_rate:.3g} vs {rate:.3g} steps/s; {len(load_ids)} clients requesting "
            f"n={s.n}, {s.steps} steps",
            {
                **common,
                "trainer_s": alone,
                "under_synthesis_s": busy,
                "load_clients": len(load_ids),
                "requests_served": served,
            },
            bound=0.9,
        )
        if not apart:
            return
        apart_rate = s.train_steps / _median(apart)
        self.add(
            "P3",
            "under synthesis: trainer in the server's process/in its own",
            busy_rate / apart_rate,
            f"{busy_rate:.3g} vs {apart_rate:.3g} steps/s; 1 - this is what sharing the "
            "interpreter lock with the sampler and gRPC costs the trainer",
            {
                **common,
                "in_process_s": busy,
                "own_process_s": apart,
                "load_clients": len(load_ids),
            },
        )

    STREAM_CHUNK_BATCHES = 2
    """P3 streaming: a chunk holds this many batches, so the loader must deliver a chunk every
    this many steps (one pass each): a harder pace than any real pool's."""
    STREAM_CHUNKS = 8
    """P3 streaming: chunks in the pool (the budget holds two)."""

    def streaming(self) -> None:
        """P3: trainer steps/s on a pool streamed from disk over the same pool held whole."""
        from collafuse.server.pool import Pool
        from collafuse.server.trainer import Trainer

        s, device = self.s, self.device
        chunk = self.STREAM_CHUNK_BATCHES * s.train_batch
        size = self.STREAM_CHUNKS * chunk
        steps = 4 * self.STREAM_CHUNK_BATCHES * max(1, s.train_steps // 2)  # several swaps
        row_bytes = 4 * math.prod(s.image.shape)
        budget_mib = 2 * chunk * row_bytes / 2**20
        with tempfile.TemporaryDirectory() as tmp:
            pool = Pool(Path(tmp) / "pool.sqlite")
            trainers: list[Trainer] = []
            try:
                cuts = honest_cuts(self.diffusion, self.t_cut, size, s.image, seed=5)
                for k in range(4):
                    cid = f"stream-{k}"
                    pool.register(cid, self.t_cut, s.cut_ratio, max_clients=8)
                    part = range(k, size, 4)
                    pool.add(cid, self.t_cut, [f"{cid}-{i}" for i in part], cuts[list(part)])
                for name, mib in (
                    ("held", 4 * budget_mib * self.STREAM_CHUNKS),
                    ("streamed", budget_mib),
                ):
                    train = self.config.train.model_copy(update={"pool_memory_mib": mib, "seed": 1})
                    config = self.config.model_copy(update={"train": train})
                    trainer = Trainer(
                        config, self.diffusion, pool, device, Path(tmp) / name / "server.pt"
                    )
                    trainer.refresh()
                    trainers.append(trainer)
                held, streamed = trainers
                if held.data.streaming or not streamed.data.streaming:
                    raise BenchError("P3 streaming: the budgets did not split held from streamed")

                def run(trainer: Trainer) -> Callable[[], None]:
                    def steps_of() -> None:
                        for _ in range(steps):
                            trainer.train_step()

                    return steps_of

                run(held)()  # warm-up both
                run(streamed)()
                late = streamed.data.late_swaps
                whole, chunked = [], []
                for r in range(s.reps):
                    whole.append(_timed(run(held), device))
                    chunked.append(_timed(run(streamed), device))
                    self.say(
                        f"P3 streaming rep {r + 1}/{s.reps}: {steps} steps held whole "
                        f"{whole[-1]:.3f}s, streamed {chunked[-1]:.3f}s"
                    )
                late = streamed.data.late_swaps - late
                loaded = streamed.data.chunks_loaded
            finally:
                for trainer in trainers:
                    trainer.data.close()
                pool.close()
        ratio = _median(whole) / _median(chunked)
        self.add(
            "P3",
            "trainer on a streamed pool/held whole",
            ratio,
            f"{steps / _median(chunked):.3g} vs {steps / _median(whole):.3g} steps/s; chunks of "
            f"{chunk} images ({self.STREAM_CHUNK_BATCHES} steps each), {late} late of the timed "
            "ones",
            {
                "pool_images": size,
                "chunk_images": chunk,
                "budget_mib": budget_mib,
                "steps_per_sample": steps,
                "held_s": whole,
                "streamed_s": chunked,
                "chunks_loaded": loaded,
            },
            bound=0.9,
        )

    def _bare_trainer(self, pool: Tensor, labels: Tensor) -> Callable[[], None]:
        """A plain PyTorch loop with the trainer's model, batch, AdamW, precision and EMA."""
        cfg = self.config.train
        device = self.device
        trainer = self.server.trainer
        model = copy.deepcopy(trainer.model).train()
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = make_optimizer(model, cfg.lr, cfg.weight_decay)  # the trainer's (fused) AdamW
        abar = torch.tensor(
            [self.diffusion.alpha_bar(t) for t in range(self.diffusion.num_timesteps + 1)],
            dtype=torch.float32,
            device=device,
        )
        T, c, B = self.diffusion.num_timesteps, self.t_cut, cfg.batch_size

        def step() -> None:
            idx = torch.randint(0, pool.shape[0], (B,), device=device)
            x0 = pool[idx]  # (B, C, H, W)
            t = torch.randint(c + 1, T + 1, (B,), device=device)
            noise = torch.randn_like(x0)
            a = abar[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            autocast = (
                torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda"
                else nullcontext()
            )
            with autocast:
                pred = model(x_t, t, class_labels=labels[idx]).sample
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            ema_update(ema, model, cfg.ema_decay)

        return step

    # ----- P5 ----------------------------------------------------------------------------------

    def upload(self) -> None:
        """P5: cut images/s through UploadCuts and Upload over raw client streaming."""
        from collafuse.common import serde
        from collafuse.common.domain import CutBatch

        s, server = self.s, self.server
        per_image = 4 * math.prod(s.image.shape)
        per_msg = max(1, (1 << 20) // per_image)  # the client's default upload_chunk_bytes
        cuts = honest_cuts(self.diffusion, self.t_cut, s.upload_images, s.image, seed=5)
        serial = iter(range(1 << 30))

        def messages() -> list[bytes]:
            """The same tensors under fresh ids, so every upload stores every image."""
            out = []
            for lo in range(0, s.upload_images, per_msg):
                part = cuts[lo : lo + per_msg]
                ids = [f"img-{next(serial):09d}" for _ in range(part.shape[0])]
                batch = CutBatch("bench-upload", self.t_cut, ids, part)
                out.append(serde.cut_batch_to_proto(batch).SerializeToString())
            return out

        sink = RawSink()
        service = "/collafuse.v1.CollaFuse/"
        try:
            arms = {
                "UploadCuts": (server.address, service + "UploadCuts", False),
                "Upload": (server.address, service + "Upload", True),
                "raw": (sink.address, RAW_METHOD, False),
            }
            times: dict[str, list[float]] = {name: [] for name in arms}
            for r in range(s.reps + 1):  # the first round warms up
                for name, (address, method, acked) in arms.items():
                    msgs = messages()
                    held = server.pool.count("bench-upload")
                    wall = self.load.call("upload", address, method, msgs, acked)
                    stored = server.pool.count("bench-upload") - held
                    if name != "raw" and stored != s.upload_images:
                        raise BenchError(
                            f"{name} stored {stored} of {s.upload_images} cut images; "
                            "the guard refused some (see the server log)"
                        )
                    if r:
                        times[name].append(wall)
                if r:
                    self.say(
                        f"P5 rep {r}/{s.reps}: "
                        + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items())
                    )
        finally:
            sink.close()
        raw_rate = s.upload_images / _median(times["raw"])
        size = len(messages()[0])
        for name in ("UploadCuts", "Upload"):
            rate = s.upload_images / _median(times[name])
            self.add(
                "P5",
                f"{name}/raw gRPC stream",
                rate / raw_rate,
                f"{rate:.4g} vs {raw_rate:.4g} cut images/s",
                {
                    "rpc": name,
                    "images": s.upload_images,
                    "images_per_message": per_msg,
                    "message_bytes": size,
                    "wall_s": times[name],
                    "raw_wall_s": times["raw"],
                    "images_per_s": rate,
                    "raw_images_per_s": raw_rate,
                },
                bound=0.5,
            )

    # ----- P4 ----------------------------------------------------------------------------------

    def client(self) -> None:
        """P4: the client's chain from t_cut against full chains; the daemon's peak RSS.

        The chains run on the CPU, where the client daemon runs (it has no device option).
        """
        from collafuse.client.synth import finish_chain

        s, diffusion = self.s, self.diffusion
        T, c = diffusion.num_timesteps, self.t_cut
        cut_steps = max(1, round(s.chain_steps * c / T))
        cpu = torch.device("cpu")
        client_model = build_unet(CLIENT_UNET, s.image).eval()
        server_sized = build_unet(s.model, s.image).eval()  # unconditioned, as a local model
        x = torch.randn((s.chain_images, *s.image.shape))
        chains = {
            "client t_cut..0": (client_model, c, cut_steps),
            "client-size T..0": (client_model, T, s.chain_steps),
            "server-size T..0": (server_sized, T, s.chain_steps),
        }

        def run(model: nn.Module, start: int, steps: int) -> None:
            finish_chain(diffusion, model, x, start, steps, "ddim", 0.0, 0)

        flops: dict[str, int] = {}
        for name, (model, start, steps) in chains.items():
            t = torch.full((s.chain_images,), start, dtype=torch.long)
            with torch.inference_mode():
                per_call = count_flops(functools.partial(model, x, t))
            # One network call per hop of the chain.
            flops[name] = per_call * (len(diffusion.timesteps(start, 0, steps)) - 1)
            run(model, T, min(steps, 2))  # warm-up
        times: dict[str, list[float]] = {name: [] for name in chains}
        for r in range(s.reps):
            for name, args in chains.items():
                times[name].append(_timed(functools.partial(run, *args), cpu))
            self.say(
                f"P4 rep {r + 1}/{s.reps}: "
                + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items())
            )
        ours = "client t_cut..0"
        cut = _median(times[ours])
        for name in ("client-size T..0", "server-size T..0"):
            full = _median(times[name])
            self.add(
                "P4",
                f"client chain/full {name.split()[0]} chain (wall)",
                cut / full,
                f"{cut / s.chain_images:.3g}s vs {full / s.chain_images:.3g}s per image; "
                f"{flops[ours] / s.chain_images / 1e9:.3g} vs "
                f"{flops[name] / s.chain_images / 1e9:.3g} GFLOP per image",
                {
                    "cut_steps": cut_steps,
                    "full_steps": s.chain_steps,
                    "t_cut": c,
                    "images": s.chain_images,
                    "device": "cpu",
                    "cut_wall_s": times[ours],
                    "full_wall_s": times[name],
                    "cut_flops": flops[ours],
                    "full_flops": flops[name],
                    "flops_ratio": flops[ours] / flops[name],
                },
            )
        self.daemon_rss()

    def daemon_rss(self) -> None:
        """Run `collafuse client run` against the bench server and read its peak RSS."""
        s = self.s
        state = self.work_dir / "daemon"
        config = self.work_dir / "daemon.toml"
        config.write_text(
            "\n".join(
                [
                    'client_id = "bench-daemon"',
                    f'server = "{self.server.address}"',
                    "insecure = true",
                    f"state_dir = {json.dumps(str(state))}",
                    f"cut_ratio = {s.cut_ratio}",
                    f"max_release_snr = {BENCH_MAX_RELEASE_SNR}",
                    "exit_when_done = true",
                    "threads = 1",
                    "[image]",
                    f"channels = {s.image.channels}",
                    f"size = {s.image.size}",
                    "[data]",
                    'source = "digits"',
                    'partition = "iid"',
                    f"limit = {s.daemon_images}",
                    "[train]",
                    f"steps = {s.daemon_train_steps}",
                    "batch_size = 16",
                    f"checkpoint_every = {max(1, s.daemon_train_steps)}",
                ]
            )
            + "\n"
        )
        log = self.work_dir / "daemon.log"
        rss_file = self.work_dir / "daemon.maxrss"
        command = ["-m", "collafuse", "client", "run", "--config", str(config)]
        started = time.perf_counter()
        with log.open("wb") as fh:
            code = subprocess.run(
                [sys.executable, "-c", _PEAK_RSS, str(rss_file), *command],
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=600,
            ).returncode
        wall = time.perf_counter() - started
        if code != 0:
            tail = log.read_text(errors="replace").splitlines()[-10:]
            raise BenchError(f"the client daemon exited {code}:\n" + "\n".join(tail))
        rss_mib = int(rss_file.read_text()) / 1024  # Linux reports KiB
        self.add(
            "P4",
            "client daemon peak RSS (MiB)",
            rss_mib,
            f"`collafuse client run`: {s.daemon_images} images, {s.daemon_train_steps} local "
            f"steps, {wall:.1f}s",
            {
                "images": s.daemon_images,
                "train_steps": s.daemon_train_steps,
                "wall_s": wall,
                "peak_rss_mib": rss_mib,
                "model": CLIENT_UNET.model_dump(mode="json"),
            },
        )


@contextmanager
def _quiet_server_logs(verbose: bool) -> Iterator[None]:
    """The server logs every registration at INFO; the bench prints its own progress."""
    import logging

    logger = logging.getLogger("collafuse")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_bench(
    settings: BenchSettings,
    out: Path,
    device: str = "auto",
    threads: int = 0,
    say: Say = print,
    verbose: bool = False,
) -> BenchReport:
    """Run the bench in a temporary directory, print the table and JSON, write JSON to `out`."""
    with tempfile.TemporaryDirectory(prefix="collafuse-bench-") as tmp, _quiet_server_logs(verbose):
        report = Bench(settings, Path(tmp), device, threads, say).run()
    doc = report.to_json()
    text = dumps(doc)
    say("")
    say(report.table())
    say("")
    say(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(text + "\n")
    tmp_out.replace(out)
    say(f"wrote {out} ({report.seconds:.0f}s)")
    return report
