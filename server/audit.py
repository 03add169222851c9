"""Accountability: a hash-chained, append-only audit log of calls, and signed receipts."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collafuse.common.files import create_private_file, read_private_bytes

GENESIS = "0" * 64
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
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        create_private_file(path)
        self._lock = threading.Lock()
        self._seq, self._prev = self._tail()
        self._fh = path.open("a", encoding="utf-8")

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
        """Write one entry; returns its hash."""
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
            self._fh.write(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
            self._fh.flush()
            return self._prev

    def close(self) -> None:
        """fsync and close."""
        with self._lock:
            if self._fh.closed:
                return
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


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
