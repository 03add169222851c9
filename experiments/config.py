"""Configuration of a study (`collafuse experiment --config experiments/NAME.toml`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from collafuse.common.config import DeviceName, UNetConfig

ArmKind = Literal[
    "local", "local-size", "local-flops", "centralised", "fedavg", "collafuse", "heuristic"
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class StudyData(_Frozen):
    """The data and how it is split; every arm sees the same split."""

    source: Literal["fashion-mnist", "digits", "folder", "cifar10", "celeba", "awa2"] = (
        "fashion-mnist"
    )
    """Where the images come from (see DataConfig)."""
    path: Path | None = None
    """Data directory for sources that need one."""
    image_size: int = Field(default=28, ge=8, le=256)
    """Images are resized to this square size."""
    channels: int = Field(default=1, ge=1, le=3)
    """Colour channels."""
    num_clients: int = Field(default=3, ge=2, le=10)
    """Clients in the federation."""
    partitions: tuple[Literal["classes", "iid"], ...] = ("classes",)
    """Splits to study: by class (non-IID) and/or IID."""
    train_per_client: int = Field(default=500, ge=8)
    """Training images per client."""
    test_per_client: int = Field(default=200, ge=8)
    """Held-out images per client: the reference for FID/KID, the distractors for re-id and the
    non-members of the membership attack."""


class StudyModels(_Frozen):
    """Network sizes of each role."""

    server: UNetConfig = UNetConfig(block_out_channels=(16, 32, 32), attention_levels=())
    """The shared server denoiser (CollaFuse and heuristic arms)."""
    clients: dict[str, UNetConfig] = {
        "s": UNetConfig(block_out_channels=(8, 16), attention_levels=(), norm_num_groups=4)
    }
    """The client sizes the study sweeps, by a short name used in arm keys: every CollaFuse arm
    and both equal-cost baselines run once per size. The heuristic ablation uses the first."""
    full: UNetConfig = UNetConfig(block_out_channels=(16, 32, 32), attention_levels=())
    """The full-chain model of the local-only, centralised and FedAvg arms, and of local-only at
    the client's training FLOPs."""

    @model_validator(mode="after")
    def _named(self) -> StudyModels:
        if not self.clients:
            raise ValueError("models.clients needs at least one client size")
        for name in self.clients:
            if not name.isidentifier() or "-" in name:
                raise ValueError(f"client size names must be short identifiers, not {name!r}")
        return self


class StudyTrain(_Frozen):
    """Training budgets in epochs: every arm passes over each image equally often, so a model
    that sees the pooled data (centralised, the CollaFuse server) takes num_clients times the
    steps of one that sees one client's share."""

    epochs: float = Field(default=20.0, gt=0)
    """Passes over its data for every full-size model: local-only, centralised, FedAvg (in
    total) and the server of the split arms."""
    client_epochs: float = Field(default=20.0, gt=0)
    """Passes over its own data for each client's small model (CollaFuse, heuristic)."""
    fedavg_rounds: int = Field(default=10, ge=1)
    """FedAvg rounds; the local steps are spread evenly over them."""
    batch_size: int = Field(default=32, ge=1)
    """Batch size everywhere."""
    lr: float = Field(default=1e-3, gt=0)
    """AdamW learning rate everywhere."""


class StudyEval(_Frozen):
    """How images are generated and scored."""

    samples_per_client: int = Field(default=100, ge=4)
    """Images generated per client and arm."""
    sampler: Literal["ddpm", "ddim"] = "ddim"
    """Sampler on both halves of the chain."""
    steps: int = Field(default=50, ge=0)
    """Sampling steps over the whole chain (0 = every timestep). Split arms give each side a
    share proportional to its part of the chain, so every arm has the same sampling budget."""
    kid_subset_size: int = Field(default=50, ge=2)
    """Images per KID subset of the optional Inception scores (classifier-feature KID uses every
    image at once)."""
    bootstrap: int = Field(default=200, ge=10)
    """Bootstrap resamples behind every interval (FID, KID, attack figures)."""
    level: float = Field(default=0.95, gt=0.5, lt=1)
    """Coverage of the intervals."""
    membership_timesteps: int = Field(default=8, ge=1, le=64)
    """Timesteps per image of the loss-threshold membership attack: evenly spread over the
    lowest 30% of the chain the attacked model owns."""
    few_client_steps: int = Field(default=0, ge=0, le=1000)
    """When above 0, every CollaFuse arm also finishes each client's chain in this many steps
    with DDIM, DDPM and Analytic-DPM from the same hand-off (variance from the client's own
    images), and with DDPM and Analytic-DPM on both halves (the server's drawn again, its
    variance from the cut images it holds), and reports their pooled FIDs. It adds figures
    only: no model changes, so it is not part of the digest that keys finished arms."""


class ExperimentConfig(_Frozen):
    """One study: arms x partitions x cut ratios on one data set, with shared seeds."""

    name: str = "study"
    """Name printed in the report."""
    seed: int = 0
    """Seed of the client split and the clients' secrets, shared by every arm and seed."""
    seeds: tuple[int, ...] = Field(default=(0,), min_length=1)
    """Training and sampling seeds: every arm runs with the first; the key arms with each."""
    key_arms: tuple[str, ...] = ()
    """Arms (keys without partition, as in `local`, `local-size-s`, `collafuse-0.5-s`) repeated
    with every seed in `seeds`."""
    num_timesteps: int = Field(default=100, ge=21, le=4000)
    """T."""
    beta_schedule: Literal["linear", "cosine"] = "linear"
    """Noise schedule."""
    device: DeviceName = "auto"
    """Where models run: auto, cpu, cuda or cuda:N."""
    threads: int = Field(default=0, ge=0)
    """torch CPU threads (0 keeps the default)."""
    arms: tuple[ArmKind, ...] = (
        "local",
        "local-size",
        "local-flops",
        "centralised",
        "fedavg",
        "collafuse",
        "heuristic",
    )
    """Which arms to run. `local-size`: local-only with the client's network and training steps
    (equal client FLOPs, same model); `local-flops`: local-only with the full-size network, given
    the CollaFuse client's training FLOPs."""
    cut_ratios: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    """Cut ratios of the CollaFuse arm."""
    heuristic_cut_ratios: tuple[float, ...] = (0.4,)
    """Cut ratios of the paper's heuristic ablation."""
    data: StudyData = StudyData()
    """Data and split."""
    models: StudyModels = StudyModels()
    """Network sizes."""
    train: StudyTrain = StudyTrain()
    """Training budgets."""
    eval: StudyEval = StudyEval()
    """Generation and scoring."""

    @model_validator(mode="after")
    def _ratios(self) -> ExperimentConfig:
        for c in (*self.cut_ratios, *self.heuristic_cut_ratios):
            if not 0 < c < 1:
                raise ValueError(f"cut ratios must lie in (0, 1), got {c}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        return self

    def digest(self) -> str:
        """A hash of everything shared by all arms that changes results.

        The lists of arms (kinds, cut ratios, client sizes, seeds, key arms) are left out, so
        adding a cut or a client size does not redo the arms already finished; what one arm
        depends on beyond this (its cut, size, seed) is in its key and `arm_digest`.
        """
        text = json.dumps(
            self.model_dump(
                mode="json",
                exclude={
                    "name": True,
                    "threads": True,
                    "arms": True,
                    "cut_ratios": True,
                    "heuristic_cut_ratios": True,
                    "seeds": True,
                    "key_arms": True,
                    "models": {"clients"},
                    "eval": {"few_client_steps"},
                },
            ),
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def arm_digest(self, key: str, client: str | None) -> str:
        """The digest of one arm: the shared digest, its key and its client network, if any."""
        size = self.models.clients[client].model_dump_json() if client is not None else ""
        text = f"{self.digest()}|{key}|{size}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]
