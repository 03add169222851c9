"""Atomic checkpoint files: written to a temporary file, fsynced, then renamed into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from collafuse.common.files import private_dir


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` so that `path` holds either the old or the new checkpoint, never a torn one."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """Load a checkpoint written by save_atomic, or None when there is none yet."""
    if not path.exists():
        return None
    # weights_only: a checkpoint is tensors and plain data; never unpickle arbitrary objects.
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state
