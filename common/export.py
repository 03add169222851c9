"""Models out of checkpoints into diffusers folders with a collafuse.json, and warm starts back in.

An export folder holds one model:

    OUT/unet/config.json                              UNet2DModel.save_pretrained, safetensors
    OUT/unet/diffusion_pytorch_model.safetensors
    OUT/collafuse.json                                ExportManifest: schedule, role, shapes, source

`UNet2DModel.from_pretrained("OUT/unet")` loads it in any diffusers program; `collafuse.json`
says what the network means: the schedule it was trained on (and its hash), the timesteps it
denoises, what its labels stand for, and which checkpoint it came from. The weights are the EMA
weights, the ones that serve synthesis. A server or client daemon with `init_from = "OUT"` starts
from the folder when it has no checkpoint of its own, after checking that the folder fits its
configuration (`warm_start_state`).

This module imports neither the server nor the client: both sides use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from collafuse import __version__
from collafuse.common.checkpoint import CheckpointError, checkpoint_files, load_latest
from collafuse.common.config import (
    ClientConfig,
    ConfigError,
    ImageConfig,
    ScheduleConfig,
    ServerConfig,
    UNetConfig,
)
from collafuse.common.diffusion import Diffusion
from collafuse.common.nets import build_unet

log = logging.getLogger("collafuse.export")

FORMAT: Final = "collafuse-model"
FORMAT_VERSION = 1
"""Bumped when collafuse.json changes in a way an older reader would misread."""
MANIFEST = "collafuse.json"
UNET_DIR = "unet"
SERVER_CHECKPOINT = Path("checkpoints") / "server.pt"
"""Where a server keeps its checkpoint under its data_dir (server/app.py)."""
CLIENT_CHECKPOINT = Path("checkpoints") / "client.pt"
"""Where a client daemon keeps its checkpoint under its state_dir (client/daemon.py)."""

Role = Literal["server", "client"]


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported (damaged, incomplete); the message names the file."""


class WarmStartError(ConfigError):
    """A model folder that cannot be used to start from; the message says what differs."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Conditioning(_Record):
    """What the model's labels (diffusers `class_labels`) stand for."""

    num_class_embeds: int | None
    """Rows of the label embedding; None for a model that takes no labels."""
    unconditional_label: int | None
    """The label that stands for no particular client: it samples the mixture of all clients."""
    meaning: str
    """What a label is, in words."""
    trained_labels: tuple[int, ...] = ()
    """Labels whose data the model was trained on."""


class Source(_Record):
    """The checkpoint the weights came from."""

    kind: Literal["server-checkpoint", "client-checkpoint"]
    path: str
    """The checkpoint file, as given to the export."""
    step: int = Field(ge=0)
    """Training step of the checkpoint."""
    sha256: str
    """sha256 of the checkpoint file as it lay on disk (what `sha256sum` prints)."""
    checksum_verified: bool
    """True when the sha256 recorded inside the checkpoint was checked; False for a file from
    before checkpoints carried one (its zip CRC-32s were checked instead)."""
    code_version: str | None
    """The CollaFuse version that wrote the checkpoint."""
    weights: Literal["ema"] = "ema"
    """Which weights of the checkpoint: the EMA weights, which serve synthesis."""


class ExportManifest(_Record):
    """collafuse.json: what an exported network is and where it came from."""

    format: Literal["collafuse-model"] = FORMAT
    format_version: int = FORMAT_VERSION
    role: Role
    """server: the shared denoiser of the high-noise part; client: a client's low-noise part."""
    prediction: Literal["epsilon"] = "epsilon"
    """The network predicts the noise eps of x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    schedule: ScheduleConfig
    """The DDPM schedule it was trained on."""
    schedule_hash: str
    """`common/diffusion.py` schedule_hash of the schedule's betas."""
    image: ImageConfig
    image_shape: tuple[int, int, int]
    """(C, H, W) of x_t, in [-1, 1] at t = 0."""
    unet: UNetConfig
    """The CollaFuse network size; unet/config.json is the diffusers form of the same."""
    t_range: tuple[int, int]
    """(low, high), both included: the timesteps the network was trained to denoise. A client:
    (1, t_cut). A server: (min_t_cut + 1, T); each client's share of it starts above that
    client's own cut."""
    t_cut: int
    """A client: its cut, where the server's chain hands over. A server: the lowest cut its
    privacy policy admits (max_release_snr)."""
    cut_ratio: float | None
    """A client: its cut ratio c, t_cut = round(c * T). None for a server."""
    max_release_snr: float | None
    """A server: its policy's bound on a cut's SNR. A client: its own bound."""
    conditioning: Conditioning
    source: Source
    files: dict[str, str] = {}
    """sha256 of every file under the folder but collafuse.json, by relative path; a warm start
    checks them, so an edited or damaged folder is refused."""
    exported_at: str
    """UTC time of the export, ISO 8601."""
    code_version: str = __version__
    """The CollaFuse version that wrote the export."""


# ----- reading checkpoints -----------------------------------------------------------------


@dataclass(frozen=True)
class _Checkpoint:
    state: dict[str, Any]
    sha256: str
    verified: bool


def _read_checkpoint(path: Path, role: Role) -> _Checkpoint:
    """Read, verify (sha256, zip, weights-only unpickling) and unpack one checkpoint file.

    The bytes are read once and verified from a private copy, so a server that rotates its
    checkpoints meanwhile cannot make the recorded sha256 describe another file than the one
    exported; `load_latest` on the copy sees no older generation to fall back on.
    """
    if not path.is_file():
        raise ConfigError(f"no {role} checkpoint at {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror}") from None
    older = [p.name for p in checkpoint_files(path)[1:]]
    remedy = (
        f"export an older generation instead ({', '.join(older)}), or restore {path} from a backup"
        if older
        else f"restore {path} from a backup"
    )
    with tempfile.TemporaryDirectory(prefix="collafuse-export-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_bytes(data)
        try:
            loaded = load_latest(copy, remedy)
        except CheckpointError as exc:
            raise ExportError(str(exc).replace(str(copy), str(path))) from None
    assert loaded is not None  # the copy exists
    return _Checkpoint(loaded.state, hashlib.sha256(data).hexdigest(), loaded.verified)


def _section(record: Mapping[str, Any], name: str, model: type[BaseModel], path: Path) -> Any:
    try:
        return model.model_validate(record[name])
    except (KeyError, TypeError, ValidationError) as exc:
        raise ExportError(
            f"{path} records no usable {name} configuration ({type(exc).__name__}); it was "
            "written by another version of CollaFuse"
        ) from None


def _checked_schedule(
    state: Mapping[str, Any], config: Mapping[str, Any], path: Path
) -> tuple[ScheduleConfig, Diffusion]:
    """The recorded schedule, after checking that it hashes to the recorded hash."""
    schedule = _section(config, "schedule", ScheduleConfig, path)
    diffusion = Diffusion.from_config(schedule)
    if state.get("schedule_hash") != diffusion.hash:
        raise ExportError(
            f"{path} records schedule hash {state.get('schedule_hash')}, but the schedule it "
            f"describes hashes to {diffusion.hash} here: it was written by an incompatible "
            "version of CollaFuse"
        )
    return schedule, diffusion


def _ema_unet(
    state: Mapping[str, Any], unet: UNetConfig, image: ImageConfig, labels: int | None, path: Path
) -> nn.Module:
    model = build_unet(unet, image, num_class_embeds=labels)
    try:
        model.load_state_dict(state["ema"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"the EMA weights in {path} do not fit the network its configuration names: {first}"
        ) from None
    return model.eval().requires_grad_(False)


def _source(
    kind: Literal["server-checkpoint", "client-checkpoint"],
    path: Path,
    step: int,
    ckpt: _Checkpoint,
    version: str | None,
) -> Source:
    """The manifest's record of the checkpoint the weights came from."""
    return Source(
        kind=kind,
        path=str(path),
        step=step,
        sha256=ckpt.sha256,
        checksum_verified=ckpt.verified,
        code_version=version,
    )


def _config_record(state: Mapping[str, Any], path: Path) -> tuple[Mapping[str, Any], str | None]:
    record = state.get("record")
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict):
        raise ExportError(f"{path} holds no configuration record; it is not a CollaFuse model")
    version = record.get("code_version") if isinstance(record, dict) else None
    return config, version if isinstance(version, str) else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def server_model(path: Path) -> tuple[nn.Module, ExportManifest]:
    """The EMA network of a server checkpoint and the manifest describing it (files empty).

    `path` is a checkpoint file (DATA_DIR/checkpoints/server.pt or an older generation
    server.pt.1) or a server's data dir.
    """
    if path.is_dir():
        path = path / SERVER_CHECKPOINT
    ckpt = _read_checkpoint(path, "server")
    state = ckpt.state
    if "t_cut" in state:
        raise ConfigError(f"{path} is a client checkpoint; export it with --client-state")
    config, version = _config_record(state, path)
    schedule, diffusion = _checked_schedule(state, config, path)
    image = _section(config, "image", ImageConfig, path)
    unet = _section(config, "model", UNetConfig, path)
    try:
        policy = config["policy"]
        max_clients = int(policy["max_clients"])
        max_snr = float(policy["max_release_snr"])
        step = int(state["step"])
        trained = tuple(sorted(int(k) for k in state.get("trained_since", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{path} is not a server checkpoint ({type(exc).__name__})") from None
    model = _ema_unet(state, unet, image, max_clients + 1, path)
    T = diffusion.num_timesteps
    min_cut = diffusion.equivalent_timestep(max_snr)
    manifest = ExportManifest(
        role="server",
        schedule=schedule,
        schedule_hash=diffusion.hash,
        image=image,
        image_shape=image.shape,
        unet=unet,
        t_range=(min(min_cut + 1, T), T),
        t_cut=min_cut,
        cut_ratio=None,
        max_release_snr=max_snr,
        conditioning=Conditioning(
            num_class_embeds=max_clients + 1,
            unconditional_label=max_clients,
            meaning="the index of the contributing client, in order of first registration on "
            f"the source server (0..{max_clients - 1}); {max_clients} is the unconditional "
            "token that samples the mixture of all clients",
            trained_labels=trained,
        ),
        source=_source("server-checkpoint", path, step, ckpt, version),
        exported_at=_now(),
    )
    return model, manifest


def client_model(path: Path) -> tuple[nn.Module, ExportManifest]:
    """The EMA network of a client checkpoint and the manifest describing it (files empty).

    `path` is a client's state_dir (the model is STATE_DIR/checkpoints/client.pt) or the
    checkpoint file itself.
    """
    if path.is_dir():
        path = path / CLIENT_CHECKPOINT
    ckpt = _read_checkpoint(path, "client")
    state = ckpt.state
    if "t_cut" not in state:
        raise ConfigError(f"{path} is a server checkpoint; export it with --server-checkpoint")
    config, version = _config_record(state, path)
    # A client learns its schedule from the server; the checkpoint keeps it beside the config.
    schedule, diffusion = _checked_schedule(state, {"schedule": state.get("schedule")}, path)
    image = _section(config, "image", ImageConfig, path)
    unet = _section(config, "model", UNetConfig, path)
    try:
        t_cut = int(state["t_cut"])
        step = int(state["step"])
        cut_ratio = float(config["cut_ratio"])
        max_snr = float(config["max_release_snr"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{path} is not a client checkpoint ({type(exc).__name__})") from None
    # Studies train label-conditioned client models; a daemon's model takes no labels.
    embedding = state.get("ema", {}).get("class_embedding.weight")
    labels = int(embedding.shape[0]) if isinstance(embedding, Tensor) else None
    model = _ema_unet(state, unet, image, labels, path)
    manifest = ExportManifest(
        role="client",
        schedule=schedule,
        schedule_hash=diffusion.hash,
        image=image,
        image_shape=image.shape,
        unet=unet,
        t_range=(1, t_cut),
        t_cut=t_cut,
        cut_ratio=cut_ratio,
        max_release_snr=max_snr,
        conditioning=Conditioning(
            num_class_embeds=labels,
            unconditional_label=None,
            meaning="none: the model takes no labels"
            if labels is None
            else "the local class label of each image",
        ),
        source=_source("client-checkpoint", path, step, ckpt, version),
        exported_at=_now(),
    )
    return model, manifest


# ----- writing folders ---------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder except the manifest, by POSIX relative path."""
    return {
        p.relative_to(folder).as_posix(): _sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    }


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace the export there")
    if not (out / MANIFEST).is_file():
        # --overwrite replaces an export, never a folder of something else.
        raise ConfigError(
            f"--out {out} is not empty and holds no {MANIFEST}, so it is not an export; "
            "--overwrite replaces only an earlier export: choose another --out"
        )


def write_export(
    model: nn.Module, manifest: ExportManifest, out: Path, *, overwrite: bool = False
) -> ExportManifest:
    """Write model and manifest into the folder `out`; returns the manifest with file hashes.

    The folder appears whole or not at all: it is written beside `out` and renamed into place
    (an earlier export at `out` is replaced only with overwrite). It is private (0700), like the
    state it came from: a client's model was trained on its raw images.
    """
    out = out.absolute()
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        unet: Any = model  # a diffusers UNet2DModel (build_unet)
        unet.save_pretrained(tmp / UNET_DIR, safe_serialization=True)
        manifest = manifest.model_copy(update={"files": _tree_hashes(tmp)})
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # onto nothing or an empty directory


def export_server(path: Path, out: Path, *, overwrite: bool = False) -> ExportManifest:
    """Export a server checkpoint's EMA model to the folder `out` (see server_model)."""
    model, manifest = server_model(path)
    return write_export(model, manifest, out, overwrite=overwrite)


def export_client(path: Path, out: Path, *, overwrite: bool = False) -> ExportManifest:
    """Export a client's EMA model to the folder `out` (see client_model)."""
    model, manifest = client_model(path)
    return write_export(model, manifest, out, overwrite=overwrite)


# ----- reading folders ---------------------------------------------------------------------


def read_manifest(folder: Path) -> ExportManifest:
    """The collafuse.json of an export folder; WarmStartError when there is none or it is bad."""
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise WarmStartError(
            f"{folder} is not a CollaFuse model folder: it has no {MANIFEST} "
            "(make one with `collafuse export`)"
        ) from None
    except OSError as exc:
        raise WarmStartError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except ValueError:
        raise WarmStartError(f"{path} is not valid JSON") from None
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        version = raw.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise WarmStartError(
                f"{path} has format version {version}; this CollaFuse reads up to "
                f"{FORMAT_VERSION}: upgrade it"
            )
    try:
        return ExportManifest.model_validate(raw)
    except ValidationError as exc:
        raise WarmStartError(f"{path} is not a CollaFuse model description:\n{exc}") from None


def verify_files(folder: Path, manifest: ExportManifest) -> None:
    """Check each file's sha256 against the manifest; WarmStartError names the first bad one."""
    if not manifest.files:
        raise WarmStartError(f"{folder / MANIFEST} lists no files to check")
    for rel, expected in sorted(manifest.files.items()):
        path = folder / rel
        try:
            actual = _sha256_file(path)
        except FileNotFoundError:
            raise WarmStartError(f"{path} is missing from the model folder") from None
        if actual != expected:
            raise WarmStartError(
                f"{path} does not match the sha256 in {MANIFEST}: the folder was edited or "
                "damaged; export it again"
            )


def _json(value: Any) -> Any:
    """Tuples become lists, so configs from a file and from code compare equal."""
    return json.loads(json.dumps(value))


def load_exported_unet(folder: Path) -> tuple[nn.Module, ExportManifest]:
    """The network of an export folder (eval mode, CPU) and its manifest, after checking both.

    Loads with `UNet2DModel.from_pretrained(..., local_files_only=True)`: from the folder and
    nothing else, never a download.
    """
    from diffusers import UNet2DModel

    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    labels = manifest.conditioning.num_class_embeds
    reference = cast(Any, build_unet(manifest.unet, manifest.image, num_class_embeds=labels))
    try:
        # low_cpu_mem_usage=False: the default asks for `accelerate`, which tiny models don't need.
        loaded = UNet2DModel.from_pretrained(
            str(folder / UNET_DIR), local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise WarmStartError(f"cannot load {folder / UNET_DIR}: {exc}") from None
    # unet/config.json must describe the network collafuse.json names; a hand-edited one might
    # keep every weight shape and still compute something else (e.g. attention_head_dim).
    differ = sorted(
        k
        for k in reference.config
        if not k.startswith("_") and _json(reference.config[k]) != _json(loaded.config.get(k))
    )
    if differ:
        raise WarmStartError(
            f"{folder / UNET_DIR / 'config.json'} does not describe the network in {MANIFEST} "
            f"({', '.join(differ)} differ)"
        )
    return cast(nn.Module, loaded).eval().requires_grad_(False), manifest


# ----- warm starts -------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmStartTarget:
    """What a model folder must match to start a server or a client from it."""

    role: Role
    schedule_hash: str
    image: ImageConfig
    unet: UNetConfig
    num_class_embeds: int | None
    t_cut: int | None = None
    """A client's own cut: its model must have been trained up to exactly there. None: no check."""


def server_target(config: ServerConfig, schedule_hash: str) -> WarmStartTarget:
    """What a server built from `config` needs: its network has max_clients + 1 labels."""
    return WarmStartTarget(
        "server", schedule_hash, config.image, config.model, config.policy.max_clients + 1
    )


def client_target(
    config: ClientConfig, schedule_hash: str, t_cut: int, num_class_embeds: int | None = None
) -> WarmStartTarget:
    """What a client with `config`, on the server's schedule at its own `t_cut`, needs."""
    return WarmStartTarget(
        "client", schedule_hash, config.image, config.model, num_class_embeds, t_cut
    )


def check_fits(manifest: ExportManifest, target: WarmStartTarget, folder: Path) -> None:
    """WarmStartError listing every way the folder's model differs from what the target needs."""
    problems: list[str] = []
    if manifest.role != target.role:
        problems.append(f"it holds a {manifest.role} model, this is a {target.role}")
    if manifest.schedule_hash != target.schedule_hash:
        problems.append(
            f"its schedule hash is {manifest.schedule_hash}, this {target.role}'s is "
            f"{target.schedule_hash} (the folder's schedule is "
            f"{manifest.schedule.model_dump(mode='json')})"
        )
    if manifest.image != target.image:
        problems.append(
            f"its image shape is {manifest.image_shape}, this {target.role}'s is "
            f"{target.image.shape}"
        )
    if manifest.unet != target.unet:
        problems.append(
            f"its model is {manifest.unet.model_dump(mode='json')}, this {target.role}'s is "
            f"{target.unet.model_dump(mode='json')}"
        )
    if manifest.conditioning.num_class_embeds != target.num_class_embeds:
        problems.append(
            f"it has {manifest.conditioning.num_class_embeds} label embeddings, this "
            f"{target.role} needs {target.num_class_embeds}"
            + (" (policy.max_clients + 1)" if target.role == "server" else "")
        )
    if target.t_cut is not None and manifest.t_cut != target.t_cut:
        problems.append(
            f"it was trained for t_cut={manifest.t_cut}, this client's cut is t_cut="
            f"{target.t_cut}: it would hand over at the wrong noise level"
        )
    if problems:
        raise WarmStartError(
            f"cannot start from {folder}: " + "; ".join(problems) + ". Use a folder exported "
            "from a model with the same configuration, or remove init_from"
        )


def warm_start_state(
    folder: Path, target: WarmStartTarget
) -> tuple[dict[str, Tensor], ExportManifest]:
    """The weights of a model folder that fits `target`, as a CPU state dict, and its manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WarmStartError(f"init_from {folder} is not a directory")
    check_fits(read_manifest(folder), target, folder)  # the cheap, clear refusal first
    model, manifest = load_exported_unet(folder)
    return model.state_dict(), manifest
