"""The cut images the server's trainer draws batches from, within a memory budget.

While the pool fits the budget (`train.pool_memory_mib`) it is held whole on the trainer's
device and grows as uploads arrive. Once it does not, the trainer keeps only an index of the
pool in host memory (24 bytes an image) and streams the pixels from disk in shuffled chunks:
each pass over the pool visits its images in a fresh seeded order, cut into chunks of half the
budget; a loader thread reads the next chunk (and copies it to the device, on a stream of its
own on a GPU) while the trainer draws batches from the current one. So the pool may exceed
both GPU and host memory, and training never waits for the disk unless the disk is slower
than training: then it draws a little longer from the chunk it has (counted in `late_swaps`).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from collafuse.server.pool import Pool

log = logging.getLogger("collafuse.server.trainer")

MEMORY_SHARE = 4
"""The default budget is a quarter of the device's memory (the GPU's, or the host's on a CPU)."""

_WAIT_S = 0.2
"""How often a blocked loader or trainer looks at the stop flag."""

CHUNK_TIMEOUT_S = 300.0
"""How long training waits for a chunk when it has none left (a Forget emptied it) before it
fails (and the trainer restarts)."""


def memory_budget(device: torch.device, configured_mib: float) -> int:
    """Bytes of cut images the trainer may hold: the configured MiB, or a share of the device."""
    if configured_mib > 0:
        return max(1, int(configured_mib * 2**20))
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total) // MEMORY_SHARE


@dataclass(frozen=True)
class Chunk:
    """Cut images held on the device, with the pool sequence number of each."""

    seq: np.ndarray  # (N,) int64 on the host, for dropping a forgotten client's rows
    cuts: Tensor  # (N, C, H, W) float32 on the device
    t_cut: Tensor  # (N,) int64 on the device
    labels: Tensor  # (N,) int64 on the device: the client index

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held."""
        return self.cuts.numel() * self.cuts.element_size()

    def keep(self, mask: np.ndarray) -> Chunk:
        """The rows where `mask` (N,) is True."""
        if mask.all():
            return self
        where = torch.from_numpy(np.flatnonzero(mask)).to(self.cuts.device)
        return Chunk(self.seq[mask], self.cuts[where], self.t_cut[where], self.labels[where])

    @staticmethod
    def empty(device: torch.device, shape: tuple[int, ...] | None) -> Chunk:
        """No rows (of the given image shape, when known)."""
        return Chunk(
            np.empty(0, dtype=np.int64),
            torch.empty((0, *(shape or ())), device=device),
            torch.empty(0, dtype=torch.long, device=device),
            torch.empty(0, dtype=torch.long, device=device),
        )


class TrainingSet:
    """The rows the trainer draws from: the whole pool, or a chunk of it streamed from disk."""

    def __init__(
        self,
        pool: Pool | None,
        device: torch.device,
        *,
        memory_bytes: int,
        passes: float,
        batch_size: int,
        seed: int,
    ) -> None:
        self.pool = pool
        self.device = device
        self.memory_bytes = memory_bytes
        self.passes = passes
        self.batch_size = batch_size
        self.seed = seed
        self.streaming = False
        """True once the pool outgrew the budget (it stays so until a restart)."""
        self.chunks_loaded = 0
        """Chunks read from disk since streaming began."""
        self.late_swaps = 0
        """Times a chunk had been trained for its passes and the next was not read yet."""
        self.peak_bytes = 0
        """The most bytes of pixels held at once (current chunk, next chunk, chunk being read)."""
        self._held = 0
        self._shape: tuple[int, ...] | None = None
        self._chunk = Chunk.empty(device, None)
        # While the pool is held whole, _chunk views the front of these buffers (see _append).
        self._room: Chunk | None = None
        # The index of every row the pool holds (for streaming and for the size).
        self._seq = np.empty(0, dtype=np.int64)
        self._t_cut = np.empty(0, dtype=np.int64)
        self._labels = np.empty(0, dtype=np.int64)
        self._last_seq = 0
        self._forgotten: dict[int, int] = {}
        """Client index -> last sequence number deleted by Forget; a chunk read before the
        deletion drops those rows when it arrives."""
        self._steps_on_chunk = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ready: queue.Queue[Chunk | BaseException] = queue.Queue(maxsize=1)
        # One chunk beside the current one may exist (queued, or being read): with chunks of
        # half the budget the pixels held never exceed it.
        self._slot = threading.Semaphore(1)
        self._loader: threading.Thread | None = None

    # ----- sizes -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Rows the pool holds (all of them, not only those in memory)."""
        return len(self._seq)

    @property
    def resident(self) -> int:
        """Rows held on the device now (the whole pool unless streaming)."""
        return len(self._chunk)

    @property
    def row_bytes(self) -> int:
        """Bytes of one image's pixels (float32); 0 before the image shape is known."""
        return 4 * math.prod(self._shape) if self._shape else 0

    @property
    def chunk_rows(self) -> int:
        """Rows per streamed chunk: half the budget, so the next chunk fits beside it."""
        return max(1, self.memory_bytes // (2 * max(1, self.row_bytes)))

    def _account(self, delta: int) -> None:
        with self._lock:
            self._held += delta
            self.peak_bytes = max(self.peak_bytes, self._held)

    # ----- growing -----------------------------------------------------------------------------

    def refresh(self, step: int = 0) -> list[int]:
        """Index rows that arrived since the last refresh, reading their pixels while the pool
        fits the budget; returns the client indices that gained rows. `step`: the trainer's
        step, from which a loader started now numbers its passes."""
        if self.pool is None:
            return []
        with self._lock:
            if self.streaming and (self._loader is None or not self._loader.is_alive()):
                self._start_loader(step)  # a loader that failed is started again
            index = self.pool.index_since(self._last_seq)
            if not len(index.seq):
                return []
            self._shape = self._shape or index.shape
            self._seq = np.concatenate([self._seq, index.seq])
            self._t_cut = np.concatenate([self._t_cut, index.t_cut])
            self._labels = np.concatenate([self._labels, index.client_index])
            self._last_seq = int(index.seq[-1])
            if not self.streaming:
                if self.size * self.row_bytes <= self.memory_bytes:
                    seq, cuts = self.pool.read_cuts(index.seq, self._shape or ())
                    self._append(seq, cuts, *self._lookup(seq))
                else:
                    self._begin_streaming(step)
            return sorted({int(x) for x in np.unique(index.client_index)})

    def add(self, cuts: Tensor, t_cut: Tensor, labels: Tensor) -> None:
        """Hold rows that come from no pool (a benchmark, a test), whatever the budget."""
        t_cuts, clients = t_cut.long().cpu().numpy(), labels.long().cpu().numpy()
        with self._lock:
            first = self._last_seq + 1
            seq = np.arange(first, first + cuts.shape[0], dtype=np.int64)
            self._shape = self._shape or tuple(cuts.shape[1:])
            self._seq = np.concatenate([self._seq, seq])
            self._t_cut = np.concatenate([self._t_cut, t_cuts])
            self._labels = np.concatenate([self._labels, clients])
            self._last_seq = int(seq[-1]) if len(seq) else self._last_seq
            self._append(seq, cuts, t_cuts, clients)

    def _lookup(self, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """t_cut and client index of indexed rows, by sequence number."""
        at = np.searchsorted(self._seq, seq)
        return self._t_cut[at], self._labels[at]

    def _append(self, seq: np.ndarray, cuts: Tensor, t_cut: np.ndarray, labels: np.ndarray) -> None:
        """Add rows to the pool held whole, in place: the rows live at the front of buffers
        with room to grow (up to twice the rows, within the budget), so an upload arriving
        while the trainer runs costs a copy of what it adds, not of the whole pool."""
        old, added = len(self._chunk), cuts.shape[0]
        need = old + added
        row = self.row_bytes  # the callers set the shape first
        room = self._room
        if (
            room is None
            or room.cuts.shape[0] < need
            or (old and room.cuts.data_ptr() != self._chunk.cuts.data_ptr())
        ):
            capacity = max(need, min(2 * need, self.memory_bytes // max(1, row)))
            room = Chunk(
                np.empty(0, dtype=np.int64),
                torch.empty((capacity, *cuts.shape[1:]), dtype=torch.float32, device=self.device),
                torch.empty(capacity, dtype=torch.int64, device=self.device),
                torch.empty(capacity, dtype=torch.int64, device=self.device),
            )
            if old:
                room.cuts[:old].copy_(self._chunk.cuts)
                room.t_cut[:old].copy_(self._chunk.t_cut)
                room.labels[:old].copy_(self._chunk.labels)
            self._room = room
        room.cuts[old:need].copy_(cuts)
        room.t_cut[old:need].copy_(torch.from_numpy(t_cut))
        room.labels[old:need].copy_(torch.from_numpy(labels))
        self._chunk = Chunk(
            np.concatenate([self._chunk.seq, seq]),
            room.cuts[:need],
            room.t_cut[:need],
            room.labels[:need],
        )
        self._account(added * row)

    def _begin_streaming(self, step: int) -> None:
        """The pool outgrew the budget: keep a random chunk's worth of what is held, and start
        reading shuffled chunks from disk."""
        self.streaming = True
        rows = self.chunk_rows
        held = self._chunk
        self._room = None  # the whole pool's buffers go: what is kept is copied out of them
        if len(held) > rows:
            gen = np.random.default_rng((self.seed, step, 0x5EED))
            mask = np.zeros(len(held), dtype=bool)
            mask[gen.choice(len(held), size=rows, replace=False)] = True
            self._chunk = held.keep(mask)
            self._account(self._chunk.nbytes - held.nbytes)
        elif len(held):
            self._chunk = Chunk(
                held.seq, held.cuts.clone(), held.t_cut.clone(), held.labels.clone()
            )
        self._steps_on_chunk = 0
        log.info(
            "the pool (%d images, %.1f MiB) outgrew the trainer's budget of %.1f MiB: streaming "
            "it from disk in shuffled chunks of %d images",
            self.size,
            self.size * self.row_bytes / 2**20,
            self.memory_bytes / 2**20,
            rows,
        )
        self._start_loader(step)

    # ----- streaming ---------------------------------------------------------------------------

    def _start_loader(self, step: int) -> None:
        self._loader = threading.Thread(
            target=self._load, args=(step,), name="pool-loader", daemon=True
        )
        self._loader.start()

    def _load(self, step: int) -> None:
        """Read chunk after chunk, in a fresh order for each pass over the pool, until stop.

        The orders are seeded by (seed, step, pass): a loader started again, after a restart
        or a resume at a later step, takes fresh orders instead of replaying the first chunks
        of pass 0, which frequent restarts would otherwise train on again and again.
        """
        holding = False
        try:
            for epoch in range(2**62):
                with self._lock:
                    seqs = self._seq.copy()
                if not len(seqs) and self._stop.wait(_WAIT_S):  # all forgotten: wait for more
                    return
                order = np.random.default_rng((self.seed, step, epoch)).permutation(len(seqs))
                rows = self.chunk_rows
                for start in range(0, len(seqs), rows):
                    if not self._acquire_slot():
                        return
                    holding = True
                    chunk = self._read(np.sort(seqs[order[start : start + rows]]))
                    holding = False  # the trainer frees the slot when it drops the chunk
                    if not self._put(chunk):
                        return
        except BaseException as exc:  # hand it to the training thread, which restarts us
            if holding:
                self._slot.release()
            self._put(exc)

    def _acquire_slot(self) -> bool:
        while not self._stop.is_set():
            if self._slot.acquire(timeout=_WAIT_S):
                return True
        return False

    def _put(self, item: Chunk | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=_WAIT_S)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, seqs: np.ndarray) -> Chunk:
        """The rows with these sequence numbers that still exist, on the device."""
        assert self.pool is not None and self._shape is not None
        row = self.row_bytes
        self._account(len(seqs) * row)  # the buffer is allocated before the rows are read
        try:
            found, cuts = self.pool.read_cuts(seqs, self._shape)
        except BaseException:
            self._account(-len(seqs) * row)
            raise
        self._account((len(found) - len(seqs)) * row)
        with self._lock:
            known = np.isin(found, self._seq)  # Forget may have dropped rows meanwhile
            found = found[known]
            t_cut, labels = self._lookup(found)
        cuts = cuts[torch.from_numpy(known)] if not known.all() else cuts
        self.chunks_loaded += 1
        if self.device.type != "cuda":
            return Chunk(found, cuts, torch.from_numpy(t_cut), torch.from_numpy(labels))
        # Copy on a stream of the loader's own, so the copy overlaps the trainer's kernels.
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            moved = [
                x.pin_memory().to(self.device, non_blocking=True)
                for x in (cuts, torch.from_numpy(t_cut), torch.from_numpy(labels))
            ]
        stream.synchronize()
        for x in moved:  # the trainer uses them on its own stream; free them only after that
            x.record_stream(torch.cuda.current_stream(self.device))
        return Chunk(found, *moved)

    def _next_chunk(self, block: bool) -> bool:
        """Make the next streamed chunk the current one; False when none is ready (not block).

        Call without holding the lock: the loader takes it to finish a chunk.
        """
        deadline = time.monotonic() + CHUNK_TIMEOUT_S
        while True:
            try:
                item = self._ready.get(timeout=_WAIT_S) if block else self._ready.get_nowait()
                break
            except queue.Empty:
                if not block or self._stop.is_set():
                    return False
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no chunk of the pool was read from disk within {CHUNK_TIMEOUT_S:g} s"
                    ) from None
        if isinstance(item, BaseException):
            raise RuntimeError(f"reading the pool from disk failed: {item}") from item
        with self._lock:
            old = self._chunk
            self._chunk = self._drop_forgotten(item)
            self._steps_on_chunk = 0
            self._account(self._chunk.nbytes - item.nbytes - old.nbytes)
            del old
        self._slot.release()
        return True

    def _drop_forgotten(self, chunk: Chunk) -> Chunk:
        """A chunk read before a Forget loses the forgotten client's rows."""
        if not self._forgotten or not len(chunk):
            return chunk
        labels = chunk.labels.cpu().numpy()
        mask = np.ones(len(chunk), dtype=bool)
        for label, last in self._forgotten.items():
            mask &= ~((labels == label) & (chunk.seq <= last))
        return chunk.keep(mask)

    # ----- drawing -----------------------------------------------------------------------------

    def batch(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """size rows drawn with replacement: (cut images, t_cut, client index) on the device.

        Streaming, the current chunk is swapped for the next once it has been drawn from for
        `passes` passes' worth of batches; if the next is not read yet, drawing goes on.
        """
        if self.streaming:
            with self._lock:
                rows, steps = len(self._chunk), self._steps_on_chunk
            due = math.ceil(self.passes * max(1, rows) / self.batch_size)
            if not rows:
                self._next_chunk(block=True)
            elif steps >= due and not self._next_chunk(block=False) and steps == due:
                self.late_swaps += 1
        with self._lock:
            chunk = self._chunk
            if not len(chunk):
                raise RuntimeError("no cut images to train on")
            idx = torch.randint(0, len(chunk), (size,), generator=generator, device=self.device)
            self._steps_on_chunk += 1
            return chunk.cuts[idx], chunk.t_cut[idx], chunk.labels[idx]

    def held(self) -> Chunk:
        """The rows on the device now (the whole pool, or the current chunk)."""
        with self._lock:
            return self._chunk

    # ----- forgetting and stopping ---------------------------------------------------------------

    def forget(self, client_index: int) -> None:
        """Drop a client's rows (already deleted from the pool) from the index and memory."""
        with self._lock:
            keep = self._labels != client_index
            self._seq, self._t_cut, self._labels = (
                self._seq[keep],
                self._t_cut[keep],
                self._labels[keep],
            )
            self._forgotten[client_index] = self._last_seq
            old = self._chunk
            self._chunk = self._drop_forgotten(old)
            if self._chunk is not old:
                self._room = None  # the rows kept are a compact copy
            self._account(self._chunk.nbytes - old.nbytes)

    def close(self) -> None:
        """Stop the loader thread."""
        self._stop.set()
        loader = self._loader
        if loader is not None:
            loader.join(timeout=10)
