"""Domain objects exchanged between client and server, free of protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from collafuse.common.config import SamplerKind, ScheduleConfig


@dataclass(frozen=True)
class Registration:
    """A client's request to join."""

    client_id: str
    image_shape: tuple[int, int, int]
    cut_ratio: float
    exposure: str = "fixed"
    schedule_hash: str = ""
    num_images: int = 0


@dataclass(frozen=True)
class ScheduleInfo:
    """The server's schedule as sent to clients."""

    config: ScheduleConfig
    hash: str


@dataclass(frozen=True)
class Session:
    """What a client learns at registration."""

    schedule: ScheduleInfo
    t_cut: int
    model_version: int
    client_index: int
    max_message_bytes: int
    release_snr: float


@dataclass(frozen=True)
class CutBatch:
    """Cut images x_{t_cut} with their ids: the only training data that leaves a client."""

    client_id: str
    t_cut: int
    image_ids: list[str]
    cuts: Tensor  # (N, C, H, W) float32


@dataclass(frozen=True)
class UploadResult:
    """The server's answer to an upload stream."""

    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejections: list[tuple[str, str]] = field(default_factory=list)
    pool_size: int = 0
    receipt: str = ""


@dataclass(frozen=True)
class UploadAck:
    """The server's answer to one upload message, sent once the message is durable."""

    message: int
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejections: list[tuple[str, str]] = field(default_factory=list)
    pool_size: int = 0
    receipt: str = ""


@dataclass(frozen=True)
class SynthesisRequest:
    """A client's request for n samples of x_{t_cut}."""

    client_id: str
    n: int
    seed: int
    sampler: SamplerKind = "ddpm"
    num_steps: int = 0
    eta: float = 0.0
    mixture: bool = False
    offset: int = 0


@dataclass(frozen=True)
class SynthesisChunk:
    """Samples [offset, offset + N) of a synthesis, all at timestep `timestep`."""

    timestep: int
    offset: int
    total: int
    samples: Tensor  # (N, C, H, W) float32
    model_version: int


@dataclass(frozen=True)
class ClientPool:
    """One client's share of the server's pool."""

    client_id: str
    client_index: int
    t_cut: int
    num_images: int


@dataclass(frozen=True)
class ServerStatus:
    """What GetStatus reports."""

    model_version: int
    train_step: int
    uptime_s: float
    pools: list[ClientPool]
    last_loss: float
    device: str
    model_parameters: int
    requests_served: int
    schedule: ScheduleInfo
    nonfinite_steps: int = 0
    trainer_state: str = ""
    trainer_restarts: int = 0
    malformed_requests: int = 0


@dataclass(frozen=True)
class ForgetResult:
    """What the server deleted for a Forget call, and which model versions saw the images."""

    deleted: int
    trained_from_version: int
    trained_to_version: int
    receipt: str = ""
