"""The client's own privacy floor against servers that lie, over real gRPC on port 0.

Each fake server is a small CollaFuseServicer that answers with serde helpers and counts what it
received, so the tests can assert that nothing was released when the client refused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from collafuse.client.daemon import ClientDaemon, ClientRefused, state_paths
from collafuse.client.ledger import Ledger, LedgerError, Release
from collafuse.client.remote import Remote, open_channel
from collafuse.client.synth import SynthesisError, receive_cut_samples
from collafuse.common import serde
from collafuse.common.config import ClientConfig, DataConfig, ScheduleConfig, ServerConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import (
    Registration,
    ScheduleInfo,
    Session,
    SynthesisChunk,
    SynthesisRequest,
    UploadAck,
)
from collafuse.server.app import start_server
from collafuse.server.policy import Policy, PolicyError
from collafuse.v1 import collafuse_pb2 as pb
from collafuse.v1 import collafuse_pb2_grpc as pb_grpc

TIMEOUT = 30
SCHEDULE = ScheduleConfig(num_timesteps=50)
DIFFUSION = Diffusion.from_config(SCHEDULE)
CUT_RATIO = 0.4
T_CUT = DIFFUSION.t_cut(CUT_RATIO)  # 20 of 50; release SNR about 0.23
SHAPE = (1, 8, 8)
PER_IMAGE = 4 * 8 * 8


def tiny_client_config(state_dir: Path, address: str, **extra: Any) -> ClientConfig:
    """A daemon on 60 digits at 8x8 that exits once uploaded and trained (a few steps)."""
    return ClientConfig.model_validate(
        {
            "client_id": "client-0",
            "server": address,
            "insecure": True,
            "state_dir": str(state_dir),
            "cut_ratio": CUT_RATIO,
            # Above the default 0.1, so that the tests of a lying server reach its lie; the
            # client's own floor is tested with max_release_snr=0.1 below.
            "max_release_snr": 1.0,
            "exit_when_done": True,
            "max_backoff_s": 1.0,
            "image": {"channels": 1, "size": 8},
            "data": {
                "source": "digits",
                "partition": "classes",
                "num_clients": 2,
                "client_index": 0,
                "limit": 60,
            },
            "model": {"block_out_channels": [4, 8], "attention_levels": [], "norm_num_groups": 4},
            "train": {"steps": 2, "batch_size": 16, "checkpoint_every": 2},
            # 4 cut images per upload message, so an upload is a stream of 15 messages.
            "upload_chunk_bytes": 1024,
            **extra,
        }
    )


@contextmanager
def serving(servicer: pb_grpc.CollaFuseServicer) -> Iterator[str]:
    """Run `servicer` on a real gRPC server on 127.0.0.1, port 0; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CollaFuseServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(timeout=TIMEOUT)


class FakeServer(pb_grpc.CollaFuseServicer):
    """Answers Register as told and accepts every upload, counting the messages it received.

    answer(cut_ratio) -> (t_cut, release_snr): what the server claims at registration.
    break_first_upload_after: abort the first Upload stream (UNAVAILABLE) after reading that
    many messages (acknowledging all but the last), as a server that restarts mid-upload would.
    """

    def __init__(
        self,
        answer: Callable[[float], tuple[int, float]],
        break_first_upload_after: int | None = None,
    ) -> None:
        self.answer = answer
        self.break_after = break_first_upload_after
        self.upload_calls = 0
        self.upload_messages = 0
        self.image_ids: list[str] = []
        self.per_call: dict[int, list[str]] = {}
        self.acked_ids: set[str] = set()
        self.lock = threading.Lock()

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> Any:
        reg = serde.registration_from_proto(request)
        t_cut, snr = self.answer(reg.cut_ratio)
        session = Session(
            schedule=ScheduleInfo(SCHEDULE, DIFFUSION.hash),
            t_cut=t_cut,
            model_version=0,
            client_index=0,
            max_message_bytes=1 << 24,
            release_snr=snr,
        )
        return serde.session_to_proto(session)

    def Upload(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.upload_calls += 1
            first = self.upload_calls == 1
        for k, msg in enumerate(request_iterator):
            with self.lock:
                self.upload_messages += 1
                self.image_ids.extend(msg.image_ids)
                self.per_call.setdefault(self.upload_calls, []).extend(msg.image_ids)
            if first and self.break_after is not None and k + 1 >= self.break_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            self.acked_ids.update(msg.image_ids)
            yield serde.upload_ack_to_proto(
                UploadAck(message=k, accepted=len(msg.image_ids), pool_size=len(self.acked_ids))
            )


def honest(cut_ratio: float) -> tuple[int, float]:
    t_cut = DIFFUSION.t_cut(cut_ratio)
    return t_cut, DIFFUSION.snr(t_cut)


def read_status(config: ClientConfig) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(state_paths(config)["status"].read_text())
    return status


def ledger_summary(config: ClientConfig) -> tuple[int, int, int, int]:
    ledger = Ledger(state_paths(config)["ledger"])
    try:
        s = ledger.summary()
    finally:
        ledger.close()
    return s.images_released, s.images_acknowledged, s.releases, s.bytes_released


# ----- registration: the client computes its own cut -----------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("answer", "needle"),
    [
        # A server that wants the images nearly clean: t_cut=1 is about 46 dB PSNR.
        (lambda c: (1, DIFFUSION.snr(1)), "answered t_cut=1"),
        (lambda c: (T_CUT - 5, DIFFUSION.snr(T_CUT - 5)), f"answered t_cut={T_CUT - 5}"),
        # Right t_cut, but it misreports what a release discloses.
        (lambda c: (T_CUT, DIFFUSION.snr(T_CUT) / 10), "release SNR"),
    ],
    ids=["t_cut_1", "smaller_t_cut", "wrong_snr"],
)
def test_a_server_that_lies_at_registration_gets_nothing(
    tmp_path: Path, answer: Callable[[float], tuple[int, float]], needle: str
) -> None:
    fake = FakeServer(answer)
    with serving(fake) as address:
        config = tiny_client_config(tmp_path / "client", address)
        assert ClientDaemon(config).run() == 1
    status = read_status(config)
    assert status["phase"] == "refused"
    assert needle in status["last_error"] and "nothing was released" in status["last_error"]
    assert fake.upload_calls == 0 and fake.upload_messages == 0
    assert ledger_summary(config) == (0, 0, 0, 0)


@pytest.mark.timeout(120)
def test_the_client_floor_holds_even_when_the_server_agrees(tmp_path: Path) -> None:
    fake = FakeServer(honest)
    with serving(fake) as address:
        # The cut's SNR is about 0.23; this client accepts at most 0.1.
        config = tiny_client_config(tmp_path / "client", address, max_release_snr=0.1)
        assert ClientDaemon(config).run() == 1
    status = read_status(config)
    assert status["phase"] == "refused"
    assert "max_release_snr" in status["last_error"] and "cut_ratio" in status["last_error"]
    assert fake.upload_calls == 0 and fake.upload_messages == 0
    assert ledger_summary(config) == (0, 0, 0, 0)


@pytest.mark.timeout(120)
def test_the_default_cut_passes_both_default_floors(tmp_path: Path) -> None:
    """The defaults agree: the client's cut on the server's schedule (T=1000, linear) is within
    both sides' max_release_snr, and a default client registers with a default server."""
    client, server = ClientConfig(), ServerConfig()
    assert (server.schedule.num_timesteps, server.schedule.beta_schedule) == (1000, "linear")
    diffusion = Diffusion.from_config(server.schedule)
    t_cut = diffusion.t_cut(client.cut_ratio)
    snr = diffusion.snr(t_cut)
    assert t_cut == 500 and snr == pytest.approx(0.0853, abs=1e-4)
    assert snr <= client.max_release_snr and snr <= server.policy.max_release_snr
    # The study's c = 0.3 (SNR 0.66), which the earlier default 1.0 admitted, is refused now.
    policy = Policy(server.policy, server.image, diffusion)
    with pytest.raises(PolicyError, match=r"above the policy limit 0\.1;"):
        policy.check_registration(Registration(client.client_id, client.image.shape, 0.3))

    # Over gRPC: only what a test needs differs from the defaults (where, and which data).
    running = start_server(
        server.model_copy(
            update={"listen": "127.0.0.1:0", "data_dir": tmp_path / "server", "insecure": True}
        )
    )
    daemon = None
    try:
        local = client.model_copy(
            update={
                "server": running.address,
                "insecure": True,
                "state_dir": tmp_path / "client",
                "data": DataConfig(source="digits", limit=8),
            }
        )
        daemon = ClientDaemon(local)
        session = daemon.register()  # both floors checked: the server's and the client's own
        assert (session.t_cut, session.release_snr) == (t_cut, snr)
    finally:
        if daemon is not None:
            if daemon.remote is not None:
                daemon.remote.close()
            daemon.ledger.close()
        running.stop()


@pytest.mark.timeout(180)
def test_a_broken_stream_is_resent_without_counting_twice_and_never_at_another_cut(
    tmp_path: Path,
) -> None:
    # The first stream breaks after 5 of 15 messages (4 acknowledged); the daemon redials and
    # resumes after the last acknowledged message.
    fake = FakeServer(honest, break_first_upload_after=5)
    with serving(fake) as address:
        config = tiny_client_config(tmp_path / "client", address)
        assert ClientDaemon(config).run() == 0
        assert fake.upload_calls == 2 and len(set(fake.image_ids)) == 60
        first, second = fake.per_call[1], fake.per_call[2]
        assert len(first) == 20  # 5 messages of 4 images
        # The second stream carries exactly what was not acknowledged: the 5th message again
        # (the same bytes) and the rest; nothing acknowledged crosses twice.
        assert set(second) == set(fake.image_ids) - set(first[:16]) and len(second) == 44
        # One release per image, each image's bytes once, all acknowledged.
        assert ledger_summary(config) == (60, 60, 60, 60 * PER_IMAGE)
        assert read_status(config)["bytes_released"] == 60 * PER_IMAGE

        # The same client, now configured for another cut, must not re-release its images.
        moved = config.model_copy(update={"cut_ratio": 0.5})
        daemon = ClientDaemon(moved)
        try:
            session = daemon.register()
            assert session.t_cut == DIFFUSION.t_cut(0.5) != T_CUT
            calls = fake.upload_calls
            with pytest.raises(ClientRefused, match=f"already released at t_cut={T_CUT}"):
                daemon.upload(session, everything=True)
            assert fake.upload_calls == calls
        finally:
            if daemon.remote is not None:
                daemon.remote.close()
            daemon.ledger.close()
    assert ledger_summary(config) == (60, 60, 60, 60 * PER_IMAGE)


# ----- synthesis: a stream longer than asked is cut off -------------------------------------


class EndlessSynthesis(pb_grpc.CollaFuseServicer):
    """Streams chunks of 2 samples until the client goes away (or the `bad` chunk, if any).

    It paces itself so that the number of chunks it managed to send measures how fast the
    client cancelled, not how much HTTP/2 buffers.
    """

    def __init__(self, bad: Callable[[int, SynthesisChunk], SynthesisChunk] | None = None) -> None:
        self.bad = bad or (lambda k, c: c)
        self.yielded = 0
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    def Synthesize(self, request: pb.SynthesizeRequest, context: grpc.ServicerContext) -> Any:
        # Runs when the call ends; this stream never ends on its own, so only a cancel ends it.
        context.add_callback(self.cancelled.set)

        def chunks() -> Iterator[pb.SynthesizeChunk]:
            try:
                k = 0
                while context.is_active() and k < 200:
                    chunk = SynthesisChunk(
                        timestep=T_CUT,
                        offset=2 * k,
                        total=request.n,
                        samples=torch.zeros(2, *SHAPE),
                        model_version=3,
                    )
                    self.yielded += 1
                    yield serde.synthesis_chunk_to_proto(self.bad(k, chunk))
                    k += 1
                    self.cancelled.wait(0.1)
            finally:
                self.finished.set()

        return chunks()


def _wrong_timestep(k: int, c: SynthesisChunk) -> SynthesisChunk:
    if k < 1:
        return c
    return SynthesisChunk(T_CUT - 1, c.offset, c.total, c.samples, c.model_version)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("bad", "bad_index", "needle"),
    [(None, 2, "4 were asked for"), (_wrong_timestep, 1, "timestep 19")],
    ids=["too_many", "wrong_timestep"],
)
def test_a_bad_synthesis_stream_is_cancelled_at_once(
    bad: Callable[[int, SynthesisChunk], SynthesisChunk] | None, bad_index: int, needle: str
) -> None:
    fake = EndlessSynthesis(bad)
    with serving(fake) as address:
        remote = Remote(open_channel(address, insecure=True))
        try:
            started = time.monotonic()
            with pytest.raises(SynthesisError, match=needle):
                receive_cut_samples(remote, SynthesisRequest("client-0", n=4, seed=0), T_CUT, SHAPE)
            # The client stopped at the bad chunk and the server saw the call cancelled.
            assert fake.cancelled.wait(TIMEOUT) and fake.finished.wait(TIMEOUT)
            assert time.monotonic() - started < 10
            assert fake.yielded <= bad_index + 2, fake.yielded
        finally:
            remote.close()


class ExactSynthesis(pb_grpc.CollaFuseServicer):
    """Streams exactly the n samples asked for, in chunks of 3."""

    def Synthesize(self, request: pb.SynthesizeRequest, context: grpc.ServicerContext) -> Any:
        for lo in range(0, request.n, 3):
            k = min(3, request.n - lo)
            samples = torch.full((k, *SHAPE), float(lo))
            yield serde.synthesis_chunk_to_proto(SynthesisChunk(T_CUT, lo, request.n, samples, 3))


@pytest.mark.timeout(60)
def test_an_exact_synthesis_stream_is_received() -> None:
    with serving(ExactSynthesis()) as address:
        remote = Remote(open_channel(address, insecure=True))
        try:
            x, version = receive_cut_samples(
                remote, SynthesisRequest("client-0", n=7, seed=0), T_CUT, SHAPE
            )
        finally:
            remote.close()
    assert x.shape == (7, *SHAPE) and version == 3
    assert x[:, 0, 0, 0].tolist() == [0, 0, 0, 3, 3, 3, 6]


# ----- the ledger: one release per image, ever ----------------------------------------------


def _release(local_id: str, t_cut: int = T_CUT, sha: str = "aa" * 32) -> Release:
    return Release(local_id, f"w-{local_id}", t_cut, PER_IMAGE, sha)


def test_ledger_same_bytes_twice_is_one_release(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        first = ledger.record([_release("a"), _release("b")])
        # A retried stream, then a second retry that also carries a new image.
        assert ledger.record([_release("a"), _release("b")]) == first
        again = ledger.record([_release("b"), _release("c")])
        assert again[0] == first[1] and again[1] not in first
        ledger.acknowledge(first)
        s = ledger.summary()
        assert (s.images_released, s.images_acknowledged, s.releases) == (3, 2, 3)
        assert s.bytes_released == 3 * PER_IMAGE and s.t_cuts == [T_CUT]
        assert ledger.acknowledged_ids() == {"a", "b"}
    finally:
        ledger.close()


@pytest.mark.parametrize(
    "conflict",
    [
        _release("a", t_cut=T_CUT + 5),
        _release("a", sha="bb" * 32),
        Release("a", "w-other", T_CUT, PER_IMAGE, "aa" * 32),
    ],
    ids=["other_t_cut", "other_bytes", "other_wire_id"],
)
def test_ledger_refuses_a_second_release_of_an_image(tmp_path: Path, conflict: Release) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        ledger.record([_release("a")])
        with pytest.raises(LedgerError, match="'a' was already released"):
            ledger.check([conflict])
        # Nothing of a refused batch is recorded, not even its harmless rows.
        with pytest.raises(LedgerError):
            ledger.record([_release("z"), conflict])
        s = ledger.summary()
        assert (s.images_released, s.releases, s.bytes_released) == (1, 1, PER_IMAGE)
    finally:
        ledger.close()


_LEGACY_SCHEMA = """
CREATE TABLE releases (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    local_id TEXT NOT NULL,
    wire_id TEXT NOT NULL,
    t_cut INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    released_at REAL NOT NULL,
    acked_at REAL
);
CREATE INDEX releases_local ON releases(local_id);
"""


def _legacy_ledger(path: Path, rows: list[tuple[Release, float | None]]) -> None:
    """A ledger as the version before one-release-per-image wrote it, retries included."""
    db = sqlite3.connect(path)
    db.executescript(_LEGACY_SCHEMA)
    db.executemany(
        "INSERT INTO releases (local_id, wire_id, t_cut, bytes, sha256, released_at, acked_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(r.local_id, r.wire_id, r.t_cut, r.bytes, r.sha256, 1.0, acked) for r, acked in rows],
    )
    db.commit()
    db.close()


def _has_unique_index(path: Path) -> bool:
    db = sqlite3.connect(path)
    try:
        row = db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'releases_one_per_image'"
        ).fetchone()
    finally:
        db.close()
    return row is not None


def test_legacy_retry_duplicates_are_folded_into_one_release(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    # Image a went out three times in retried streams (the last one acknowledged), b once.
    _legacy_ledger(
        path, [(_release("a"), None), (_release("b"), None), (_release("a"), None),
               (_release("a"), 5.0)]
    )  # fmt: skip
    ledger = Ledger(path)
    try:
        s = ledger.summary()
        assert (s.images_released, s.images_acknowledged, s.releases) == (2, 1, 2)
        assert s.bytes_released == 2 * PER_IMAGE
        assert ledger.acknowledged_ids() == {"a"}
        assert ledger.record([_release("a")]) == [1]  # the first row stands for all of them
        with pytest.raises(LedgerError):
            ledger.record([_release("b", t_cut=T_CUT + 1)])
    finally:
        ledger.close()
    assert _has_unique_index(path)


def test_legacy_image_released_at_two_cuts_stays_recorded_and_frozen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    _legacy_ledger(
        path, [(_release("a"), 5.0), (_release("a", t_cut=T_CUT + 5, sha="cc" * 32), 6.0),
               (_release("b"), None), (_release("b"), 7.0)]
    )  # fmt: skip
    ledger = Ledger(path)
    try:
        s = ledger.summary()
        # Both disclosures of a stay on record; b's retry is folded.
        assert (s.images_released, s.images_acknowledged, s.releases) == (2, 2, 3)
        assert s.bytes_released == 3 * PER_IMAGE and s.t_cuts == [T_CUT, T_CUT + 5]
        for t_cut, sha in ((T_CUT, "aa" * 32), (T_CUT + 5, "cc" * 32)):
            with pytest.raises(LedgerError):
                ledger.record([_release("a", t_cut=t_cut, sha=sha)])
        assert ledger.record([_release("c")]) == [5]
    finally:
        ledger.close()
    assert not _has_unique_index(path)
    # Opening it again changes nothing.
    ledger = Ledger(path)
    try:
        assert ledger.summary().releases == 4
    finally:
        ledger.close()
