"""The client's release ledger: every tensor it sent, with image id, t_cut, bytes and time."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from collafuse.common.store import open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    local_id TEXT NOT NULL,
    wire_id TEXT NOT NULL,
    t_cut INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    released_at REAL NOT NULL,
    acked_at REAL
);
CREATE INDEX IF NOT EXISTS releases_local ON releases(local_id);
"""


@dataclass(frozen=True)
class LedgerSummary:
    """What a client has disclosed so far."""

    images_released: int
    images_acknowledged: int
    releases: int
    bytes_released: int
    t_cuts: list[int]


class Ledger:
    """Rows are written before a tensor is sent and marked once the server acknowledged it."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def record(self, rows: list[tuple[str, str, int, int, str]]) -> list[int]:
        """Record releases (local_id, wire_id, t_cut, bytes, sha256) before sending."""
        now = time.time()
        seqs = []
        with self._lock:
            self._db.execute("BEGIN")
            for row in rows:
                cur = self._db.execute(
                    "INSERT INTO releases (local_id, wire_id, t_cut, bytes, sha256, released_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (*row, now),
                )
                seqs.append(int(cur.lastrowid or 0))
            self._db.execute("COMMIT")
        return seqs

    def acknowledge(self, seqs: list[int]) -> None:
        """Mark releases the server acknowledged."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE releases SET acked_at=? WHERE seq=?", [(now, s) for s in seqs]
            )
            self._db.execute("COMMIT")

    def acknowledged_ids(self) -> set[str]:
        """Local ids the server has acknowledged."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT local_id FROM releases WHERE acked_at IS NOT NULL"
            ).fetchall()
        return {r[0] for r in rows}

    def summary(self) -> LedgerSummary:
        """Totals over the whole ledger."""
        with self._lock:
            released, acked, bytes_, rows = self._db.execute(
                "SELECT COUNT(DISTINCT local_id), COUNT(DISTINCT CASE WHEN acked_at IS NOT NULL "
                "THEN local_id END), COALESCE(SUM(bytes), 0), COUNT(*) FROM releases"
            ).fetchone()
            cuts = [r[0] for r in self._db.execute("SELECT DISTINCT t_cut FROM releases")]
        return LedgerSummary(int(released), int(acked), int(rows), int(bytes_), sorted(cuts))
