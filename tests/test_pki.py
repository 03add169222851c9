"""The small PKI: CA, client kits, server certificates, revocation, and a real mutual-TLS call."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collafuse.cli import main
from collafuse.common import pki
from collafuse.common.config import ClientConfig

TIMEOUT_S = 10.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


@pytest.fixture
def ca(tmp_path: Path) -> pki.CaFiles:
    return pki.init_ca(tmp_path / "ca", name="Test CA", days=30)


def test_init_ca_writes_private_ca(ca: pki.CaFiles) -> None:
    assert _mode(ca.ca_dir) == 0o700
    assert _mode(ca.key) == 0o600
    assert _mode(ca.cert) == 0o644
    assert pki.read_denylist(ca.revoked) == frozenset()
    cert = _cert(ca.cert)
    cert.verify_directly_issued_by(cert)  # self-signed
    assert _cn(cert) == "Test CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_init_ca_refuses_existing_ca(ca: pki.CaFiles) -> None:
    before = ca.key.read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.init_ca(ca.ca_dir)
    assert ca.key.read_bytes() == before


def test_issue_client_kit(ca: pki.CaFiles, tmp_path: Path) -> None:
    kit = pki.issue_client(ca.ca_dir, "edge-0", tmp_path / "kit", server_address="cf.example:443")
    assert _mode(kit.out_dir) == 0o700
    assert _mode(kit.key) == 0o600
    assert kit.ca_cert.read_bytes() == ca.cert.read_bytes()

    cert = _cert(kit.cert)
    cert.verify_directly_issued_by(_cert(ca.cert))
    assert _cn(cert) == "edge-0"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["collafuse:client:edge-0"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC) < cert.not_valid_after_utc
    assert kit.fingerprint == pki.fingerprint(kit.cert.read_bytes())
    assert kit.fingerprint == cert.fingerprint(hashes.SHA256()).hex()

    key = serialization.load_pem_private_key(kit.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_kit_config_names_the_files(ca: pki.CaFiles, tmp_path: Path) -> None:
    kit = pki.issue_client(ca.ca_dir, "edge.1", tmp_path / "kit", server_address="10.0.0.5:50051")
    data = tomllib.loads(kit.config.read_text())
    assert data == {
        "client_id": "edge.1",
        "server": "10.0.0.5:50051",
        "tls_ca": str(kit.ca_cert),
        "tls_cert": str(kit.cert),
        "tls_key": str(kit.key),
        "state_dir": str(kit.out_dir / "state"),
    }
    assert all(Path(data[k]).is_absolute() for k in ("tls_ca", "tls_cert", "tls_key", "state_dir"))
    config = ClientConfig.model_validate(data)
    assert config.tls_cert == kit.cert
    assert config.tls_key == kit.key


def test_issue_client_refuses_existing_kit(ca: pki.CaFiles, tmp_path: Path) -> None:
    kit = pki.issue_client(ca.ca_dir, "edge-0", tmp_path / "kit")
    before = kit.key.read_bytes()
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.issue_client(ca.ca_dir, "edge-0", tmp_path / "kit")
    assert kit.key.read_bytes() == before
    # An existing empty directory is fine: nothing in it can be overwritten.
    (tmp_path / "empty").mkdir(mode=0o755)
    pki.issue_client(ca.ca_dir, "edge-0", tmp_path / "empty")
    assert _mode(tmp_path / "empty") == 0o700


@pytest.mark.parametrize("client_id", ["", "a/b", "../x", "a b", "x" * 65, "é"])
def test_issue_client_refuses_bad_id(ca: pki.CaFiles, tmp_path: Path, client_id: str) -> None:
    with pytest.raises(pki.PkiError, match="invalid"):
        pki.issue_client(ca.ca_dir, client_id, tmp_path / "kit")
    assert not (tmp_path / "kit").exists()


def test_issue_client_expired(ca: pki.CaFiles, tmp_path: Path) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    kit = pki.issue_client(ca.ca_dir, "old", tmp_path / "kit", days=1, not_before=start)
    cert = _cert(kit.cert)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    cert.verify_directly_issued_by(_cert(ca.cert))
    with pytest.raises(pki.PkiError, match="timezone"):
        pki.issue_client(ca.ca_dir, "x", tmp_path / "kit2", not_before=dt.datetime(2020, 1, 1))


def test_ca_key_readable_by_others_is_refused(ca: pki.CaFiles, tmp_path: Path) -> None:
    ca.key.chmod(0o640)
    with pytest.raises(pki.PkiError, match=f"chmod 600 {ca.key}"):
        pki.issue_client(ca.ca_dir, "edge-0", tmp_path / "kit")
    assert not (tmp_path / "kit").exists()


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="pki init"):
        pki.issue_client(tmp_path / "nothing", "edge-0", tmp_path / "kit")


def test_issue_server(ca: pki.CaFiles, tmp_path: Path) -> None:
    files = pki.issue_server(ca.ca_dir, ["127.0.0.1", "cf.example.org", "::1"], tmp_path / "srv")
    assert _mode(files.out_dir) == 0o700
    assert _mode(files.key) == 0o600
    assert files.ca_cert.read_bytes() == ca.cert.read_bytes()
    cert = _cert(files.cert)
    cert.verify_directly_issued_by(_cert(ca.cert))
    assert _cn(cert) == "127.0.0.1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["cf.example.org"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.issue_server(ca.ca_dir, ["127.0.0.1"], tmp_path / "srv")
    with pytest.raises(pki.PkiError, match="neither an IP address nor a DNS name"):
        pki.issue_server(ca.ca_dir, ["host:50051"], tmp_path / "srv2")
    with pytest.raises(pki.PkiError, match="at least one host"):
        pki.issue_server(ca.ca_dir, [], tmp_path / "srv3")


def test_revoke_writes_fingerprint_once(ca: pki.CaFiles, tmp_path: Path) -> None:
    kit = pki.issue_client(ca.ca_dir, "edge-0", tmp_path / "kit")
    other = pki.issue_client(ca.ca_dir, "edge-1", tmp_path / "kit1")
    assert pki.revoke(ca.ca_dir, kit.cert) == kit.fingerprint
    assert pki.revoke(ca.ca_dir, kit.cert) == kit.fingerprint
    lines = ca.revoked.read_text().splitlines()
    assert lines.count(kit.fingerprint) == 1
    assert pki.read_denylist(ca.revoked) == {kit.fingerprint}
    pki.revoke(ca.ca_dir, other.cert)
    assert pki.read_denylist(ca.revoked) == {kit.fingerprint, other.fingerprint}


def test_revoke_refuses_foreign_certificate(ca: pki.CaFiles, tmp_path: Path) -> None:
    foreign = pki.init_ca(tmp_path / "other-ca")
    kit = pki.issue_client(foreign.ca_dir, "edge-0", tmp_path / "kit")
    with pytest.raises(pki.PkiError, match="not issued by"):
        pki.revoke(ca.ca_dir, kit.cert)
    assert pki.read_denylist(ca.revoked) == frozenset()


def test_read_denylist_comments_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    fp = "ab" * 32
    path.write_text(f"# header\n\n{fp.upper()}  # edge-0\n")
    assert pki.read_denylist(path) == {fp}
    path.write_text("not-a-fingerprint\n")
    with pytest.raises(pki.PkiError, match=r"revoked\.txt:1"):
        pki.read_denylist(path)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, kit_dir, srv_dir = tmp_path / "ca", tmp_path / "kit", tmp_path / "srv"
    assert main(["pki", "init", "--ca-dir", str(ca_dir), "--days", "30"]) == 0
    assert main(["pki", "init", "--ca-dir", str(ca_dir)]) == 2
    assert "already exists" in capsys.readouterr().err

    argv = ["pki", "issue", "edge-0", "--ca-dir", str(ca_dir), "--out", str(kit_dir)]
    assert main([*argv, "--server", "cf.example:50051"]) == 0
    out = capsys.readouterr().out
    assert f"collafuse client run --config {kit_dir / 'client.toml'}" in out
    assert tomllib.loads((kit_dir / "client.toml").read_text())["server"] == "cf.example:50051"
    assert main(argv) == 2
    bad = ["pki", "issue", "a/b", "--ca-dir", str(ca_dir), "--out", str(tmp_path / "k2")]
    assert main(bad) == 2

    assert (
        main(
            [
                "pki",
                "issue-server",
                "localhost",
                "127.0.0.1",
                "--ca-dir",
                str(ca_dir),
                "--out",
                str(srv_dir),
            ]
        )
        == 0
    )
    assert "tls_client_ca" in capsys.readouterr().out

    assert main(["pki", "revoke", str(kit_dir / "client.crt"), "--ca-dir", str(ca_dir)]) == 0
    out = capsys.readouterr().out
    fp = pki.fingerprint((kit_dir / "client.crt").read_bytes())
    assert fp in out and "tls_revoked" in out
    assert pki.read_denylist(ca_dir / "revoked.txt") == {fp}


# --- a real mutual-TLS call --------------------------------------------------------------------


@dataclass(frozen=True)
class _Server:
    address: str
    ca_pem: bytes


@pytest.fixture
def mtls_server(ca: pki.CaFiles, tmp_path: Path) -> Iterator[_Server]:
    files = pki.issue_server(ca.ca_dir, ["127.0.0.1"], tmp_path / "srv")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield _Server(f"127.0.0.1:{port}", files.ca_cert.read_bytes())
    finally:
        server.stop(grace=None).wait(TIMEOUT_S)


def _check(address: str, creds: grpc.ChannelCredentials) -> health_pb2.HealthCheckResponse:
    with grpc.secure_channel(address, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response: health_pb2.HealthCheckResponse = stub.Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
        )
        return response


def _kit_creds(kit: pki.KitFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        kit.ca_cert.read_bytes(), kit.key.read_bytes(), kit.cert.read_bytes()
    )


def test_mtls_accepts_kit(ca: pki.CaFiles, mtls_server: _Server, tmp_path: Path) -> None:
    kit = pki.issue_client(ca.ca_dir, "edge-0", tmp_path / "kit")
    response = _check(mtls_server.address, _kit_creds(kit))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_mtls_refuses_missing_expired_or_foreign_cert(
    ca: pki.CaFiles, mtls_server: _Server, tmp_path: Path
) -> None:
    refused = [grpc.ssl_channel_credentials(mtls_server.ca_pem)]
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    expired = pki.issue_client(ca.ca_dir, "old", tmp_path / "old", days=1, not_before=start)
    refused.append(_kit_creds(expired))
    # A kit from another CA: the client still trusts our server, but the server must not
    # trust the client.
    foreign_ca = pki.init_ca(tmp_path / "foreign-ca")
    foreign = pki.issue_client(foreign_ca.ca_dir, "edge-0", tmp_path / "foreign")
    refused.append(
        grpc.ssl_channel_credentials(
            mtls_server.ca_pem, foreign.key.read_bytes(), foreign.cert.read_bytes()
        )
    )
    for creds in refused:
        with pytest.raises(grpc.RpcError) as info:
            _check(mtls_server.address, creds)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
