"""Who is calling: identities from verified client certificates or bearer tokens, fail closed."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from collafuse.common.pki import fingerprint, read_denylist
from collafuse.server.policy import PolicyError, Refusal

log = logging.getLogger("collafuse.server.auth")
AUTH_HEADER = "authorization"


def hash_token(token: str) -> str:
    """What the server stores: the token's sha256, so the file holds no usable secret."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Identity:
    """An authenticated caller. `name` is None only on a server without authentication."""

    name: str | None
    admin: bool = False
    method: str = "none"  # "certificate", "token" or "none"

    def check_acts_as(self, client_id: str) -> None:
        """A caller may act only as itself."""
        if self.name is not None and self.name != client_id:
            raise PolicyError(
                Refusal.PERMISSION_DENIED,
                f"you are authenticated as {self.name} and cannot act as {client_id}",
            )

    @property
    def sees_everything(self) -> bool:
        """Admins and the operator of an unauthenticated (loopback) server see every pool."""
        return self.admin or self.name is None


ANONYMOUS = Identity(name=None)


@dataclass(frozen=True)
class _Token:
    client_id: str
    expires: datetime | None


def _as_datetime(value: object, where: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise ValueError(f"{where}: expires must be a TOML date-time such as 2027-01-31T00:00:00Z")


def load_tokens(path: Path) -> dict[str, _Token]:
    """Read the token file: `id = "sha256:<hex>"` or `[id]` tables with `hash` and `expires`."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"the token file {path} is not valid TOML: {exc}") from None
    by_hash: dict[str, _Token] = {}
    for client_id, entry in data.items():
        where = f"token file {path}, entry {client_id!r}"
        expires: object = None
        if isinstance(entry, dict):
            expires = entry.get("expires")
            entry = entry.get("hash")
        if not (isinstance(entry, str) and entry.startswith("sha256:")):
            raise ValueError(
                f'{where} must read {client_id} = "sha256:<hex>" or be a table with hash = '
                '"sha256:<hex>" (make one with `collafuse token CLIENT_ID`)'
            )
        by_hash[entry] = _Token(client_id, _as_datetime(expires, where))
    if not by_hash:
        # An empty file must not silently turn authentication off.
        raise ValueError(
            f"the token file {path} lists no tokens; add lines from `collafuse token CLIENT_ID`"
        )
    return by_hash


class _Denylist:
    """Revoked certificate fingerprints, re-read whenever the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._fingerprints: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> frozenset[str]:
        if self.path is None:
            return self._fingerprints
        try:
            st = self.path.stat()
        except OSError as exc:
            # Fail closed: without the list nobody can say who is revoked.
            raise PolicyError(
                Refusal.UNAVAILABLE,
                f"the server cannot read its revocation list ({exc.strerror}); try again later",
            ) from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._fingerprints = read_denylist(self.path)
                except ValueError as exc:
                    # Fail closed on a list that does not parse; the operator sees why.
                    log.error("revocation list %s: %s", self.path, exc)
                    raise PolicyError(
                        Refusal.UNAVAILABLE,
                        "the server cannot read its revocation list; try again later",
                    ) from None
                self._stamp = stamp
                log.info("revocation list %s: %d entries", self.path, len(self._fingerprints))
            return self._fingerprints


class Authenticator:
    """Maps a call's verified peer certificate or bearer token to an Identity."""

    def __init__(
        self,
        *,
        mutual_tls: bool = False,
        token_file: Path | None = None,
        revoked: Path | None = None,
        admins: Sequence[str] = (),
    ) -> None:
        self.mutual_tls = mutual_tls
        self.token_file = token_file
        self.admins = frozenset(admins)
        self._tokens = load_tokens(token_file) if token_file is not None else {}
        self._denylist = _Denylist(revoked)

    @property
    def enabled(self) -> bool:
        """Whether calls must carry an identity."""
        return self.mutual_tls or self.token_file is not None

    def reload(self) -> None:
        """Re-read the token file (SIGHUP); on an error keep the tokens already loaded."""
        if self.token_file is None:
            return
        try:
            self._tokens = load_tokens(self.token_file)
        except ValueError as exc:
            log.error("kept the previous tokens: %s", exc)
            return
        log.info("reloaded %d tokens from %s", len(self._tokens), self.token_file)

    def identify(
        self,
        auth_context: Mapping[str, Sequence[bytes]],
        metadata: Iterable[tuple[str, str | bytes]] | None,
    ) -> Identity:
        """The caller's identity; raises PolicyError (UNAUTHENTICATED) when it has none."""
        if self.mutual_tls:
            return self._from_certificate(auth_context)
        if self.token_file is not None:
            return self._from_token(metadata or ())
        return ANONYMOUS

    def _named(self, name: str, method: str) -> Identity:
        return Identity(name=name, admin=name in self.admins, method=method)

    def _from_certificate(self, auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
        names = auth_context.get("x509_common_name") or []
        pems = auth_context.get("x509_pem_cert") or []
        if not names or not pems:
            # The TLS layer already demands a certificate; this is the second lock on the door.
            raise PolicyError(
                Refusal.UNAUTHENTICATED,
                "this server requires a client certificate: set tls_cert and tls_key "
                "from your `collafuse pki issue` kit",
            )
        if fingerprint(pems[0]) in self._denylist.refresh():
            raise PolicyError(
                Refusal.UNAUTHENTICATED,
                "your client certificate has been revoked; ask the operator for a new kit",
            )
        return self._named(names[0].decode(errors="replace"), "certificate")

    def _from_token(self, metadata: Iterable[tuple[str, str | bytes]]) -> Identity:
        value = next((v for k, v in metadata if k.lower() == AUTH_HEADER), None)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if not value or not value.startswith("Bearer "):
            raise PolicyError(
                Refusal.UNAUTHENTICATED,
                "this server requires a client token: set auth_token_file in the client config",
            )
        presented = hash_token(value.removeprefix("Bearer ").strip())
        match: _Token | None = None
        for stored, token in self._tokens.items():
            if hmac.compare_digest(stored, presented):
                match = token
        if match is None:
            raise PolicyError(
                Refusal.UNAUTHENTICATED, "the client token is not known to this server"
            )
        if match.expires is not None and datetime.now(UTC) >= match.expires:
            raise PolicyError(
                Refusal.UNAUTHENTICATED,
                f"the token of {match.client_id} expired at {match.expires.isoformat()}; "
                "ask the operator for a new one",
            )
        return self._named(match.client_id, "token")
