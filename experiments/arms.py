"""The study's arms: what each trains and samples, with the real server and client code.

No second implementation of the math: the server trains with the server's Trainer and samples
with its BatchingSampler; clients train with the client's LocalTrainer and finish the chain with
the client's finish_chain; baselines reuse LocalTrainer on the full chain.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from collafuse.client.daemon import compute_cuts
from collafuse.client.synth import finish_chain
from collafuse.client.trainer import LocalTrainer
from collafuse.common.config import (
    ClientConfig,
    ClientTrainConfig,
    DataConfig,
    ImageConfig,
    PolicyConfig,
    SamplerKind,
    ScheduleConfig,
    ServerConfig,
    ServerTrainConfig,
    UNetConfig,
)
from collafuse.common.data import LocalData, load_local_data
from collafuse.common.diffusion import Diffusion
from collafuse.common.nets import UNetDenoiser, build_unet
from collafuse.experiments.config import ExperimentConfig
from collafuse.experiments.cost import FlopBook, cost_record
from collafuse.experiments.scoring import Scorer
from collafuse.server.sampler import BatchingSampler
from collafuse.server.trainer import Trainer

# Arms run in this order: centralised first, because its model is also an attacker of the split
# arms; the equal-cost baselines before the split arms they are compared with.
ORDER = ("centralised", "local", "local-size", "local-flops", "fedavg", "collafuse", "heuristic")
SIZED = frozenset({"local-size", "local-flops", "collafuse", "heuristic"})


@dataclass(frozen=True)
class ClientShare:
    """One client's training and held-out images."""

    train: LocalData
    test: Tensor  # (M, C, H, W)


@dataclass(frozen=True)
class Arm:
    """One arm of the study: a kind, a split, and where it applies a cut, a client size, a seed."""

    kind: str
    partition: str
    cut_ratio: float | None = None
    client: str | None = None
    """Name of the client network (a key of models.clients) for sized arms."""
    seed: int = 0
    repeat: bool = False
    """A key arm run again with a later seed of `seeds`; its key carries the seed."""

    @property
    def name(self) -> str:
        """The arm without split and seed, as `key_arms` names it."""
        cut = f"-{self.cut_ratio:g}" if self.cut_ratio is not None else ""
        size = f"-{self.client}" if self.client is not None else ""
        return f"{self.kind}{cut}{size}"

    @property
    def key(self) -> str:
        """File-name-safe identifier."""
        seed = f"-s{self.seed}" if self.repeat else ""
        return f"{self.partition}-{self.name}{seed}"


def plan(config: ExperimentConfig) -> list[Arm]:
    """Every arm in the order they run; key arms again for each later seed."""
    first, later = config.seeds[0], config.seeds[1:]
    sizes = list(config.models.clients)
    arms: list[Arm] = []
    for partition in config.data.partitions:
        mine: list[Arm] = []
        for kind in ORDER:
            if kind not in config.arms:
                continue
            if kind == "collafuse":
                mine += [
                    Arm(kind, partition, c, s, first) for c in config.cut_ratios for s in sizes
                ]
            elif kind == "heuristic":
                mine += [
                    Arm(kind, partition, c, sizes[0], first) for c in config.heuristic_cut_ratios
                ]
            elif kind in SIZED:
                mine += [Arm(kind, partition, None, s, first) for s in sizes]
            else:
                mine.append(Arm(kind, partition, seed=first))
        names = {a.name for a in mine}
        unknown = [k for k in config.key_arms if k not in names]
        if unknown:
            raise ValueError(
                f"key_arms {unknown} name no planned arm; planned: {', '.join(sorted(names))}"
            )
        repeats = [
            Arm(a.kind, a.partition, a.cut_ratio, a.client, seed, repeat=True)
            for seed in later
            for a in mine
            if a.name in config.key_arms
        ]
        arms += mine + repeats
    return arms


def load_shares(config: ExperimentConfig, partition: str) -> list[ClientShare]:
    """Each client's share of the data, split into training and held-out images (seeded)."""
    d = config.data
    image = ImageConfig(channels=d.channels, size=d.image_size)
    shares = []
    for i in range(d.num_clients):
        local = load_local_data(
            DataConfig(
                source=d.source,
                path=d.path,
                partition=partition,  # type: ignore[arg-type]
                num_clients=d.num_clients,
                client_index=i,
                seed=config.seed,
            ),
            image,
        )
        need = d.train_per_client + d.test_per_client
        if len(local.ids) < need:
            raise ValueError(
                f"client {i} holds {len(local.ids)} images under partition={partition}; "
                f"the study needs {need} (train_per_client + test_per_client)"
            )
        order = torch.randperm(
            len(local.ids), generator=torch.Generator().manual_seed(config.seed + i)
        )
        tr, te = order[: d.train_per_client], order[d.train_per_client : need]
        train = LocalData(
            images=local.images[tr],
            labels=local.labels[tr],
            ids=[local.ids[int(k)] for k in tr],
            num_classes=local.num_classes,
        )
        shares.append(ClientShare(train, local.images[te]))
    return shares


@dataclass
class ServerSide:
    """The server's half of a split arm at one cut and seed, shared by every client size."""

    t_cut: int
    model: nn.Module
    """The server's EMA denoiser."""
    handoff: list[Tensor]
    """Per client, the server's samples at t_cut, (samples_per_client, C, H, W)."""
    steps: int
    train_s: float
    synth_s: float
    sampling_steps: int
    disclosure: dict[str, Any]
    trainer: Trainer
    """The resumed trainer: its hub serves the server's half again, and it draws Analytic-DPM's
    Gamma_t from the cut images it holds."""
    handoffs: dict[str, list[Tensor]] = field(default_factory=dict)
    """Per sampler, hand-offs drawn again with it (the few-step comparison), kept for the other
    client sizes at this cut."""


class ArmRunner:
    """Trains, samples and scores one arm at a time; work in progress lives under out/work."""

    def __init__(
        self,
        config: ExperimentConfig,
        out: Path,
        device: torch.device,
        scorer: Scorer,
        say: Callable[[str], None],
    ) -> None:
        self.config = config
        self.out = out
        self.device = device
        self.scorer = scorer
        self.say = say
        self.schedule = ScheduleConfig(
            num_timesteps=config.num_timesteps, beta_schedule=config.beta_schedule
        )
        self.diffusion = Diffusion.from_config(self.schedule)
        self.image = ImageConfig(channels=config.data.channels, size=config.data.image_size)
        self.flops = FlopBook(self.image, config.train.batch_size, config.num_timesteps)
        self._shares: dict[str, list[ClientShare]] = {}
        self._servers: dict[str, ServerSide] = {}

    @staticmethod
    def diffusion_of(config: ExperimentConfig) -> Diffusion:
        """The study's noise schedule."""
        return Diffusion.from_config(
            ScheduleConfig(num_timesteps=config.num_timesteps, beta_schedule=config.beta_schedule)
        )

    # ----- bookkeeping -----------------------------------------------------------------------

    def shares(self, partition: str) -> list[ClientShare]:
        """The split, loaded once per partition."""
        if partition not in self._shares:
            self._shares[partition] = load_shares(self.config, partition)
        return self._shares[partition]

    def work(self, name: str, digest: str) -> Path:
        """Checkpoints of work in progress (a stopped study resumes inside an arm too).

        A folder left by another config is emptied first: resuming its checkpoints would mix
        two configs' training.
        """
        path = self.out / "work" / name
        stamp = path / "digest.txt"
        if path.exists() and (not stamp.exists() or stamp.read_text() != digest):
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
        return path

    def run(self, arm: Arm, digest: str) -> dict[str, Any]:
        """Train, sample and score `arm`."""
        runners: dict[str, Callable[[Arm, Path], dict[str, Any]]] = {
            "local": self.arm_local,
            "local-size": self.arm_local_size,
            "local-flops": self.arm_local_flops,
            "centralised": self.arm_centralised,
            "fedavg": self.arm_fedavg,
            "collafuse": self.arm_collafuse,
            "heuristic": self.arm_heuristic,
        }
        return runners[arm.kind](arm, self.work(arm.key, digest))

    def _client_config(self, model: UNetConfig, steps: int, seed: int) -> ClientConfig:
        t = self.config.train
        return ClientConfig(
            image=self.image,
            model=model,
            train=ClientTrainConfig(
                steps=steps,
                batch_size=t.batch_size,
                lr=t.lr,
                checkpoint_every=max(1, steps // 4),
                seed=seed,
            ),
        )

    def _train_local(
        self,
        name: str,
        work: Path,
        model: UNetConfig,
        images: Tensor,
        t_cut: int,
        steps: int,
        seed: int,
        labels: Tensor | None = None,
        num_class_embeds: int | None = None,
        t_floor: int = 0,
    ) -> tuple[nn.Module, float]:
        """Train (or resume) one LocalTrainer; returns its EMA model and training seconds."""
        trainer = LocalTrainer(
            self._client_config(model, steps, seed),
            self.schedule,
            t_cut,
            work / f"{name}.pt",
            num_class_embeds=num_class_embeds,
            t_floor=t_floor,
        )
        every = max(1, steps // 4)

        def progress(step: int, loss: float) -> None:
            if step % every == 0:
                self.say(f"    {name}: step {step}/{steps} loss {loss:.4f}")

        trainer.train(images, progress=progress, labels=labels)
        trainer.save()
        return trainer.ema.eval(), trainer.seconds

    def _sample_full(
        self, model: nn.Module, n: int, seed: int, label: int | None
    ) -> tuple[Tensor, float]:
        """A full chain T..0 with one model (baselines)."""
        ev = self.config.eval
        gen = torch.Generator().manual_seed(seed)
        x_T = torch.randn((n, *self.image.shape), generator=gen)
        steps = self.diffusion.timesteps(self.config.num_timesteps, 0, ev.steps)
        labels = None if label is None else torch.full((n,), label, dtype=torch.long)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.diffusion.sample_loop(
                UNetDenoiser(
                    model.to(self.device), None if labels is None else labels.to(self.device)
                ),
                x_T.to(self.device),
                steps,
                ev.sampler,
                0.0,
                gen,
            )
        return out.cpu(), time.perf_counter() - started

    def _quality(self, arm: Arm, samples: list[Tensor]) -> dict[str, Any]:
        """FID/KID with intervals, and whether the samples copy training images."""
        shares = self.shares(arm.partition)
        tests = [s.test for s in shares]
        result = self.scorer.quality(arm.key, arm.partition, tests, samples, arm.seed)
        trains = [s.train.images for s in shares]
        result["copying"] = self.scorer.copying(samples, trains, tests, arm.seed + 41)
        return result

    def _few_step_samplers(
        self, arm: Arm, clients: list[nn.Module], server: ServerSide
    ) -> dict[str, Any]:
        """Pooled FID when every client finishes its chain in eval.few_client_steps steps.

        From the same hand-off: DDIM, DDPM and Analytic-DPM (Gamma_t from the client's own
        training images) on the client's half. And with the sampler on both halves: the
        server's half drawn again with DDPM and with Analytic-DPM (Gamma_t from the cut images
        it trained on), then the client's with the same sampler. What the sampler is worth at
        few client steps, and at the hand-off.
        """
        steps = self.config.eval.few_client_steps
        shares = self.shares(arm.partition)
        tests = [s.test for s in shares]
        out: dict[str, Any] = {"steps": steps}

        def finish(handoff: list[Tensor], kind: SamplerKind) -> list[Tensor]:
            return [
                finish_chain(
                    self.diffusion,
                    clients[i],
                    handoff[i],
                    server.t_cut,
                    steps,
                    kind,
                    0.0,
                    arm.seed + i,
                    images=shares[i].train.images,
                )
                for i in range(len(shares))
            ]

        kinds: tuple[SamplerKind, ...] = ("ddim", "ddpm", "analytic")
        for k, kind in enumerate(kinds):
            samples = finish(server.handoff, kind)
            out[kind] = self.scorer.pooled_fid(arm.partition, tests, samples, arm.seed + 50 + k)
        both: tuple[SamplerKind, ...] = ("ddpm", "analytic")
        for k, kind in enumerate(both):
            samples = finish(self._handoff(arm, server, kind), kind)
            out[f"{kind}_both"] = self.scorer.pooled_fid(
                arm.partition, tests, samples, arm.seed + 60 + k
            )
        return out

    def _handoff(self, arm: Arm, server: ServerSide, kind: SamplerKind) -> list[Tensor]:
        """The study's hand-off drawn again with `kind` (kept for the other client sizes)."""
        if kind not in server.handoffs:
            T = self.config.num_timesteps
            steps = self.diffusion.timesteps(T, server.t_cut, self._share(T - server.t_cut))
            server.handoffs[kind] = self._server_half(arm, server.trainer, steps, kind)
        return server.handoffs[kind]

    def _server_half(
        self, arm: Arm, trainer: Trainer, steps: list[int], kind: SamplerKind
    ) -> list[Tensor]:
        """Every client's x_{t_cut}: one request per client through the server's batching
        sampler at once, seeded per client; Analytic-DPM takes Gamma_t from the trainer's pool."""
        sampler = BatchingSampler(
            self.diffusion, trainer.hub, 4096, self.device, gamma_samples=trainer.gamma_samples
        )
        jobs = [
            sampler.submit(
                self.config.eval.samples_per_client,
                arm.seed + 100 + i,
                steps,
                kind,
                0.0,
                i,
                self.image.shape,
            )
            for i in range(len(self.shares(arm.partition)))
        ]
        sampler.start()
        try:
            for job_list in jobs:
                for job in job_list:
                    job.done.wait()
        finally:
            sampler.stop()
        return [torch.cat([_result(j) for j in group]).cpu() for group in jobs]

    def _steps(self, images: int, epochs: float) -> int:
        """Training steps for `epochs` passes over `images` images at the study's batch size."""
        return max(1, math.ceil(epochs * images / self.config.train.batch_size))

    def _share(self, span: int) -> int:
        """Sampling steps for `span` timesteps of the chain: its share of eval.steps."""
        total = self.config.eval.steps
        return 0 if total == 0 else max(1, round(total * span / self.config.num_timesteps))

    def _full_steps(self) -> int:
        """Sampling steps of a full chain."""
        T = self.config.num_timesteps
        return len(self.diffusion.timesteps(T, 0, self.config.eval.steps)) - 1

    def _secret(self, i: int) -> bytes:
        return hashlib.sha256(f"collafuse-study-{self.config.seed}-client-{i}".encode()).digest()

    def _pixels(self) -> int:
        return math.prod(self.image.shape)

    def client_steps(self) -> int:
        """Training steps of every client model of the split arms (and of local-size)."""
        return self._steps(self.config.data.train_per_client, self.config.train.client_epochs)

    # ----- local-only baselines ----------------------------------------------------------------

    def _local(self, arm: Arm, work: Path, model_cfg: UNetConfig, steps: int) -> dict[str, Any]:
        """Each client trains a full chain on its own data alone with `model_cfg` for `steps`."""
        cfg, T = self.config, self.config.num_timesteps
        samples, train_s, synth_s = [], 0.0, 0.0
        for i, share in enumerate(self.shares(arm.partition)):
            model, secs = self._train_local(
                f"client-{i}", work, model_cfg, share.train.images, T, steps, arm.seed + i
            )
            train_s += secs
            out, s = self._sample_full(model, cfg.eval.samples_per_client, arm.seed + 100 + i, None)
            samples.append(out)
            synth_s += s
        f = self.flops.of(model_cfg, None)
        result = self._quality(arm, samples)
        result["cost"] = cost_record(
            client_train=f.train_step * steps,
            server_train=0,
            client_synth=f.forward_one * self._full_steps(),
            server_synth=0,
            client_train_s=train_s / cfg.data.num_clients,
            synth_s=synth_s,
            bytes_up=0,
            bytes_down=0,
            client_train_steps=steps,
        )
        result["client_params"] = _params(model_cfg, self.image)
        result["disclosure"] = {"note": "nothing sent"}
        return result

    def arm_local(self, arm: Arm, work: Path) -> dict[str, Any]:
        """Local-only at full size: the full network for the full epochs."""
        cfg = self.config
        steps = self._steps(cfg.data.train_per_client, cfg.train.epochs)
        return self._local(arm, work, cfg.models.full, steps)

    def arm_local_size(self, arm: Arm, work: Path) -> dict[str, Any]:
        """Local-only with the client's network and steps: the CollaFuse client's FLOPs exactly."""
        assert arm.client is not None
        return self._local(arm, work, self.config.models.clients[arm.client], self.client_steps())

    def arm_local_flops(self, arm: Arm, work: Path) -> dict[str, Any]:
        """Local-only with the full network, given the CollaFuse client's training FLOPs."""
        assert arm.client is not None
        cfg = self.config
        budget = (
            self.flops.of(cfg.models.clients[arm.client], None).train_step * self.client_steps()
        )
        steps = max(1, round(budget / self.flops.of(cfg.models.full, None).train_step))
        return self._local(arm, work, cfg.models.full, steps)

    # ----- centralised and FedAvg ------------------------------------------------------------

    def central_path(self, partition: str) -> Path:
        """Where the centralised arm keeps its model (an attacker of the split arms)."""
        return self.out / "work" / f"{partition}-centralised" / "central.pt"

    def arm_centralised(self, arm: Arm, work: Path) -> dict[str, Any]:
        """One model on the pooled raw data, conditioned on the client: no privacy at all."""
        cfg, T = self.config, self.config.num_timesteps
        shares = self.shares(arm.partition)
        images = torch.cat([s.train.images for s in shares])
        labels = _labels([s.train.images for s in shares])
        n = cfg.data.num_clients
        steps_total = self._steps(images.shape[0], cfg.train.epochs)
        model, secs = self._train_local(
            "central", work, cfg.models.full, images, T, steps_total, arm.seed, labels, n
        )
        samples, synth_s = [], 0.0
        for i in range(n):
            out, s = self._sample_full(model, cfg.eval.samples_per_client, arm.seed + 100 + i, i)
            samples.append(out)
            synth_s += s
        f = self.flops.of(cfg.models.full, n)
        result = self._quality(arm, samples)
        result["cost"] = cost_record(
            client_train=0,
            server_train=f.train_step * steps_total,
            client_synth=0,
            server_synth=f.forward_one * self._full_steps(),
            client_train_s=0.0,
            server_train_s=secs,
            synth_s=synth_s,
            bytes_up=len(shares[0].train.ids) * self._pixels() * 4,
            bytes_down=self._pixels() * 4,
        )
        tests = [s.test for s in shares]
        result["disclosure"] = {
            "note": "raw images sent: everything disclosed",
            "membership": self.scorer.membership(
                model, images, labels, torch.cat(tests), _labels(tests), 0, arm.seed + 7
            ),
        }
        return result

    def arm_fedavg(self, arm: Arm, work: Path) -> dict[str, Any]:
        """Clients train full models from the global weights; the server averages each round."""
        cfg, T = self.config, self.config.num_timesteps
        shares = self.shares(arm.partition)
        rounds = cfg.train.fedavg_rounds
        local_steps = max(1, self._steps(cfg.data.train_per_client, cfg.train.epochs) // rounds)
        global_path = work / "global.pt"
        torch.manual_seed(arm.seed)
        global_model = build_unet(cfg.models.full, self.image)
        start_round, train_s = 0, 0.0
        if global_path.exists():
            state = torch.load(global_path, weights_only=True)
            global_model.load_state_dict(state["model"])
            start_round, train_s = int(state["round"]), float(state["train_s"])
        sizes = torch.tensor([len(s.train.ids) for s in shares], dtype=torch.float64)
        weights = (sizes / sizes.sum()).tolist()
        for r in range(start_round, rounds):
            states = []
            for i, share in enumerate(shares):
                trainer = LocalTrainer(
                    self._client_config(cfg.models.full, local_steps, arm.seed + i),
                    self.schedule,
                    T,
                    work / f"unused-{i}.pt",
                )
                trainer.model.load_state_dict(global_model.state_dict())
                trainer.step = r * local_steps  # distinct batches every round
                started = time.perf_counter()
                for _ in range(local_steps):
                    trainer.train_step(share.train.images)
                train_s += time.perf_counter() - started
                states.append(trainer.model.state_dict())
            averaged = {
                k: sum(w * s[k].double() for w, s in zip(weights, states, strict=True)).to(v.dtype)
                for k, v in states[0].items()
            }
            global_model.load_state_dict(averaged)
            torch.save(
                {"model": global_model.state_dict(), "round": r + 1, "train_s": train_s},
                global_path,
            )
            self.say(f"    fedavg: round {r + 1}/{rounds}")
        samples, synth_s = [], 0.0
        for i in range(len(shares)):
            out, s = self._sample_full(
                global_model.eval(), cfg.eval.samples_per_client, arm.seed + 100 + i, None
            )
            samples.append(out)
            synth_s += s
        f = self.flops.of(cfg.models.full, None)
        params = sum(p.numel() for p in global_model.parameters())
        result = self._quality(arm, samples)
        result["cost"] = cost_record(
            client_train=f.train_step * local_steps * rounds,
            server_train=0,
            client_synth=f.forward_one * self._full_steps(),
            server_synth=0,
            client_train_s=train_s / len(shares),
            synth_s=synth_s,
            bytes_up=rounds * params * 4,
            bytes_down=0,
            bytes_model_down=rounds * params * 4,
            client_train_steps=local_steps * rounds,
        )
        result["client_params"] = params
        result["disclosure"] = {"note": "model updates shared every round (not measured here)"}
        return result

    # ----- the split -------------------------------------------------------------------------

    def _cuts(self, partition: str, t_cut: int) -> list[Tensor]:
        return [
            compute_cuts(s.train, self._secret(i), self.diffusion, t_cut)
            for i, s in enumerate(self.shares(partition))
        ]

    def _attackers(self, partition: str, server_model: nn.Module | None) -> dict[str, nn.Module]:
        """Denoisers the server could apply to cut images: its own, and a model trained on
        the pooled raw data (the centralised arm), a stand-in for a strong public model."""
        found: dict[str, nn.Module] = {}
        if server_model is not None:
            found["server model"] = server_model
        central = self.central_path(partition)
        if central.exists():
            state = torch.load(central, weights_only=True)
            net = build_unet(self.config.models.full, self.image, self.config.data.num_clients)
            net.load_state_dict(state["ema"])
            found["raw-data model"] = net.eval()
        return found

    def _disclosure(
        self, partition: str, t_cut: int, cuts: list[Tensor], model: nn.Module | None, seed: int
    ) -> dict[str, Any]:
        shares = self.shares(partition)
        return self.scorer.reconstruction(
            t_cut,
            cuts,
            torch.cat([s.train.images for s in shares]),
            torch.cat([s.test for s in shares]),
            self._attackers(partition, model),
            seed,
        )

    def server_side(self, arm: Arm) -> ServerSide:
        """Train the server at this cut and seed (or load it), sample its half and attack it.

        Every client size at one cut and seed meets the same server: it only ever sees the cut
        images, which do not depend on the client's network. So it is trained once and its
        hand-off samples and disclosure are kept on disk for the other sizes.
        """
        assert arm.cut_ratio is not None
        name = f"{arm.partition}-server-{arm.cut_ratio:g}-s{arm.seed}"
        if name in self._servers:
            return self._servers[name]
        cfg, T = self.config, self.config.num_timesteps
        n = cfg.data.num_clients
        t_cut = self.diffusion.t_cut(arm.cut_ratio)
        work = self.work(name, cfg.arm_digest(name, None))
        cuts = self._cuts(arm.partition, t_cut)
        server_steps = self._steps(sum(c.shape[0] for c in cuts), cfg.train.epochs)
        server_cfg = ServerConfig(
            schedule=self.schedule,
            image=self.image,
            model=cfg.models.server,
            device=cfg.device,
            train=ServerTrainConfig(
                batch_size=cfg.train.batch_size,
                lr=cfg.train.lr,
                seed=arm.seed,
                max_steps=server_steps,
            ),
            policy=PolicyConfig(max_clients=n),
        )
        trainer = Trainer(server_cfg, self.diffusion, None, self.device, work / "server.pt")
        trainer.add_cuts(
            torch.cat(cuts),
            torch.full((sum(c.shape[0] for c in cuts),), t_cut, dtype=torch.long),
            _labels(cuts),
        )
        done = work / "server-side.pt"
        steps = self.diffusion.timesteps(T, t_cut, self._share(T - t_cut))
        if done.exists():
            saved = torch.load(done, weights_only=True)
            handoff = list(saved["handoff"])
            meta = json.loads(str(saved["meta"]))
        else:
            started = time.perf_counter()
            every = max(1, server_steps // 4)
            while trainer.step < server_steps:
                loss = trainer.train_step()
                if trainer.step % every == 0:
                    trainer.save()
                    self.say(f"    server: step {trainer.step}/{server_steps} loss {loss:.4f}")
            train_s = time.perf_counter() - started
            trainer.save()  # the last steps too: a resumed study reloads this exact model
            trainer.hub.publish(trainer.ema.state_dict(), trainer.step)
            started = time.perf_counter()
            handoff = self._server_half(arm, trainer, steps, cfg.eval.sampler)
            synth_s = time.perf_counter() - started
            model = trainer.ema.eval()
            disclosure = self._disclosure(arm.partition, t_cut, cuts, model, arm.seed)
            shares = self.shares(arm.partition)
            tests = [s.test for s in shares]
            gen = torch.Generator().manual_seed(arm.seed + 31)
            held_out = [
                self.diffusion.q_sample(
                    x,
                    torch.full((x.shape[0],), t_cut, dtype=torch.long),
                    torch.randn(x.shape, generator=gen),
                )
                for x in tests
            ]
            disclosure["membership"] = self.scorer.membership(
                model,
                torch.cat(cuts),
                _labels(cuts),
                torch.cat(held_out),
                _labels(held_out),
                t_cut,
                arm.seed + 7,
            )
            meta = {
                "steps": server_steps,
                "train_s": train_s,
                "synth_s": synth_s,
                "disclosure": disclosure,
            }
            torch.save({"handoff": handoff, "meta": json.dumps(meta)}, done)
        side = ServerSide(
            t_cut=t_cut,
            model=trainer.ema.eval(),
            handoff=handoff,
            steps=int(meta["steps"]),
            train_s=float(meta["train_s"]),
            synth_s=float(meta["synth_s"]),
            sampling_steps=len(steps) - 1,
            disclosure=dict(meta["disclosure"]),
            trainer=trainer,
        )
        self._servers = {name: side}  # keep one: a server model and its samples are large
        return side

    def arm_collafuse(self, arm: Arm, work: Path) -> dict[str, Any]:
        """The exact split: the server learns from cut images alone, clients own t <= t_cut."""
        assert arm.cut_ratio is not None and arm.client is not None
        cfg = self.config
        client_cfg = cfg.models.clients[arm.client]
        shares = self.shares(arm.partition)
        n = len(shares)
        server = self.server_side(arm)
        t_cut = server.t_cut
        client_steps = self.client_steps()
        clients, client_s = [], 0.0
        for i, share in enumerate(shares):
            model, secs = self._train_local(
                f"client-{i}",
                work,
                client_cfg,
                share.train.images,
                t_cut,
                client_steps,
                arm.seed + i,
            )
            clients.append(model)
            client_s += secs
        ev = cfg.eval
        started = time.perf_counter()
        samples = [
            finish_chain(
                self.diffusion,
                clients[i],
                server.handoff[i],
                t_cut,
                self._share(t_cut),
                ev.sampler,
                0.0,
                arm.seed + i,
            )
            for i in range(n)
        ]
        client_synth_s = time.perf_counter() - started
        result = self._quality(arm, samples)
        if ev.few_client_steps:
            result["few_step_samplers"] = self._few_step_samplers(arm, clients, server)
        result["t_cut"] = t_cut
        result["client_params"] = _params(client_cfg, self.image)
        result["disclosure"] = server.disclosure
        s_f = self.flops.of(cfg.models.server, n + 1)
        c_f = self.flops.of(client_cfg, None)
        client_sampling = len(self.diffusion.timesteps(t_cut, 0, self._share(t_cut))) - 1
        result["cost"] = cost_record(
            client_train=c_f.train_step * client_steps,
            server_train=s_f.train_step * server.steps,
            client_synth=c_f.forward_one * client_sampling,
            server_synth=s_f.forward_one * server.sampling_steps,
            client_train_s=client_s / n,
            server_train_s=server.train_s,
            synth_s=server.synth_s + client_synth_s,
            bytes_up=len(shares[0].train.ids) * self._pixels() * 4,
            bytes_down=self._pixels() * 4,
            client_train_steps=client_steps,
        )
        return result

    def arm_heuristic(self, arm: Arm, work: Path) -> dict[str, Any]:
        """The paper's variant 2: server trains on x_c as if clean; client starts at c+c(1-c)."""
        assert arm.cut_ratio is not None and arm.client is not None
        cfg, T = self.config, self.config.num_timesteps
        client_cfg = cfg.models.clients[arm.client]
        shares = self.shares(arm.partition)
        n = len(shares)
        c = arm.cut_ratio
        t_cut = self.diffusion.t_cut(c)
        t_start = min(max(round((c + c * (1 - c)) * T), t_cut), T - 1)
        cuts = self._cuts(arm.partition, t_cut)
        server_steps = self._steps(sum(x.shape[0] for x in cuts), cfg.train.epochs)
        client_steps = self.client_steps()
        server, server_s = self._train_local(
            "server",
            work,
            cfg.models.server,
            torch.cat(cuts),
            T,
            server_steps,
            arm.seed,
            _labels(cuts),
            n + 1,
            t_floor=t_cut,
        )
        ev = cfg.eval
        samples, client_s, synth_s = [], 0.0, 0.0
        steps = self.diffusion.timesteps(T, t_cut, self._share(T - t_cut))
        for i, share in enumerate(shares):
            model, secs = self._train_local(
                f"client-{i}",
                work,
                client_cfg,
                share.train.images,
                t_start,
                client_steps,
                arm.seed + i,
            )
            client_s += secs
            started = time.perf_counter()
            gen = torch.Generator().manual_seed(arm.seed + 100 + i)
            x = torch.randn((ev.samples_per_client, *self.image.shape), generator=gen)
            lab = torch.full((x.shape[0],), i, dtype=torch.long)
            with torch.inference_mode():
                x = self.diffusion.sample_loop(
                    UNetDenoiser(server, lab), x, steps, ev.sampler, 0.0, gen
                )
            # The hand-off the paper uses: treat the server's output as x at c + c(1 - c).
            samples.append(
                finish_chain(
                    self.diffusion,
                    model,
                    x,
                    t_start,
                    self._share(t_start),
                    ev.sampler,
                    0.0,
                    arm.seed + i,
                )
            )
            synth_s += time.perf_counter() - started
        result = self._quality(arm, samples)
        result["t_cut"] = t_cut
        result["t_start_client"] = t_start
        result["client_params"] = _params(client_cfg, self.image)
        result["disclosure"] = self._disclosure(arm.partition, t_cut, cuts, None, arm.seed)
        s_f = self.flops.of(cfg.models.server, n + 1)
        c_f = self.flops.of(client_cfg, None)
        result["cost"] = cost_record(
            client_train=c_f.train_step * client_steps,
            server_train=s_f.train_step * server_steps,
            client_synth=c_f.forward_one
            * (len(self.diffusion.timesteps(t_start, 0, self._share(t_start))) - 1),
            server_synth=s_f.forward_one * (len(steps) - 1),
            client_train_s=client_s / n,
            server_train_s=server_s,
            synth_s=synth_s,
            bytes_up=len(shares[0].train.ids) * self._pixels() * 4,
            bytes_down=self._pixels() * 4,
            client_train_steps=client_steps,
        )
        return result


def _result(job: Any) -> Tensor:
    """A finished sampler job's images; a failed job stops the study with the sampler's error."""
    if job.x is None:
        raise RuntimeError(f"the server's sampler failed a study request: {job.error}")
    x: Tensor = job.x
    return x


def _labels(groups: list[Tensor]) -> Tensor:
    """(sum N_i,) the index of the group each image belongs to: the client condition."""
    return torch.cat([torch.full((g.shape[0],), i, dtype=torch.long) for i, g in enumerate(groups)])


def _params(model: UNetConfig, image: ImageConfig) -> int:
    return sum(p.numel() for p in build_unet(model, image).parameters())
