"""A pool larger than the trainer's memory budget is streamed from disk in shuffled chunks."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_integration import tiny_server_config

from collafuse.common.diffusion import Diffusion
from collafuse.server.pool import Pool
from collafuse.server.trainer import Trainer
from collafuse.server.training_set import TrainingSet

SHAPE = (1, 8, 8)
ROW_BYTES = 4 * math.prod(SHAPE)
CUT_A, CUT_B = 20, 30


def fill(pool: Pool, client: str, t_cut: int, first: int, n: int) -> None:
    """n cut images whose every pixel is its own number (first, first + 1, ...)."""
    pool.register(client, t_cut, t_cut / 50, max_clients=4)
    ids = torch.arange(first, first + n, dtype=torch.float32)
    pixels = ids.reshape(n, 1, 1, 1).expand(n, *SHAPE).contiguous()
    pool.add(client, t_cut, [f"{client}-{i}" for i in range(first, first + n)], pixels)


def streaming_set(pool: Pool, chunk_rows: int, batch_size: int = 16) -> TrainingSet:
    return TrainingSet(
        pool,
        torch.device("cpu"),
        memory_bytes=2 * chunk_rows * ROW_BYTES,
        passes=1.0,
        batch_size=batch_size,
        seed=0,
    )


def draw_until(
    data: TrainingSet, want: set[int], max_steps: int = 5000, max_s: float = 60.0
) -> tuple[set[int], dict[int, tuple[int, int]]]:
    """Draw batches until every number in `want` was seen (bounded): numbers seen, and the
    (t_cut, client) each came with."""
    gen = torch.Generator().manual_seed(1)
    seen: set[int] = set()
    meta: dict[int, tuple[int, int]] = {}
    deadline = time.monotonic() + max_s
    for _ in range(max_steps):
        x, c, label = data.batch(16, gen)
        for v, cc, lab in zip(x[:, 0, 0, 0].tolist(), c.tolist(), label.tolist(), strict=True):
            seen.add(int(v))
            meta[int(v)] = (cc, lab)
        if want <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.0005)  # a training step takes time: let the loader read meanwhile
    return seen, meta


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    pool = Pool(tmp_path / "pool.sqlite")
    fill(pool, "a", CUT_A, first=0, n=400)
    fill(pool, "b", CUT_B, first=400, n=200)
    return pool


def test_a_pool_larger_than_the_budget_is_streamed_whole_within_it(pool: Pool) -> None:
    data = streaming_set(pool, chunk_rows=50)
    try:
        assert data.refresh() == [0, 1]
        assert data.streaming and data.size == 600 and data.resident <= 50
        seen, meta = draw_until(data, set(range(600)))
        # Every image of the pool came round, with its own cut and client, and no more than
        # the budget (two chunks) was ever held.
        assert seen == set(range(600))
        assert all(meta[i] == (CUT_A, 0) for i in range(400))
        assert all(meta[i] == (CUT_B, 1) for i in range(400, 600))
        assert data.chunks_loaded >= 12  # 600 images in chunks of 50 take 12 reads a pass
        assert 0 < data.peak_bytes <= data.memory_bytes
    finally:
        data.close()
        pool.close()


def test_the_pool_held_whole_grows_in_place(pool: Pool) -> None:
    """Uploads arriving while the pool is held whole are written behind it, not copied with
    it; the room to grow stays within the budget; Forget keeps the right rows."""
    data = streaming_set(pool, chunk_rows=1000)  # a budget of 2000 rows
    try:
        data.refresh()
        start = data.held().cuts.data_ptr()
        for k in range(5):
            fill(pool, "a", CUT_A, first=600 + 10 * k, n=10)
            data.refresh()
            assert data.held().cuts.data_ptr() == start  # the same buffer: no copy of the pool
        held = data.held()
        assert held.cuts[:, 0, 0, 0].tolist() == list(range(650))
        assert held.labels.tolist() == [0] * 400 + [1] * 200 + [0] * 50
        assert held.t_cut.tolist() == [CUT_A] * 400 + [CUT_B] * 200 + [CUT_A] * 50
        assert held.cuts.untyped_storage().nbytes() <= data.memory_bytes
        fill(pool, "b", CUT_B, first=2000, n=1300)  # past the room: one copy, then in place
        data.refresh()
        assert not data.streaming and data.resident == 1950
        assert data.held().cuts.untyped_storage().nbytes() <= data.memory_bytes
        assert data.held().cuts[:, 0, 0, 0].tolist() == [*range(650), *range(2000, 3300)]
        data.forget(1)
        assert sorted(data.held().cuts[:, 0, 0, 0].tolist()) == [*range(400), *range(600, 650)]
        fill(pool, "a", CUT_A, first=4000, n=5)
        data.refresh()
        assert data.held().cuts[:, 0, 0, 0].tolist()[-5:] == list(range(4000, 4005))
        assert data.resident == 455
    finally:
        data.close()
        pool.close()


def test_a_pool_within_the_budget_is_held_whole_and_grows(pool: Pool) -> None:
    data = streaming_set(pool, chunk_rows=1000)
    try:
        data.refresh()
        assert not data.streaming and data.resident == 600
        fill(pool, "a", CUT_A, first=600, n=10)
        assert data.refresh() == [0] and data.resident == 610
        # Once the pool outgrows the budget the trainer switches to streaming, keeping a
        # random chunk of what it held so that training goes on at once.
        fill(pool, "b", CUT_B, first=610, n=1500)
        data.refresh()
        assert data.streaming and data.size == 2110 and data.resident <= data.chunk_rows
        seen, _ = draw_until(data, set(range(2110)), max_steps=20000)
        assert seen == set(range(2110))
        assert data.peak_bytes <= 2 * 1000 * ROW_BYTES
    finally:
        data.close()
        pool.close()


def test_forget_while_streaming_drops_the_rows_at_once_and_from_later_chunks(pool: Pool) -> None:
    data = streaming_set(pool, chunk_rows=40)
    try:
        data.refresh()
        draw_until(data, set(range(600)), max_steps=50)  # the loader has chunks in flight
        assert pool.forget("b") == 200
        data.forget(1)
        assert data.size == 400
        seen, meta = draw_until(data, set(range(400)))
        assert seen == set(range(400)), "client b's images must never be drawn again"
        assert {lab for _, lab in meta.values()} == {0}
        # The forgotten client uploads again: only the new images come back.
        fill(pool, "b", CUT_B, first=1000, n=30)
        data.refresh()
        seen, _ = draw_until(data, set(range(400)) | set(range(1000, 1030)))
        assert seen == set(range(400)) | set(range(1000, 1030))
    finally:
        data.close()
        pool.close()


def first_chunk(pool: Pool, step: int) -> set[int]:
    """The images of the first chunk a loader started at the trainer's `step` reads."""
    data = streaming_set(pool, chunk_rows=100)
    try:
        data.refresh(step)
        data.batch(16, torch.Generator().manual_seed(0))  # waits for the first chunk
        return {int(v) for v in data.held().cuts[:, 0, 0, 0].tolist()}
    finally:
        data.close()


def test_a_loader_started_at_a_later_step_takes_a_fresh_order(pool: Pool) -> None:
    """A resumed or restarted trainer does not replay pass 0's first chunks; the same step
    gives the same order."""
    try:
        at_zero = first_chunk(pool, 0)
        assert len(at_zero) == 100
        assert first_chunk(pool, 0) == at_zero
        later = [first_chunk(pool, step) for step in (1000, 2000)]
        assert all(chunk != at_zero for chunk in later) and later[0] != later[1]
    finally:
        pool.close()


def test_a_damaged_row_fails_the_draw_and_streaming_resumes_once_it_is_gone(
    pool: Pool, tmp_path: Path
) -> None:
    db = sqlite3.connect(tmp_path / "pool.sqlite")
    db.execute("UPDATE cuts SET data = x'00' WHERE image_id = 'a-7'")
    db.commit()
    data = streaming_set(pool, chunk_rows=50)
    try:
        data.refresh()
        with pytest.raises(RuntimeError, match=r"reading the pool from disk failed.*holds 1 bytes"):
            draw_until(data, set(range(600)))
        db.execute("DELETE FROM cuts WHERE image_id = 'a-7'")
        db.commit()
        data.refresh()  # starts the loader again, as the trainer's next loop does
        want = set(range(600)) - {7}
        seen, _ = draw_until(data, want)
        assert seen == want
    finally:
        db.close()
        data.close()
        pool.close()


def test_the_trainer_trains_on_a_streamed_pool(tmp_path: Path) -> None:
    pool = Pool(tmp_path / "noisy.sqlite")
    for client, t_cut in (("a", CUT_A), ("b", CUT_B)):
        pool.register(client, t_cut, t_cut / 50, max_clients=4)
        cuts = torch.randn(300, *SHAPE, generator=torch.Generator().manual_seed(t_cut))
        pool.add(client, t_cut, [f"{client}-{i}" for i in range(300)], cuts)
    budget = 2 * 100 * ROW_BYTES
    config = tiny_server_config(tmp_path / "server", pool_memory_mib=budget / 2**20)
    trainer = Trainer(
        config,
        Diffusion.from_config(config.schedule),
        pool,
        torch.device("cpu"),
        tmp_path / "checkpoints" / "server.pt",
    )
    try:
        assert trainer.refresh() == 600
        assert trainer.data.streaming and trainer.trained_since == {0: 0, 1: 0}
        losses = [float(trainer.train_step()) for _ in range(30)]
        assert all(np.isfinite(losses)) and trainer.step == 30
        assert trainer.data.chunks_loaded >= 1
        assert trainer.data.peak_bytes <= budget
        assert trainer.state == "training"
        # Forget reaches the streamed set as it does the resident one.
        pool.forget("b")
        assert trainer.forget(1) == (1, 30)
        assert trainer.data.size == 300
    finally:
        trainer.stop()
        pool.close()
