"""SQLite files shared by both sides: one connection, durable commits, explicit transactions."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from collafuse.common.files import create_private_file

# Every message about a full disk carries these words, so a peer can tell it from other refusals.
DISK_FULL_MARKER = "disk is full"

# Primary result codes (the low byte of an extended code), from sqlite3.h.
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26


def open_database(path: Path, schema: str, page_size: int | None = None) -> sqlite3.Connection:
    """Open (creating) a database for use from several threads behind the caller's lock.

    WAL with synchronous=FULL: once a transaction commits it survives a SIGKILL or a power
    loss, so whatever a side acknowledges is on disk first. Autocommit mode (isolation_level
    None) leaves BEGIN/COMMIT to the caller. The directory is made 0700 and the files 0600.
    `page_size` applies to a new database only (an existing one keeps its own).
    """
    # SQLite gives its -wal and -shm files the database file's mode: create it 0600 first.
    create_private_file(path)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    if page_size is not None:
        db.execute(f"PRAGMA page_size={int(page_size)}")  # before WAL, which fixes it
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


@contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; on any error roll back what is left and re-raise that error.

    When COMMIT fails on a full disk or an I/O error SQLite has already rolled the transaction
    back, and a ROLLBACK then fails with "cannot rollback - no transaction is active": that must
    not replace the error that says what went wrong. A failed transaction stores nothing.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as rollback:
                exc.add_note(f"the rollback failed too: {rollback}")
        raise


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error says the disk (or the user's quota) has no room for the write."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == _SQLITE_FULL) or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def is_corrupt(exc: BaseException) -> bool:
    """Whether an SQLite error says the file is damaged or is no database at all."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text
