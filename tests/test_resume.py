"""Resumable synthesis: the same request and seed give the same samples from any offset, and
`synthesize` waits for a restarting server and resumes a broken stream where it stopped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from test_integration import tiny_client_config, tiny_server_config

from collafuse.client.daemon import ClientDaemon
from collafuse.client.remote import Remote, open_channel
from collafuse.client.synth import SynthesisError, fetch_cut_samples, synthesize
from collafuse.common import serde
from collafuse.common.domain import Registration, SynthesisChunk, SynthesisRequest
from collafuse.server.app import start_server
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

TIMEOUT = 30


def test_offset_gives_the_same_samples(tmp_path: Path) -> None:
    running = start_server(tiny_server_config(tmp_path / "server"))
    remote = Remote(open_channel(running.address, insecure=True))
    try:
        remote.register(Registration("a", (1, 8, 8), 0.4))

        def fetch(offset: int) -> torch.Tensor:
            req = SynthesisRequest("a", 6, seed=3, num_steps=4, offset=offset)
            chunks = list(remote.synthesize(req))
            assert chunks[0].offset == offset and all(c.total == 6 for c in chunks)
            return torch.cat([c.samples for c in chunks])

        full = fetch(0)
        assert full.shape == (6, 1, 8, 8)
        assert torch.allclose(fetch(4), full[4:], atol=1e-6)
        assert torch.allclose(fetch(1), full[1:], atol=1e-6)
        with pytest.raises(grpc.RpcError) as info:
            list(remote.synthesize(SynthesisRequest("a", 6, seed=3, offset=6)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "offset" in info.value.details()
    finally:
        remote.close()
        running.stop()


class BreakingSynthesis(pb_grpc.CollaFuseServicer):
    """Sends sample i as a constant image of value i; the first stream breaks after 2; n=9 is
    refused for good."""

    def __init__(self) -> None:
        self.offsets: list[int] = []

    def Synthesize(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.offsets.append(request.offset)
        if request.n == 9:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
        for i in range(request.offset, request.n):
            if len(self.offsets) == 1 and i == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            sample = torch.full((1, 1, 8, 8), float(i))
            yield serde.synthesis_chunk_to_proto(
                SynthesisChunk(
                    timestep=20, offset=i, total=request.n, samples=sample, model_version=7
                )
            )


def test_a_broken_stream_resumes_from_the_samples_it_has(tmp_path: Path) -> None:
    fake = BreakingSynthesis()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CollaFuseServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        config = tiny_client_config(tmp_path / "c", f"127.0.0.1:{port}", 0)
        x, version = fetch_cut_samples(config, SynthesisRequest("client-0", 5, 0), 20, 10.0)
        assert fake.offsets == [0, 2]  # the retry asked only for what was missing
        assert [float(v) for v in x[:, 0, 0, 0]] == [0, 1, 2, 3, 4] and version == 7
        # A refusal that retrying cannot fix is a clear error, not a raw RPC object.
        with pytest.raises(SynthesisError, match="PERMISSION_DENIED: not yours"):
            fetch_cut_samples(config, SynthesisRequest("client-0", 9, 0), 20, 10.0)
    finally:
        server.stop(0)


def test_synthesize_waits_for_a_restarting_server(tmp_path: Path) -> None:
    config = tiny_server_config(tmp_path / "server", max_steps=2)
    running = start_server(config)
    client = tiny_client_config(tmp_path / "client", running.address, 0)
    assert ClientDaemon(client).run() == 0
    remote = Remote(open_channel(running.address, insecure=True))
    deadline = time.monotonic() + 60
    while remote.status().model_version < 2:  # training done: one model version throughout
        assert time.monotonic() < deadline, "the server did not finish its 2 steps"
        time.sleep(0.1)
    remote.close()
    before = synthesize(client, n=3, seed=5)
    # Stop the server and bring it back on the same address two seconds later.
    fixed = config.model_copy(update={"listen": running.address})
    running.stop()
    restarted: list[Any] = []

    def restart() -> None:
        time.sleep(2.0)
        restarted.append(start_server(fixed))

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        started = time.monotonic()
        after = synthesize(client, n=3, seed=5)
        assert time.monotonic() - started >= 1.5  # it waited for the server
        assert after.images.shape == (3, 1, 8, 8)
        # Same model version after the restart (training had finished): the same samples.
        assert after.model_version == before.model_version
        assert torch.allclose(after.images, before.images, atol=1e-5)
    finally:
        thread.join(timeout=TIMEOUT)
        for r in restarted:
            r.stop()
