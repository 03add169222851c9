"""The client's secret: it seeds every noise draw and keys the opaque image ids; it never leaves."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import torch
from torch import Tensor

from collafuse.common.files import private_dir, read_private_bytes

SECRET_BYTES = 32


def load_or_create_secret(path: Path) -> bytes:
    """Read the secret, or create it (mode 0600) on first use."""
    if path.exists():
        data = read_private_bytes(path, "client secret")
        if len(data) != SECRET_BYTES:
            raise ValueError(f"secret file {path} is corrupt: expected {SECRET_BYTES} bytes")
        return data
    private_dir(path.parent)
    data = secrets.token_bytes(SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return data


def _mac(secret: bytes, purpose: str, local_id: str) -> bytes:
    return hmac.new(secret, f"{purpose}\0{local_id}".encode(), hashlib.sha256).digest()


def wire_id(secret: bytes, local_id: str) -> str:
    """The id the server sees: a keyed hash, so it reveals nothing about which local image it is."""
    return _mac(secret, "id", local_id).hex()[:32]


def image_noise(secret: bytes, local_id: str, shape: tuple[int, ...]) -> Tensor:
    """eps1 for one image: N(0, I) from a seed only this client can compute (fixed exposure)."""
    seed = int.from_bytes(_mac(secret, "eps1", local_id)[:8], "little") & ((1 << 63) - 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
