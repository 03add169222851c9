"""Checkpoint files that verify themselves, rotate, and are written atomically and durably.

On-disk format: exactly what `torch.save` writes (a zip archive), except that the archive's
comment, which torch leaves empty, holds `collafuse-checkpoint sha256=<64 hex digits>`: the
sha256 of the file as torch.save wrote it, i.e. with an empty comment. A zip comment is part of
the format, so `torch.load(path, weights_only=True)` and any zip tool still read the file
(`unzip -z server.pt` prints the checksum), and the checksum travels inside the one file it
covers: there is no sidecar that a crash or a copy could separate from it.

At load the file is read into memory, checked (empty, not a zip, truncated, checksum
mismatch) and only then unpickled with `weights_only=True`. Every failure becomes a
`CheckpointError` in our own words; torch's messages are not passed on, because some of them
advise loading with `weights_only=False`, which would run any code the file holds. A file with
an empty comment (written before checksums existed) is accepted after its zip CRC-32s check out,
with a warning; it gets a sha256 at its next save.

Rotation: `save_atomic(state, path, keep=K)` keeps the K newest checkpoints as `path` (newest),
`path.1`, ..., `path.{K-1}`. The new file is written to a 0600 temporary file and fsynced, the
older generations are renamed one place down (`path` is hard-linked to `path.1`, so `path`
exists throughout), the temporary file is renamed over `path`, and the directory (0700) is
fsynced. A crash at any point leaves every generation either old or new, never torn.
`load_latest(path)` tries `path`, then `path.1`, ..., and uses the newest intact one, with a
warning that names the files it skipped and why.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from collafuse.common.files import private_dir

log = logging.getLogger("collafuse.checkpoint")

DEFAULT_KEEP = 3
"""Checkpoints kept by default: the newest and two older ones to fall back on."""

DEFAULT_REMEDY = "restore {path} from a backup, or move the damaged files aside to start afresh"
"""What a CheckpointError tells the operator to do (`{path}` is the checkpoint); the server's
names its --start-over flag."""

_TAG = b"collafuse-checkpoint sha256="
_LOCAL_HEADER = b"PK\x03\x04"
_END_OF_ARCHIVE = b"PK\x05\x06"
_END_SIZE = 22  # the end-of-central-directory record, without its comment
_MAX_COMMENT = 0xFFFF


class CheckpointError(ValueError):
    """No intact checkpoint to resume from; the message names the files and what to do."""


class _Damaged(Exception):
    """One checkpoint file is unusable; the message is the reason, worded for operators."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """The state of the newest intact checkpoint, which file it came from, and what was skipped."""

    state: dict[str, Any]
    path: Path
    skipped: tuple[tuple[Path, str], ...]
    """Newer generations that were missing or damaged, each with the reason."""
    verified: bool
    """True when a sha256 was checked; False for an older file with zip CRC-32s only."""


def generation(path: Path, index: int) -> Path:
    """The file of the index-th newest checkpoint: `path` itself for 0, else `path.{index}`."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


def _older(path: Path) -> dict[int, Path]:
    """The existing older generations `path.1`, `path.2`, ... by index."""
    found: dict[int, Path] = {}
    if not path.parent.is_dir():
        return found
    prefix = f"{path.name}."
    for entry in path.parent.iterdir():
        suffix = entry.name[len(prefix) :]
        if entry.name.startswith(prefix) and suffix.isdigit() and int(suffix) > 0:
            found[int(suffix)] = entry
    return found


def checkpoint_files(path: Path) -> list[Path]:
    """Every existing generation of the checkpoint at `path`, newest first."""
    older = _older(path)
    return [p for p in (path,) if p.exists()] + [older[i] for i in sorted(older)]


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (renames, links, new files) to disk."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make renames and links themselves durable
    finally:
        os.close(dir_fd)


def _write_temp(chunks: list[bytes | memoryview], path: Path) -> Path:
    """A fsynced 0600 temporary file in path's (0700) directory holding the chunks."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Replace `path` (0600, in a 0700 directory) with `data` atomically and durably."""
    tmp = _write_temp([data], path)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _rotate(path: Path, keep: int) -> None:
    """Move every generation one place older and drop those beyond `keep`; `path` stays."""
    older = _older(path)
    for index in sorted(older, reverse=True):
        if index + 1 >= keep:
            older[index].unlink(missing_ok=True)
        else:
            os.replace(older[index], generation(path, index + 1))
    if keep >= 2 and path.exists():
        try:
            os.link(path, generation(path, 1))
        except OSError:  # a file system without hard links: a short window without `path`
            os.replace(path, generation(path, 1))


def _remove_stale_temps(path: Path) -> None:
    """Temporary files left by a process killed while it wrote a checkpoint."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def save_atomic(state: dict[str, Any], path: Path, keep: int = DEFAULT_KEEP) -> None:
    """Write `state` as the newest checkpoint at `path`, keeping `keep` generations in all.

    `path` holds the old or the new checkpoint at every instant, never a torn one, and the
    file carries the sha256 that load_checkpoint verifies (see the module docstring).
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    buf = io.BytesIO()
    torch.save(state, buf)
    raw = buf.getbuffer()
    if len(raw) < _END_SIZE or raw[-_END_SIZE:-18] != _END_OF_ARCHIVE or raw[-2:] != b"\0\0":
        raise RuntimeError("torch.save wrote no zip archive with an empty comment; cannot sign")
    comment = _TAG + hashlib.sha256(raw).hexdigest().encode()
    private_dir(path.parent)
    _remove_stale_temps(path)
    tmp = _write_temp([raw[:-2], len(comment).to_bytes(2, "little"), comment], path)
    try:
        _rotate(path, keep)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _check_bytes(data: bytes) -> bool:
    """Raise _Damaged unless `data` is an intact checkpoint; True when its sha256 was checked."""
    if not data:
        raise _Damaged("is empty (0 bytes; was the disk full or the copy cut short?)")
    if not data.startswith(_LOCAL_HEADER):
        raise _Damaged("is not a checkpoint (it does not start like a file torch.save writes)")
    end = data.rfind(_END_OF_ARCHIVE, max(0, len(data) - _END_SIZE - _MAX_COMMENT))
    if end < 0 or len(data) < end + _END_SIZE:
        raise _Damaged(f"is truncated ({len(data)} bytes and no end-of-archive record)")
    comment_len = int.from_bytes(data[end + 20 : end + 22], "little")
    if end + _END_SIZE + comment_len != len(data):
        raise _Damaged(f"is truncated or has bytes appended ({len(data)} bytes)")
    comment = data[end + _END_SIZE :]
    if not comment:
        _check_zip_crcs(data)
        return False
    if not comment.startswith(_TAG) or len(comment) != len(_TAG) + 64:
        raise _Damaged("is damaged: its checksum record is unreadable")
    expected = comment[len(_TAG) :].decode("ascii", errors="replace")
    sha = hashlib.sha256()
    sha.update(memoryview(data)[: end + 20])
    sha.update(b"\0\0")  # the checksum covers the file as torch.save wrote it, comment empty
    if sha.hexdigest() != expected:
        raise _Damaged(
            "is damaged: its contents do not match the sha256 recorded when it was written "
            "(flipped bits, a partial copy or an edit)"
        )
    return True


def _check_zip_crcs(data: bytes) -> None:
    """The zip CRC-32 of every member, for files written before checksums were added."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise _Damaged(f"is damaged: not a readable zip archive ({exc})") from None
    if bad is not None:
        raise _Damaged(f"is damaged: its member {bad} fails its CRC-32 check")


def _load_one(path: Path) -> tuple[dict[str, Any], bool]:
    """Read, verify and unpickle one checkpoint file, or raise _Damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Damaged("is missing") from None
    except OSError as exc:
        raise _Damaged(f"cannot be read ({exc.strerror})") from None
    verified = _check_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter
            # weights_only: a checkpoint is tensors and plain data; never unpickle anything else.
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running the file's code: never.
        raise _Damaged(
            "holds objects other than tensors and plain data, so it was not loaded"
        ) from None
    except Exception as exc:  # RuntimeError, EOFError, KeyError, zip errors...: say it our way
        raise _Damaged(f"cannot be unpacked ({type(exc).__name__}); it is damaged") from None
    if not isinstance(state, dict):
        raise _Damaged(f"holds a {type(state).__name__}, not a checkpoint")
    return state, verified


def load_latest(path: Path, remedy: str = DEFAULT_REMEDY) -> LoadedCheckpoint | None:
    """The newest intact generation of the checkpoint at `path`; None when none exists.

    Raises CheckpointError, naming every file and `remedy` (a template with `{path}`), when
    files exist but none is intact.
    """
    older = _older(path)
    candidates = [path] + [older[i] for i in sorted(older)]
    if not older and not path.exists():
        return None
    skipped: list[tuple[Path, str]] = []
    for candidate in candidates:
        try:
            state, verified = _load_one(candidate)
        except _Damaged as exc:
            skipped.append((candidate, str(exc)))
            continue
        if skipped:
            log.warning(
                "%s; using the older checkpoint %s",
                "; ".join(f"checkpoint {p} {why}" for p, why in skipped),
                candidate,
            )
        if not verified:
            log.warning(
                "checkpoint %s has no sha256 (written by an older CollaFuse); its zip CRC-32s "
                "are intact, so it is used, and the next save adds a sha256",
                candidate,
            )
        return LoadedCheckpoint(state, candidate, tuple(skipped), verified)
    broken = "; ".join(f"checkpoint {p} {why}" for p, why in skipped)
    raise CheckpointError(
        f"{broken}; no intact checkpoint is left to resume from: {remedy.format(path=path)}"
    )


def load_checkpoint(path: Path, remedy: str = DEFAULT_REMEDY) -> dict[str, Any] | None:
    """The state of the newest intact checkpoint at `path` (see load_latest), or None."""
    loaded = load_latest(path, remedy)
    return None if loaded is None else loaded.state
