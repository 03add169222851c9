from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_DDPM: _ClassVar[Sampler]
    SAMPLER_DDIM: _ClassVar[Sampler]
    SAMPLER_ANALYTIC: _ClassVar[Sampler]
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_DDPM: Sampler
SAMPLER_DDIM: Sampler
SAMPLER_ANALYTIC: Sampler

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("client_id", "image_shape", "cut_ratio", "exposure", "schedule_hash", "num_images")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CUT_RATIO_FIELD_NUMBER: _ClassVar[int]
    EXPOSURE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    cut_ratio: float
    exposure: str
    schedule_hash: str
    num_images: int
    def __init__(self, client_id: _Optional[str] = ..., image_shape: _Optional[_Iterable[int]] = ..., cut_ratio: _Optional[float] = ..., exposure: _Optional[str] = ..., schedule_hash: _Optional[str] = ..., num_images: _Optional[int] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("num_timesteps", "beta_schedule", "beta_start", "beta_end", "schedule_hash")
    NUM_TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    BETA_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    BETA_START_FIELD_NUMBER: _ClassVar[int]
    BETA_END_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_HASH_FIELD_NUMBER: _ClassVar[int]
    num_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    schedule_hash: str
    def __init__(self, num_timesteps: _Optional[int] = ..., beta_schedule: _Optional[str] = ..., beta_start: _Optional[float] = ..., beta_end: _Optional[float] = ..., schedule_hash: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("schedule", "t_cut", "model_version", "client_index", "max_message_bytes", "release_snr")
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    T_CUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SNR_FIELD_NUMBER: _ClassVar[int]
    schedule: Schedule
    t_cut: int
    model_version: int
    client_index: int
    max_message_bytes: int
    release_snr: float
    def __init__(self, schedule: _Optional[_Union[Schedule, _Mapping]] = ..., t_cut: _Optional[int] = ..., model_version: _Optional[int] = ..., client_index: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., release_snr: _Optional[float] = ...) -> None: ...

class UploadCutsRequest(_message.Message):
    __slots__ = ("client_id", "t_cut", "image_ids", "cuts")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    T_CUT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    t_cut: int
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    cuts: Tensor
    def __init__(self, client_id: _Optional[str] = ..., t_cut: _Optional[int] = ..., image_ids: _Optional[_Iterable[str]] = ..., cuts: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("image_id", "reason")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    reason: str
    def __init__(self, image_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UploadCutsResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "rejected", "rejections", "pool_size", "receipt")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicate: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    pool_size: int
    receipt: str
    def __init__(self, accepted: _Optional[int] = ..., duplicate: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., pool_size: _Optional[int] = ..., receipt: _Optional[str] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("message", "accepted", "duplicate", "rejected", "rejections", "pool_size", "receipt")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    message: int
    accepted: int
    duplicate: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    pool_size: int
    receipt: str
    def __init__(self, message: _Optional[int] = ..., accepted: _Optional[int] = ..., duplicate: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., pool_size: _Optional[int] = ..., receipt: _Optional[str] = ...) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("client_id", "n", "seed", "sampler", "num_steps", "eta", "mixture", "offset")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    MIXTURE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    n: int
    seed: int
    sampler: Sampler
    num_steps: int
    eta: float
    mixture: bool
    offset: int
    def __init__(self, client_id: _Optional[str] = ..., n: _Optional[int] = ..., seed: _Optional[int] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., num_steps: _Optional[int] = ..., eta: _Optional[float] = ..., mixture: _Optional[bool] = ..., offset: _Optional[int] = ...) -> None: ...

class SynthesizeChunk(_message.Message):
    __slots__ = ("timestep", "offset", "total", "samples", "model_version")
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    timestep: int
    offset: int
    total: int
    samples: Tensor
    model_version: int
    def __init__(self, timestep: _Optional[int] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ..., model_version: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientPool(_message.Message):
    __slots__ = ("client_id", "client_index", "t_cut", "num_images")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    T_CUT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    client_index: int
    t_cut: int
    num_images: int
    def __init__(self, client_id: _Optional[str] = ..., client_index: _Optional[int] = ..., t_cut: _Optional[int] = ..., num_images: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("model_version", "train_step", "uptime_s", "pools", "last_loss", "device", "model_parameters", "requests_served", "schedule", "nonfinite_steps", "trainer_state", "trainer_restarts", "malformed_requests")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEP_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STATE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    train_step: int
    uptime_s: float
    pools: _containers.RepeatedCompositeFieldContainer[ClientPool]
    last_loss: float
    device: str
    model_parameters: int
    requests_served: int
    schedule: Schedule
    nonfinite_steps: int
    trainer_state: str
    trainer_restarts: int
    malformed_requests: int
    def __init__(self, model_version: _Optional[int] = ..., train_step: _Optional[int] = ..., uptime_s: _Optional[float] = ..., pools: _Optional[_Iterable[_Union[ClientPool, _Mapping]]] = ..., last_loss: _Optional[float] = ..., device: _Optional[str] = ..., model_parameters: _Optional[int] = ..., requests_served: _Optional[int] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., nonfinite_steps: _Optional[int] = ..., trainer_state: _Optional[str] = ..., trainer_restarts: _Optional[int] = ..., malformed_requests: _Optional[int] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("deleted", "trained_from_version", "trained_to_version", "receipt")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    trained_from_version: int
    trained_to_version: int
    receipt: str
    def __init__(self, deleted: _Optional[int] = ..., trained_from_version: _Optional[int] = ..., trained_to_version: _Optional[int] = ..., receipt: _Optional[str] = ...) -> None: ...
