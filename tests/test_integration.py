"""A real server on port 0 and two client daemons over gRPC, with an audit of every request."""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collafuse.client.daemon import ClientDaemon, compute_cuts, state_paths
from collafuse.client.ledger import Ledger
from collafuse.client.remote import Remote, open_channel
from collafuse.client.secret import load_or_create_secret, wire_id
from collafuse.client.synth import synthesize
from collafuse.common import serde
from collafuse.common.config import ClientConfig, ServerConfig
from collafuse.common.data import load_local_data
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import CutBatch, Registration, SynthesisRequest
from collafuse.server.app import RunningServer, start_server
from collafuse.server.policy import guard_ratio, measure_noise_std
from collafuse.v1 import collafuse_pb2 as pb
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

TIMEOUT = 30
TINY_SERVER_MODEL = {
    "block_out_channels": [8, 16],
    "attention_levels": [],
    "norm_num_groups": 4,
}
TINY_CLIENT_MODEL = {"block_out_channels": [4, 8], "attention_levels": [], "norm_num_groups": 4}


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """Records every request message the server receives, as the servicer will see it."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def _record(self, method: str, msg: Any) -> None:
        with self.lock:
            self.messages.append((method, msg))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method  # type: ignore[attr-defined]
        if handler is None:
            return handler
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(it: AsyncIterator[Any], ctx: Any) -> Any:
                async def audited() -> AsyncIterator[Any]:
                    async for m in it:
                        self._record(method, m)
                        yield m

                return await inner_su(audited(), ctx)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(it: AsyncIterator[Any], ctx: Any) -> AsyncIterator[Any]:
                async def audited() -> AsyncIterator[Any]:
                    async for m in it:
                        self._record(method, m)
                        yield m

                async for reply in inner_ss(audited(), ctx):
                    yield reply

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(m: Any, ctx: Any) -> Any:
                self._record(method, m)
                return await inner_uu(m, ctx)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(m: Any, ctx: Any) -> AsyncIterator[Any]:
                self._record(method, m)
                async for reply in inner_us(m, ctx):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


# The tiny configs cut at 0.4 of T = 50 (t_cut = 20, release SNR 0.23), which the default
# max_release_snr of 0.1 refuses; both sides admit it explicitly so that the tests built on them
# keep testing what they are about. The defaults themselves are tested in test_client_floor.py.
TINY_MAX_RELEASE_SNR = 1.0


def tiny_server_config(data_dir: Path, **train: Any) -> ServerConfig:
    return ServerConfig.model_validate(
        {
            "listen": "127.0.0.1:0",
            "data_dir": str(data_dir),
            "insecure": True,
            "schedule": {"num_timesteps": 50},
            "image": {"channels": 1, "size": 8},
            "model": TINY_SERVER_MODEL,
            "train": {"batch_size": 16, "publish_every": 1, "checkpoint_every": 5, **train},
            "sampler": {"max_batch": 64},
            "policy": {"max_release_snr": TINY_MAX_RELEASE_SNR},
        }
    )


def tiny_client_config(state_dir: Path, address: str, index: int, **extra: Any) -> ClientConfig:
    return ClientConfig.model_validate(
        {
            "client_id": f"client-{index}",
            "server": address,
            "insecure": True,
            "state_dir": str(state_dir),
            "cut_ratio": 0.4,
            "max_release_snr": TINY_MAX_RELEASE_SNR,
            "exit_when_done": True,
            "image": {"channels": 1, "size": 8},
            "data": {
                "source": "digits",
                "partition": "classes",
                "num_clients": 2,
                "client_index": index,
                "limit": 60,
            },
            "model": TINY_CLIENT_MODEL,
            "train": {"steps": 6, "batch_size": 16, "checkpoint_every": 3},
            "synth": {"server_steps": 10, "client_steps": 0},
            **extra,
        }
    )


@pytest.fixture
def audited_server(tmp_path: Path) -> Iterator[tuple[RunningServer, AuditInterceptor]]:
    audit = AuditInterceptor()
    running = start_server(tiny_server_config(tmp_path / "server", max_steps=10), [audit])
    try:
        yield running, audit
    finally:
        running.stop()


def _stub(address: str) -> tuple[grpc.Channel, pb_grpc.CollaFuseStub]:
    channel = open_channel(address, insecure=True)
    return channel, pb_grpc.CollaFuseStub(channel)


def test_two_clients_end_to_end_with_audit(
    tmp_path: Path, audited_server: tuple[RunningServer, AuditInterceptor]
) -> None:
    running, audit = audited_server
    configs = [tiny_client_config(tmp_path / f"c{i}", running.address, i) for i in range(2)]
    codes: dict[int, int] = {}

    def run(i: int) -> None:
        codes[i] = ClientDaemon(configs[i]).run()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert codes == {0: 0, 1: 0}

    remote = Remote(open_channel(running.address, insecure=True))
    status = remote.status()
    assert {p.client_id: p.num_images for p in status.pools} == {"client-0": 60, "client-1": 60}
    t_cut = Diffusion.from_config(running.config.schedule).t_cut(0.4)
    assert all(p.t_cut == t_cut for p in status.pools)

    # A few training steps happen on the uploaded pool (published just after each step).
    deadline = 60.0
    while status.model_version < 10 and deadline > 0:
        threading.Event().wait(0.2)
        deadline -= 0.2
        status = remote.status()
    assert (
        status.train_step == 10 and status.model_version == 10 and math.isfinite(status.last_loss)
    )

    # Synthesis: both clients at once, each finishing the chain locally.
    results = {}

    def synth(i: int) -> None:
        results[i] = synthesize(configs[i], n=5, seed=i)

    threads = [threading.Thread(target=synth, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    for i in range(2):
        assert results[i].images.shape == (5, 1, 8, 8)
        assert results[i].t_cut == t_cut and results[i].model_version == 10
        assert results[i].images.abs().max() <= 1.0 + 1e-6

    # The ledger recorded every release with its t_cut and size.
    for cfg in configs:
        ledger = Ledger(state_paths(cfg)["ledger"])
        summary = ledger.summary()
        ledger.close()
        assert summary.images_released == 60 and summary.images_acknowledged == 60
        assert summary.t_cuts == [t_cut] and summary.bytes_released == 60 * 64 * 4

    # Audit: only uploads carried tensors; every tensor is exactly the client's cut image,
    # at or above the registered noise level, and no raw pixel array ever crossed.
    diffusion = Diffusion.from_config(running.config.schedule)
    sigma = math.sqrt(1 - diffusion.alpha_bar(t_cut))
    received: dict[str, torch.Tensor] = {}
    for method, msg in audit.messages:
        if not method.endswith(("/UploadCuts", "/Upload")):
            assert not any(f.message_type is not None and f.message_type.name == "Tensor"
                           for f, _ in msg.ListFields()), method  # fmt: skip
            continue
        assert msg.t_cut == t_cut
        cuts = serde.tensor_from_proto(msg.cuts)
        for image_id, cut in zip(msg.image_ids, cuts, strict=True):
            received[f"{msg.client_id}/{image_id}"] = cut
    assert len(received) == 120
    floor = guard_ratio(0.7, (1, 8, 8)) * sigma
    for cfg in configs:
        data = load_local_data(cfg.data, cfg.image)
        secret = load_or_create_secret(state_paths(cfg)["secret"])
        expected = compute_cuts(data, secret, diffusion, t_cut)
        for k, local_id in enumerate(data.ids):
            wid = wire_id(secret, local_id)
            assert local_id not in wid  # ids on the wire are opaque
            got = received[f"{cfg.client_id}/{wid}"]
            assert torch.equal(got, expected[k])
            # Far from the raw image: the residual is the full noise sqrt(1 - abar) eps1.
            resid = got - math.sqrt(diffusion.alpha_bar(t_cut)) * data.images[k]
            assert resid.std() > 0.5 * sigma
            assert (got - data.images[k]).abs().mean() > 0.3
        measured = measure_noise_std(expected)
        assert bool((measured >= floor).all())
    remote.close()


def test_guard_refuses_clean_images(audited_server: tuple[RunningServer, AuditInterceptor]) -> None:
    running, _ = audited_server
    remote = Remote(open_channel(running.address, insecure=True))
    session = remote.register(Registration("mallory", (1, 8, 8), 0.4))
    data = load_local_data(
        ClientConfig().data.model_copy(update={"source": "digits", "limit": 20}),
        running.config.image,
    )
    result = remote.upload(
        [CutBatch("mallory", session.t_cut, [f"raw-{i}" for i in range(20)], data.images)]
    )
    # The guard's power is limited on 8x8 images; most clean digits must still be refused.
    assert result.accepted + result.rejected == 20 and result.rejected >= 15
    assert "clean or under-noised" in result.rejections[0][1]
    # Properly noised images of the same client pass.
    d = Diffusion.from_config(running.config.schedule)
    c = torch.full((20,), session.t_cut)
    cuts = d.q_sample(data.images, c, torch.randn_like(data.images))
    ok = remote.upload([CutBatch("mallory", session.t_cut, [f"cut-{i}" for i in range(20)], cuts)])
    assert ok.accepted == 20 and ok.rejected == 0
    again = remote.upload(
        [CutBatch("mallory", session.t_cut, [f"cut-{i}" for i in range(20)], cuts)]
    )
    assert again.accepted == 0 and again.duplicate == 20
    remote.close()


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def test_malformed_requests_get_invalid_argument_and_server_keeps_serving(
    audited_server: tuple[RunningServer, AuditInterceptor],
) -> None:
    running, _ = audited_server
    channel, stub = _stub(running.address)
    good = pb.RegisterRequest(client_id="c", image_shape=[1, 8, 8], cut_ratio=0.4)
    stub.Register(good, timeout=TIMEOUT)
    tensor = serde.tensor_to_proto(torch.randn(2, 1, 8, 8))

    def upload(**kw: Any) -> Callable[[], Any]:
        return lambda: stub.UploadCuts(iter([pb.UploadCutsRequest(**kw)]), timeout=TIMEOUT)

    cases: list[tuple[Callable[[], Any], grpc.StatusCode, str]] = [
        (lambda: stub.Register(pb.RegisterRequest(client_id="", cut_ratio=0.4), timeout=TIMEOUT),
         grpc.StatusCode.INVALID_ARGUMENT, "client_id"),
        (lambda: stub.Register(pb.RegisterRequest(client_id="c", image_shape=[1, 8, 8], cut_ratio=0),
                               timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT, "cut_ratio"),
        (lambda: stub.Register(pb.RegisterRequest(client_id="c", image_shape=[3, 8, 8], cut_ratio=0.4),
                               timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT, "image_shape"),
        (lambda: stub.Register(pb.RegisterRequest(client_id="d", image_shape=[1, 8, 8], cut_ratio=0.05),
                               timeout=TIMEOUT), grpc.StatusCode.FAILED_PRECONDITION, "SNR"),
        (upload(client_id="c", t_cut=20, image_ids=["a", "b"],
                cuts=pb.Tensor(dtype="float32", shape=[2, 1, 8, 8], data=b"\0" * 10)),
         grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match"),
        (upload(client_id="c", t_cut=20, image_ids=["a", "b"],
                cuts=serde.tensor_to_proto(torch.full((2, 1, 8, 8), float("nan")))),
         grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (upload(client_id="c", t_cut=20, image_ids=["a", "b"],
                cuts=serde.tensor_to_proto(torch.randn(2, 1, 9, 9))),
         grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (upload(client_id="c", t_cut=3, image_ids=["a", "b"], cuts=tensor),
         grpc.StatusCode.INVALID_ARGUMENT, "t_cut"),
        (upload(client_id="c", t_cut=20, image_ids=["a"], cuts=tensor),
         grpc.StatusCode.INVALID_ARGUMENT, "one id per image"),
        (upload(client_id="stranger", t_cut=20, image_ids=["a", "b"], cuts=tensor),
         grpc.StatusCode.FAILED_PRECONDITION, "Register first"),
        (lambda: stub.Synthesize(pb.SynthesizeRequest(client_id="c", n=0), timeout=TIMEOUT),
         grpc.StatusCode.INVALID_ARGUMENT, "n must be positive"),
        (lambda: stub.Synthesize(pb.SynthesizeRequest(client_id="c", n=10**6), timeout=TIMEOUT),
         grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"),
        (lambda: stub.Synthesize(pb.SynthesizeRequest(client_id="c", n=1, eta=2), timeout=TIMEOUT),
         grpc.StatusCode.INVALID_ARGUMENT, "eta"),
    ]  # fmt: skip
    for call, code, needle in cases:
        got, details = _code(call)
        assert got == code, (needle, got, details)
        assert needle in details, (needle, details)
    # Still serving: status, health and a real synthesis answer.
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT)
    assert status.requests_served >= 1
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="collafuse.v1.CollaFuse"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    chunks = list(
        stub.Synthesize(pb.SynthesizeRequest(client_id="c", n=3, num_steps=5), timeout=TIMEOUT)
    )
    assert sum(serde.tensor_from_proto(c.samples).shape[0] for c in chunks) == 3
    assert all(c.timestep == 20 for c in chunks)
    channel.close()


def test_synthesis_is_reproducible_and_batched(
    audited_server: tuple[RunningServer, AuditInterceptor],
) -> None:
    running, _ = audited_server
    channel, stub = _stub(running.address)
    for cid, ratio in (("a", 0.4), ("b", 0.6)):
        stub.Register(
            pb.RegisterRequest(client_id=cid, image_shape=[1, 8, 8], cut_ratio=ratio),
            timeout=TIMEOUT,
        )

    def fetch(cid: str, seed: int, sampler: int) -> torch.Tensor:
        req = pb.SynthesizeRequest(client_id=cid, n=4, seed=seed, sampler=sampler, num_steps=8)
        return torch.cat(
            [serde.tensor_from_proto(c.samples) for c in stub.Synthesize(req, timeout=TIMEOUT)]
        )

    alone = fetch("a", 1, pb.SAMPLER_DDPM)
    calls_before = running.sampler.forward_calls
    out: dict[str, torch.Tensor] = {}
    threads = [
        threading.Thread(target=lambda: out.__setitem__("a", fetch("a", 1, pb.SAMPLER_DDPM))),
        threading.Thread(target=lambda: out.__setitem__("b", fetch("b", 2, pb.SAMPLER_DDIM))),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    # Same seed, same samples, whatever else shared the batch.
    assert torch.allclose(out["a"], alone, atol=1e-5)
    assert out["b"].shape == (4, 1, 8, 8)
    assert running.sampler.forward_calls > calls_before
    channel.close()


def test_client_tokens(tmp_path: Path) -> None:
    from collafuse.server.auth import hash_token

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'alice = "{hash_token("alice-secret")}"\nbob = "{hash_token("bob-secret")}"\n'
    )
    config = tiny_server_config(tmp_path / "server").model_copy(update={"auth_tokens": tokens})
    running = start_server(config)
    try:
        reg = Registration("alice", (1, 8, 8), 0.4)

        def remote(token: str | None) -> Remote:
            return Remote(open_channel(running.address, insecure=True, token=token))

        ok = remote("alice-secret")
        assert ok.register(reg).t_cut == 20
        assert ok.status().pools[0].client_id == "alice"
        for token, code, needle in (
            (None, grpc.StatusCode.UNAUTHENTICATED, "requires a client token"),
            ("guess", grpc.StatusCode.UNAUTHENTICATED, "not known"),
            ("bob-secret", grpc.StatusCode.PERMISSION_DENIED, "cannot act as alice"),
        ):
            r = remote(token)
            with pytest.raises(grpc.RpcError) as info:
                r.register(reg)
            assert info.value.code() == code and needle in info.value.details()  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as info:
                list(r.synthesize(SynthesisRequest("alice", 1, 0)))
            assert info.value.code() == code
            r.close()
        # A client configured with its token file works end to end.
        token_file = tmp_path / "alice.token"
        token_file.write_text("alice-secret\n")
        token_file.chmod(0o600)
        cfg = tiny_client_config(tmp_path / "alice", running.address, 0).model_copy(
            update={"client_id": "alice", "auth_token_file": token_file}
        )
        assert ClientDaemon(cfg).run() == 0
        assert ok.status().pools[0].num_images == 60
        ok.close()
    finally:
        running.stop()


def test_token_command_writes_a_private_token(tmp_path: Path) -> None:
    from collafuse.cli import main
    from collafuse.server.auth import Authenticator, hash_token

    out = tmp_path / "edge.token"
    assert main(["token", "edge-1", "--out", str(out)]) == 0
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    token = out.read_text().strip()
    server_file = tmp_path / "tokens.toml"
    server_file.write_text(f'edge-1 = "{hash_token(token)}"\n')
    auth = Authenticator(token_file=server_file)
    assert auth.identify({}, [("authorization", f"Bearer {token}")]).name == "edge-1"
