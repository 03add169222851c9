"""Per-client bearer tokens: a client may act only as itself when the server has a token file."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from collafuse.server.policy import PolicyError, Refusal

AUTH_HEADER = "authorization"


def hash_token(token: str) -> str:
    """What the server stores: the token's sha256, so the file holds no usable secret."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


class Authenticator:
    """Maps a request's bearer token to the client id it belongs to."""

    def __init__(self, hashes: dict[str, str] | None = None) -> None:
        self._by_hash = {h: cid for cid, h in (hashes or {}).items()}

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        """Read `client_id = "sha256:<hex>"` lines (TOML); no file means no authentication."""
        if path is None:
            return cls()
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read the token file {path}: {exc}") from None
        bad = [k for k, v in data.items() if not (isinstance(v, str) and v.startswith("sha256:"))]
        if bad:
            raise ValueError(
                f'token file {path}: entries {bad} must read client_id = "sha256:<hex>" '
                "(make them with `collafuse token CLIENT_ID`)"
            )
        return cls(dict(data))

    @property
    def enabled(self) -> bool:
        """Whether requests must carry a token."""
        return bool(self._by_hash)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """The caller's client id; None when authentication is off. Raises when it fails."""
        if not self.enabled:
            return None
        value = next((v for k, v in metadata if k.lower() == AUTH_HEADER), None)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if not value or not value.startswith("Bearer "):
            raise PolicyError(
                Refusal.UNAUTHENTICATED,
                "this server requires a client token: set auth_token_file in the client config",
            )
        presented = hash_token(value.removeprefix("Bearer ").strip())
        for stored, client_id in self._by_hash.items():
            if hmac.compare_digest(stored, presented):
                return client_id
        raise PolicyError(Refusal.UNAUTHENTICATED, "the client token is not known to this server")

    @staticmethod
    def check(caller: str | None, client_id: str) -> None:
        """A token may act only for its own client id."""
        if caller is not None and caller != client_id:
            raise PolicyError(
                Refusal.PERMISSION_DENIED,
                f"the token belongs to {caller} and cannot act as {client_id}",
            )
