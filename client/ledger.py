"""The client's release ledger: the authority on what left this machine, one release per image.

A release is one tensor: an image's cut at t_cut, identified by the sha256 of its bytes. The
ledger holds at most one release per local image, ever. Sending the same bytes again (a stream
retried after a broken connection, or a re-upload to a server that lost its pool) discloses
nothing new, so it reuses the existing row; anything else about an image that was released
before (another t_cut, other bytes, another wire id) is refused with a LedgerError before a
single byte is sent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from collafuse.common.store import immediate_transaction, open_database

log = logging.getLogger("collafuse.client.ledger")

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
CREATE TABLE IF NOT EXISTS forgets (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_at REAL NOT NULL,
    deleted INTEGER NOT NULL,
    trained_from_version INTEGER NOT NULL,
    trained_to_version INTEGER NOT NULL,
    receipt TEXT NOT NULL
);
"""

# Enforces one row per image in the database itself, on top of the check in `record`. Ledgers
# written before this rule may hold an image released at two noise levels; such a ledger keeps
# those rows as the record of what was disclosed and goes without the index (see _migrate).
_UNIQUE_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS releases_one_per_image ON releases(local_id)"
# The first row of each distinct release; later rows with the same identity are retries.
_FIRST_OF_EACH_RELEASE = "SELECT MIN(seq) FROM releases GROUP BY local_id, wire_id, t_cut, sha256"


class LedgerError(ValueError):
    """A release would disclose an image a second time (another t_cut or other bytes)."""


@dataclass(frozen=True)
class Release:
    """One tensor about to leave the client: which image, under which id, at which noise level."""

    local_id: str
    """The image's id on this machine; never sent."""
    wire_id: str
    """The opaque id the server sees."""
    t_cut: int
    """The timestep the cut was noised to."""
    bytes: int
    """Size of the tensor sent."""
    sha256: str
    """Hex sha256 of the tensor's bytes: the same hash means the same disclosure."""


@dataclass(frozen=True)
class LedgerSummary:
    """What a client has disclosed so far."""

    images_released: int
    """Distinct local images that ever left the machine."""
    images_acknowledged: int
    """Distinct local images the server acknowledged."""
    releases: int
    """Distinct tensors released; equals images_released unless a legacy ledger shows an image
    released at two noise levels."""
    bytes_released: int
    """Bytes of the distinct tensors released (each image's bytes once)."""
    t_cuts: list[int]
    """Every t_cut anything was released at."""


class Ledger:
    """Rows are written before a tensor is sent and marked once the server acknowledged it."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA)
        self._lock = threading.Lock()
        with self._lock:
            self._migrate()
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(releases)")}
            if "receipt" not in columns:  # ledgers from before upload receipts
                self._db.execute("ALTER TABLE releases ADD COLUMN receipt TEXT")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # ----- schema ---------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Fold legacy duplicate rows into one per release, then enforce one row per image.

        Before the one-release rule every retried upload stream inserted its rows again. Rows
        with the same image, wire id, t_cut and bytes are one disclosure: keep the first, with
        the earliest acknowledgement any of them got. Rows of one image that differ otherwise
        are distinct disclosures that did happen; they stay, and the image is frozen (record
        refuses every further release of it).
        """
        if self._has_unique_index():
            return
        # IMMEDIATE: another process opening the same ledger waits instead of interleaving.
        with immediate_transaction(self._db):
            self._db.execute(
                "UPDATE releases SET acked_at = (SELECT MIN(o.acked_at) FROM releases o "
                "WHERE o.local_id = releases.local_id AND o.wire_id = releases.wire_id "
                "AND o.t_cut = releases.t_cut AND o.sha256 = releases.sha256) "
                f"WHERE seq IN ({_FIRST_OF_EACH_RELEASE})"
            )
            self._db.execute(f"DELETE FROM releases WHERE seq NOT IN ({_FIRST_OF_EACH_RELEASE})")
            frozen = [
                r[0]
                for r in self._db.execute(
                    "SELECT local_id FROM releases GROUP BY local_id HAVING COUNT(*) > 1"
                )
            ]
            if not frozen:
                self._db.execute(_UNIQUE_INDEX)
        if frozen:
            log.warning(
                "the ledger shows %d images released at more than one noise level (e.g. %s) by "
                "an older version; they are kept as released and will not be released again",
                len(frozen),
                frozen[0],
            )

    def _has_unique_index(self) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'releases_one_per_image'"
        ).fetchone()
        return row is not None

    # ----- releases -------------------------------------------------------------------------

    def _conflict(self, release: Release) -> tuple[int | None, str | None]:
        """(seq of the same earlier release or None, why this release is refused or None).

        Call with the lock held.
        """
        rows = self._db.execute(
            "SELECT seq, wire_id, t_cut, sha256 FROM releases WHERE local_id = ? ORDER BY seq",
            (release.local_id,),
        ).fetchall()
        same: int | None = None
        for seq, wire, t_cut, sha in rows:
            if t_cut != release.t_cut:
                return None, (
                    f"image {release.local_id!r} was already released at t_cut={t_cut}; it "
                    f"will not be released again at t_cut={release.t_cut}"
                )
            if sha != release.sha256 or wire != release.wire_id:
                return None, (
                    f"image {release.local_id!r} was already released at t_cut={t_cut} with "
                    f"other bytes or under another id (sha256 {sha[:12]}..., now "
                    f"{release.sha256[:12]}...); the image, the client secret or the code that "
                    "noises it changed, and a second noise draw of one image would disclose more"
                )
            same = int(seq) if same is None else same
        return same, None

    def check(self, releases: Sequence[Release]) -> None:
        """Raise LedgerError if any of these releases would disclose an image a second time."""
        with self._lock:
            for release in releases:
                _, why = self._conflict(release)
                if why is not None:
                    raise LedgerError(why)

    def record(self, releases: Sequence[Release]) -> list[int]:
        """Record releases before they are sent; the ledger seq of each, in order.

        A release identical to one recorded before (same image, wire id, t_cut and sha256) is
        not a new disclosure: it gets the earlier row's seq and adds nothing. Raises LedgerError,
        recording none of them, if any would release an image a second time differently.
        """
        now = time.time()
        seqs: list[int] = []
        # IMMEDIATE takes the write lock before the check, so no other process can record a
        # conflicting release of the same image between the check and the insert.
        with self._lock, immediate_transaction(self._db):
            for release in releases:
                same, why = self._conflict(release)
                if why is not None:
                    raise LedgerError(why)
                if same is not None:
                    seqs.append(same)
                    continue
                cur = self._db.execute(
                    "INSERT INTO releases (local_id, wire_id, t_cut, bytes, sha256, "
                    "released_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        release.local_id,
                        release.wire_id,
                        release.t_cut,
                        release.bytes,
                        release.sha256,
                        now,
                    ),
                )
                seqs.append(int(cur.lastrowid or 0))
        return seqs

    def acknowledge(self, seqs: list[int], receipt: str = "") -> None:
        """Mark releases the server acknowledged, with its receipt (the first one is kept)."""
        now = time.time()
        with self._lock, immediate_transaction(self._db):
            self._db.executemany(
                "UPDATE releases SET acked_at=?, receipt=? WHERE seq=? AND acked_at IS NULL",
                [(now, receipt or None, s) for s in seqs],
            )

    def receipts(self) -> dict[str, str]:
        """The server's receipt for each acknowledged local image."""
        with self._lock:
            rows = self._db.execute(
                "SELECT local_id, receipt FROM releases WHERE receipt IS NOT NULL"
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def record_forget(self, deleted: int, trained_from: int, trained_to: int, receipt: str) -> None:
        """Record that the server deleted this client's cut images (and what saw them)."""
        with self._lock, immediate_transaction(self._db):
            self._db.execute(
                "INSERT INTO forgets (requested_at, deleted, trained_from_version, "
                "trained_to_version, receipt) VALUES (?, ?, ?, ?, ?)",
                (time.time(), deleted, trained_from, trained_to, receipt),
            )

    def forgotten(self) -> bool:
        """Whether this client asked the server to forget its images: no re-upload after that."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM forgets").fetchone()[0] > 0

    def acknowledged_ids(self) -> set[str]:
        """Local ids the server has acknowledged."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT local_id FROM releases WHERE acked_at IS NOT NULL"
            ).fetchall()
        return {r[0] for r in rows}

    def summary(self) -> LedgerSummary:
        """Totals over the whole ledger, each distinct tensor counted once."""
        with self._lock:
            released, acked = self._db.execute(
                "SELECT COUNT(DISTINCT local_id), COUNT(DISTINCT CASE WHEN acked_at IS NOT NULL "
                "THEN local_id END) FROM releases"
            ).fetchone()
            # Grouping keeps the count honest even if duplicate rows ever reappear.
            releases, bytes_ = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(b), 0) FROM (SELECT MAX(bytes) AS b FROM releases "
                "GROUP BY local_id, t_cut, sha256)"
            ).fetchone()
            cuts = [r[0] for r in self._db.execute("SELECT DISTINCT t_cut FROM releases")]
        return LedgerSummary(int(released), int(acked), int(releases), int(bytes_), sorted(cuts))
