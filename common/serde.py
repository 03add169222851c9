"""The one module that converts between protobuf messages and domain objects.

Tensors are dtype + shape + raw little-endian bytes; nothing is ever pickled. Decoding checks
everything a peer could get wrong and raises WireError with a message a person can act on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from collafuse.common.config import CLIENT_ID_PATTERN, SAMPLERS, ScheduleConfig
from collafuse.common.domain import (
    ClientPool,
    CutBatch,
    ForgetResult,
    Registration,
    ScheduleInfo,
    ServerStatus,
    Session,
    SynthesisChunk,
    SynthesisRequest,
    UploadAck,
    UploadResult,
)
from collafuse.common.limits import MAX_IMAGE_ID_LENGTH, MAX_IMAGE_PIXELS
from collafuse.v1 import collafuse_pb2 as pb

WIRE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
CLIENT_ID_RE = re.compile(CLIENT_ID_PATTERN)
# Wire values follow the sampler registry: SAMPLER_<NAME> for each registered sampler.
_SAMPLERS: dict[str, Any] = {name: pb.Sampler.Value(f"SAMPLER_{name.upper()}") for name in SAMPLERS}


class WireError(ValueError):
    """A message that breaks the wire contract; maps to INVALID_ARGUMENT."""


# ----- tensors -----------------------------------------------------------------------------


def tensor_to_proto(tensor: Tensor, dtype: str = "float32") -> pb.Tensor:
    """Encode a tensor as dtype + shape + bytes (float32 or float16 on the wire)."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    array = tensor.detach().cpu().numpy().astype(WIRE_DTYPES[dtype], copy=False)
    return pb.Tensor(
        dtype=dtype, shape=list(array.shape), data=np.ascontiguousarray(array).tobytes()
    )


def tensor_from_proto(msg: pb.Tensor, what: str = "tensor") -> Tensor:
    """Decode and validate a tensor; the result is float32 whatever the wire dtype."""
    if msg.dtype not in WIRE_DTYPES:
        raise WireError(f"{what}: dtype {msg.dtype!r} is not allowed; use float32 or float16")
    shape = tuple(int(d) for d in msg.shape)
    if not shape or any(d <= 0 for d in shape):
        raise WireError(f"{what}: shape {list(shape)} must be non-empty with positive sizes")
    count = math.prod(shape)
    expected = count * WIRE_DTYPES[msg.dtype].itemsize
    if len(msg.data) != expected:
        raise WireError(
            f"{what}: {len(msg.data)} bytes do not match shape {list(shape)} of {msg.dtype} "
            f"({expected} bytes expected)"
        )
    array = np.frombuffer(msg.data, dtype=WIRE_DTYPES[msg.dtype]).reshape(shape)
    if not np.isfinite(array).all():
        raise WireError(f"{what}: contains NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32))


# ----- register ----------------------------------------------------------------------------


def registration_to_proto(reg: Registration) -> pb.RegisterRequest:
    """Encode a registration."""
    return pb.RegisterRequest(
        client_id=reg.client_id,
        image_shape=list(reg.image_shape),
        cut_ratio=reg.cut_ratio,
        exposure=reg.exposure,
        schedule_hash=reg.schedule_hash,
        num_images=reg.num_images,
    )


def check_client_id(client_id: str) -> str:
    """Client ids are 1-64 letters, digits, '-', '_' or '.'."""
    if not CLIENT_ID_RE.match(client_id):
        raise WireError(
            f"client_id {client_id[:80]!r} is invalid: use 1-64 letters, digits, '-', '_' or '.'"
        )
    return client_id


def registration_from_proto(msg: pb.RegisterRequest) -> Registration:
    """Decode and validate a registration."""
    check_client_id(msg.client_id)
    shape = tuple(int(d) for d in msg.image_shape)
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise WireError(f"image_shape must be (channels, height, width), got {list(shape)}")
    if not (0.0 < msg.cut_ratio < 1.0) or not math.isfinite(msg.cut_ratio):
        raise WireError(f"cut_ratio must lie strictly between 0 and 1, got {msg.cut_ratio}")
    exposure = msg.exposure or "fixed"
    if exposure not in ("fixed", "fresh"):
        raise WireError(f"exposure must be 'fixed' or 'fresh', got {exposure!r}")
    if msg.num_images < 0:
        raise WireError("num_images must not be negative")
    return Registration(
        client_id=msg.client_id,
        image_shape=(shape[0], shape[1], shape[2]),
        cut_ratio=float(msg.cut_ratio),
        exposure=exposure,
        schedule_hash=msg.schedule_hash,
        num_images=int(msg.num_images),
    )


def schedule_to_proto(info: ScheduleInfo) -> pb.Schedule:
    """Encode a schedule."""
    c = info.config
    return pb.Schedule(
        num_timesteps=c.num_timesteps,
        beta_schedule=c.beta_schedule,
        beta_start=c.beta_start,
        beta_end=c.beta_end,
        schedule_hash=info.hash,
    )


def schedule_from_proto(msg: pb.Schedule) -> ScheduleInfo:
    """Decode a schedule."""
    try:
        config = ScheduleConfig(
            num_timesteps=msg.num_timesteps,
            beta_schedule=msg.beta_schedule,  # type: ignore[arg-type]
            beta_start=msg.beta_start,
            beta_end=msg.beta_end,
        )
    except ValueError as exc:
        raise WireError(f"schedule is invalid: {exc}") from None
    return ScheduleInfo(config, msg.schedule_hash)


def session_to_proto(s: Session) -> pb.RegisterResponse:
    """Encode a registration answer."""
    return pb.RegisterResponse(
        schedule=schedule_to_proto(s.schedule),
        t_cut=s.t_cut,
        model_version=s.model_version,
        client_index=s.client_index,
        max_message_bytes=s.max_message_bytes,
        release_snr=s.release_snr,
    )


def session_from_proto(msg: pb.RegisterResponse) -> Session:
    """Decode a registration answer."""
    return Session(
        schedule=schedule_from_proto(msg.schedule),
        t_cut=int(msg.t_cut),
        model_version=int(msg.model_version),
        client_index=int(msg.client_index),
        max_message_bytes=int(msg.max_message_bytes),
        release_snr=float(msg.release_snr),
    )


# ----- upload ------------------------------------------------------------------------------


def cut_batch_to_proto(batch: CutBatch, dtype: str = "float32") -> pb.UploadCutsRequest:
    """Encode one upload message."""
    return pb.UploadCutsRequest(
        client_id=batch.client_id,
        t_cut=batch.t_cut,
        image_ids=batch.image_ids,
        cuts=tensor_to_proto(batch.cuts, dtype),
    )


def cut_batch_from_proto(msg: pb.UploadCutsRequest) -> CutBatch:
    """Decode and validate one upload message."""
    check_client_id(msg.client_id)
    if msg.t_cut <= 0:
        raise WireError(f"t_cut must be a positive timestep, got {msg.t_cut}")
    if not msg.HasField("cuts"):
        raise WireError("upload message carries no cuts tensor")
    cuts = tensor_from_proto(msg.cuts, "cuts")
    if cuts.ndim != 4:
        raise WireError(f"cuts must have shape (N, C, H, W), got {list(cuts.shape)}")
    if math.prod(cuts.shape[1:]) > MAX_IMAGE_PIXELS:
        raise WireError(f"images of shape {list(cuts.shape[1:])} exceed the size limit")
    ids = list(msg.image_ids)
    if len(ids) != cuts.shape[0]:
        raise WireError(f"{len(ids)} image ids for {cuts.shape[0]} images: one id per image")
    if len(set(ids)) != len(ids):
        raise WireError("image ids repeat inside one message")
    for image_id in ids:
        if not image_id or len(image_id) > MAX_IMAGE_ID_LENGTH:
            raise WireError(f"image ids must be 1-{MAX_IMAGE_ID_LENGTH} characters")
    return CutBatch(client_id=msg.client_id, t_cut=int(msg.t_cut), image_ids=ids, cuts=cuts)


def _rejections_to_proto(rejections: list[tuple[str, str]]) -> list[pb.Rejection]:
    """At most 100 (image id, reason) pairs: enough to act on, bounded in size."""
    return [pb.Rejection(image_id=i, reason=why) for i, why in rejections[:100]]


def _rejections_from_proto(msgs: Iterable[pb.Rejection]) -> list[tuple[str, str]]:
    return [(r.image_id, r.reason) for r in msgs]


def upload_result_to_proto(r: UploadResult) -> pb.UploadCutsResponse:
    """Encode an upload answer (at most 100 rejection reasons)."""
    return pb.UploadCutsResponse(
        accepted=r.accepted,
        duplicate=r.duplicate,
        rejected=r.rejected,
        rejections=_rejections_to_proto(r.rejections),
        pool_size=r.pool_size,
        receipt=r.receipt,
    )


def upload_result_from_proto(msg: pb.UploadCutsResponse) -> UploadResult:
    """Decode an upload answer."""
    return UploadResult(
        accepted=int(msg.accepted),
        duplicate=int(msg.duplicate),
        rejected=int(msg.rejected),
        rejections=_rejections_from_proto(msg.rejections),
        pool_size=int(msg.pool_size),
        receipt=msg.receipt,
    )


def upload_ack_to_proto(a: UploadAck) -> pb.UploadAck:
    """Encode the acknowledgement of one upload message (at most 100 rejection reasons)."""
    return pb.UploadAck(
        message=a.message,
        accepted=a.accepted,
        duplicate=a.duplicate,
        rejected=a.rejected,
        rejections=_rejections_to_proto(a.rejections),
        pool_size=a.pool_size,
        receipt=a.receipt,
    )


def upload_ack_from_proto(msg: pb.UploadAck) -> UploadAck:
    """Decode the acknowledgement of one upload message."""
    return UploadAck(
        message=int(msg.message),
        accepted=int(msg.accepted),
        duplicate=int(msg.duplicate),
        rejected=int(msg.rejected),
        rejections=_rejections_from_proto(msg.rejections),
        pool_size=int(msg.pool_size),
        receipt=msg.receipt,
    )


# ----- synthesis ---------------------------------------------------------------------------


def synthesis_request_to_proto(r: SynthesisRequest) -> pb.SynthesizeRequest:
    """Encode a synthesis request."""
    return pb.SynthesizeRequest(
        client_id=r.client_id,
        n=r.n,
        seed=r.seed,
        sampler=_SAMPLERS[r.sampler],
        num_steps=r.num_steps,
        eta=r.eta,
        mixture=r.mixture,
        offset=r.offset,
    )


def synthesis_request_from_proto(msg: pb.SynthesizeRequest) -> SynthesisRequest:
    """Decode and validate a synthesis request."""
    check_client_id(msg.client_id)
    if msg.n <= 0:
        raise WireError(f"n must be positive, got {msg.n}")
    if not 0 <= msg.offset < msg.n:
        raise WireError(f"offset must lie in [0, n) = [0, {msg.n}), got {msg.offset}")
    if msg.num_steps < 0:
        raise WireError(f"num_steps must not be negative, got {msg.num_steps}")
    if not (0.0 <= msg.eta <= 1.0):
        raise WireError(f"eta must lie in [0, 1], got {msg.eta}")
    names = {v: k for k, v in _SAMPLERS.items()}
    sampler = names.get(msg.sampler, "ddpm" if msg.sampler == pb.SAMPLER_UNSPECIFIED else None)
    if sampler is None:
        raise WireError(
            f"unknown sampler {msg.sampler}; use one of {', '.join(n.upper() for n in SAMPLERS)}"
        )
    return SynthesisRequest(
        client_id=msg.client_id,
        n=int(msg.n),
        seed=int(msg.seed),
        sampler=sampler,  # type: ignore[arg-type]
        num_steps=int(msg.num_steps),
        eta=float(msg.eta),
        mixture=bool(msg.mixture),
        offset=int(msg.offset),
    )


def synthesis_chunk_to_proto(c: SynthesisChunk) -> pb.SynthesizeChunk:
    """Encode a chunk of x_{t_cut}."""
    return pb.SynthesizeChunk(
        timestep=c.timestep,
        offset=c.offset,
        total=c.total,
        samples=tensor_to_proto(c.samples),
        model_version=c.model_version,
    )


def synthesis_chunk_from_proto(msg: pb.SynthesizeChunk) -> SynthesisChunk:
    """Decode and validate a chunk of x_{t_cut}."""
    samples = tensor_from_proto(msg.samples, "samples")
    if samples.ndim != 4:
        raise WireError(f"samples must have shape (N, C, H, W), got {list(samples.shape)}")
    return SynthesisChunk(
        timestep=int(msg.timestep),
        offset=int(msg.offset),
        total=int(msg.total),
        samples=samples,
        model_version=int(msg.model_version),
    )


# ----- status ------------------------------------------------------------------------------


def status_to_proto(s: ServerStatus) -> pb.GetStatusResponse:
    """Encode a status."""
    return pb.GetStatusResponse(
        model_version=s.model_version,
        train_step=s.train_step,
        uptime_s=s.uptime_s,
        pools=[
            pb.ClientPool(
                client_id=p.client_id,
                client_index=p.client_index,
                t_cut=p.t_cut,
                num_images=p.num_images,
            )
            for p in s.pools
        ],
        last_loss=s.last_loss,
        device=s.device,
        model_parameters=s.model_parameters,
        requests_served=s.requests_served,
        schedule=schedule_to_proto(s.schedule),
        nonfinite_steps=s.nonfinite_steps,
        trainer_state=s.trainer_state,
        trainer_restarts=s.trainer_restarts,
        malformed_requests=s.malformed_requests,
    )


def status_from_proto(msg: pb.GetStatusResponse) -> ServerStatus:
    """Decode a status."""
    return ServerStatus(
        model_version=int(msg.model_version),
        train_step=int(msg.train_step),
        uptime_s=float(msg.uptime_s),
        pools=[
            ClientPool(p.client_id, int(p.client_index), int(p.t_cut), int(p.num_images))
            for p in msg.pools
        ],
        last_loss=float(msg.last_loss),
        device=msg.device,
        model_parameters=int(msg.model_parameters),
        requests_served=int(msg.requests_served),
        schedule=schedule_from_proto(msg.schedule),
        nonfinite_steps=int(msg.nonfinite_steps),
        trainer_state=msg.trainer_state,
        trainer_restarts=int(msg.trainer_restarts),
        malformed_requests=int(msg.malformed_requests),
    )


def status_request() -> pb.GetStatusRequest:
    """An empty status request."""
    return pb.GetStatusRequest()


# ----- forget ------------------------------------------------------------------------------


def forget_request_to_proto(client_id: str) -> pb.ForgetRequest:
    """Ask the server to delete this client's cut images."""
    return pb.ForgetRequest(client_id=client_id)


def forget_request_from_proto(msg: pb.ForgetRequest) -> str:
    """The client id whose cut images are to be deleted."""
    return check_client_id(msg.client_id)


def forget_result_to_proto(r: ForgetResult) -> pb.ForgetResponse:
    """Encode the answer to Forget."""
    return pb.ForgetResponse(
        deleted=r.deleted,
        trained_from_version=r.trained_from_version,
        trained_to_version=r.trained_to_version,
        receipt=r.receipt,
    )


def forget_result_from_proto(msg: pb.ForgetResponse) -> ForgetResult:
    """Decode the answer to Forget."""
    return ForgetResult(
        deleted=int(msg.deleted),
        trained_from_version=int(msg.trained_from_version),
        trained_to_version=int(msg.trained_to_version),
        receipt=msg.receipt,
    )
