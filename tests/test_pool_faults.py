"""A damaged pool and a full disk are named, recoverable conditions, not internal errors.

The full-disk tests mount a small tmpfs (root only; skipped otherwise) so that the disk really
runs out under SQLite, the audit log and the gRPC server.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from test_integration import tiny_server_config

from collafuse.cli import main
from collafuse.client.remote import Remote, open_channel
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import CutBatch, Registration
from collafuse.common.store import DISK_FULL_MARKER
from collafuse.server.app import StartupError, start_server
from collafuse.server.audit import verify_chain
from collafuse.server.pool import (
    POOL_PAGE_SIZE,
    DiskFullError,
    Pool,
    PoolCorruptError,
    check_pool,
)

TIMEOUT = 30
PAGE = POOL_PAGE_SIZE
ROWS = 6000  # of 8x8 images: a leaf page holds at most PAGE / 256 of their 256-byte blobs
T_CUT = 20


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the duration; the test is skipped if it cannot."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill a disk needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {where}: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(path: Path, limit: int = 1 << 24) -> int:
    """Write a filler file until the disk is full (at most `limit` bytes); returns its size."""
    written = 0
    with path.open("wb", buffering=0) as fh:
        while written < limit:
            try:
                written += fh.write(b"\xa5" * min(PAGE, limit - written))
            except OSError:
                break
    return written


def cuts(n: int, seed: int) -> torch.Tensor:
    """Honest-looking cut images (n, 1, 8, 8); the pool itself does not check them."""
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def rows(path: Path) -> dict[int, tuple[str, str, bytes]]:
    """seq -> (client_id, image_id, data) of every cut row, read straight from a sound file."""
    # immutable when no server has the file open, so that reading leaves no -wal/-shm behind
    mode = "mode=ro" if Path(f"{path}-wal").exists() else "immutable=1"
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True)) as db:
        found = db.execute("SELECT seq, client_id, image_id, data FROM cuts").fetchall()
    return {int(r[0]): (r[1], r[2], r[3]) for r in found}


# ----- a damaged pool -------------------------------------------------------------------------


@pytest.fixture
def damaged_pool(tmp_path: Path) -> tuple[Path, dict[int, tuple[str, str, bytes]]]:
    """A pool of ROWS cut images with four of its table leaf pages overwritten by garbage."""
    path = tmp_path / "data" / "pool.sqlite"
    pool = Pool(path)
    for client in ("a", "b"):
        pool.register(client, T_CUT, 0.4, max_clients=4)
    for k in range(ROWS // 100):
        ids = [f"img-{k}-{i}" for i in range(100)]
        pool.add("ab"[k % 2], T_CUT, ids, cuts(100, k))
    pool.close()  # the last connection folds the WAL into the file
    before = rows(path)
    assert len(before) == ROWS
    data = path.read_bytes()
    pages = len(data) // PAGE
    # Page 1 starts with the 100-byte file header; 0x0D marks a table leaf (here: cut rows).
    leaves = [k for k in range(pages // 3, 2 * pages // 3) if data[k * PAGE] == 0x0D]
    assert len(leaves) >= 20
    rng = random.Random(7)
    with path.open("r+b") as fh:
        for k in leaves[::5][:4]:
            fh.seek(k * PAGE)
            fh.write(bytes(rng.randrange(256) for _ in range(PAGE)))
    return path, before


def test_damaged_pool_is_refused_at_open_and_salvaged(
    damaged_pool: tuple[Path, dict[int, tuple[str, str, bytes]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, before = damaged_pool

    with pytest.raises(PoolCorruptError) as err:
        Pool(path)
    message = str(err.value)
    assert str(path) in message
    assert "quick_check" in message and "cuts" in message
    assert f"collafuse pool salvage {path} --out" in message
    with pytest.raises(PoolCorruptError):
        Pool(path, full_check=True)

    assert main(["pool", "check", str(path)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    assert main(["pool", "check", str(path), "--full"]) == 1
    capsys.readouterr()

    out = tmp_path / "salvaged.sqlite"
    assert main(["pool", "salvage", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    salvaged = rows(out)
    assert f"copied 2 clients and {len(salvaged)} cut images" in printed
    assert f"mv {out} {path}" in printed
    # Whole pages of rows are gone; everything else came across unchanged, with its seq.
    assert ROWS - 4 * (PAGE // 256) <= len(salvaged) < ROWS
    assert all(before[seq] == row for seq, row in salvaged.items())
    assert main(["pool", "check", str(out)]) == 0
    assert main(["pool", "check", str(out), "--full"]) == 0
    assert not Path(f"{out}-wal").exists()  # nothing to carry along when it is moved

    pool = Pool(out, full_check=True)
    try:
        assert {p.client_id: p.num_images for p in pool.pools()} == {
            c: sum(1 for r in salvaged.values() if r[0] == c) for c in "ab"
        }
        assert pool.read_since(0).cuts.shape == (len(salvaged), 1, 8, 8)
        assert pool.add("a", T_CUT, ["new"], cuts(1, 99)) == (1, 0)
        assert pool.read_since(max(before)).last_seq == max(before) + 1  # no number reused
    finally:
        pool.close()
    # salvage refuses to overwrite
    assert main(["pool", "salvage", str(path), "--out", str(out)]) == 2


def test_counts_follow_the_rows(tmp_path: Path) -> None:
    """The per-client counts the pool keeps in memory agree with its rows: after adds with
    duplicates, a Forget, a re-upload and a reopen."""
    path = tmp_path / "pool.sqlite"

    def on_disk() -> dict[str, int]:
        counted: dict[str, int] = {}
        for client, _, _ in rows(path).values():
            counted[client] = counted.get(client, 0) + 1
        return counted

    pool = Pool(path)
    try:
        for client in ("a", "b"):
            pool.register(client, T_CUT, 0.4, max_clients=2)
        assert pool.add("a", T_CUT, ["x", "y", "z"], cuts(3, 0)) == (3, 0)
        assert pool.add("a", T_CUT, ["y", "w"], cuts(2, 1)) == (1, 1)
        assert pool.add("b", T_CUT, ["x"], cuts(1, 2)) == (1, 0)
        assert pool.count("a") == 4 and pool.count("b") == 1 and pool.count("nobody") == 0
        assert {p.client_id: p.num_images for p in pool.pools()} == on_disk() == {"a": 4, "b": 1}
        assert pool.forget("a") == 4
        assert pool.count("a") == 0
        assert {p.client_id: p.num_images for p in pool.pools()} == {"a": 0, "b": 1}
        assert pool.add("a", T_CUT, ["x"], cuts(1, 3)) == (1, 0)
    finally:
        pool.close()
    pool = Pool(path)
    try:
        assert {p.client_id: p.num_images for p in pool.pools()} == on_disk() == {"a": 1, "b": 1}
    finally:
        pool.close()


def test_healthy_pool_passes_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pool.sqlite"
    pool = Pool(path, full_check=True)
    pool.register("a", T_CUT, 0.4, max_clients=1)
    pool.add("a", T_CUT, ["x", "y"], cuts(2, 0))
    pool.close()
    assert check_pool(path).ok and check_pool(path, full=True).ok
    assert main(["pool", "check", str(path)]) == 0
    assert main(["pool", "check", str(path), "--full"]) == 0
    assert "ok (integrity_check)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["pool.sqlite"]  # the check left no side files
    assert main(["pool", "check", str(tmp_path / "missing.sqlite")]) == 2


def test_server_refuses_to_start_on_a_damaged_pool(
    damaged_pool: tuple[Path, dict[int, tuple[str, str, bytes]]],
) -> None:
    path, _ = damaged_pool
    with pytest.raises(StartupError, match="collafuse pool salvage"):
        start_server(tiny_server_config(path.parent))


# ----- a full disk ----------------------------------------------------------------------------


def test_full_disk_fails_one_write_and_keeps_what_was_committed(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "data" / "pool.sqlite"
        pool = Pool(path)
        try:
            pool.register("a", T_CUT, 0.4, max_clients=1)
            filler = disk / "filler"
            fill(filler, limit=400 * 1024)
            stored: list[torch.Tensor] = []
            error: DiskFullError | None = None
            for k in range(500):
                batch = cuts(16, k)
                try:
                    assert pool.add("a", T_CUT, [f"{k}-{i}" for i in range(16)], batch) == (16, 0)
                except DiskFullError as exc:
                    error = exc
                    break
                stored.append(batch)
            assert error is not None, "the disk never filled up"
            assert len(stored) >= 2
            message = str(error)
            assert DISK_FULL_MARKER in message and str(path.parent) in message
            assert "Free space" in message
            # What was committed is there; the failed write left nothing and no open transaction.
            assert pool.count("a") == 16 * len(stored)
            assert torch.equal(pool.read_since(0).cuts, torch.cat(stored))
            with pytest.raises(DiskFullError):
                pool.register("b", T_CUT, 0.4, max_clients=2)
            assert pool.client("b") is None
            # Freeing space is all it takes.
            filler.unlink()
            for k in range(500, 503):
                assert pool.add("a", T_CUT, [f"{k}-{i}" for i in range(16)], cuts(16, k)) == (
                    16,
                    0,
                )
            assert pool.count("a") == 16 * (len(stored) + 3)
            assert pool.register("b", T_CUT, 0.4, max_clients=2).client_index == 1
        finally:
            pool.close()
        assert check_pool(path).ok


class FullServer:
    """A server whose data dir is a small tmpfs, a client "c" and a filler file on that disk."""

    def __init__(self, disk: Path, audit_elsewhere: Path | None) -> None:
        data_dir = disk / "server"
        data_dir.mkdir(mode=0o700)
        if audit_elsewhere is not None:
            # The audit log lives off the full disk (see test_audit_log_on_a_full_disk).
            audit_elsewhere.touch(mode=0o600)
            (data_dir / "audit.log").symlink_to(audit_elsewhere)
        config = tiny_server_config(data_dir, min_pool=10**9)  # never trains: no checkpoints
        self.config = config.model_copy(
            update={"limits": config.limits.model_copy(update={"rate_burst": 10_000})}
        )
        self.filler = disk / "filler"
        self.running = start_server(self.config)
        self.remote = Remote(open_channel(self.running.address, insecure=True))
        self.session = self.remote.register(Registration("c", (1, 8, 8), 0.4))
        self.diffusion = Diffusion.from_config(self.config.schedule)
        self.gen = torch.Generator().manual_seed(0)

    def upload(self, k: int) -> tuple[list[str], torch.Tensor]:
        """One stream of one message of 32 honest cut images; returns what was acknowledged."""
        t_cut = self.session.t_cut
        x0 = torch.rand(32, 1, 8, 8, generator=self.gen) * 2 - 1
        noise = torch.randn(x0.shape, generator=self.gen)
        xc = self.diffusion.q_sample(x0, torch.full((32,), t_cut), noise)
        ids = [f"{k}-{i}" for i in range(32)]
        result = self.remote.upload([CutBatch("c", t_cut, ids, xc)])
        assert result.accepted == 32, result.rejections[:1]
        return ids, xc

    def batch(self, k: int, n: int = 32) -> CutBatch:
        """A message of n honest cut images with ids k-0 .. k-(n-1)."""
        t_cut = self.session.t_cut
        x0 = torch.rand(n, 1, 8, 8, generator=self.gen) * 2 - 1
        noise = torch.randn(x0.shape, generator=self.gen)
        xc = self.diffusion.q_sample(x0, torch.full((n,), t_cut), noise)
        return CutBatch("c", t_cut, [f"{k}-{i}" for i in range(n)], xc)

    def fill_up(self) -> tuple[list[tuple[list[str], torch.Tensor]], grpc.RpcError]:
        """Upload until the server refuses: what it acknowledged, and the refusal."""
        fill(self.filler, limit=256 * 1024)
        acked: list[tuple[list[str], torch.Tensor]] = []
        for k in range(400):
            try:
                acked.append(self.upload(k))
            except grpc.RpcError as exc:
                return acked, exc
        raise AssertionError("the disk never filled up")

    def close(self) -> None:
        """Free the disk (the final audit lines need room), then stop."""
        self.filler.unlink(missing_ok=True)
        self.remote.close()
        self.running.stop()


@pytest.mark.timeout(300)
def test_full_disk_through_the_server(tmp_path: Path) -> None:
    """Uploads until the disk is full: RESOURCE_EXHAUSTED naming it, the server stays up, and
    every acknowledged image is in the pool; after space is freed uploads go on."""
    with tmpfs(tmp_path / "disk", "768k") as disk:
        server = FullServer(disk, audit_elsewhere=tmp_path / "audit.log")
        try:
            acked, refusal = server.fill_up()
            assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details()
            assert DISK_FULL_MARKER in (refusal.details() or "")
            assert "retry later" in (refusal.details() or "")
            assert len(acked) >= 2

            for _ in range(40):  # the server keeps answering while its disk is full
                status = server.remote.status(timeout=TIMEOUT)
            assert [(p.client_id, p.num_images) for p in status.pools] == [("c", 32 * len(acked))]
            pool = server.running.pool
            assert torch.equal(pool.read_since(0).cuts, torch.cat([xc for _, xc in acked]))
            held = sorted(r[1] for r in rows(pool.path).values())
            assert held == sorted(i for ids, _ in acked for i in ids)

            server.filler.unlink()
            acked += [server.upload(k) for k in range(400, 403)]
            status = server.remote.status(timeout=TIMEOUT)
            assert [(p.client_id, p.num_images) for p in status.pools] == [("c", 32 * len(acked))]
        finally:
            server.close()


@pytest.mark.timeout(300)
def test_many_message_streams_on_a_filling_disk(tmp_path: Path) -> None:
    """Streams of many messages, their commits on the writer thread: an acknowledged stream
    keeps every message it acknowledged; a stream answered at the end fails as a whole and,
    once space is back, sending it again stores the rest."""
    with tmpfs(tmp_path / "disk", "768k") as disk:
        server = FullServer(disk, audit_elsewhere=tmp_path / "audit.log")
        try:
            # Each commit appends its pages to the WAL (16 KiB each): the filler leaves room
            # for a few, and frees room for the three messages sent again.
            fill(server.filler, limit=320 * 1024)
            sent = [server.batch(k) for k in range(400)]
            acked: list[str] = []
            with pytest.raises(grpc.RpcError) as err:
                for ack in server.remote.upload_acked(iter(sent)):
                    assert ack.accepted == 32, ack.rejections[:1]
                    acked += sent[ack.message].image_ids
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert DISK_FULL_MARKER in (err.value.details() or "")
            assert len(acked) >= 64
            held = {r[1] for r in rows(server.running.pool.path).values()}
            assert set(acked) <= held

            again = [server.batch(k) for k in range(1000, 1003)]
            with pytest.raises(grpc.RpcError) as err:
                server.remote.upload(iter(again))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            server.filler.unlink()
            stored = server.running.pool.count("c")
            result = server.remote.upload(iter(again))
            assert result.rejected == 0
            assert result.accepted + result.duplicate == 96
            assert result.pool_size == server.running.pool.count("c") == stored + result.accepted
            held = {r[1] for r in rows(server.running.pool.path).values()}
            assert {i for b in again for i in b.image_ids} <= held
        finally:
            server.close()


@pytest.mark.timeout(300)
def test_audit_log_on_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "768k") as disk:
        server = FullServer(disk, audit_elsewhere=None)
        try:
            _, refusal = server.fill_up()
            assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details()
            for _ in range(40):  # more audit lines than one 4 KiB page holds: held in memory
                server.remote.status(timeout=TIMEOUT)
            server.filler.unlink()
            server.remote.status(timeout=TIMEOUT)  # space is back: the held lines are written
        finally:
            server.close()
        log = disk / "server" / "audit.log"
        check = verify_chain(log)
        assert check.ok, check.message
        statuses = [line for line in log.read_text().splitlines() if '"rpc":"GetStatus"' in line]
        assert len(statuses) >= 41
