"""Private files and directories: state is 0700/0600, and loosely readable secrets are refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class InsecureFileError(ValueError):
    """A secret file others could read; the message says how to fix it."""


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make the directory itself 0700.

    Parents are created with the process umask: they may be shared folders such as /srv.
    The directory we own holds pools, ledgers and keys, so nobody else may list or read it.
    """
    path.mkdir(parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR_MODE:
        path.chmod(PRIVATE_DIR_MODE)
    return path


def create_private_file(path: Path) -> None:
    """Create an empty 0600 file if it does not exist (before a library opens it with 0644)."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def check_private_file(path: Path, what: str) -> Path:
    """Refuse a secret, key or token file that group or others may read or write."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise InsecureFileError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise InsecureFileError(
            f"the {what} {path} has mode {mode:04o}, so other users may read it; "
            f"run `chmod 600 {path}` and start again"
        )
    return path


def read_private_bytes(path: Path, what: str) -> bytes:
    """The contents of a secret file after checking its mode."""
    check_private_file(path, what)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InsecureFileError(f"cannot read the {what} {path}: {exc.strerror}") from None
