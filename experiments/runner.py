"""Runs a study's arms with the real server and client code, and saves each finished arm.

No second implementation of the math: the server arm trains with the server's Trainer and
samples with its BatchingSampler; clients train with the client's LocalTrainer and finish the
chain with the client's finish_chain; baselines reuse LocalTrainer on the full chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    ScheduleConfig,
    ServerConfig,
    ServerTrainConfig,
    UNetConfig,
)
from collafuse.common.data import LocalData, load_local_data
from collafuse.common.diffusion import Diffusion
from collafuse.common.images import save_grid
from collafuse.common.metrics import (
    FeatureExtractor,
    FeatureNet,
    count_flops,
    fid_kid,
    kid_between,
    load_feature_net,
    psnr,
    reidentification_rate,
    ssim,
)
from collafuse.common.nets import UNetDenoiser, build_unet, pick_device
from collafuse.experiments.config import ExperimentConfig
from collafuse.server.sampler import BatchingSampler
from collafuse.server.trainer import Trainer

log = logging.getLogger("collafuse.experiments")


@dataclass(frozen=True)
class ClientShare:
    """One client's training and held-out images."""

    train: LocalData
    test: Tensor  # (M, C, H, W)


@dataclass(frozen=True)
class Arm:
    """One arm of the study."""

    kind: str
    partition: str
    cut_ratio: float | None = None

    @property
    def key(self) -> str:
        """File-name-safe identifier."""
        suffix = f"-{self.cut_ratio:g}" if self.cut_ratio is not None else ""
        return f"{self.partition}-{self.kind}{suffix}"


def plan(config: ExperimentConfig) -> list[Arm]:
    """Every arm in the order they run (centralised first: its model is also an attacker)."""
    order = ["centralised", "local", "fedavg", "collafuse", "heuristic"]
    arms = []
    for partition in config.data.partitions:
        for kind in order:
            if kind not in config.arms:
                continue
            if kind == "collafuse":
                arms += [Arm(kind, partition, c) for c in config.cut_ratios]
            elif kind == "heuristic":
                arms += [Arm(kind, partition, c) for c in config.heuristic_cut_ratios]
            else:
                arms.append(Arm(kind, partition))
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


class Study:
    """Runs the arms of one config into an output directory; finished arms are not redone."""

    def __init__(
        self,
        config: ExperimentConfig,
        out: Path,
        say: Callable[[str], None] = print,
        inception: FeatureExtractor | None = None,
    ) -> None:
        self.config = config
        self.out = out
        self.say = say
        self.device = pick_device(config.device)
        self.schedule = ScheduleConfig(
            num_timesteps=config.num_timesteps, beta_schedule=config.beta_schedule
        )
        self.diffusion = Diffusion.from_config(self.schedule)
        self.image = ImageConfig(channels=config.data.channels, size=config.data.image_size)
        self.features: FeatureNet = load_feature_net()
        # Optional second feature space (Inception from a user-supplied weights file).
        self.inception = inception
        self._flops: dict[str, tuple[int, int]] = {}
        self._shares: dict[str, list[ClientShare]] = {}
        (out / "arms").mkdir(parents=True, exist_ok=True)
        (out / "grids").mkdir(parents=True, exist_ok=True)

    # ----- bookkeeping -----------------------------------------------------------------------

    def arm_path(self, arm: Arm) -> Path:
        """Where a finished arm's result lives."""
        return self.out / "arms" / f"{arm.key}.json"

    def done(self, arm: Arm) -> dict[str, Any] | None:
        """The saved result of an arm, if it was made by this same config."""
        path = self.arm_path(arm)
        if not path.exists():
            return None
        result: dict[str, Any] = json.loads(path.read_text())
        return result if result.get("digest") == self.config.digest() else None

    def work(self, arm: Arm) -> Path:
        """Checkpoints of an arm in progress (a stopped study resumes inside an arm too)."""
        path = self.out / "work" / arm.key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def shares(self, partition: str) -> list[ClientShare]:
        """The split, loaded once per partition."""
        if partition not in self._shares:
            self._shares[partition] = load_shares(self.config, partition)
        return self._shares[partition]

    def run(self) -> list[dict[str, Any]]:
        """Run every arm not yet done; returns all results in plan order."""
        arms = plan(self.config)
        results = []
        for k, arm in enumerate(arms, 1):
            saved = self.done(arm)
            if saved is not None:
                self.say(f"[{k}/{len(arms)}] {arm.key}: done earlier, kept")
                results.append(saved)
                continue
            self.say(f"[{k}/{len(arms)}] {arm.key}: running")
            started = time.perf_counter()
            result = self.run_arm(arm)
            result.update(
                arm=arm.kind,
                partition=arm.partition,
                cut_ratio=arm.cut_ratio,
                key=arm.key,
                digest=self.config.digest(),
                wall_s=round(time.perf_counter() - started, 2),
            )
            tmp = self.arm_path(arm).with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(self.arm_path(arm))
            self.say(
                f"[{k}/{len(arms)}] {arm.key}: pooled FID {result['fid_pooled']:.2f} "
                f"in {result['wall_s']:.0f}s"
            )
            results.append(result)
        return results

    def run_arm(self, arm: Arm) -> dict[str, Any]:
        """Dispatch on the arm's kind."""
        runners = {
            "local": self.arm_local,
            "centralised": self.arm_centralised,
            "fedavg": self.arm_fedavg,
            "collafuse": self.arm_collafuse,
            "heuristic": self.arm_heuristic,
        }
        return runners[arm.kind](arm)

    # ----- building blocks -------------------------------------------------------------------

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
        arm: Arm,
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
            self.work(arm) / f"{name}.pt",
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

    def _flops_of(self, model_cfg: UNetConfig, classes: int | None) -> tuple[int, int]:
        """(FLOPs of one training step at the study's batch size, of one forward per image)."""
        key = f"{model_cfg.model_dump_json()}-{classes}"
        if key not in self._flops:
            net = build_unet(model_cfg, self.image, classes)
            b = self.config.train.batch_size
            x = torch.randn(b, *self.image.shape)
            t = torch.randint(1, self.config.num_timesteps, (b,))
            labels = torch.zeros(b, dtype=torch.long) if classes else None

            def train_step() -> None:
                net(x, t, class_labels=labels).sample.pow(2).mean().backward()

            def forward_one() -> None:
                with torch.no_grad():
                    net(x[:1], t[:1], class_labels=None if labels is None else labels[:1])

            self._flops[key] = (count_flops(train_step), count_flops(forward_one))
        return self._flops[key]

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

    def _score(self, arm: Arm, samples: list[Tensor]) -> dict[str, Any]:
        """Per-client and pooled FID/KID against held-out images; saves a grid."""
        shares = self.shares(arm.partition)
        ev = self.config.eval
        fid, kid = {}, {}
        for i, (share, fake) in enumerate(zip(shares, samples, strict=True)):
            r = fid_kid(share.test, fake, self.features, kid_subset_size=ev.kid_subset_size)
            fid[f"client-{i}"] = round(r.fid, 3)
            kid[f"client-{i}"] = round(r.kid_mean, 5)
        pooled = fid_kid(
            torch.cat([s.test for s in shares]),
            torch.cat(samples),
            self.features,
            kid_subset_size=ev.kid_subset_size,
        )
        extra: dict[str, Any] = {}
        if self.inception is not None:
            inc = fid_kid(
                torch.cat([s.test for s in shares]),
                torch.cat(samples),
                self.inception,
                kid_subset_size=ev.kid_subset_size,
            )
            extra = {
                "fid_inception_pooled": round(inc.fid, 3),
                "kid_inception_pooled": round(inc.kid_mean, 5),
            }
        grid = self.out / "grids" / f"{arm.key}.png"
        save_grid(torch.cat([s[:8] for s in samples]), grid, nrow=8, scale=2)
        return {
            "fid": fid,
            "kid": kid,
            "fid_pooled": round(pooled.fid, 3),
            "kid_pooled": round(pooled.kid_mean, 5),
            "grid": str(grid.relative_to(self.out)),
            **extra,
        }

    def _steps(self, images: int, epochs: float) -> int:
        """Training steps for `epochs` passes over `images` images at the study's batch size."""
        return max(1, math.ceil(epochs * images / self.config.train.batch_size))

    def _share(self, span: int) -> int:
        """Sampling steps for `span` timesteps of the chain: its share of eval.steps."""
        total = self.config.eval.steps
        return 0 if total == 0 else max(1, round(total * span / self.config.num_timesteps))

    def _secret(self, i: int) -> bytes:
        return hashlib.sha256(f"collafuse-study-{self.config.seed}-client-{i}".encode()).digest()

    def _pixels(self) -> int:
        return math.prod(self.image.shape)

    # ----- arms --------------------------------------------------------------------------------

    def arm_local(self, arm: Arm) -> dict[str, Any]:
        """Each client trains a full chain on its own data alone."""
        cfg, T = self.config, self.config.num_timesteps
        samples, train_s, synth_s = [], 0.0, 0.0
        n_img = self.config.data.train_per_client
        full_steps = self._steps(n_img, cfg.train.epochs)
        for i, share in enumerate(self.shares(arm.partition)):
            model, secs = self._train_local(
                f"client-{i}",
                arm,
                cfg.models.full,
                share.train.images,
                T,
                full_steps,
                cfg.seed + i,
            )
            train_s += secs
            out, s = self._sample_full(model, cfg.eval.samples_per_client, cfg.seed + 100 + i, None)
            samples.append(out)
            synth_s += s
        train_f, fwd_f = self._flops_of(cfg.models.full, None)
        steps = len(self.diffusion.timesteps(T, 0, cfg.eval.steps)) - 1
        result = self._score(arm, samples)
        result["cost"] = self._cost(
            client_train=train_f * full_steps,
            server_train=0,
            client_synth=fwd_f * steps,
            server_synth=0,
            client_train_s=train_s / cfg.data.num_clients,
            synth_s=synth_s,
            bytes_up=0,
            bytes_down=0,
        )
        return result

    def arm_centralised(self, arm: Arm) -> dict[str, Any]:
        """One model on the pooled raw data, conditioned on the client: no privacy at all."""
        cfg, T = self.config, self.config.num_timesteps
        shares = self.shares(arm.partition)
        images = torch.cat([s.train.images for s in shares])
        labels = torch.cat(
            [torch.full((len(s.train.ids),), i, dtype=torch.long) for i, s in enumerate(shares)]
        )
        n = cfg.data.num_clients
        steps_total = self._steps(images.shape[0], cfg.train.epochs)
        model, secs = self._train_local(
            "central", arm, cfg.models.full, images, T, steps_total, cfg.seed, labels, n
        )
        samples, synth_s = [], 0.0
        for i in range(n):
            out, s = self._sample_full(model, cfg.eval.samples_per_client, cfg.seed + 100 + i, i)
            samples.append(out)
            synth_s += s
        train_f, fwd_f = self._flops_of(cfg.models.full, n)
        steps = len(self.diffusion.timesteps(T, 0, cfg.eval.steps)) - 1
        result = self._score(arm, samples)
        result["cost"] = self._cost(
            client_train=0,
            server_train=train_f * steps_total,
            client_synth=0,
            server_synth=fwd_f * steps,
            client_train_s=0.0,
            server_train_s=secs,
            synth_s=synth_s,
            bytes_up=len(shares[0].train.ids) * self._pixels() * 4,
            bytes_down=self._pixels() * 4,
        )
        result["disclosure"] = {"note": "raw images sent: everything disclosed"}
        return result

    def arm_fedavg(self, arm: Arm) -> dict[str, Any]:
        """Clients train full models from the global weights; the server averages each round."""
        cfg, T = self.config, self.config.num_timesteps
        shares = self.shares(arm.partition)
        rounds = cfg.train.fedavg_rounds
        local_steps = max(1, self._steps(cfg.data.train_per_client, cfg.train.epochs) // rounds)
        global_path = self.work(arm) / "global.pt"
        torch.manual_seed(cfg.seed)
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
                    self._client_config(cfg.models.full, local_steps, cfg.seed + i),
                    self.schedule,
                    T,
                    self.work(arm) / f"unused-{i}.pt",
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
                global_model.eval(), cfg.eval.samples_per_client, cfg.seed + 100 + i, None
            )
            samples.append(out)
            synth_s += s
        train_f, fwd_f = self._flops_of(cfg.models.full, None)
        params = sum(p.numel() for p in global_model.parameters())
        steps = len(self.diffusion.timesteps(T, 0, cfg.eval.steps)) - 1
        result = self._score(arm, samples)
        result["cost"] = self._cost(
            client_train=train_f * local_steps * rounds,
            server_train=0,
            client_synth=fwd_f * steps,
            server_synth=0,
            client_train_s=train_s / len(shares),
            synth_s=synth_s,
            bytes_up=rounds * params * 4,
            bytes_down=0,
            bytes_model_down=rounds * params * 4,
        )
        result["disclosure"] = {"note": "model updates shared every round (not measured here)"}
        return result

    def _cuts(self, arm: Arm, t_cut: int) -> list[Tensor]:
        return [
            compute_cuts(s.train, self._secret(i), self.diffusion, t_cut)
            for i, s in enumerate(self.shares(arm.partition))
        ]

    def arm_collafuse(self, arm: Arm) -> dict[str, Any]:
        """The exact split: the server learns from cut images alone, clients own t <= t_cut."""
        assert arm.cut_ratio is not None
        cfg, T = self.config, self.config.num_timesteps
        shares = self.shares(arm.partition)
        n = len(shares)
        t_cut = self.diffusion.t_cut(arm.cut_ratio)
        cuts = self._cuts(arm, t_cut)
        server_steps = self._steps(sum(c.shape[0] for c in cuts), cfg.train.epochs)
        client_steps = self._steps(cfg.data.train_per_client, cfg.train.client_epochs)
        server_cfg = ServerConfig(
            schedule=self.schedule,
            image=self.image,
            model=cfg.models.server,
            device=cfg.device,
            train=ServerTrainConfig(
                batch_size=cfg.train.batch_size,
                lr=cfg.train.lr,
                seed=cfg.seed,
                max_steps=server_steps,
            ),
            policy=PolicyConfig(max_clients=n),
        )
        trainer = Trainer(
            server_cfg, self.diffusion, None, self.device, self.work(arm) / "server.pt"
        )
        trainer.add_cuts(
            torch.cat(cuts),
            torch.full((sum(c.shape[0] for c in cuts),), t_cut, dtype=torch.long),
            torch.cat([torch.full((c.shape[0],), i, dtype=torch.long) for i, c in enumerate(cuts)]),
        )
        started = time.perf_counter()
        every = max(1, server_steps // 4)
        while trainer.step < server_steps:
            loss = trainer.train_step()
            if trainer.step % every == 0:
                trainer.save()
                self.say(f"    server: step {trainer.step}/{server_steps} loss {loss:.4f}")
        server_s = time.perf_counter() - started
        trainer.hub.publish(trainer.ema.state_dict(), trainer.step)
        clients, client_s = [], 0.0
        for i, share in enumerate(shares):
            model, secs = self._train_local(
                f"client-{i}",
                arm,
                cfg.models.client,
                share.train.images,
                t_cut,
                client_steps,
                cfg.seed + i,
            )
            clients.append(model)
            client_s += secs
        # Synthesis: every client's request through the server's batching sampler at once.
        ev = cfg.eval
        sampler = BatchingSampler(self.diffusion, trainer.hub, 4096, self.device)
        steps = self.diffusion.timesteps(T, t_cut, self._share(T - t_cut))
        started = time.perf_counter()
        jobs = [
            sampler.submit(
                ev.samples_per_client,
                cfg.seed + 100 + i,
                steps,
                ev.sampler,
                0.0,
                i,
                self.image.shape,
            )
            for i in range(n)
        ]
        sampler.start()
        for job_list in jobs:
            for job in job_list:
                job.done.wait()
        sampler.stop()
        server_synth_s = time.perf_counter() - started
        started = time.perf_counter()
        samples = [
            finish_chain(
                self.diffusion,
                clients[i],
                torch.cat([j.x for j in jobs[i] if j.x is not None]),
                t_cut,
                self._share(t_cut),
                ev.sampler,
                0.0,
                cfg.seed + i,
            )
            for i in range(n)
        ]
        client_synth_s = time.perf_counter() - started
        result = self._score(arm, samples)
        result["t_cut"] = t_cut
        result["disclosure"] = self._disclosure(arm, t_cut, cuts, trainer.ema)
        s_train, s_fwd = self._flops_of(cfg.models.server, n + 1)
        c_train, c_fwd = self._flops_of(cfg.models.client, None)
        result["cost"] = self._cost(
            client_train=c_train * client_steps,
            server_train=s_train * server_steps,
            client_synth=c_fwd * (len(self.diffusion.timesteps(t_cut, 0, self._share(t_cut))) - 1),
            server_synth=s_fwd * (len(steps) - 1),
            client_train_s=client_s / n,
            server_train_s=server_s,
            synth_s=server_synth_s + client_synth_s,
            bytes_up=len(shares[0].train.ids) * self._pixels() * 4,
            bytes_down=self._pixels() * 4,
        )
        return result

    def arm_heuristic(self, arm: Arm) -> dict[str, Any]:
        """The paper's variant 2: server trains on x_c as if clean; client starts at c+c(1-c)."""
        assert arm.cut_ratio is not None
        cfg, T = self.config, self.config.num_timesteps
        shares = self.shares(arm.partition)
        n = len(shares)
        c = arm.cut_ratio
        t_cut = self.diffusion.t_cut(c)
        t_start = min(max(round((c + c * (1 - c)) * T), t_cut), T - 1)
        cuts = self._cuts(arm, t_cut)
        server_steps = self._steps(sum(c.shape[0] for c in cuts), cfg.train.epochs)
        client_steps = self._steps(cfg.data.train_per_client, cfg.train.client_epochs)
        labels = torch.cat(
            [torch.full((x.shape[0],), i, dtype=torch.long) for i, x in enumerate(cuts)]
        )
        server, server_s = self._train_local(
            "server",
            arm,
            cfg.models.server,
            torch.cat(cuts),
            T,
            server_steps,
            cfg.seed,
            labels,
            n + 1,
            t_floor=t_cut,
        )
        ev = cfg.eval
        samples, client_s, synth_s = [], 0.0, 0.0
        steps = self.diffusion.timesteps(T, t_cut, self._share(T - t_cut))
        for i, share in enumerate(shares):
            model, secs = self._train_local(
                f"client-{i}",
                arm,
                cfg.models.client,
                share.train.images,
                t_start,
                client_steps,
                cfg.seed + i,
            )
            client_s += secs
            started = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed + 100 + i)
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
                    cfg.seed + i,
                )
            )
            synth_s += time.perf_counter() - started
        result = self._score(arm, samples)
        result["t_cut"] = t_cut
        result["t_start_client"] = t_start
        result["disclosure"] = self._disclosure(arm, t_cut, cuts, None)
        s_train, s_fwd = self._flops_of(cfg.models.server, n + 1)
        c_train, c_fwd = self._flops_of(cfg.models.client, None)
        result["cost"] = self._cost(
            client_train=c_train * client_steps,
            server_train=s_train * server_steps,
            client_synth=c_fwd
            * (len(self.diffusion.timesteps(t_start, 0, self._share(t_start))) - 1),
            server_synth=s_fwd * (len(steps) - 1),
            client_train_s=client_s / n,
            server_train_s=server_s,
            synth_s=synth_s,
            bytes_up=len(shares[0].train.ids) * self._pixels() * 4,
            bytes_down=self._pixels() * 4,
        )
        return result

    # ----- disclosure and cost ---------------------------------------------------------------

    def _attackers(self, arm: Arm, server_model: nn.Module | None) -> dict[str, nn.Module]:
        """Denoisers the server could apply to cut images: its own, and a model trained on
        the pooled raw data (the centralised arm), a stand-in for a strong public model."""
        found: dict[str, nn.Module] = {}
        if server_model is not None:
            found["server model"] = server_model
        central = self.out / "work" / f"{arm.partition}-centralised" / "central.pt"
        if central.exists():
            state = torch.load(central, weights_only=True)
            net = build_unet(self.config.models.full, self.image, self.config.data.num_clients)
            net.load_state_dict(state["ema"])
            found["raw-data model"] = net.eval()
        return found

    def _disclosure(
        self, arm: Arm, t_cut: int, cuts: list[Tensor], server_model: nn.Module | None
    ) -> dict[str, Any]:
        """What the server saw: SNR, KID to the data, and the best reconstruction attack."""
        shares = self.shares(arm.partition)
        originals = torch.cat([s.train.images for s in shares])
        seen = torch.cat(cuts)
        distractors = torch.cat([s.test for s in shares])
        out: dict[str, Any] = {
            "snr": round(self.diffusion.snr(t_cut), 4),
            "kid_cut_vs_train": round(
                kid_between(
                    seen, originals, self.features, kid_subset_size=self.config.eval.kid_subset_size
                ),
                5,
            ),
            "reid_raw_cut": round(reidentification_rate(seen, originals, distractors), 4),
        }
        best: dict[str, Any] | None = None
        t = torch.full((seen.shape[0],), t_cut, dtype=torch.long)
        for name, model in self._attackers(arm, server_model).items():
            labels = torch.cat(
                [torch.full((c.shape[0],), i, dtype=torch.long) for i, c in enumerate(cuts)]
            )
            with torch.inference_mode():
                eps = torch.cat(
                    [
                        model(
                            seen[k : k + 256], t[k : k + 256], class_labels=labels[k : k + 256]
                        ).sample
                        for k in range(0, seen.shape[0], 256)
                    ]
                )
            x0 = self.diffusion.x0_from_eps(seen, t, eps).clamp(-1, 1)
            score = {
                "attacker": name,
                "psnr": round(float(psnr(x0, originals).mean()), 3),
                "ssim": round(float(ssim(x0, originals).mean()), 4),
                "reid": round(reidentification_rate(x0, originals, distractors), 4),
            }
            if best is None or score["psnr"] > best["psnr"]:
                best = score
        if best is not None:
            out.update(
                attack_psnr=best["psnr"],
                attack_ssim=best["ssim"],
                attack_reid=best["reid"],
                attacker=best["attacker"],
            )
        return out

    def _cost(
        self,
        client_train: int,
        server_train: int,
        client_synth: int,
        server_synth: int,
        client_train_s: float,
        synth_s: float,
        bytes_up: int,
        bytes_down: int,
        server_train_s: float = 0.0,
        bytes_model_down: int = 0,
    ) -> dict[str, Any]:
        return {
            "client_train_gflops": round(client_train / 1e9, 3),
            "server_train_gflops": round(server_train / 1e9, 3),
            "client_synth_mflops_per_image": round(client_synth / 1e6, 3),
            "server_synth_mflops_per_image": round(server_synth / 1e6, 3),
            "client_train_s": round(client_train_s, 2),
            "server_train_s": round(server_train_s, 2),
            "synth_s": round(synth_s, 2),
            "bytes_up_per_client": bytes_up,
            "bytes_down_per_image": bytes_down,
            "bytes_model_down_per_client": bytes_model_down,
        }
