"""The persistent pool of cut images and registered clients (SQLite under the data dir).

Two failures of the disk are named rather than reported as internal errors. A damaged file
(`PoolCorruptError`) is found at open by `PRAGMA quick_check` (or the slower
`integrity_check`), before the server reports SERVING; `salvage_pool` copies every row that
can still be read into a fresh pool (`collafuse pool salvage`). A full disk (`DiskFullError`)
fails the one write that did not fit: a failed transaction stores nothing, so nothing that was
acknowledged is lost, and writes succeed again once space is freed.
"""

from __future__ import annotations

import errno
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from collafuse.common.domain import ClientPool
from collafuse.common.store import (
    DISK_FULL_MARKER,
    immediate_transaction,
    is_corrupt,
    is_disk_full,
    open_database,
)

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
POOL_PAGE_SIZE = 16384
"""Bytes per page of a new pool. A cut image is a blob of kilobytes (3 KiB at 28x28, 768 KiB at
256x256x3): at SQLite's default 4 KiB most pages carry one image and its overhead, while 16 KiB
pages halve the time an upload's commit takes (measured: 2,000 images of 28x28, 35 ms to
18 ms with the fsync). Existing pools keep the page size they were created with."""
WAL_CHECKPOINT_BYTES = 4 << 20
"""How large the pool's write-ahead log grows before SQLite folds it into the file."""
# How many problems a check lists, and how many of them an error message quotes.
_CHECK_LINES = 100
_QUOTED_LINES = 3
# Salvage steps over a damaged range one row id at a time; when no upper bound can be read it
# gives up this far past the last readable row.
_SALVAGE_WINDOW = 4096


@dataclass(frozen=True)
class ClientRecord:
    """A registered client."""

    client_id: str
    client_index: int
    t_cut: int
    cut_ratio: float


@dataclass(frozen=True)
class PoolIndex:
    """Which cut images arrived after a sequence number, without their pixels."""

    seq: np.ndarray  # (N,) int64, increasing
    t_cut: np.ndarray  # (N,) int64
    client_index: np.ndarray  # (N,) int64
    shape: tuple[int, ...] | None
    """(C, H, W) of the images; None when there are none."""


@dataclass(frozen=True)
class PoolRows:
    """Cut images read from the pool, in arrival order."""

    last_seq: int
    cuts: Tensor  # (N, C, H, W) float32
    t_cut: Tensor  # (N,) int64
    client_index: Tensor  # (N,) int64


class PoolFullError(Exception):
    """No room for another client."""


class PoolCorruptError(RuntimeError):
    """The pool file is damaged; the message names it, what was found and how to salvage it."""

    def __init__(self, path: Path, found: list[str], how: str = "PRAGMA quick_check") -> None:
        self.path = path
        self.found = found
        quoted = "; ".join(found[:_QUOTED_LINES])
        more = f" (and {len(found) - _QUOTED_LINES} more)" if len(found) > _QUOTED_LINES else ""
        super().__init__(
            f"the pool {path} is damaged ({how} found: {quoted}{more}). Stop the server and "
            f"copy every readable row into a new pool with `{salvage_command(path)}`; it "
            "says how to move the new file in place"
        )


class DiskFullError(OSError):
    """A write did not fit on the disk; it stored nothing. The message says where to free space."""

    def __init__(self, directory: Path, detail: str) -> None:
        super().__init__(
            errno.ENOSPC,
            f"the server's {DISK_FULL_MARKER}: the pool in {directory} could not store this "
            f"write ({detail}); nothing of it was stored and everything acknowledged before is "
            f"kept. Free space on the disk holding {directory}",
        )
        self.directory = directory

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class PoolCheck:
    """What `PRAGMA quick_check` (or `integrity_check`) found in a pool file."""

    path: Path
    full: bool
    problems: list[str]  # empty when the file is sound

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


@dataclass(frozen=True)
class SalvageReport:
    """What `salvage_pool` copied into the new pool and what it had to leave behind."""

    source: Path
    out: Path
    clients: int
    """Client rows copied."""
    cuts: int
    """Cut image rows copied."""
    unreadable_clients: int
    """Client row ids that could not be read (at most this many clients lost)."""
    unreadable_cuts: int
    """Cut row ids that could not be read (at most this many images lost)."""
    malformed: int
    """Rows that could be read but whose contents are impossible (skipped)."""
    orphaned: int
    """Readable cut rows whose client row was lost (skipped: the trainer needs its index)."""
    check: PoolCheck
    """The new pool's quick_check."""


def salvage_command(path: Path) -> str:
    """The command that copies the readable rows of a damaged pool into a new file."""
    return f"collafuse pool salvage {path} --out {path.with_name(path.stem + '-salvaged.sqlite')}"


def _pragma(full: bool) -> str:
    return "PRAGMA integrity_check" if full else "PRAGMA quick_check"


def _problems(db: sqlite3.Connection, full: bool) -> list[str]:
    """The check's findings; empty when the file is sound."""
    try:
        rows = db.execute(f"{_pragma(full)}({_CHECK_LINES})").fetchall()
    except sqlite3.DatabaseError as exc:
        if not is_corrupt(exc):
            raise
        # The check gave up without saying where (a damaged page header does that): name the
        # tables and indexes whose b-trees cannot be walked.
        return _unreadable_trees(db) or [str(exc)]
    lines = [
        line
        for r in rows
        for line in str(r[0]).splitlines()
        if line and not line.startswith("*** in database")
    ]
    return [] if lines == ["ok"] else lines


def _unreadable_trees(db: sqlite3.Connection) -> list[str]:
    """'table cuts: <error>' for every table or index whose pages cannot all be read."""
    try:
        trees = db.execute(
            "SELECT type, name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index') "
            "AND rootpage > 0"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        return [f"the table list cannot be read: {exc}"]
    found = []
    for kind, name, table in trees:
        # COUNT(*) walks every page of the one b-tree named: the table's own, or the index's.
        how = "NOT INDEXED" if kind == "table" else f'INDEXED BY "{name}"'
        try:
            db.execute(f'SELECT COUNT(*) FROM "{table}" {how}').fetchone()
        except sqlite3.DatabaseError as exc:
            found.append(f"{kind} {name}: {exc}")
    return found


def _open_read_only(path: Path) -> sqlite3.Connection:
    """Open without writing: a file without a -wal is opened immutable, so no side files appear.

    (A server that opens the file meanwhile could change it under an immutable reader: check
    and salvage a pool while its server is stopped.)
    """
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"no pool file at {path}")
    mode = "mode=ro" if Path(f"{path}-wal").exists() else "immutable=1"
    return sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True)


def check_pool(path: Path, full: bool = False) -> PoolCheck:
    """Check a pool file without changing it: quick_check, or integrity_check when `full`.

    quick_check reads every page and checks the b-trees; integrity_check also checks that
    every index agrees with its table, which takes longer on a large pool.
    """
    db = _open_read_only(path)
    try:
        problems = _problems(db, full)
    finally:
        db.close()
    return PoolCheck(path, full, problems)


class Pool:
    """Thread-safe store; every write is committed before the caller acknowledges it.

    Opening checks the file (`PRAGMA quick_check`, or `integrity_check` with full_check) and
    raises PoolCorruptError on damage. A write that does not fit on the disk raises
    DiskFullError and stores nothing.
    """

    def __init__(self, path: Path, *, full_check: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        with self._errors():
            self._db = open_database(path, _SCHEMA, page_size=POOL_PAGE_SIZE)
        # One guard for everything read at opening: any failure closes the connection.
        try:
            with self._errors():
                # SQLite folds the WAL back after 1,000 pages by default: 16 MiB of 16 KiB
                # pages. Keep the 4 MiB that pools of 4 KiB pages had, whatever the page size.
                page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
                self._db.execute(
                    f"PRAGMA wal_autocheckpoint={max(1, WAL_CHECKPOINT_BYTES // page)}"
                )
                problems = _problems(self._db, full_check)
                # Images per client, counted once here and kept by add and forget after each
                # commit (this object is the pool's only writer): status, metrics and quota
                # checks then cost no scan of the pool under the lock uploads commit behind.
                counted = (
                    []
                    if problems
                    else self._db.execute(
                        "SELECT client_id, COUNT(*) FROM cuts GROUP BY client_id"
                    ).fetchall()
                )
        except BaseException:
            self._db.close()
            raise
        if problems:
            self._db.close()
            raise PoolCorruptError(path, problems, _pragma(full_check))
        # The trainer reads images on a connection of its own: under WAL a reader never waits
        # for a commit, and a long read of a chunk never holds up an upload's commit.
        self._read_lock = threading.Lock()
        self._read_db: sqlite3.Connection | None = None
        self._counts: dict[str, int] = {str(c): int(n) for c, n in counted}

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Name a full disk and a damaged file; other errors pass unchanged."""
        try:
            yield
        except (DiskFullError, PoolCorruptError):
            raise
        except (sqlite3.Error, OSError) as exc:
            if is_disk_full(exc):
                raise DiskFullError(self.path.parent, str(exc)) from exc
            if is_corrupt(exc):
                raise PoolCorruptError(self.path, [str(exc)], "SQLite") from exc
            raise

    def close(self) -> None:
        """Close the database."""
        with self._read_lock:
            if self._read_db is not None:
                self._read_db.close()
                self._read_db = None
        with self._lock:
            self._db.close()

    def client(self, client_id: str) -> ClientRecord | None:
        """The registered client, if any."""
        with self._lock, self._errors():
            row = self._db.execute(
                "SELECT client_id, client_index, t_cut, cut_ratio FROM clients WHERE client_id=?",
                (client_id,),
            ).fetchone()
        return ClientRecord(row[0], int(row[1]), int(row[2]), float(row[3])) if row else None

    def count(self, client_id: str) -> int:
        """Cut images held for one client."""
        with self._lock:
            return self._counts.get(client_id, 0)

    def register(
        self, client_id: str, t_cut: int, cut_ratio: float, max_clients: int
    ) -> ClientRecord:
        """Add a client or update its cut; the cut is fixed once it has uploaded images."""
        with self._lock, self._errors(), immediate_transaction(self._db):
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
                    held = self._counts.get(client_id, 0)
                    if held:
                        raise ValueError(
                            f"client {client_id} already released {held} images at t_cut="
                            f"{row[1]}; fixed exposure keeps its cut (t_cut={t_cut} refused)"
                        )
                    self._db.execute(
                        "UPDATE clients SET t_cut=?, cut_ratio=? WHERE client_id=?",
                        (t_cut, cut_ratio, client_id),
                    )
        return ClientRecord(client_id, index, t_cut, cut_ratio)

    def add(
        self, client_id: str, t_cut: int, image_ids: list[str], cuts: Tensor
    ) -> tuple[int, int]:
        """Insert cut images; ids already held are duplicates. Returns (accepted, duplicate)."""
        array = cuts.detach().cpu().numpy().astype("<f4", copy=False)
        shape = ",".join(str(d) for d in array.shape[1:])
        now = time.time()
        with self._lock:
            with self._errors(), immediate_transaction(self._db):
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
            self._counts[client_id] = self._counts.get(client_id, 0) + accepted  # committed
        return accepted, len(image_ids) - accepted

    def forget(self, client_id: str) -> int:
        """Delete every cut image of a client (committed before returning); returns how many."""
        with self._lock:
            with self._errors(), immediate_transaction(self._db):
                cur = self._db.execute("DELETE FROM cuts WHERE client_id=?", (client_id,))
            self._counts.pop(client_id, None)  # committed
        return int(cur.rowcount)

    def pools(self) -> list[ClientPool]:
        """Per-client pool sizes."""
        with self._lock, self._errors():
            rows = self._db.execute(
                "SELECT client_id, client_index, t_cut FROM clients ORDER BY client_index"
            ).fetchall()
            return [ClientPool(r[0], int(r[1]), int(r[2]), self._counts.get(r[0], 0)) for r in rows]

    def read_since(self, seq: int) -> PoolRows:
        """Cut images that arrived after sequence number `seq`, pixels included."""
        index = self.index_since(seq)
        if index.shape is None:
            return PoolRows(seq, torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0))
        found, cuts = self.read_cuts(index.seq, index.shape)
        at = np.searchsorted(index.seq, found)
        return PoolRows(
            last_seq=int(found[-1]) if len(found) else seq,
            cuts=cuts,
            t_cut=torch.from_numpy(index.t_cut[at]),
            client_index=torch.from_numpy(index.client_index[at]),
        )

    def _reader(self) -> sqlite3.Connection:
        """The read connection (call with _read_lock held), opened on first use."""
        if self._read_db is None:
            # Not opened read-only: a read-only connection to a WAL file fails when the -shm
            # file is missing, and this one only ever runs SELECTs.
            self._read_db = sqlite3.connect(self.path, check_same_thread=False)
        return self._read_db

    def index_since(self, seq: int) -> PoolIndex:
        """Sequence number, t_cut and client index of every cut image after `seq`, in order.

        Reads no pixels: 24 bytes a row in memory, so a pool far larger than memory can be
        indexed whole (the trainer streams the pixels in chunks with `read_cuts`).
        """
        with self._read_lock, self._errors():
            rows = (
                self._reader()
                .execute(
                    "SELECT k.seq, k.t_cut, c.client_index FROM cuts k JOIN clients c "
                    "ON c.client_id = k.client_id WHERE k.seq > ? ORDER BY k.seq",
                    (seq,),
                )
                .fetchall()
            )
            shape = None
            if rows:
                text = (
                    self._reader()
                    .execute("SELECT shape FROM cuts WHERE seq = ?", (rows[0][0],))
                    .fetchone()
                )
                shape = tuple(int(d) for d in text[0].split(",")) if text else None
        table = np.array(rows, dtype=np.int64).reshape(-1, 3)
        return PoolIndex(table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy(), shape)

    # SQLite's default limit on bound parameters is 32766 since 3.32; stay well below it.
    _READ_BATCH = 900

    def read_cuts(self, seqs: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, Tensor]:
        """The cut images with these sequence numbers: (seqs found, (M, *shape) float32).

        Rows deleted meanwhile (Forget) are left out; the images come in the order of the
        sequence numbers found. The batches of lookups release the GIL while SQLite reads.
        """
        found: list[int] = []
        row_bytes = 4 * math.prod(shape)
        out = np.empty((len(seqs), *shape), dtype=np.float32)
        with self._read_lock, self._errors():
            db = self._reader()
            for start in range(0, len(seqs), self._READ_BATCH):
                part = [int(s) for s in seqs[start : start + self._READ_BATCH]]
                marks = ",".join("?" * len(part))
                for seq, data in db.execute(
                    f"SELECT seq, data FROM cuts WHERE seq IN ({marks}) ORDER BY seq", part
                ):
                    if len(data) != row_bytes:
                        raise ValueError(
                            f"cut image {seq} in {self.path} holds {len(data)} bytes, not the "
                            f"{row_bytes} of shape {shape}"
                        )
                    out[len(found)] = np.frombuffer(data, dtype="<f4").reshape(shape)
                    found.append(int(seq))
        return np.array(found, dtype=np.int64), torch.from_numpy(out[: len(found)])


# ----- salvage ---------------------------------------------------------------------------------

_CLIENT_COLUMNS = "client_id, client_index, t_cut, cut_ratio, registered_at"
_CUT_COLUMNS = "client_id, image_id, t_cut, shape, data, received_at"


class _Disordered(Exception):
    """A damaged b-tree handed back a row id that does not increase."""


def _upper_rowid(db: sqlite3.Connection, table: str) -> int | None:
    """The largest row id the damaged file still admits to, from whatever can be read."""
    queries = [f"SELECT MAX(rowid) FROM {table}", "SELECT seq FROM sqlite_sequence WHERE name=?"]
    try:  # every index holds the row ids too, on pages of its own
        indexes = [str(r[1]) for r in db.execute(f"PRAGMA index_list({table})")]
    except sqlite3.DatabaseError:
        indexes = []
    queries += [f'SELECT MAX(rowid) FROM {table} INDEXED BY "{name}"' for name in indexes]
    found: list[int] = []
    for sql in queries:
        try:
            row = db.execute(sql, (table,) if "?" in sql else ()).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None and isinstance(row[0], int):
            found.append(row[0])
    return max(found) if found else None


def _readable_rows(
    db: sqlite3.Connection, table: str, columns: str
) -> tuple[list[tuple[object, ...]], int]:
    """Every row of `table` that can be read, in row id order, and how many row ids could not.

    A scan in row id order stops at the first damaged page; from there single row ids are
    looked up (each one only walks the path to its own page) until one reads cleanly, and the
    scan resumes after it. Damaged interior pages cost one lookup per row id they covered.
    """
    select = f"SELECT rowid, {columns} FROM {table}"
    rows: list[tuple[object, ...]] = []
    last, unreadable = 0, 0
    upper: int | None = None
    while True:
        try:
            for row in db.execute(f"{select} WHERE rowid > ? ORDER BY rowid", (last,)):
                rowid = row[0]
                if not isinstance(rowid, int) or rowid <= last:
                    raise _Disordered(rowid)
                rows.append(tuple(row))
                last = rowid
            return rows, unreadable
        except _Disordered:
            pass
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise  # not damage (say, no such table): salvage cannot go on
        if upper is None:
            upper = _upper_rowid(db, table) or 0
            upper = max(upper, last + 1) if upper else last + _SALVAGE_WINDOW
        # Step over the damaged range until one lookup reads cleanly, then scan on from there.
        while last < upper:
            last += 1
            try:
                row = db.execute(f"{select} WHERE rowid = ?", (last,)).fetchone()
            except sqlite3.DatabaseError:
                unreadable += 1
                continue
            if row is not None:
                rows.append(tuple(row))
            break
        else:
            return rows, unreadable


def _valid_client(row: tuple[object, ...]) -> bool:
    _, client_id, index, t_cut, ratio, at = row
    return (
        isinstance(client_id, str)
        and bool(client_id)
        and isinstance(index, int)
        and index >= 0
        and isinstance(t_cut, int)
        and t_cut >= 0
        and isinstance(ratio, float)
        and isinstance(at, float)
    )


def _valid_cut(row: tuple[object, ...]) -> bool:
    _, client_id, image_id, t_cut, shape, data, at = row
    if not (
        isinstance(client_id, str)
        and isinstance(image_id, str)
        and isinstance(t_cut, int)
        and isinstance(shape, str)
        and isinstance(data, bytes)
        and isinstance(at, float)
    ):
        return False
    try:
        dims = [int(d) for d in shape.split(",")]
    except ValueError:
        return False
    if not dims or min(dims) < 1 or len(data) != 4 * math.prod(dims):
        return False
    return bool(np.isfinite(np.frombuffer(data, dtype="<f4")).all())


def salvage_pool(source: Path, out: Path) -> SalvageReport:
    """Copy every readable client and cut row of a (damaged) pool into a new pool at `out`.

    The source is opened read-only. Rows keep their sequence numbers and client indices (the
    trainer's labels); unreadable, impossible and orphaned rows are skipped and counted.
    """
    if out.exists() or Path(f"{out}-wal").exists():
        raise FileExistsError(errno.EEXIST, f"{out} exists; name a new file for --out")
    if out.resolve() == source.resolve():
        raise ValueError("--out must name a new file, not the damaged pool itself")
    src = _open_read_only(source)
    try:
        try:
            src.execute("SELECT name FROM sqlite_master").fetchall()
        except sqlite3.DatabaseError as exc:
            raise RuntimeError(
                f"cannot read the table list of {source} ({exc}): no row can be found without "
                "it; restore the pool from a backup"
            ) from None
        clients, lost_clients = _readable_rows(src, "clients", _CLIENT_COLUMNS)
        cuts, lost_cuts = _readable_rows(src, "cuts", _CUT_COLUMNS)
        issued = _upper_rowid(src, "cuts") or 0  # lost rows at the end keep their numbers
    finally:
        src.close()
    good_clients = [r for r in clients if _valid_client(r)]
    good_cuts = [r for r in cuts if _valid_cut(r)]
    malformed = len(clients) - len(good_clients) + len(cuts) - len(good_cuts)
    known = {r[1] for r in good_clients}
    kept = [r for r in good_cuts if r[1] in known]
    pool = Pool(out)
    try:
        db = pool._db
        with pool._lock, pool._errors(), immediate_transaction(db):
            before = db.total_changes
            db.executemany(
                f"INSERT OR IGNORE INTO clients ({_CLIENT_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                [r[1:] for r in good_clients],
            )
            copied_clients = db.total_changes - before
            before = db.total_changes
            db.executemany(
                f"INSERT OR IGNORE INTO cuts (seq, {_CUT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                kept,
            )
            copied_cuts = db.total_changes - before
            # sqlite_sequence has no key on name: update its row, or add one if none exists.
            cur = db.execute(
                "UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'cuts'", (issued,)
            )
            if not cur.rowcount and issued:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('cuts', ?)", (issued,))
        with pool._lock:
            check = PoolCheck(out, False, _problems(db, False))
    finally:
        pool.close()
    malformed += len(good_clients) - copied_clients + len(kept) - copied_cuts
    return SalvageReport(
        source=source,
        out=out,
        clients=copied_clients,
        cuts=copied_cuts,
        unreadable_clients=lost_clients,
        unreadable_cuts=lost_cuts,
        malformed=malformed,
        orphaned=len(good_cuts) - len(kept),
        check=check,
    )
