"""The server's sampler: runs T..t_cut, batching concurrent requests into one network call a step.

Every sample carries its own timestep pair, and its noise depends only on the request's seed, the
sample's index and the chain position, so requests from clients with different cuts, samplers
and step counts share each forward pass, and a sample's result does not depend on what else was
in the batch. The state of every running chain stays on the sampler's device until it is done.

The analytic sampler also needs Gamma_t = E||eps_hat(x_t)||^2 / d at each of a chain's
timesteps (docs/design.md section 2). The sampler estimates it once per (model version, label,
timestep), on the first chain that needs it, from GAMMA_SAMPLES pool draws of q(x_t) that the
trainer supplies, and keeps it while that version serves; without pool data it uses Gamma = 1,
DDPM's own variance.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from collafuse.common.diffusion import Diffusion, SamplerKind, draws_noise
from collafuse.server.trainer import GammaDraw, ModelHub

log = logging.getLogger("collafuse.server.sampler")

NOISE_BLOCK = 32
"""Samples per noise draw: sample i of a request takes its noise from block i // NOISE_BLOCK."""

GAMMA_SAMPLES = 64
"""Pool draws per timestep in an estimate of Gamma_t: one network call of this many samples per
timestep, once per model version, label and timestep. On 28x28 images the mean runs over 50,000
scalars, a standard error of about 0.006 in Gamma_t; with clipping, the added variance is bounded
by a^2 (x_0 in [-1, 1]) where (1 - abar_t) / abar_t would magnify that error."""

GammaSource = Callable[[int, int, int, int], GammaDraw | None]
"""(t, n, label, seed) -> n draws of q(x_t) for that label's data, or None without any (the
trainer's `gamma_samples`)."""

_MASK64 = (1 << 64) - 1
_GAMMA_SEED = 0x6A77A


def _mix(seed: int, block: int, position: int) -> int:
    """A 63-bit generator seed for (request seed, block, chain position): splitmix64 rounds."""
    h = (seed & _MASK64) ^ 0x243F6A8885A308D3
    for part in (block, position):
        h = (h + 0x9E3779B97F4A7C15 + (part & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def sample_noise(
    seed: int,
    lo: int,
    hi: int,
    position: int,
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    """N(0, I) for samples lo..hi-1 of a request at chain position `position` (0 draws x_T).

    Each block of NOISE_BLOCK samples is one draw from a generator seeded by (seed, block,
    position), of which the samples in [lo, hi) take their rows: the same values whatever the
    request's slicing, its offset or the rest of the batch. `generator` (on `device`) is reused.
    """
    gen = generator if generator is not None else torch.Generator(device)
    parts = []
    for block in range(lo // NOISE_BLOCK, (hi - 1) // NOISE_BLOCK + 1):
        start = block * NOISE_BLOCK
        gen.manual_seed(_mix(seed, block, position))
        z = torch.randn((NOISE_BLOCK, *shape), generator=gen, device=device)
        parts.append(z[max(lo, start) - start : min(hi, start + NOISE_BLOCK) - start])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass(eq=False)
class Job:
    """A slice of one request: samples lo..hi-1 moving together down their timestep list."""

    seed: int
    lo: int  # index of the job's first sample within its request
    hi: int
    shape: tuple[int, int, int]
    timesteps: list[int]
    kind: SamplerKind
    eta: float
    label: int
    request: int = 0  # the jobs of one request share this number
    pos: int = 0
    waited: int = 0  # steps in a row this job was left out
    # The state x at timesteps[pos]: None until the job first runs, on the sampler's device
    # while it runs, on the CPU once it is done.
    x: Tensor | None = None
    labels: Tensor | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False
    # The weights the whole chain runs on, pinned in the hub when the job first runs.
    model_version: int = -1
    pinned: bool = False
    # analytic: Gamma_t at timesteps[:-1] for that version and label, (K,) on the device.
    gamma: Tensor | None = None
    # Called from the sampler thread once the job is done (an asyncio server wakes its handler).
    on_done: list[Callable[[], object]] = field(default_factory=list)

    def finish(self, error: BaseException | None = None) -> None:
        """Mark the job done (failed when error is given) and notify whoever waits."""
        if error is not None:
            self.error = error
        self.done.set()
        for notify in self.on_done:
            notify()

    @property
    def n(self) -> int:
        """Samples in this job."""
        return self.hi - self.lo

    @property
    def needs_noise(self) -> bool:
        """Whether a step draws noise: every sampler but deterministic DDIM does."""
        return draws_noise(self.kind, self.eta)


def default_max_batch(device: torch.device) -> int:
    """Samples per step when the config leaves it to the device (sampler.max_batch = 0)."""
    return 512 if device.type == "cuda" else 16


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """sampler.precision with auto resolved: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    return "bf16" if precision == "bf16" else "fp32"


class BatchingSampler:
    """A worker thread that steps active jobs together, up to max_batch samples a call.

    Iteration-level batching with a fair share: requests are cut into jobs of at most
    `slice_size` samples, and each step serves the requests with the least work left first.
    While an interactive request (at most `interactive_n` samples) waits, a step carries at most
    `interactive_batch` samples (or all the interactive ones, if more), so a large request
    cannot make a small one wait for its long steps; it takes the rest of the room, and a job
    left out for `max_wait` steps in a row goes first.
    """

    def __init__(
        self,
        diffusion: Diffusion,
        hub: ModelHub,
        max_batch: int,
        device: torch.device,
        *,
        slice_size: int = 32,
        interactive_n: int = 16,
        interactive_batch: int = 0,
        max_wait: int = 8,
        precision: str = "auto",
        compile: bool = False,
        gamma_samples: GammaSource | None = None,
        gamma_n: int = GAMMA_SAMPLES,
    ) -> None:
        self.diffusion = diffusion
        self.hub = hub
        self.max_batch = max_batch or default_max_batch(device)
        self.device = device
        self.slice_size = max(1, min(slice_size, self.max_batch))
        self.interactive_n = interactive_n
        # A step's cost grows with its batch on a CPU from a few samples on (measured n=1
        # latency beside a 512-sample request, over alone: 2.5 at 16, 2.3 at 8, 1.9 at 4, 1.7 at
        # 1, while the large request took about as long); a GPU runs a few hundred for about the
        # price of one.
        auto = 128 if device.type == "cuda" else 4
        self.interactive_batch = min(self.max_batch, interactive_batch or auto)
        self.max_wait = max_wait
        self.precision = resolve_precision(precision, device)
        self.compile = compile
        self._net: Callable[..., Any] = hub.model
        self._generator = torch.Generator(device)
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._requests = itertools.count(1)
        self.forward_calls = 0
        self.samples_stepped = 0
        self.queue_depth = 0
        """Jobs waiting or running, as of the last step."""
        self.gamma_samples = gamma_samples
        self.gamma_n = gamma_n
        # Gamma_t per model version, then per (label, timestep): 0-d tensors on the device.
        self._gammas: dict[int, dict[tuple[int, int], Tensor]] = {}
        self._warned_no_gamma = False
        self.gamma_estimates = 0
        """Timesteps whose Gamma_t was estimated (or fell back to 1), over all versions."""

    def autocast(self) -> AbstractContextManager[Any]:
        """The precision the network runs in during synthesis."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def prepare(self, shape: tuple[int, int, int]) -> float:
        """Compile the network when asked to, before any request waits for it; returns seconds.

        Two warm-up batches: the first compiles a static graph, the second a graph whose batch
        dimension alone is dynamic, which then serves every batch of two or more (a single
        sample is padded to two). dynamic=True would make every dimension symbolic as well:
        on an H200 the 36M-parameter UNet did not finish compiling that in 200 s.
        """
        if not self.compile:
            return 0.0
        started = time.perf_counter()
        try:
            self._net = torch.compile(self.hub.model)
            for batch in (2, max(3, min(self.max_batch, 64))):
                x = torch.zeros((batch, *shape), device=self.device)
                t = torch.full((batch,), 1, dtype=torch.long, device=self.device)
                labels = torch.zeros(batch, dtype=torch.long, device=self.device)
                with self.hub.lock:
                    self._forward(x, t, labels, None)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:
            # A machine without a working compiler can still serve, only slower: say so loudly.
            log.warning(
                "torch.compile failed (%s: %s); serving uncompiled", type(exc).__name__, exc
            )
            self._uncompile()
        seconds = time.perf_counter() - started
        if self.compile:
            log.info("compiled the synthesis network in %.0f s", seconds)
        return seconds

    def _uncompile(self) -> None:
        self.compile = False
        self._net = self.hub.model

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; pending jobs fail."""
        self._stop.set()
        self._thread.join()

    def submit(
        self,
        n: int,
        seed: int,
        timesteps: Sequence[int],
        kind: SamplerKind,
        eta: float,
        label: int,
        shape: tuple[int, int, int],
        first_index: int = 0,
    ) -> list[Job]:
        """Queue samples first_index .. first_index + n - 1 of a request, from x_T ~ N(0, I).

        Returns the jobs (slices of at most slice_size samples, in order).
        """
        request = next(self._requests)
        jobs = []
        lo, end = first_index, first_index + n
        while lo < end:
            # Cut at multiples of slice_size, so a resumed request is sliced like the original.
            hi = min(end, (lo // self.slice_size + 1) * self.slice_size)
            job = Job(
                seed=seed,
                lo=lo,
                hi=hi,
                shape=shape,
                timesteps=list(timesteps),
                kind=kind,
                eta=eta,
                label=label,
                request=request,
            )
            jobs.append(job)
            self._queue.put(job)
            lo = hi
        return jobs

    def _release(self, job: Job) -> None:
        if job.pinned:
            job.pinned = False
            self.hub.unpin(job.model_version)

    def _run(self) -> None:
        active: list[Job] = []
        while not self._stop.is_set():
            try:
                # Block only when idle; otherwise just pick up what has arrived.
                while True:
                    active.append(self._queue.get(timeout=0.1 if not active else 0.0))
            except queue.Empty:
                pass
            for job in active:
                if job.cancelled:
                    self._release(job)
            active = [j for j in active if not j.cancelled]
            self.queue_depth = len(active)
            if len(self._gammas) > 1:
                self._forget_gammas(active)
            if not active:
                continue
            batch = self.pick(active)
            chosen = set(map(id, batch))
            for job in active:
                job.waited = 0 if id(job) in chosen else job.waited + 1
            try:
                self._step(batch)
            except Exception as exc:
                # One bad request must not fail the others that shared its step: retry each
                # alone, and fail only those that fail by themselves.
                log.exception("sampler step of %d jobs failed", len(batch))
                for job in batch:
                    try:
                        if len(batch) == 1:
                            raise exc
                        self._step([job])
                    except Exception as own:
                        self._release(job)
                        job.finish(own)
            finished = [j for j in batch if j.done.is_set()]
            active = [j for j in active if j not in finished]
        for job in active:
            self._release(job)
            job.finish(RuntimeError("server is shutting down"))

    def pick(self, active: list[Job]) -> list[Job]:
        """The jobs of the next step: least work left first, within the step's budget."""
        left: dict[int, int] = defaultdict(int)
        size: dict[int, int] = defaultdict(int)
        for job in active:
            left[job.request] += job.n * (len(job.timesteps) - 1 - job.pos)
            size[job.request] += job.n
        interactive = sum(j.n for j in active if size[j.request] <= self.interactive_n)
        # Aging: a job left out for max_wait steps goes first, so a steady stream of small
        # requests cannot starve a large one.
        starving = [j for j in active if j.waited >= self.max_wait]
        budget = self.max_batch
        if interactive:
            need = interactive + sum(j.n for j in starving)
            budget = min(self.max_batch, max(need, self.interactive_batch))
        batch: list[Job] = []
        room = budget
        # sorted() is stable: a request's slices keep their order, so they finish in order.
        order = sorted(active, key=lambda j: (j.waited < self.max_wait, left[j.request], j.request))
        for job in order:
            if job.n <= room:
                batch.append(job)
                room -= job.n
        return batch

    def _forward(self, x: Tensor, t: Tensor, labels: Tensor, weights: Any) -> Tensor:
        """eps_hat in float32; `weights` None runs the hub's current weights."""
        pad = 0
        if self.compile and x.shape[0] == 1:
            # The compiled graphs serve batches of 2 and more; one sample rides twice.
            pad = 1
            x, t, labels = (torch.cat([v, v]) for v in (x, t, labels))
        with torch.inference_mode(), self.autocast():
            if weights is None and self.compile:
                try:
                    out = self._net(x, t, class_labels=labels).sample
                except Exception:
                    log.exception("the compiled network failed; serving uncompiled from now on")
                    self._uncompile()
                    x, t, labels = (
                        x[: x.shape[0] - pad],
                        t[: t.shape[0] - pad],
                        labels[: labels.shape[0] - pad],
                    )
                    pad = 0
                    out = self.hub.model(x, t, class_labels=labels).sample
            elif weights is None:
                out = self._net(x, t, class_labels=labels).sample
            else:
                out = torch.func.functional_call(
                    self.hub.model, weights, (x, t), {"class_labels": labels}
                ).sample
        out = out.float()
        return out[:1] if pad else out

    def _start(self, job: Job) -> None:
        """A job's first step: pin the weights its chain runs on and draw x_T on the device."""
        job.model_version = self.hub.pin()
        job.pinned = True
        job.x = sample_noise(job.seed, job.lo, job.hi, 0, job.shape, self.device, self._generator)
        job.labels = torch.full((job.n,), job.label, dtype=torch.long, device=self.device)
        if job.kind == "analytic":
            job.gamma = self._gamma_of(job)

    def _gamma_of(self, job: Job) -> Tensor:
        """Gamma_t at the job's timesteps[:-1] for its version and label, estimated once each."""
        known = self._gammas.setdefault(job.model_version, {})
        wanted = job.timesteps[:-1]
        missing = [t for t in dict.fromkeys(wanted) if (job.label, t) not in known]
        if missing:
            estimates = self._estimate_gammas(job.model_version, job.label, missing)
            known.update(((job.label, t), g) for t, g in zip(missing, estimates, strict=True))
            self.gamma_estimates += len(missing)
        return torch.stack([known[(job.label, t)] for t in wanted])

    def _estimate_gammas(self, version: int, label: int, timesteps: list[int]) -> list[Tensor]:
        """Monte Carlo Gamma_t on the pinned weights, from pool draws; 1 where there are none.

        The draws are seeded by (version, label, t), so an estimate does not depend on which
        request asked first or what ran beside it. Nothing is read back to the host.
        """
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        draws: dict[int, GammaDraw] = {}
        for t in timesteps:
            draw = None
            if self.gamma_samples is not None:
                seed = _mix(_GAMMA_SEED ^ version, label, t)
                draw = self.gamma_samples(t, self.gamma_n, label, seed)
            if draw is not None:
                draws[t] = draw
        if len(draws) < len(timesteps) and not self._warned_no_gamma:
            self._warned_no_gamma = True
            log.warning(
                "analytic sampler: no pool data to estimate Gamma_t from; using Gamma = 1 "
                "(DDPM's variance) at those timesteps until a new model version (logged once)"
            )
        out = {t: torch.ones((), dtype=dtype, device=self.device) for t in timesteps}
        if draws:
            present = list(draws)

            def model(x: Tensor, t: Tensor) -> Tensor:
                labels = torch.full((x.shape[0],), label, dtype=torch.long, device=self.device)
                return self._forward(x, t, labels, self.hub.weights(version))

            with self.hub.lock:
                means = self.diffusion.estimate_gamma(
                    model, present, lambda t: draws[t].x_t, max_batch=self.max_batch
                )
            ok = torch.stack([draws[t].ok for t in present])
            means = torch.where(ok, means.to(dtype), torch.ones_like(means, dtype=dtype))
            out.update(zip(present, means.unbind(), strict=True))
        return [out[t] for t in timesteps]

    def _forget_gammas(self, active: list[Job]) -> None:
        """Drop the Gamma_t of versions that neither serve now nor run a chain."""
        live = {j.model_version for j in active} | {self.hub.version}
        for version in [v for v in self._gammas if v not in live]:
            del self._gammas[version]

    def _step(self, batch: list[Job]) -> None:
        """One network call per model version in the batch, then one update per sampler kind.

        Nothing here reads device values back to the host, except the finished samples once.
        """
        for job in batch:
            if job.x is None:
                self._start(job)
        xs = [j.x for j in batch if j.x is not None]
        x = torch.cat(xs)  # (B, C, H, W) on the device
        labels = torch.cat([j.labels for j in batch if j.labels is not None])
        t_host = [j.timesteps[j.pos] for j in batch for _ in range(j.n)]
        s_host = [j.timesteps[j.pos + 1] for j in batch for _ in range(j.n)]
        t = torch.tensor(t_host, dtype=torch.long).to(self.device, non_blocking=True)
        s = torch.tensor(s_host, dtype=torch.long).to(self.device, non_blocking=True)
        spans: list[tuple[int, int]] = []
        offset = 0
        for job in batch:
            spans.append((offset, offset + job.n))
            offset += job.n
        versions = sorted({j.model_version for j in batch})
        with self.hub.lock:
            if len(versions) == 1:
                eps = self._forward(x, t, labels, self.hub.weights(versions[0]))
            else:
                # Chains pinned to weights the trainer has since replaced: one call per version.
                eps = torch.empty_like(x)
                for version in versions:
                    mine = torch.tensor(
                        [
                            r
                            for j, (lo, hi) in zip(batch, spans, strict=True)
                            if j.model_version == version
                            for r in range(lo, hi)
                        ]
                    ).to(self.device, non_blocking=True)
                    eps[mine] = self._forward(
                        x[mine], t[mine], labels[mine], self.hub.weights(version)
                    )
        self.forward_calls += len(versions)
        self.samples_stepped += x.shape[0]
        noisy = [j for j in batch if j.needs_noise]
        noise: Tensor | None = None
        if noisy:
            noise = torch.zeros_like(x) if len(noisy) < len(batch) else None
            parts = []
            for job, (lo, hi) in zip(batch, spans, strict=True):
                if job.needs_noise:
                    z = sample_noise(
                        job.seed,
                        job.lo,
                        job.hi,
                        job.pos + 1,
                        job.shape,
                        self.device,
                        self._generator,
                    )
                    if noise is None:
                        parts.append(z)
                    else:
                        noise[lo:hi] = z
            if noise is None:
                noise = torch.cat(parts)
        # One update per sampler kind and eta over all their rows, not one per job: per-call
        # overhead would otherwise grow with the number of requests in the step.
        groups: dict[tuple[SamplerKind, float], list[int]] = defaultdict(list)
        for job, (lo, hi) in zip(batch, spans, strict=True):
            groups[(job.kind, job.eta)].extend(range(lo, hi))
        # Gamma_t of the analytic rows, in batch order like their group's rows.
        gammas = [
            j.gamma[j.pos].expand(j.n)
            for j in batch
            if j.kind == "analytic" and j.gamma is not None
        ]
        gamma = torch.cat(gammas) if gammas else None
        if len(groups) == 1:
            (kind, eta), _ = next(iter(groups.items()))
            prev = self.diffusion.step(
                eps, x, t, s, kind=kind, eta=eta, noise=noise, gamma=gamma
            ).prev_sample
        else:
            prev = torch.empty_like(x)
            for (kind, eta), rows in groups.items():
                idx = torch.tensor(rows).to(self.device, non_blocking=True)
                out = self.diffusion.step(
                    eps[idx],
                    x[idx],
                    t[idx],
                    s[idx],
                    kind=kind,
                    eta=eta,
                    noise=None if noise is None else noise[idx],
                    gamma=gamma if kind == "analytic" else None,
                )
                prev[idx] = out.prev_sample
        finishing = [j.pos + 1 == len(j.timesteps) - 1 for j in batch]
        # The one copy back to the host: the samples whose chains end at this step.
        host = prev.cpu() if any(finishing) else None
        for job, (lo, hi), ends in zip(batch, spans, finishing, strict=True):
            job.pos += 1
            if ends and host is not None:
                job.x = host[lo:hi]
                job.labels = None
                self._release(job)
                job.finish()
            else:
                job.x = prev[lo:hi]
