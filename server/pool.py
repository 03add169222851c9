"""The persistent pool of cut images and registered clients (SQLite under the data dir)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from collafuse.common.domain import ClientPool
from collafuse.common.store import open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    client_index INTEGER NOT NULL UNIQUE,
    t_cut INTEGER NOT NULL,
    cut_ratio REAL NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cuts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id TEXT NOT NULL REFERENCES clients(client_id),
    image_id TEXT NOT NULL,
    t_cut INTEGER NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (client_id, image_id)
);
"""


@dataclass(frozen=True)
class ClientRecord:
    """A registered client."""

    client_id: str
    client_index: int
    t_cut: int
    cut_ratio: float


@dataclass(frozen=True)
class PoolRows:
    """Cut images read from the pool, in arrival order."""

    last_seq: int
    cuts: Tensor  # (N, C, H, W) float32
    t_cut: Tensor  # (N,) int64
    client_index: Tensor  # (N,) int64


class PoolFullError(Exception):
    """No room for another client."""


class Pool:
    """Thread-safe store; every write is committed before the caller acknowledges it."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def client(self, client_id: str) -> ClientRecord | None:
        """The registered client, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT client_id, client_index, t_cut, cut_ratio FROM clients WHERE client_id=?",
                (client_id,),
            ).fetchone()
        return ClientRecord(row[0], int(row[1]), int(row[2]), float(row[3])) if row else None

    def count(self, client_id: str) -> int:
        """Cut images held for one client."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM cuts WHERE client_id=?", (client_id,)
            ).fetchone()
        return int(row[0])

    def register(
        self, client_id: str, t_cut: int, cut_ratio: float, max_clients: int
    ) -> ClientRecord:
        """Add a client or update its cut; the cut is fixed once it has uploaded images."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT client_index, t_cut FROM clients WHERE client_id=?", (client_id,)
                ).fetchone()
                if row is None:
                    used = self._db.execute("SELECT COUNT(*) FROM clients").fetchone()[0]
                    if used >= max_clients:
                        raise PoolFullError(
                            f"the server holds {used} clients, its limit (policy.max_clients)"
                        )
                    index = int(used)
                    self._db.execute(
                        "INSERT INTO clients VALUES (?, ?, ?, ?, ?)",
                        (client_id, index, t_cut, cut_ratio, time.time()),
                    )
                else:
                    index = int(row[0])
                    if int(row[1]) != t_cut:
                        held = self._db.execute(
                            "SELECT COUNT(*) FROM cuts WHERE client_id=?", (client_id,)
                        ).fetchone()[0]
                        if held:
                            raise ValueError(
                                f"client {client_id} already released {held} images at t_cut="
                                f"{row[1]}; fixed exposure keeps its cut (t_cut={t_cut} refused)"
                            )
                        self._db.execute(
                            "UPDATE clients SET t_cut=?, cut_ratio=? WHERE client_id=?",
                            (t_cut, cut_ratio, client_id),
                        )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ClientRecord(client_id, index, t_cut, cut_ratio)

    def add(
        self, client_id: str, t_cut: int, image_ids: list[str], cuts: Tensor
    ) -> tuple[int, int]:
        """Insert cut images; ids already held are duplicates. Returns (accepted, duplicate)."""
        array = cuts.detach().cpu().numpy().astype("<f4", copy=False)
        shape = ",".join(str(d) for d in array.shape[1:])
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany(
                    "INSERT OR IGNORE INTO cuts (client_id, image_id, t_cut, shape, data, "
                    "received_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (client_id, image_id, t_cut, shape, array[i].tobytes(), now)
                        for i, image_id in enumerate(image_ids)
                    ],
                )
                accepted = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return accepted, len(image_ids) - accepted

    def forget(self, client_id: str) -> int:
        """Delete every cut image of a client (committed before returning); returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("DELETE FROM cuts WHERE client_id=?", (client_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(cur.rowcount)

    def pools(self) -> list[ClientPool]:
        """Per-client pool sizes."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.client_id, c.client_index, c.t_cut, COUNT(k.seq) FROM clients c "
                "LEFT JOIN cuts k ON k.client_id = c.client_id GROUP BY c.client_id "
                "ORDER BY c.client_index"
            ).fetchall()
        return [ClientPool(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    def read_since(self, seq: int) -> PoolRows:
        """Cut images that arrived after sequence number `seq`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT k.seq, k.t_cut, k.shape, k.data, c.client_index FROM cuts k "
                "JOIN clients c ON c.client_id = k.client_id WHERE k.seq > ? ORDER BY k.seq",
                (seq,),
            ).fetchall()
        if not rows:
            return PoolRows(seq, torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0))
        shape = tuple(int(d) for d in rows[0][2].split(","))
        cuts = np.stack([np.frombuffer(r[3], dtype="<f4").reshape(shape) for r in rows])
        return PoolRows(
            last_seq=int(rows[-1][0]),
            cuts=torch.from_numpy(cuts.astype(np.float32)),
            t_cut=torch.tensor([int(r[1]) for r in rows], dtype=torch.long),
            client_index=torch.tensor([int(r[4]) for r in rows], dtype=torch.long),
        )
