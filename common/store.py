"""SQLite files shared by both sides: one connection, durable commits, explicit transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from collafuse.common.files import create_private_file


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating) a database for use from several threads behind the caller's lock.

    WAL with synchronous=FULL: once a transaction commits it survives a SIGKILL or a power
    loss, so whatever a side acknowledges is on disk first. Autocommit mode (isolation_level
    None) leaves BEGIN/COMMIT to the caller. The directory is made 0700 and the files 0600.
    """
    # SQLite gives its -wal and -shm files the database file's mode: create it 0600 first.
    create_private_file(path)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db
