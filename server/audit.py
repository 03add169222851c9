"""Accountability: a hash-chained, append-only audit log of calls, and signed receipts."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collafuse.common.files import create_private_file, read_private_bytes

log = logging.getLogger("collafuse.server.audit")
GENESIS = "0" * 64
MAX_PENDING_LINES = 100_000
RECEIPT_VERSION = "v1"


def _digest(prev: str, record: dict[str, Any]) -> str:
    """sha256 over the previous hash and the record's canonical JSON (sorted keys, no spaces)."""
    body = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest()


@dataclass(frozen=True)
class ChainCheck:
    """The verdict on an audit log: ok, how many entries, and where it first breaks."""

    ok: bool
    entries: int
    message: str


def verify_chain(path: Path) -> ChainCheck:
    """Recompute every link; an edited, inserted, removed or reordered line breaks the chain."""
    prev = GENESIS
    count = 0
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        return ChainCheck(False, 0, f"cannot read {path}: {exc.strerror}")
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            claimed = entry.pop("hash")
        except (ValueError, KeyError, AttributeError):
            return ChainCheck(False, count, f"line {number} is not an audit entry")
        if entry.get("prev") != prev or entry.get("seq") != number:
            return ChainCheck(False, count, f"line {number} does not follow line {number - 1}")
        if _digest(prev, entry) != claimed:
            return ChainCheck(False, count, f"line {number} was changed after it was written")
        prev = claimed
        count += 1
    return ChainCheck(True, count, f"{count} entries, chain intact, head {prev[:16]}")


class AuditLog:
    """One JSON line per call: who, which RPC, counts, verdict; each line hashes the previous.

    Lines are flushed to the OS as they are written and fsynced on close, so a crash of the
    process loses nothing; a power loss may lose the last lines but never breaks the chain.
    While the disk is full, lines wait in memory (up to MAX_PENDING_LINES) and are written
    once space returns.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        create_private_file(path)
        self._lock = threading.Lock()
        self._seq, self._prev = self._tail()
        # Unbuffered appends: after a failed or partial write we know exactly which bytes are
        # on disk, so a retry neither repeats nor skips any.
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._pending = bytearray()  # bytes not yet written (a full disk)
        self._held = 0  # lines in _pending
        self._failing = False
        self._lost = 0

    def _tail(self) -> tuple[int, str]:
        """Sequence number and hash of the last complete line, to continue the chain."""
        seq, prev = 0, GENESIS
        with self.path.open("rb") as fh:
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            # A line torn by a crash mid-write: cut it so the next line chains onto a whole one.
            with self.path.open("r+b") as fh:
                fh.truncate(len(complete))
        for line in complete.splitlines()[-1:]:
            entry = json.loads(line)
            seq, prev = int(entry["seq"]), str(entry["hash"])
        return seq, prev

    def append(self, who: str, rpc: str, verdict: str, **fields: Any) -> str:
        """Write one entry; returns its hash. A full disk delays lines, it never fails a call."""
        with self._lock:
            self._seq += 1
            record = {
                "seq": self._seq,
                "time": round(time.time(), 3),
                "who": who,
                "rpc": rpc,
                "verdict": verdict,
                **fields,
                "prev": self._prev,
            }
            record["hash"] = self._prev = _digest(self._prev, record)
            if self._held < MAX_PENDING_LINES:
                line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
                self._pending += line.encode()
                self._held += 1
            else:
                # Past the bound the chain must break; say so instead of growing without end.
                self._lost += 1
            self._write_pending()
            return self._prev

    def _write_pending(self) -> None:
        """Write the bytes held back (a full disk); keep the rest for the next try."""
        while self._pending and self._fd is not None:
            try:
                written = os.write(self._fd, self._pending)
            except OSError as exc:
                if not self._failing:
                    log.error("cannot write the audit log %s (%s); holding lines", self.path, exc)
                self._failing = True
                return
            del self._pending[:written]
        if self._failing:
            log.info("audit log %s is writable again", self.path)
        if self._lost:
            log.error("the audit log lost %d lines while the disk was full", self._lost)
            self._lost = 0
        self._held = 0
        self._failing = False

    def close(self) -> None:
        """Write what is held, fsync and close (errors are logged: shutdown goes on)."""
        with self._lock:
            if self._fd is None:
                return
            self._write_pending()
            try:
                os.fsync(self._fd)
            except OSError as exc:
                log.error("audit log %s not synced on close: %s", self.path, exc)
            os.close(self._fd)
            self._fd = None


class ReceiptSigner:
    """HMAC receipts for acknowledged uploads and deletions; the key stays in the data dir."""

    def __init__(self, key_path: Path) -> None:
        if not key_path.exists():
            create_private_file(key_path)
            key_path.write_bytes(secrets.token_bytes(32))
        self._key = read_private_bytes(key_path, "receipt key")

    def _mac(self, action: str, client_id: str, items: Iterable[str], when: int) -> str:
        body = "\n".join([RECEIPT_VERSION, action, client_id, str(when), *sorted(items)])
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def sign(self, action: str, client_id: str, items: Iterable[str]) -> str:
        """`v1:<unix time>:<hex HMAC>` over the action, client, time and sorted item ids."""
        when = int(time.time())
        return f"{RECEIPT_VERSION}:{when}:{self._mac(action, client_id, items, when)}"

    def verify(self, receipt: str, action: str, client_id: str, items: Iterable[str]) -> bool:
        """Whether this server issued `receipt` for exactly these items."""
        try:
            version, when, mac = receipt.split(":")
            stamp = int(when)
        except ValueError:
            return False
        expected = self._mac(action, client_id, items, stamp)
        return version == RECEIPT_VERSION and hmac.compare_digest(mac, expected)
