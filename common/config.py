"""Frozen configuration models: one source of defaults, loaded from TOML, overridable by flags."""

from __future__ import annotations

import ipaddress
import json
import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from types import UnionType
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from collafuse import __version__

# A client id: what the config, the wire and the certificates accept, in one place.
CLIENT_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"

# The samplers of the reverse chain, one registry: the diffusion math implements each, and the
# wire enum (SAMPLER_<NAME>), the config fields and the CLI choices follow from this list.
SamplerKind = Literal["ddpm", "ddim", "analytic"]
SAMPLERS: tuple[str, ...] = get_args(SamplerKind)

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device(name: str) -> str:
    """A device name as `auto`, `cpu`, `cuda` or `cuda:N` (N a GPU index), or ValueError.

    Only the spelling is checked here: whether the GPU exists is a fact about the machine that
    runs the config, checked when the server starts (`nets.pick_device`).
    """
    if name in ("auto", "cpu", "cuda"):
        return name
    kind, sep, index = name.partition(":")
    if kind == "cuda" and sep and index.isascii() and index.isdigit():
        return f"cuda:{int(index)}"
    raise ValueError(f"device must be {DEVICE_CHOICES} (N a GPU index, 0 or more)")


DeviceName = Annotated[str, AfterValidator(check_device)]


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says why."""


class DeviceError(ConfigError):
    """The configured device is not usable on this machine; the message says what to change."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ScheduleConfig(_Frozen):
    """The DDPM noise schedule; the server owns it and clients adopt it at registration."""

    num_timesteps: int = Field(default=1000, ge=2, le=10_000)
    """T, the number of diffusion steps."""
    beta_schedule: Literal["linear", "cosine"] = "linear"
    """How the betas grow: linear (Ho et al.) or cosine (Nichol & Dhariwal)."""
    beta_start: float = Field(default=1e-4, gt=0, lt=1)
    """First beta of the linear schedule, stated for T=1000 and rescaled by 1000/T for other T."""
    beta_end: float = Field(default=0.02, gt=0, lt=1)
    """Last beta of the linear schedule, stated for T=1000 and rescaled by 1000/T for other T."""

    @model_validator(mode="after")
    def _ordered(self) -> ScheduleConfig:
        if self.beta_end <= self.beta_start:
            raise ValueError("beta_end must be larger than beta_start")
        scaled_end = self.beta_end * 1000 / self.num_timesteps
        if self.beta_schedule == "linear" and scaled_end >= 1:
            raise ValueError(
                f"the linear schedule rescaled to T={self.num_timesteps} reaches beta "
                f"{scaled_end:.3g} >= 1; use more timesteps or a smaller beta_end"
            )
        return self


class ImageConfig(_Frozen):
    """Shape of the images every client and the server agree on."""

    channels: int = Field(default=1, ge=1, le=4)
    """Colour channels (1 for grey, 3 for RGB)."""
    size: int = Field(default=28, ge=4, le=512)
    """Height and width in pixels; images are square."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return (self.channels, self.size, self.size)


class UNetConfig(_Frozen):
    """Size of a diffusers UNet2DModel."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    """Channels at each resolution level; each level but the last halves the resolution."""
    layers_per_block: int = Field(default=1, ge=1, le=4)
    """Residual layers per level."""
    attention_levels: tuple[int, ...] = (1,)
    """Indices of levels that carry self-attention."""
    norm_num_groups: int = Field(default=8, ge=1)
    """Groups of GroupNorm; must divide every entry of block_out_channels."""

    @model_validator(mode="after")
    def _consistent(self) -> UNetConfig:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide {bad}")
        levels = len(self.block_out_channels)
        if any(i < 0 or i >= levels for i in self.attention_levels):
            raise ValueError(f"attention_levels must lie in 0..{levels - 1}")
        return self


SERVER_UNET = UNetConfig()
# The client's default network is under 10% of the server's parameters: it only denoises the
# cheap low-noise end of the chain, on an edge machine.
CLIENT_UNET = UNetConfig(block_out_channels=(8, 16), attention_levels=(), norm_num_groups=4)


class ServerTrainConfig(_Frozen):
    """How the server trains the shared denoiser on the pool of cut images."""

    batch_size: int = Field(default=64, ge=1, le=4096)
    """Cut images per training step."""
    lr: float = Field(default=2e-4, gt=0, le=1)
    """AdamW learning rate."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    ema_decay: float = Field(default=0.995, ge=0, lt=1)
    """Decay of the EMA weights that serve synthesis."""
    p_uncond: float = Field(default=0.1, ge=0, le=1)
    """Probability of replacing the client condition by the unconditional token in training."""
    loss_gamma: float = Field(default=5.0, gt=0)
    """Bound on the bridge loss weight, in eps-MSE units (min-SNR style)."""
    max_steps: int = Field(default=0, ge=0)
    """Stop training after this many steps; 0 trains for as long as the server runs."""
    checkpoint_every: int = Field(default=200, ge=1)
    """Write an atomic checkpoint every this many steps."""
    publish_every: int = Field(default=50, ge=1)
    """Hand the EMA weights to the sampler every this many steps (the model version)."""
    min_pool: int = Field(default=1, ge=1)
    """Do not start training before the pool holds this many cut images."""
    seed: int = 0
    """Seed of the trainer's noise draws."""
    pool_memory_mib: float = Field(default=0, ge=0)
    """Memory the trainer may hold cut images in (on its device). A pool that fits is held
    whole; a larger one is streamed from disk in shuffled chunks, the next read while the
    current one trains. 0 picks by device: a quarter of the GPU's memory, or of the host's."""
    chunk_passes: float = Field(default=1.0, gt=0, le=100)
    """When streaming, train on a chunk for this many passes over its images (in batches drawn
    with replacement) before moving to the next one, if that one has been read by then."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The network's precision in training: bf16 runs forward and backward under bfloat16
    autocast (weights, gradients and AdamW state stay float32); auto takes bf16 on CUDA and
    fp32 elsewhere."""
    compile: bool = False
    """torch.compile the network for training. It compiles at the first step; a compilation
    that fails leaves the network uncompiled, with a warning."""


class PolicyConfig(_Frozen):
    """What the server refuses, to keep the privacy contract (docs/design.md section 4)."""

    max_release_snr: float = Field(default=0.1, gt=0)
    """Largest signal-to-noise ratio abar/(1-abar) a cut may have; cleaner cuts are refused. The
    default 0.1 admits cut_ratio >= 0.486 on the linear T=1000 schedule. Why not 1.0 (c >= 0.26):
    in the CPU study (docs/results/fmnist-cpu/report.md) a strong attacker re-identified 77-86%
    of the training images from cuts at c=0.3 (SNR 0.66), and 6% at c=0.5 (SNR 0.085), where
    collaboration still beat local-only training at equal client cost."""
    guard_tolerance: float = Field(default=0.7, gt=0, le=1)
    """An upload is refused when its measured noise std is below this share of the std its
    declared t_cut implies."""
    max_clients: int = Field(default=16, ge=1, le=100_000)
    """Clients the conditioned server model has room for."""
    max_images_per_client: int = Field(default=100_000, ge=1)
    """Quota of cut images per client."""
    max_synthesize_n: int = Field(default=1024, ge=1)
    """Largest n a Synthesize request may ask for."""
    allow_mixture: bool = False
    """Whether a client may sample the mixture of all clients' distributions. Off by default:
    the mixture carries what the server learnt from the other clients' images."""


class LimitsConfig(_Frozen):
    """Bounds that keep one caller from starving the others; a refusal is RESOURCE_EXHAUSTED."""

    max_concurrent_rpcs: int = Field(default=1024, ge=1)
    """Calls the server handles at once, all callers together; more are refused at once. Each
    waiting call costs a coroutine, not a thread; silent ones end after idle_timeout_s."""
    max_streams_per_client: int = Field(default=4, ge=1)
    """Open UploadCuts and Synthesize streams per identity."""
    idle_timeout_s: float = Field(default=30.0, gt=0)
    """A call whose next request message does not arrive within this many seconds is closed,
    so calls that send headers and then nothing hold no slot for long."""
    rate_per_s: float = Field(default=20.0, gt=0)
    """Calls per second per identity, refilled continuously (token bucket)."""
    rate_burst: int = Field(default=40, ge=1)
    """Calls an identity may make at once before rate_per_s applies."""
    max_rejected_per_upload: int = Field(default=64, ge=1)
    """An upload stream is aborted once the guard has refused this many of its images."""


class SamplerConfig(_Frozen):
    """How the server batches synthesis requests."""

    max_batch: int = Field(default=0, ge=0)
    """Largest number of samples in one network call, across all requests; 0 picks by device:
    16 on a CPU (where a bigger batch buys little and makes every waiting request wait for a
    long step), 512 on a GPU."""
    slice_size: int = Field(default=32, ge=1)
    """Requests are cut into slices of this many samples, so others can join at any step."""
    interactive_n: int = Field(default=16, ge=0)
    """Requests of at most this many samples are interactive: they go first, and while one
    waits a step is kept small (interactive_batch) so that it is not slowed by large ones."""
    interactive_batch: int = Field(default=0, ge=0)
    """Samples per step while an interactive request waits (more if the interactive requests
    alone need more); 0 picks by device: 4 on a CPU, 128 on a GPU."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The network's precision during synthesis: bf16 runs it under bfloat16 autocast (the
    schedule arithmetic stays float32); auto takes bf16 on CUDA and fp32 elsewhere."""
    compile: bool = False
    """torch.compile the network for synthesis. The server compiles before it starts
    listening, with the batch size dynamic, so no request waits for a compilation (a
    compilation that fails leaves the network uncompiled, with a warning)."""


class ServerConfig(_Frozen):
    """Everything `collafuse server` needs."""

    listen: str = "127.0.0.1:50051"
    """HOST:PORT to listen on; port 0 picks a free one."""
    data_dir: Path = Path("collafuse-server")
    """Where the pool, checkpoints and logs live."""
    init_from: Path | None = None
    """A model folder from `collafuse export` to start from while data_dir holds no checkpoint:
    its weights become the model and EMA weights at step 0. It must match this schedule, image
    shape, model and policy.max_clients, or the server refuses to start. Once the server has a
    checkpoint of its own, that wins and the folder is ignored (the log says so)."""
    insecure: bool = False
    """Serve plaintext gRPC (loopback and tests only); otherwise TLS from tls_cert/tls_key."""
    tls_cert: Path | None = None
    """PEM certificate chain for TLS."""
    tls_key: Path | None = None
    """PEM private key for TLS."""
    tls_client_ca: Path | None = None
    """PEM certificate of the CA that issues client certificates (`collafuse pki init`). When
    set, every client must present a certificate it signed (mutual TLS); the certificate's
    common name is the caller's identity."""
    tls_revoked: Path | None = None
    """Denylist of revoked certificates (`collafuse pki revoke`): sha256 fingerprints, one a
    line. Re-read whenever the file changes, so a revocation needs no restart."""
    allow_insecure_remote: bool = False
    """Allow `insecure` on an address other than loopback (a private test network only)."""
    auth_tokens: Path | None = None
    """TOML file of `client_id = "sha256:<hex>"` lines (from `collafuse token`), or tables
    `[client_id]` with `hash` and an optional `expires` date-time. When set, every call must
    carry its client's token as call credentials and may act only as that client. Re-read on
    SIGHUP."""
    admins: tuple[str, ...] = ()
    """Identities (certificate names or token owners) that may read every client's status."""
    metrics_listen: str = ""
    """HOST:PORT of a Prometheus /metrics endpoint (plain HTTP, no authentication); empty
    serves none, port 0 picks a free one. It names clients and their pool sizes, so it must
    be a loopback address unless metrics_allow_remote is set."""
    metrics_allow_remote: bool = False
    """Allow metrics_listen on an address other than loopback (behind a firewall that admits
    only the Prometheus scraper)."""
    device: DeviceName = "auto"
    """Where the model runs: auto takes the first GPU when one is usable and the CPU otherwise
    (with a warning), cpu, cuda (the first GPU) or cuda:N (GPU N); cuda and cuda:N refuse to
    start without that GPU."""
    threads: int = Field(default=0, ge=0)
    """torch CPU threads; 0 keeps torch's default."""
    schedule: ScheduleConfig = ScheduleConfig()
    """The noise schedule."""
    image: ImageConfig = ImageConfig()
    """The image shape clients must register with."""
    model: UNetConfig = SERVER_UNET
    """The shared denoiser."""
    train: ServerTrainConfig = ServerTrainConfig()
    """Training of the shared denoiser."""
    policy: PolicyConfig = PolicyConfig()
    """Privacy and quota policy."""
    sampler: SamplerConfig = SamplerConfig()
    """Synthesis batching."""
    limits: LimitsConfig = LimitsConfig()
    """Per-caller limits."""

    @model_validator(mode="after")
    def _transport(self) -> ServerConfig:
        tls = [n for n in ("tls_cert", "tls_key", "tls_client_ca") if getattr(self, n)]
        if self.insecure and tls:
            raise ValueError(
                f"insecure contradicts {', '.join(tls)}: choose plaintext (--insecure) or TLS"
            )
        if self.insecure and not self.allow_insecure_remote and not is_loopback(self.listen):
            raise ValueError(
                f"insecure (plaintext) serving is for loopback only, and {self.listen} is not "
                "loopback: use TLS, or also set allow_insecure_remote on a private test network"
            )
        return self

    @model_validator(mode="after")
    def _metrics(self) -> ServerConfig:
        check_metrics_listen(self.metrics_listen, self.metrics_allow_remote)
        return self


class DataConfig(_Frozen):
    """Where a client's images come from and which share of them it holds."""

    source: Literal["fashion-mnist", "digits", "folder", "cifar10", "celeba", "awa2"] = (
        "fashion-mnist"
    )
    """fashion-mnist (Debian package files), digits (scikit-learn), a folder of images, or
    CIFAR-10, CelebA or AwA2 read from path in the data set's own layout."""
    path: Path | None = None
    """Directory of the data: the IDX files for fashion-mnist, the images for folder;
    cifar-10-batches-py (or its parent) for cifar10; the folder holding img_align_celeba/ and
    list_attr_celeba.txt for celeba; Animals_with_Attributes2 (or its parent) for awa2."""
    partition: Literal["iid", "classes", "dirichlet"] = "classes"
    """How the data set is split across clients."""
    num_clients: int = Field(default=1, ge=1)
    """Number of clients the data set is split across."""
    client_index: int = Field(default=0, ge=0)
    """Which share this client holds."""
    classes: tuple[int, ...] | None = None
    """For partition=classes: the classes this client holds; default deals classes round-robin."""
    alpha: float = Field(default=0.5, gt=0)
    """Dirichlet concentration for partition=dirichlet (small = more skewed)."""
    limit: int = Field(default=0, ge=0)
    """Keep at most this many images (0 keeps all)."""
    seed: int = 0
    """Seed of the partition, shared by all clients of one federation."""
    split_attributes: tuple[str, ...] | None = None
    """For celeba: attributes that make the classes, e.g. ["Black_Hair", "Blond_Hair",
    "Brown_Hair", "Gray_Hair"]. An image's class is the first listed attribute it has; images
    with none are dropped. With partition=classes each client holds one attribute, client i
    the images of split_attributes[i], as in the CollaFuse paper. Unset, the labels are those
    four hair colours (-1 for none) and the partition must be iid or dirichlet."""

    @model_validator(mode="after")
    def _index(self) -> DataConfig:
        if self.client_index >= self.num_clients:
            raise ValueError(f"client_index {self.client_index} >= num_clients {self.num_clients}")
        return self

    @model_validator(mode="after")
    def _attributes(self) -> DataConfig:
        names = self.split_attributes
        if names is None:
            return self
        if self.source != "celeba":
            raise ValueError(f"split_attributes applies to source celeba, not {self.source}")
        if not names or len(set(names)) != len(names):
            raise ValueError("split_attributes must name at least one attribute, each once")
        if self.partition == "classes" and self.classes is None and len(names) != self.num_clients:
            raise ValueError(
                f"split_attributes names {len(names)} attributes for {self.num_clients} clients; "
                "with partition=classes each client holds the images of one attribute"
            )
        return self


class ClientTrainConfig(_Frozen):
    """How the client trains its small denoiser on t <= t_cut."""

    steps: int = Field(default=600, ge=0)
    """Training steps in total (resumed across restarts)."""
    batch_size: int = Field(default=64, ge=1, le=4096)
    """Images per step."""
    lr: float = Field(default=1e-3, gt=0, le=1)
    """AdamW learning rate."""
    ema_decay: float = Field(default=0.99, ge=0, lt=1)
    """Decay of the EMA weights used for synthesis."""
    checkpoint_every: int = Field(default=100, ge=1)
    """Write an atomic checkpoint every this many steps."""
    seed: int = 0
    """Seed of the local trainer."""


class SynthConfig(_Frozen):
    """Defaults for `collafuse client synthesize`."""

    sampler: SamplerKind = "ddim"
    """Sampler on both halves of the chain."""
    server_steps: int = Field(default=50, ge=0)
    """Steps the server takes from T to t_cut (0 = every timestep)."""
    client_steps: int = Field(default=0, ge=0)
    """Steps the client takes from t_cut to 0 (0 = every timestep)."""
    eta: float = Field(default=0.0, ge=0, le=1)
    """DDIM eta."""
    mixture: bool = False
    """Ask the server for the mixture of all clients instead of this client's distribution."""
    patience_s: float = Field(default=300.0, gt=0)
    """How long synthesis waits for a server that restarts or stops answering (without any
    progress) before it gives up; a broken stream resumes from the samples it already has."""


class ClientConfig(_Frozen):
    """Everything `collafuse client` needs."""

    client_id: Annotated[str, Field(pattern=CLIENT_ID_PATTERN)] = "client-0"
    """Stable id of this client."""
    server: str = "127.0.0.1:50051"
    """HOST:PORT of the CollaFuse server."""
    insecure: bool = False
    """Talk plaintext gRPC (loopback and tests only); otherwise TLS, trusting tls_ca."""
    tls_ca: Path | None = None
    """PEM root certificates to trust; default is the system's."""
    tls_cert: Path | None = None
    """PEM certificate of this client (from `collafuse pki issue`), for mutual TLS."""
    tls_key: Path | None = None
    """PEM private key of tls_cert; must not be readable by group or others."""
    auth_token_file: Path | None = None
    """File holding this client's token, for servers that require one; keep it private."""
    state_dir: Path = Path("collafuse-client")
    """Where the secret, ledger, checkpoints and status live."""
    init_from: Path | None = None
    """A client model folder from `collafuse export` to start local training from while
    state_dir holds no checkpoint. It must match the server's schedule, this image shape and
    model, and this client's t_cut; a mismatch is refused before anything is uploaded. Once the
    client has a checkpoint of its own, that wins and the folder is ignored (the log says so)."""
    cut_ratio: float = Field(default=0.5, gt=0, lt=1)
    """Share c of the chain run on the client: t_cut = round(c * T). The default 0.5 releases at
    SNR 0.085 on the linear T=1000 schedule, inside the default max_release_snr; at 0.3 (SNR 0.66)
    the CPU study's attacker re-identified 77-86% of the training images, at 0.5 6%."""
    max_release_snr: float = Field(default=0.1, gt=0)
    """The largest SNR abar/(1-abar) this client will ever release, whatever a server says: it
    computes its own t_cut from the schedule it verified and refuses to upload when that cut's
    SNR is higher. The default 0.1 (cut_ratio >= 0.486 at T=1000, linear) matches the server's
    policy default, for the reason given there (PolicyConfig.max_release_snr)."""
    exposure: Literal["fixed"] = "fixed"
    """fixed: each image is released once, at t_cut, however long training runs."""
    image: ImageConfig = ImageConfig()
    """Image shape; must match the server's."""
    data: DataConfig = DataConfig()
    """The local data."""
    model: UNetConfig = CLIENT_UNET
    """The small local denoiser."""
    train: ClientTrainConfig = ClientTrainConfig()
    """Local training."""
    synth: SynthConfig = SynthConfig()
    """Synthesis defaults."""
    upload_chunk_bytes: int = Field(default=1 << 20, ge=1024)
    """Target size of one upload message."""
    threads: int = Field(default=0, ge=0)
    """torch CPU threads; 0 keeps torch's default."""
    exit_when_done: bool = False
    """Exit once the upload and local training are done instead of staying connected."""
    heartbeat_s: float = Field(default=5.0, gt=0)
    """Seconds between status checks while idle."""
    max_backoff_s: float = Field(default=10.0, gt=0)
    """Longest wait between reconnect attempts."""
    metrics_listen: str = ""
    """HOST:PORT of a Prometheus /metrics endpoint of the daemon (plain HTTP, no
    authentication); empty serves none, port 0 picks a free one. Loopback only unless
    metrics_allow_remote is set."""
    metrics_allow_remote: bool = False
    """Allow metrics_listen on an address other than loopback."""

    @model_validator(mode="after")
    def _metrics(self) -> ClientConfig:
        check_metrics_listen(self.metrics_listen, self.metrics_allow_remote)
        return self


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT names this machine only (127.0.0.0/8, ::1 or localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_metrics_listen(listen: str, allow_remote: bool) -> None:
    """Refuse a metrics address that is not HOST:PORT, or not loopback without the opt-in."""
    if not listen:
        return
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics_listen {listen!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    if not allow_remote and not is_loopback(listen):
        # Plain HTTP without authentication, naming every client: an outsider must not read it.
        raise ValueError(
            f"metrics_listen {listen} is not loopback: the endpoint is unauthenticated HTTP; "
            "set metrics_allow_remote as well where a firewall admits only the scraper"
        )


M = TypeVar("M", bound=BaseModel)

# Environment variables that configure `collafuse server` and `collafuse client`. The prefix
# names the program because both configs have fields of the same name (insecure, tls_cert,
# train.batch_size, ...) and one shell often starts both (the demo does); nested fields are
# joined by a double underscore because field names hold single ones:
# COLLAFUSE_SERVER_TRAIN__BATCH_SIZE=32, COLLAFUSE_CLIENT_SERVER=10.0.0.5:50051.
ENV_PREFIXES: dict[type[BaseModel], str] = {
    ServerConfig: "COLLAFUSE_SERVER_",
    ClientConfig: "COLLAFUSE_CLIENT_",
}
ENV_NESTING = "__"

# The layers, lowest first; each overrides the ones before it.
Source = Literal["default", "file", "env", "flag"]


@dataclass(frozen=True)
class Origin:
    """Where a config value came from: the layer, and the file, variable or flag that set it."""

    source: Source
    detail: str = ""

    def describe(self) -> str:
        """In words, for error messages."""
        words = {
            "default": "the default",
            "file": "file",
            "env": "environment variable",
            "flag": "the command line",
        }[self.source]
        return f"{words} {self.detail}".strip()


DEFAULT = Origin("default")


@dataclass(frozen=True)
class LoadedConfig(Generic[M]):
    """A validated config and, for every field a layer above the defaults set, its origin."""

    config: M
    origins: dict[str, Origin]
    """Keyed by dotted field path (train.batch_size); a field not listed holds its default."""

    def origin(self, path: str) -> Origin:
        """Where the field at a dotted path came from."""
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            found = self.origins.get(".".join(parts[:n]))
            if found is not None:
                return found
        return DEFAULT


def _field_type(model: type[BaseModel], parts: list[str], what: str) -> Any:
    """The annotation of the field at `parts`; a ConfigError naming `what` if there is none."""
    node: Any = model
    for i, part in enumerate(parts):
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return Any  # inside a value that is not a config table: pydantic judges it
        field = node.model_fields.get(part)
        if field is None:
            raise ConfigError(f"{what}: {model.__name__} has no field {'.'.join(parts[: i + 1])!r}")
        node = field.annotation
    return node


def _members(annotation: Any) -> list[Any]:
    """The types a field admits, None excluded (X | None gives [X])."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return [a for a in args if a is not type(None)]


def _is_text(annotation: Any) -> bool:
    """Whether a field holds text: a string, a path or a choice of words."""

    def text(a: Any) -> bool:
        if get_origin(a) is Literal:
            return all(isinstance(v, str) for v in get_args(a))
        return a is str or (isinstance(a, type) and issubclass(a, PurePath))

    members = _members(annotation)
    return bool(members) and all(text(a) for a in members)


def _parse_value(text: str, annotation: Any = Any) -> Any:
    """Read a value from a flag or the environment for a field of the given type.

    Text fields take the text as it is unless it is quoted, so `client_id=123` stays a string;
    other fields read it as a TOML value (numbers, booleans, arrays such as [32, 64]), falling
    back to the text, which pydantic then converts to the field's type or refuses. An empty
    value unsets a field that may be unset.
    """
    if not text and type(None) in get_args(annotation):
        return None
    if _is_text(annotation) and not text.startswith(("'", '"')):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _leaves(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _put(
    data: dict[str, Any], parts: list[str], value: Any, origins: dict[str, Origin], origin: Origin
) -> dict[str, Any]:
    """data with value at parts (copied along the path), and the origin of what it replaced."""
    out = dict(data)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    dotted = ".".join(parts)
    for key in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
        del origins[key]
    for leaf in _leaves(value) if isinstance(value, dict) else [()]:
        origins[".".join((*parts, *leaf))] = origin
    return out


def env_settings(model: type[BaseModel], env: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """The variables of `env` that set fields of `model`, with the field path each names."""
    prefix = ENV_PREFIXES.get(model)
    if prefix is None:
        return []
    out = []
    for name in sorted(env):
        if not name.startswith(prefix):
            continue
        parts = [p.lower() for p in name[len(prefix) :].split(ENV_NESTING)]
        if not all(parts):
            raise ConfigError(
                f"environment variable {name}: expected {prefix}FIELD or "
                f"{prefix}SECTION{ENV_NESTING}FIELD"
            )
        out.append((name, parts))
    return out


def _explain(exc: ValidationError, origins: dict[str, Origin]) -> str:
    """One line per problem, naming the layer (file, variable, flag) that set the bad value."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        origin = None
        for n in range(len(loc), 0, -1):
            origin = origins.get(".".join(loc[:n]))
            if origin is not None:
                break
        line = f"  {'.'.join(loc) or 'config'}: {err['msg']}"
        if origin is not None:
            line += f" (got {err['input']!r} from {origin.describe()})"
        lines.append(line)
    return "\n".join(lines)


def load_config_layers(
    model: type[M],
    path: Path | None = None,
    overrides: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedConfig[M]:
    """Load a config with the origin of every value: defaults < TOML file < env < flags.

    `overrides` are `key.path=value` flags (`--set`, and the dedicated flags after them);
    `env` is the process environment for `collafuse server` and `collafuse client` (variables
    named by ENV_PREFIXES), None for callers that configure from files and flags alone.
    """
    data: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        origins = {".".join(leaf): Origin("file", str(path)) for leaf in _leaves(data)}
    environ = env or {}
    for name, parts in env_settings(model, environ):
        annotation = _field_type(model, parts, f"environment variable {name}")
        value = _parse_value(environ[name].strip(), annotation)
        data = _put(data, parts, value, origins, Origin("env", name))
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        parts = key.strip().split(".")
        annotation = _field_type(model, parts, f"override {item!r}")
        data = _put(
            data, parts, _parse_value(text.strip(), annotation), origins, Origin("flag", item)
        )
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n{_explain(exc, origins)}") from None
    return LoadedConfig(config, origins)


def load_config(
    model: type[M],
    path: Path | None = None,
    overrides: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> M:
    """Load a config model from an optional TOML file, the environment and `key=value` flags."""
    return load_config_layers(model, path, overrides, env).config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (str, PurePath)):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def config_toml(loaded: LoadedConfig[Any]) -> str:
    """The effective config as TOML, every field filled, each line commented with its origin.

    Reading the output back gives the same config; unset fields appear as comments.
    """
    name = type(loaded.config).__name__
    prefix = ENV_PREFIXES.get(type(loaded.config), "")
    lines = [
        f"# effective {name}; each value's origin, where later layers win: "
        "default < file < env < flag",
    ]
    if prefix:
        lines.append(f"# env: {prefix}FIELD, {prefix}SECTION{ENV_NESTING}FIELD")
    lines.append("")

    def table(obj: BaseModel, path: tuple[str, ...]) -> None:
        rows: list[tuple[str, str]] = []
        subtables = []
        for field in type(obj).model_fields:
            value = getattr(obj, field)
            if isinstance(value, BaseModel):
                subtables.append((field, value))
                continue
            origin = loaded.origin(".".join((*path, field)))
            note = f"# {origin.source}" + (f" {origin.detail}" if origin.detail else "")
            if value is None:
                rows.append((f"# {field} = (unset)", note))
            else:
                rows.append((f"{field} = {_toml_value(value)}", note))
        width = max((len(r[0]) for r in rows), default=0)
        lines.extend(f"{text.ljust(width)}  {note}" for text, note in rows)
        for field, value in subtables:
            lines.extend(["", f"[{'.'.join((*path, field))}]"])
            table(value, (*path, field))

    table(loaded.config, ())
    return "\n".join(lines) + "\n"


def config_record(config: BaseModel) -> dict[str, Any]:
    """What a checkpoint stores about how it was made: the config and the code version."""
    return {"config": config.model_dump(mode="json"), "code_version": __version__}
