"""Identities, fail-closed start-up, limits, audit and Forget against real servers on port 0.

Certificates are made inside each test with `collafuse pki`; every call carries a timeout.
"""

from __future__ import annotations

import json
import math
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from test_integration import tiny_client_config, tiny_server_config

from collafuse.client.remote import Remote, open_channel
from collafuse.common import pki
from collafuse.common.config import ConfigError, ServerConfig, load_config
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import CutBatch, Registration, SynthesisRequest
from collafuse.server.app import RunningServer, StartupError, start_server
from collafuse.server.audit import verify_chain
from collafuse.server.auth import hash_token
from collafuse.v1 import collafuse_pb2 as pb

TIMEOUT = 30
REG = {"image_shape": (1, 8, 8), "cut_ratio": 0.4}


@dataclass
class Federation:
    """A CA, a server certificate and client kits, in a temporary directory."""

    root: Path
    ca: pki.CaFiles
    server: pki.ServerFiles
    kits: dict[str, pki.KitFiles]

    def kit(self, name: str, **kw: Any) -> pki.KitFiles:
        self.kits[name] = pki.issue_client(self.root / "ca", name, self.root / f"kit-{name}", **kw)
        return self.kits[name]

    def remote(self, address: str, name: str | None) -> Remote:
        kit = self.kits[name] if name else None
        return Remote(
            open_channel(
                address,
                insecure=False,
                tls_ca=self.ca.cert,
                tls_cert=kit.cert if kit else None,
                tls_key=kit.key if kit else None,
            )
        )


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    ca = pki.init_ca(tmp_path / "ca")
    server = pki.issue_server(tmp_path / "ca", ["127.0.0.1", "localhost"], tmp_path / "srv")
    fed = Federation(tmp_path, ca, server, {})
    for name in ("alice", "bob", "ops"):
        fed.kit(name)
    return fed


def mtls_config(fed: Federation, data_dir: Path, **limits: Any) -> ServerConfig:
    base = tiny_server_config(data_dir, max_steps=5).model_dump(mode="json")
    base.update(
        insecure=False,
        tls_cert=str(fed.server.cert),
        tls_key=str(fed.server.key),
        tls_client_ca=str(fed.ca.cert),
        tls_revoked=str(fed.ca.revoked),
        admins=["ops"],
        limits=limits,
    )
    return ServerConfig.model_validate(base)


@pytest.fixture
def mtls_server(federation: Federation, tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(mtls_config(federation, tmp_path / "server"))
    try:
        yield running
    finally:
        running.stop()


def _refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return info.value


def test_mutual_tls_identities(
    federation: Federation, mtls_server: RunningServer, tmp_path: Path
) -> None:
    address = mtls_server.address
    # Happy path: a daemon configured from its kit registers, uploads and trains.
    cfg = tiny_client_config(tmp_path / "alice-state", address, 0).model_dump(mode="json")
    cfg.update(client_id="alice", insecure=False)
    kit = federation.kits["alice"]
    cfg.update(tls_ca=str(kit.ca_cert), tls_cert=str(kit.cert), tls_key=str(kit.key))
    from collafuse.client.daemon import ClientDaemon
    from collafuse.common.config import ClientConfig

    assert ClientDaemon(ClientConfig.model_validate(cfg)).run() == 0

    alice = federation.remote(address, "alice")
    mine = alice.status()
    assert [(p.client_id, p.num_images) for p in mine.pools] == [("alice", 60)]

    # A certificate for alice cannot act as bob.
    err = _refused(lambda: alice.register(Registration("bob", **REG)))  # type: ignore[arg-type]
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "authenticated as alice" in err.details()
    err = _refused(lambda: alice.synthesize(SynthesisRequest("bob", 1, 0)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED

    # Bob registers as himself and sees only his own pool; the admin sees everyone.
    bob = federation.remote(address, "bob")
    bob.register(Registration("bob", **REG))  # type: ignore[arg-type]
    assert [p.client_id for p in bob.status().pools] == ["bob"]
    ops = federation.remote(address, "ops")
    assert sorted(p.client_id for p in ops.status().pools) == ["alice", "bob"]

    # The mixture of all clients is off unless the policy allows it.
    err = _refused(lambda: alice.synthesize(SynthesisRequest("alice", 1, 0, mixture=True)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "allow_mixture" in err.details()

    # Revocation takes effect without a restart.
    assert bob.status().pools
    pki.revoke(federation.root / "ca", federation.kits["bob"].cert)
    err = _refused(lambda: bob.status())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.details()
    assert alice.status().pools  # others are unaffected
    # A list that does not parse fails closed (UNAVAILABLE), and serving resumes once fixed.
    good = federation.ca.revoked.read_text()
    federation.ca.revoked.write_text(good + "not-a-fingerprint\n")
    err = _refused(lambda: alice.status())
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "revocation list" in err.details()
    federation.ca.revoked.write_text(good)
    assert alice.status().pools

    # No certificate, an expired one, or one from another CA: the handshake fails.
    expired = federation.kit("carol", days=1, not_before=datetime.now(UTC) - timedelta(days=10))
    assert expired.cert.exists()
    other = pki.init_ca(tmp_path / "other-ca")
    federation.kits["mallory"] = pki.issue_client(other.ca_dir, "alice", tmp_path / "kit-mallory")
    for name in (None, "carol", "mallory"):
        r = federation.remote(address, name)
        err = _refused(lambda r=r: r.status(timeout=10))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, name
        r.close()
    for r in (alice, bob, ops):
        r.close()

    # Every authenticated call is in the audit log, and the chain verifies.
    check = verify_chain(mtls_server.config.data_dir / "audit.log")
    assert check.ok and check.entries >= 10, check.message
    lines = [
        json.loads(x) for x in (mtls_server.config.data_dir / "audit.log").read_text().splitlines()
    ]
    who = {(e["who"], e["rpc"], e["verdict"]) for e in lines}
    assert ("alice", "Upload", "OK") in who
    assert ("alice", "Register", "PERMISSION_DENIED") in who
    assert ("?", "GetStatus", "UNAUTHENTICATED") in who  # bob after revocation
    uploads = [e for e in lines if e["rpc"] == "Upload" and e["verdict"] == "OK"]
    assert sum(e["accepted"] for e in uploads) == 60


def test_fail_closed_configuration(federation: Federation, tmp_path: Path) -> None:
    # Plaintext together with certificates, or plaintext off loopback, is a usage error.
    with pytest.raises(ConfigError, match="insecure contradicts tls_cert"):
        load_config(ServerConfig, None, ["insecure=true", f"tls_cert='{federation.server.cert}'"])
    with pytest.raises(ConfigError, match="loopback only"):
        load_config(ServerConfig, None, ["insecure=true", "listen='0.0.0.0:0'"])
    ok = load_config(
        ServerConfig, None, ["insecure=true", "listen='0.0.0.0:0'", "allow_insecure_remote=true"]
    )
    assert ok.allow_insecure_remote
    # TLS needs a way to know clients; an empty or unreadable token file does not turn auth off.
    base = mtls_config(federation, tmp_path / "s1")
    with pytest.raises(StartupError, match="must know its clients"):
        start_server(base.model_copy(update={"tls_client_ca": None, "tls_revoked": None}))
    empty = tmp_path / "tokens.toml"
    empty.write_text("# nobody yet\n")
    for tokens, needle in ((empty, "lists no tokens"), (tmp_path / "missing.toml", "cannot read")):
        with pytest.raises(StartupError, match=needle):
            start_server(
                tiny_server_config(tmp_path / "s2").model_copy(update={"auth_tokens": tokens})
            )
    # From the command line a server that cannot start as configured exits 2 (bad configuration).
    from collafuse.cli import main

    args = ["server", "--data-dir", str(tmp_path / "s3"), "--insecure", "--listen", "127.0.0.1:0"]
    assert main([*args, "--set", f"auth_tokens='{empty}'"]) == 2
    # A private key that others may read is refused with the fix.
    federation.server.key.chmod(0o644)
    with pytest.raises(StartupError, match="chmod 600"):
        start_server(base)
    # Tokens are never sent in plaintext across a network.
    with pytest.raises(ValueError, match="plaintext"):
        open_channel("10.1.2.3:50051", insecure=True, token="secret")


def test_token_expiry_and_reload(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'alice = "{hash_token("a-secret")}"\n'
        f'[old]\nhash = "{hash_token("o-secret")}"\nexpires = 2020-01-01T00:00:00Z\n'
    )
    running = start_server(
        tiny_server_config(tmp_path / "server").model_copy(update={"auth_tokens": tokens})
    )
    try:

        def remote(token: str) -> Remote:
            return Remote(open_channel(running.address, insecure=True, token=token))

        old, new = remote("o-secret"), remote("n-secret")
        err = _refused(lambda: old.register(Registration("old", **REG)))  # type: ignore[arg-type]
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in err.details()
        assert _refused(lambda: new.status()).code() == grpc.StatusCode.UNAUTHENTICATED
        # What SIGHUP does: a new token works without a restart; a broken file keeps the old set.
        tokens.write_text(f'new = "{hash_token("n-secret")}"\n' + tokens.read_text())
        running.auth.reload()
        assert new.register(Registration("new", **REG)).t_cut == 20  # type: ignore[arg-type]
        tokens.write_text("")
        running.auth.reload()
        assert new.status().pools[0].client_id == "new"
        old.close()
        new.close()
    finally:
        running.stop()


def _token_server(tmp_path: Path, names: list[str], **limits: Any) -> RunningServer:
    """A loopback server whose clients authenticate with tokens named `<name>-secret`."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("".join(f'{n} = "{hash_token(n + "-secret")}"\n' for n in names))
    config = tiny_server_config(tmp_path / "server").model_copy(
        update={
            "auth_tokens": tokens,
            "limits": ServerConfig().limits.model_copy(update=limits),
        }
    )
    return start_server(config)


def test_half_open_calls_do_not_block_others(tmp_path: Path) -> None:
    running = _token_server(tmp_path, ["mallory", "honest"], idle_timeout_s=2.0, rate_burst=100)
    hold = threading.Event()
    channel = open_channel(running.address, insecure=True, token="mallory-secret")
    try:
        # Calls that send their headers and then nothing: 40 Register, 20 UploadCuts.
        def silent() -> Iterator[pb.RegisterRequest]:
            hold.wait(20)
            return
            yield  # pragma: no cover

        register = channel.stream_unary(
            "/collafuse.v1.CollaFuse/Register",
            request_serializer=pb.RegisterRequest.SerializeToString,
            response_deserializer=pb.RegisterResponse.FromString,
        )
        upload = channel.stream_unary(
            "/collafuse.v1.CollaFuse/UploadCuts",
            request_serializer=pb.UploadCutsRequest.SerializeToString,
            response_deserializer=pb.UploadCutsResponse.FromString,
        )
        started = time.monotonic()
        futures = [register.future(silent(), timeout=TIMEOUT) for _ in range(40)]
        futures += [upload.future(silent(), timeout=TIMEOUT) for _ in range(20)]
        time.sleep(0.3)
        # Another client is served at once, start to finish.
        honest = Remote(open_channel(running.address, insecure=True, token="honest-secret"))
        session = honest.register(Registration("honest", **REG))  # type: ignore[arg-type]
        d = Diffusion.from_config(running.config.schedule)
        x0 = torch.rand(8, 1, 8, 8) * 2 - 1
        cuts = d.q_sample(x0, torch.full((8,), session.t_cut), torch.randn(8, 1, 8, 8))
        done = honest.upload([CutBatch("honest", session.t_cut, [f"i{k}" for k in range(8)], cuts)])
        assert done.accepted == 8
        assert len(list(honest.synthesize(SynthesisRequest("honest", 2, 0, num_steps=3)))) == 1
        assert time.monotonic() - started < 10
        honest.close()
        # The silent calls are closed by the idle limit or refused by the stream limit.
        details = []
        for f in futures:
            with pytest.raises(grpc.RpcError) as info:
                f.result(timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details.append(info.value.details())
        assert sum("idle_timeout_s" in d for d in details) == 40 + 4
        assert sum("max_streams_per_client" in d for d in details) == 16
        assert time.monotonic() - started < 15
    finally:
        hold.set()
        channel.close()
        running.stop()


def test_rate_limit_and_rejection_limit(tmp_path: Path) -> None:
    running = _token_server(
        tmp_path, ["c"], rate_per_s=0.5, rate_burst=3, max_rejected_per_upload=4
    )
    remote = Remote(open_channel(running.address, insecure=True, token="c-secret"))
    try:
        session = remote.register(Registration("c", **REG))  # type: ignore[arg-type]
        x0 = torch.rand(10, 1, 8, 8) * 2 - 1  # clean images: every one is refused
        err = _refused(
            lambda: remote.upload([CutBatch("c", session.t_cut, [str(i) for i in range(10)], x0)])
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_rejected_per_upload" in err.details()
        remote.status()
        err = _refused(lambda: remote.status())
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate_per_s" in err.details()
    finally:
        remote.close()
        running.stop()


def test_undecodable_request_is_invalid_argument(tmp_path: Path) -> None:
    running = start_server(tiny_server_config(tmp_path / "server"))
    channel = open_channel(running.address, insecure=True)
    try:
        raw = channel.unary_unary("/collafuse.v1.CollaFuse/Register")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff\xff" * 8, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid collafuse.v1 message" in info.value.details()
        # The long field is quoted only in part.
        with pytest.raises(grpc.RpcError) as info:
            Remote(channel).register(Registration("x" * 20_000, **REG))  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(info.value.details()) < 300
    finally:
        channel.close()
        running.stop()


def test_poisoned_upload_leaves_the_model_finite(tmp_path: Path) -> None:
    running = start_server(tiny_server_config(tmp_path / "server", max_steps=6))
    remote = Remote(open_channel(running.address, insecure=True))
    try:
        session = remote.register(Registration("p", **REG))  # type: ignore[arg-type]
        d = Diffusion.from_config(running.config.schedule)
        honest = d.q_sample(
            torch.rand(16, 1, 8, 8) * 2 - 1,
            torch.full((16,), session.t_cut),
            torch.randn(16, 1, 8, 8),
        )
        assert (
            remote.upload(
                [CutBatch("p", session.t_cut, [f"h{i}" for i in range(16)], honest)]
            ).accepted
            == 16
        )
        huge = torch.randn(16, 1, 8, 8) * 1e30
        result = remote.upload([CutBatch("p", session.t_cut, [f"x{i}" for i in range(16)], huge)])
        assert result.accepted == 0 and result.rejected == 16
        deadline = time.monotonic() + 60
        while remote.status().train_step < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        status = remote.status()
        assert status.train_step == 6 and math.isfinite(status.last_loss)
        assert all(torch.isfinite(p).all() for p in running.trainer.model.parameters())
    finally:
        remote.close()
        running.stop()


def test_forget_and_file_modes(tmp_path: Path) -> None:
    from collafuse.client.daemon import ClientDaemon, state_paths
    from collafuse.client.ledger import Ledger
    from collafuse.client.secret import load_or_create_secret, wire_id

    running = start_server(tiny_server_config(tmp_path / "server", max_steps=4))
    try:
        cfg = tiny_client_config(tmp_path / "client", running.address, 0)
        assert ClientDaemon(cfg).run() == 0
        remote = Remote(open_channel(running.address, insecure=True))
        deadline = time.monotonic() + 60
        while remote.status().train_step < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running.pool.count("client-0") == 60
        # Receipts: every acknowledged release carries the server's receipt.
        ledger = Ledger(state_paths(cfg)["ledger"])
        assert ledger.summary().images_acknowledged == 60
        receipts = ledger.receipts()
        ledger.close()
        assert len(receipts) == 60 and len(set(receipts.values())) == 1  # one stream
        secret = load_or_create_secret(state_paths(cfg)["secret"])
        wire = [wire_id(secret, local) for local in receipts]
        signer = running.service.receipts
        assert signer.verify(next(iter(receipts.values())), "upload", "client-0", wire)
        assert not signer.verify(next(iter(receipts.values())), "upload", "client-0", wire[1:])
        result = remote.forget("client-0")
        assert result.deleted == 60 and running.pool.count("client-0") == 0
        assert 1 <= result.trained_from_version <= result.trained_to_version == 4
        assert result.receipt.startswith("v1:")
        assert running.trainer.refresh() == 0  # gone from the trainer's memory too
        err = _refused(lambda: remote.forget("someone-else"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        remote.close()
    finally:
        running.stop()

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    server_dir = tmp_path / "server"
    assert mode(server_dir) == 0o700
    for name in ("pool.sqlite", "audit.log", "receipt.key", "checkpoints/server.pt"):
        assert mode(server_dir / name) == 0o600, name
    client_dir = tmp_path / "client"
    assert mode(client_dir) == 0o700
    for name in ("ledger.sqlite", "secret.key", "checkpoints/client.pt"):
        assert mode(client_dir / name) == 0o600, name
    # A secret that others may read is refused at load, with the fix in the message.
    (client_dir / "secret.key").chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        ClientDaemon(cfg)
    token = tmp_path / "t.token"
    token.write_text("x\n")
    token.chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        Remote.for_client(cfg.model_copy(update={"auth_token_file": token}))


def test_audit_chain_detects_an_edited_line(tmp_path: Path) -> None:
    from collafuse.cli import main
    from collafuse.server.audit import AuditLog

    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(5):
        log.append("alice", "UploadCuts", "OK", accepted=i)
    log.close()
    # Appending after a restart continues the same chain.
    log = AuditLog(path)
    log.append("bob", "GetStatus", "OK")
    log.close()
    assert verify_chain(path).ok and verify_chain(path).entries == 6
    assert main(["audit", "verify", str(path)]) == 0
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"accepted":2', '"accepted":200')
    path.write_text("\n".join(lines) + "\n")
    check = verify_chain(path)
    assert not check.ok and "line 3" in check.message
    assert main(["audit", "verify", str(path)]) == 1
    # Dropping a line breaks the chain as well.
    del lines[2]
    path.write_text("\n".join(lines) + "\n")
    assert not verify_chain(path).ok


def test_trainer_health_and_status_follow_a_failing_trainer(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running = start_server(tiny_server_config(tmp_path / "server"))
    channel = open_channel(running.address, insecure=True)
    health = health_pb2_grpc.HealthStub(channel)

    def trainer_health() -> int:
        req = health_pb2.HealthCheckRequest(service="collafuse.v1.Trainer")
        return int(health.Check(req, timeout=TIMEOUT).status)

    try:
        remote = Remote(channel)
        session = remote.register(Registration("c", **REG))  # type: ignore[arg-type]
        assert trainer_health() == health_pb2.HealthCheckResponse.SERVING
        # The trainer fails on every step: it is restarted with backoff, health says so, and
        # synthesis keeps serving meanwhile.
        broken = running.trainer.train_step

        def fail() -> float:
            raise RuntimeError("injected failure")

        running.trainer.train_step = fail  # type: ignore[method-assign]
        d = Diffusion.from_config(running.config.schedule)
        cuts = d.q_sample(
            torch.rand(8, 1, 8, 8) * 2 - 1, torch.full((8,), session.t_cut), torch.randn(8, 1, 8, 8)
        )
        remote.upload([CutBatch("c", session.t_cut, [f"i{k}" for k in range(8)], cuts)])
        deadline = time.monotonic() + 20
        while trainer_health() == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never showed the failed trainer"
            time.sleep(0.2)
        status = remote.status()
        assert "injected failure" in status.trainer_state
        assert len(list(remote.synthesize(SynthesisRequest("c", 2, 0, num_steps=3)))) == 1
        # Fixed again: the next restart trains, and health recovers.
        running.trainer.train_step = broken  # type: ignore[method-assign]
        deadline = time.monotonic() + 20
        while trainer_health() != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never recovered"
            time.sleep(0.2)
        assert remote.status().trainer_restarts >= 1
        # Undecodable requests are counted, not logged one by one.
        raw = channel.unary_unary("/collafuse.v1.CollaFuse/GetStatus")
        with pytest.raises(grpc.RpcError):
            raw(b"\xff" * 9, timeout=TIMEOUT)
        assert remote.status().malformed_requests == 1
    finally:
        channel.close()
        running.stop()


def test_256_concurrent_streams_on_one_server(tmp_path: Path) -> None:
    import asyncio

    import grpc.aio

    from collafuse.common.limits import channel_options
    from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

    running = start_server(tiny_server_config(tmp_path / "server"))
    try:
        Remote(open_channel(running.address, insecure=True)).register(
            Registration("c", **REG)  # type: ignore[arg-type]
        )

        async def main() -> list[int]:
            async with grpc.aio.insecure_channel(running.address, options=channel_options()) as ch:
                stub = pb_grpc.CollaFuseStub(ch)

                async def one(seed: int) -> int:
                    req = pb.SynthesizeRequest(client_id="c", n=1, seed=seed, num_steps=2)
                    return len([c async for c in stub.Synthesize(req, timeout=120)])

                return await asyncio.gather(*(one(i) for i in range(256)))

        started = running.sampler.forward_calls
        assert asyncio.run(main()) == [1] * 256
        # They were batched together, not served one after another.
        assert running.sampler.forward_calls - started < 256
    finally:
        running.stop()
