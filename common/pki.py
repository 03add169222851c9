"""A small CA for mutual TLS: per-client startup kits, server certificates, a revocation list."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collafuse.common.config import CLIENT_ID_PATTERN

# The config's rule (config imports neither torch nor protobuf, so the PKI stays light).
CLIENT_ID_RE = re.compile(CLIENT_ID_PATTERN)
CLIENT_URI_PREFIX = "collafuse:client:"
"""A client certificate names its client as the URI SAN `collafuse:client:<client_id>`."""
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
# A DNS name (optionally a leading wildcard label) in its ASCII form; ports and URLs are refused.
_DNS_RE = re.compile(r"^(\*\.)?[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*\.?$")
# Certificates start a few minutes in the past so that a peer whose clock is slightly behind
# does not refuse a freshly issued one as "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
REVOKED = "revoked.txt"


class PkiError(ValueError):
    """A PKI operation that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class CaFiles:
    """What `init_ca` wrote."""

    ca_dir: Path
    cert: Path
    key: Path
    revoked: Path


@dataclass(frozen=True)
class KitFiles:
    """A client's startup kit: everything the client needs to connect with mutual TLS."""

    out_dir: Path
    ca_cert: Path
    cert: Path
    key: Path
    config: Path
    fingerprint: str
    """sha256 of the client certificate's DER, the value `revoke` would add to the denylist."""


@dataclass(frozen=True)
class ServerFiles:
    """What `issue_server` wrote."""

    out_dir: Path
    cert: Path
    key: Path
    ca_cert: Path


def fingerprint(cert_pem: bytes) -> str:
    """sha256 of the certificate's DER encoding as lowercase hex (the denylist's format)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from exc
    return cert.fingerprint(hashes.SHA256()).hex()


def read_denylist(path: Path) -> frozenset[str]:
    """The fingerprints in a denylist file: one per line, blank lines and `#` comments ignored.

    A malformed line is an error rather than skipped: a silently ignored typo would leave a
    revoked certificate accepted.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PkiError(f"cannot read the denylist {path}: {exc.strerror or exc}") from exc
    found: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if not _FINGERPRINT_RE.match(line):
            raise PkiError(
                f"{path}:{number}: {raw.strip()[:80]!r} is not a sha256 fingerprint "
                "(64 hex digits, one per line)"
            )
        found.add(line)
    return frozenset(found)


def client_uri(client_id: str) -> str:
    """The URI SAN that names client_id in its certificate."""
    return CLIENT_URI_PREFIX + check_client_id(client_id)


def check_client_id(client_id: str) -> str:
    """client_id itself when it is 1-64 letters, digits, '-', '_' or '.'; PkiError otherwise."""
    if not CLIENT_ID_RE.match(client_id):
        raise PkiError(
            f"client id {client_id[:80]!r} is invalid: use 1-64 letters, digits, '-', '_' or '.'"
        )
    return client_id


def init_ca(ca_dir: Path, name: str = "CollaFuse CA", days: int = 3650) -> CaFiles:
    """Create a new CA in ca_dir: ca.crt, ca.key (mode 0600) and an empty revoked.txt.

    Refuses when ca_dir already holds a CA: replacing it would orphan every issued certificate.
    """
    ca_dir = Path(ca_dir).absolute()
    _check_days(days)
    if not name or len(name) > 64:
        raise PkiError("the CA name must be 1-64 characters (the X.509 limit for a common name)")
    files = CaFiles(ca_dir, ca_dir / CA_CERT, ca_dir / CA_KEY, ca_dir / REVOKED)
    existing = [p for p in (files.cert, files.key) if p.exists() or p.is_symlink()]
    if existing:
        raise PkiError(
            f"a CA already exists in {ca_dir} ({', '.join(p.name for p in existing)}); "
            "refusing to replace it, since that would invalidate every certificate it issued"
        )
    _private_dir(ca_dir)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key first, with O_EXCL: of two concurrent inits exactly one gets past this line.
    _write_private_key(files.key, key)
    _write_new(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(
        files.revoked,
        b"# Revoked certificates: one sha256 fingerprint (of the DER) per line.\n"
        b"# Add lines with `collafuse pki revoke CERT --ca-dir DIR`.\n",
        0o644,
    )
    return files


def issue_client(
    ca_dir: Path,
    client_id: str,
    out_dir: Path,
    days: int = 365,
    not_before: dt.datetime | None = None,
    server_address: str = "127.0.0.1:50051",
) -> KitFiles:
    """Write a startup kit for client_id to out_dir (mode 0700), signed by the CA in ca_dir.

    The kit holds ca.crt, client.crt, client.key (mode 0600) and client.toml, a client config
    naming them by absolute path. not_before (timezone-aware) and days set the validity window;
    by default it starts now, less a few minutes for clock skew. Refuses a non-empty out_dir.
    """
    check_client_id(client_id)
    _check_days(days)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PkiError(
            f"{out_dir} already exists and is not an empty directory; refusing to overwrite a "
            "kit (revoke the old certificate and issue into a new directory)"
        )
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    start, end = _validity(days, not_before)

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _leaf_builder(ca_cert, ca_key, key, client_id, start, end)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(client_uri(client_id))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    _private_dir(out_dir)
    # An existing (empty) kit directory is the kit's alone, so it is made private too.
    os.chmod(out_dir, 0o700)
    files = KitFiles(
        out_dir=out_dir,
        ca_cert=out_dir / CA_CERT,
        cert=out_dir / "client.crt",
        key=out_dir / "client.key",
        config=out_dir / "client.toml",
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )
    _write_private_key(files.key, key)
    _write_new(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    config = _kit_config(client_id, server_address, files)
    _write_new(files.config, config.encode("utf-8"), 0o644)
    return files


def issue_server(ca_dir: Path, hosts: list[str], out_dir: Path, days: int = 365) -> ServerFiles:
    """Write server.crt, server.key (mode 0600) and ca.crt to out_dir for the given hosts.

    Each host goes into the subject alternative names, as an IP address when it parses as one
    and as a DNS name otherwise (clients check the name they dial against these); the common
    name is the first host.
    """
    if not hosts:
        raise PkiError("name at least one host (DNS name or IP address) the server is reached by")
    names = [_host_name(h) for h in hosts]
    _check_days(days)
    out_dir = Path(out_dir).absolute()
    files = ServerFiles(out_dir, out_dir / "server.crt", out_dir / "server.key", out_dir / CA_CERT)
    existing = [p for p in (files.cert, files.key) if p.exists() or p.is_symlink()]
    if existing:
        raise PkiError(
            f"{', '.join(str(p) for p in existing)} already exist; refusing to overwrite a "
            "server identity (issue into a new directory)"
        )
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    # The directory may already hold this CA's certificate (e.g. the CA directory itself); an
    # identical copy is kept, a different one is refused before anything is written.
    keep_ca = files.ca_cert.exists() and files.ca_cert.read_bytes() == ca_pem
    if files.ca_cert.exists() and not keep_ca:
        raise PkiError(f"{files.ca_cert} holds another CA's certificate; use a new directory")
    start, end = _validity(days, None)

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        # X.509 caps a common name at 64 characters; clients check the SAN, not the CN.
        _leaf_builder(ca_cert, ca_key, key, hosts[0][:64], start, end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _private_dir(out_dir)
    _write_private_key(files.key, key)
    _write_new(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if not keep_ca:
        _write_new(files.ca_cert, ca_pem, 0o644)
    return files


def revoke(ca_dir: Path, cert_path: Path) -> str:
    """Add the certificate's fingerprint to ca_dir/revoked.txt (once) and return it."""
    ca_dir = Path(ca_dir)
    try:
        pem = Path(cert_path).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read the certificate {cert_path}: {exc.strerror or exc}") from exc
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"{cert_path} is not a PEM certificate: {exc}") from exc
    ca_cert = _read_ca_cert(ca_dir)
    # Revoking a certificate of another CA would do nothing (the server never trusted it), so
    # it is almost certainly the wrong --ca-dir.
    if not _issued_by(cert, ca_cert):
        raise PkiError(f"{cert_path} was not issued by the CA in {ca_dir}; check --ca-dir")
    fp = cert.fingerprint(hashes.SHA256()).hex()
    denylist = ca_dir / REVOKED
    if denylist.exists():
        if fp in read_denylist(denylist):
            return fp
        text = denylist.read_text(encoding="utf-8")
    else:
        text = ""
    subject = ", ".join(a.rfc4514_string() for a in cert.subject)
    lines = [
        f"# {subject}, serial {cert.serial_number:x}, revoked {_now():%Y-%m-%dT%H:%M:%SZ}",
        fp,
    ]
    # The comment goes on its own line so that readers which only skip whole-line comments
    # still see a bare fingerprint.
    prefix = "" if not text or text.endswith("\n") else "\n"
    with denylist.open("a", encoding="utf-8") as fh:
        fh.write(prefix + "\n".join(lines) + "\n")
    return fp


# --- helpers -------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _check_days(days: int) -> None:
    if days < 1:
        raise PkiError(f"days must be at least 1, not {days}")


def _validity(days: int, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if not_before is None:
        now = _now()
        return now - _CLOCK_SKEW, now + dt.timedelta(days=days)
    if not_before.tzinfo is None:
        raise PkiError("not_before must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return not_before, not_before + dt.timedelta(days=days)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_RE.match(host):
        raise PkiError(
            f"{host[:80]!r} is neither an IP address nor a DNS name "
            "(give the host without a port or scheme, e.g. collafuse.example.org or 10.0.0.5)"
        )
    return x509.DNSName(host)


def _leaf_builder(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    start: dt.datetime,
    end: dt.datetime,
) -> x509.CertificateBuilder:
    """The parts client and server certificates share; the caller adds SAN and EKU."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )


def _read_ca_cert(ca_dir: Path) -> x509.Certificate:
    path = ca_dir / CA_CERT
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(
            f"no CA in {ca_dir} ({CA_CERT} is missing); create one with "
            f"`collafuse pki init --ca-dir {ca_dir}`"
        ) from exc
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate: {exc}") from exc


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA's certificate and key, after checking the key file is private and matches."""
    cert = _read_ca_cert(ca_dir)
    key_path = ca_dir / CA_KEY
    try:
        # Check the mode of the file actually opened (fstat), not of whatever the path named a
        # moment earlier; O_NOFOLLOW refuses a symlink planted in place of the key.
        fd = os.open(key_path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise PkiError(f"the CA key {key_path} is missing") from exc
    except OSError as exc:
        raise PkiError(f"cannot open the CA key {key_path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise PkiError(
                f"the CA key {key_path} is readable by other users (mode "
                f"{stat.S_IMODE(mode):04o}); run `chmod 600 {key_path}` and consider whether "
                "the CA must be replaced"
            )
        pem = fh.read()
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"cannot load the CA key {key_path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"the CA key {key_path} is not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise PkiError(f"{key_path} is not the key of {ca_dir / CA_CERT}")
    if cert.not_valid_after_utc <= _now():
        raise PkiError(
            f"the CA certificate {ca_dir / CA_CERT} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    return cert, key


def _issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _private_dir(path: Path) -> None:
    """Create path with mode 0700; an existing directory keeps its mode (it may be shared)."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise PkiError(f"{path} exists and is not a directory") from None
        return
    # mkdir's mode is masked by the umask; a umask can only remove bits, but make it exact.
    os.chmod(path, 0o700)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a new file created with exactly `mode`; refuse to replace an existing one."""
    try:
        # O_EXCL also refuses a symlink at path, so nothing is written through one.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except FileExistsError as exc:
        raise PkiError(f"{path} already exists; refusing to overwrite it") from exc
    with os.fdopen(fd, "wb") as fh:
        # The umask may have narrowed the mode; a public certificate should still be readable.
        os.fchmod(fh.fileno(), mode)
        fh.write(data)


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 by os.open itself, so the key is never readable by others, not even briefly.
    _write_new(path, pem, 0o600)


def _toml_string(value: str) -> str:
    """A TOML basic string; control characters are escaped (TOML forbids them raw)."""
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _kit_config(client_id: str, server_address: str, files: KitFiles) -> str:
    entries = {
        "client_id": client_id,
        "server": server_address,
        "tls_ca": str(files.ca_cert),
        "tls_cert": str(files.cert),
        "tls_key": str(files.key),
        "state_dir": str(files.out_dir / "state"),
    }
    lines = [
        f"# Startup kit for client {client_id!r}: `collafuse client run --config {files.config}`.",
        "# Paths are absolute; reissue the kit rather than moving it. Add a [data] section for",
        "# this client's images (every field is documented in common/config.py, ClientConfig).",
        *(f"{k} = {_toml_string(v)}" for k, v in entries.items()),
    ]
    return "\n".join(lines) + "\n"
