"""Round trips and validation of the protobuf <-> domain conversion, and the proto build check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collafuse.common import serde
from collafuse.common.config import ScheduleConfig
from collafuse.common.domain import (
    ClientPool,
    CutBatch,
    Registration,
    ScheduleInfo,
    ServerStatus,
    Session,
    SynthesisChunk,
    SynthesisRequest,
    UploadResult,
)
from collafuse.v1 import collafuse_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensor_round_trip(dtype: str) -> None:
    x = torch.randn(3, 1, 5, 7)
    msg = serde.tensor_to_proto(x, dtype)
    assert msg.dtype == dtype and list(msg.shape) == [3, 1, 5, 7]
    assert len(msg.data) == x.numel() * (4 if dtype == "float32" else 2)
    back = serde.tensor_from_proto(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == torch.float32 and back.shape == x.shape
    tol = 0 if dtype == "float32" else 1e-3
    assert torch.allclose(back, x, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "dtype"),
        (pb.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 12), "bytes do not match"),
        (pb.Tensor(dtype="float32", shape=[], data=b""), "shape"),
        (pb.Tensor(dtype="float32", shape=[2, -1], data=b""), "shape"),
        (serde.tensor_to_proto(torch.tensor([1.0, float("nan")])), "NaN"),
        (serde.tensor_to_proto(torch.tensor([float("inf")])), "NaN or infinite"),
    ],
)
def test_tensor_validation(msg: pb.Tensor, needle: str) -> None:
    with pytest.raises(serde.WireError, match=needle):
        serde.tensor_from_proto(msg)


def test_tensor_is_raw_bytes_not_pickle() -> None:
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    msg = serde.tensor_to_proto(x)
    # Little-endian float32, row-major: exactly numpy's bytes, nothing else.
    assert msg.data == x.numpy().astype("<f4").tobytes()


def test_domain_round_trips() -> None:
    info = ScheduleInfo(ScheduleConfig(num_timesteps=50, beta_schedule="cosine"), "abc")
    reg = Registration("c-1", (1, 8, 8), 0.4, "fixed", "abc", 10)
    assert serde.registration_from_proto(serde.registration_to_proto(reg)) == reg
    sess = Session(info, 20, 7, 3, 1 << 24, 0.5)
    assert serde.session_from_proto(serde.session_to_proto(sess)) == sess
    res = UploadResult(3, 1, 1, [("x", "too clean")], 4)
    assert serde.upload_result_from_proto(serde.upload_result_to_proto(res)) == res
    req = SynthesisRequest("c-1", 5, 9, "ddim", 10, 0.5, True)
    assert serde.synthesis_request_from_proto(serde.synthesis_request_to_proto(req)) == req
    status = ServerStatus(5, 6, 1.5, [ClientPool("c-1", 0, 20, 4)], 0.3, "cpu", 100, 2, info)
    assert serde.status_from_proto(serde.status_to_proto(status)) == status
    cuts = torch.randn(2, 1, 8, 8)
    batch = serde.cut_batch_from_proto(
        serde.cut_batch_to_proto(CutBatch("c-1", 20, ["a", "b"], cuts))
    )
    assert batch.image_ids == ["a", "b"] and torch.equal(batch.cuts, cuts)
    chunk = SynthesisChunk(20, 0, 2, cuts, 5)
    back = serde.synthesis_chunk_from_proto(serde.synthesis_chunk_to_proto(chunk))
    assert back.timestep == 20 and torch.equal(back.samples, cuts)


def test_request_validation() -> None:
    with pytest.raises(serde.WireError, match="client_id"):
        serde.registration_from_proto(
            pb.RegisterRequest(client_id="bad id!", image_shape=[1, 8, 8], cut_ratio=0.5)
        )
    with pytest.raises(serde.WireError, match="cut_ratio"):
        serde.registration_from_proto(
            pb.RegisterRequest(client_id="ok", image_shape=[1, 8, 8], cut_ratio=1.0)
        )
    with pytest.raises(serde.WireError, match="image_shape"):
        serde.registration_from_proto(
            pb.RegisterRequest(client_id="ok", image_shape=[8, 8], cut_ratio=0.5)
        )
    cuts = serde.tensor_to_proto(torch.randn(2, 1, 8, 8))
    with pytest.raises(serde.WireError, match="one id per image"):
        serde.cut_batch_from_proto(
            pb.UploadCutsRequest(client_id="ok", t_cut=5, image_ids=["a"], cuts=cuts)
        )
    with pytest.raises(serde.WireError, match="repeat"):
        serde.cut_batch_from_proto(
            pb.UploadCutsRequest(client_id="ok", t_cut=5, image_ids=["a", "a"], cuts=cuts)
        )
    with pytest.raises(serde.WireError, match="no cuts"):
        serde.cut_batch_from_proto(pb.UploadCutsRequest(client_id="ok", t_cut=5))
    with pytest.raises(serde.WireError, match="n must be positive"):
        serde.synthesis_request_from_proto(pb.SynthesizeRequest(client_id="ok", n=0))
    with pytest.raises(serde.WireError, match="sampler"):
        serde.synthesis_request_from_proto(pb.SynthesizeRequest(client_id="ok", n=1, sampler=7))


def test_generated_code_is_current(tmp_path: Path) -> None:
    """Regenerating from proto/ must reproduce the committed modules byte for byte."""
    proto = ROOT / "proto"
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{proto}",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            str(proto / "collafuse" / "v1" / "collafuse.proto"),
        ],
        check=True,
    )  # fmt: skip
    for name in ("collafuse_pb2.py", "collafuse_pb2.pyi", "collafuse_pb2_grpc.py"):
        fresh = (tmp_path / "collafuse" / "v1" / name).read_text()
        committed = (proto / "collafuse" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos` and commit the result"


def test_wire_sampler_enum_follows_the_registry() -> None:
    from collafuse.common.config import SAMPLERS

    wire = [n for n, _ in pb.Sampler.items() if n != "SAMPLER_UNSPECIFIED"]
    assert sorted(wire) == sorted(f"SAMPLER_{name.upper()}" for name in SAMPLERS)
    for name in SAMPLERS:
        req = SynthesisRequest("c", 1, 0, sampler=name)  # type: ignore[arg-type]
        assert serde.synthesis_request_from_proto(serde.synthesis_request_to_proto(req)) == req
