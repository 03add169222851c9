"""The server's sampler: runs T..t_cut, batching concurrent requests into one network call a step.

Every sample carries its own timestep pair and its own noise generator, so requests from
clients with different cuts, samplers and step counts share each forward pass, and a sample's
result does not depend on what else was in the batch.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from collafuse.common.diffusion import Diffusion, SamplerKind
from collafuse.server.trainer import ModelHub

log = logging.getLogger("collafuse.server.sampler")


def sample_generators(seed: int, n: int, first_index: int = 0) -> list[torch.Generator]:
    """One generator per sample, derived from the request seed and the sample's index."""
    return [
        torch.Generator().manual_seed((seed * 1_000_003 + i) % (1 << 63))
        for i in range(first_index, first_index + n)
    ]


@dataclass(eq=False)
class Job:
    """A slice of one request: samples moving together down their own timestep list."""

    x: Tensor  # (n, C, H, W) current state
    timesteps: list[int]
    kind: SamplerKind
    eta: float
    labels: Tensor  # (n,) int64
    generators: list[torch.Generator]
    request: int = 0  # the jobs of one request share this number
    pos: int = 0
    waited: int = 0  # steps in a row this job was left out
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False
    model_version: int = 0
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
        return int(self.x.shape[0])

    def noise(self) -> Tensor:
        """Fresh N(0, I) for each sample from its own generator, shape like x."""
        shape = self.x.shape[1:]
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])


def default_max_batch(device: torch.device) -> int:
    """Samples per step when the config leaves it to the device (sampler.max_batch = 0)."""
    return 512 if device.type == "cuda" else 16


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
    ) -> None:
        self.diffusion = diffusion
        self.hub = hub
        self.max_batch = max_batch or default_max_batch(device)
        self.device = device
        self.slice_size = max(1, min(slice_size, self.max_batch))
        self.interactive_n = interactive_n
        # A step's cost grows with its batch on a CPU from a few samples on; a GPU runs a few
        # hundred for about the price of one.
        auto = 128 if device.type == "cuda" else 16
        self.interactive_batch = min(self.max_batch, interactive_batch or auto)
        self.max_wait = max_wait
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._requests = itertools.count(1)
        self.forward_calls = 0
        self.samples_stepped = 0

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
        gens = sample_generators(seed, n, first_index)
        request = next(self._requests)
        jobs = []
        for lo in range(0, n, self.slice_size):
            g = gens[lo : lo + self.slice_size]
            x = torch.stack([torch.randn(shape, generator=gi) for gi in g])
            job = Job(
                x=x,
                timesteps=list(timesteps),
                kind=kind,
                eta=eta,
                labels=torch.full((len(g),), label, dtype=torch.long),
                generators=g,
                request=request,
            )
            jobs.append(job)
            self._queue.put(job)
        return jobs

    def _run(self) -> None:
        active: list[Job] = []
        while not self._stop.is_set():
            try:
                # Block only when idle; otherwise just pick up what has arrived.
                while True:
                    active.append(self._queue.get(timeout=0.1 if not active else 0.0))
            except queue.Empty:
                pass
            active = [j for j in active if not j.cancelled]
            if not active:
                continue
            batch = self.pick(active)
            chosen = set(map(id, batch))
            for job in active:
                job.waited = 0 if id(job) in chosen else job.waited + 1
            try:
                self._step(batch)
            except Exception as exc:  # fail these requests, keep serving others
                log.exception("sampler step failed")
                for job in batch:
                    job.finish(exc)
            finished = [j for j in batch if j.done.is_set()]
            active = [j for j in active if j not in finished]
        for job in active:
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

    def _step(self, batch: list[Job]) -> None:
        """One network call for every job in the batch, then each job's own update."""
        x = torch.cat([j.x for j in batch]).to(self.device)  # (B, C, H, W)
        t = torch.cat([torch.full((j.n,), j.timesteps[j.pos], dtype=torch.long) for j in batch])
        s = torch.cat([torch.full((j.n,), j.timesteps[j.pos + 1], dtype=torch.long) for j in batch])
        labels = torch.cat([j.labels for j in batch]).to(self.device)
        noise = torch.cat([j.noise() for j in batch]).to(self.device)
        with self.hub.lock, torch.inference_mode():
            eps = self.hub.model(x, t.to(self.device), class_labels=labels).sample.float()
            version = self.hub.version
        self.forward_calls += 1
        self.samples_stepped += x.shape[0]
        # One update per sampler kind and eta over all their rows, not one per job: per-call
        # overhead would otherwise grow with the number of requests in the step.
        spans: list[tuple[int, int]] = []
        groups: dict[tuple[SamplerKind, float], list[int]] = defaultdict(list)
        offset = 0
        for job in batch:
            spans.append((offset, offset + job.n))
            groups[(job.kind, job.eta)].extend(range(offset, offset + job.n))
            offset += job.n
        if len(groups) == 1:
            (kind, eta), _ = next(iter(groups.items()))
            prev = self.diffusion.step(eps, x, t, s, kind=kind, eta=eta, noise=noise).prev_sample
        else:
            prev = torch.empty_like(x)
            for (kind, eta), rows in groups.items():
                idx = torch.tensor(rows)
                dev = idx.to(x.device)
                out = self.diffusion.step(
                    eps[dev], x[dev], t[idx], s[idx], kind=kind, eta=eta, noise=noise[dev]
                )
                prev[dev] = out.prev_sample
        prev = prev.cpu()
        for job, (lo, hi) in zip(batch, spans, strict=True):
            job.x = prev[lo:hi]
            job.pos += 1
            job.model_version = version
            if job.pos == len(job.timesteps) - 1:
                job.finish()
