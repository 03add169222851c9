"""Scores an arm: FID/KID with intervals, and what the server can infer from what it holds.

Quality uses the committed classifier's features (and optionally Inception's) of each client's
held-out images. Disclosure covers two attacks on what the server holds:

- reconstruction: the best denoiser the server has (its own, or a model trained on the pooled
  raw data as a stand-in for a strong public model) applied to the cut images, scored by PSNR,
  SSIM and re-identification among the clients' training and held-out images;
- membership: a loss-threshold attack with the server's own model at its own timesteps, telling
  the cut images it trained on from held-out images cut the same way; beside it the same attack
  on the centralised model with the raw images.

And one check of what a client receives: whether its samples copy training images, its own or
another client's (`copying`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from collafuse.common.diffusion import Diffusion
from collafuse.common.images import save_grid
from collafuse.common.nets import UNetDenoiser
from collafuse.experiments.metrics import (
    FeatureExtractor,
    FeatureNet,
    extract_features,
    fid_kid,
    kid_between,
    psnr,
    reidentification_hits,
    ssim,
)
from collafuse.experiments.stats import fid_kid_ci, mean_ci, membership_ci, spread

ATTACK_SPAN = 0.3
"""The membership attack reads the loss on the lowest 30% of the timesteps a model owns: near
the data end the loss depends most on the exact image, as in loss-threshold attacks on diffusion
models (SecMI, PIA)."""


@dataclass(frozen=True)
class ScoreSettings:
    """How intervals and attacks are computed (from the study's eval config)."""

    resamples: int
    level: float
    kid_subset_size: int
    membership_timesteps: int


class Scorer:
    """Scores generated images and attacks; caches the held-out features per split."""

    def __init__(
        self,
        settings: ScoreSettings,
        features: FeatureNet,
        diffusion: Diffusion,
        out: Path,
        inception: FeatureExtractor | None = None,
    ) -> None:
        self.settings = settings
        self.features = features
        self.diffusion = diffusion
        self.out = out
        self.inception = inception
        self._real: dict[str, list[Tensor]] = {}

    def _real_features(self, partition: str, tests: list[Tensor]) -> list[Tensor]:
        if partition not in self._real:
            self._real[partition] = [extract_features(t, self.features) for t in tests]
        return self._real[partition]

    def quality(
        self, key: str, partition: str, tests: list[Tensor], samples: list[Tensor], seed: int
    ) -> dict[str, Any]:
        """Per-client and pooled FID/KID with intervals against held-out images; saves a grid."""
        s = self.settings
        real = self._real_features(partition, tests)
        fake = [extract_features(x, self.features) for x in samples]
        fid: dict[str, float] = {}
        kid: dict[str, float] = {}
        fid_ci: dict[str, list[float]] = {}
        kid_ci: dict[str, list[float]] = {}
        sets = [(f"client-{i}", r, f) for i, (r, f) in enumerate(zip(real, fake, strict=True))]
        sets.append(("pooled", torch.cat(real), torch.cat(fake)))
        for k, (name, r, f) in enumerate(sets):
            q = fid_kid_ci(r, f, s.resamples, s.level, seed * 1000 + k)
            fid_ci[name], kid_ci[name] = q.fid.to_list(), q.kid.to_list()
            if name != "pooled":
                fid[name], kid[name] = round(q.fid.value, 3), round(q.kid.value, 5)
        extra: dict[str, Any] = {}
        if self.inception is not None:
            inc = fid_kid(
                torch.cat(tests),
                torch.cat(samples),
                self.inception,
                kid_subset_size=s.kid_subset_size,
            )
            extra = {
                "fid_inception_pooled": round(inc.fid, 3),
                "kid_inception_pooled": round(inc.kid_mean, 5),
            }
        grid = self.out / "grids" / f"{key}.png"
        save_grid(torch.cat([x[:8] for x in samples]), grid, nrow=8, scale=2)
        return {
            "fid": fid,
            "kid": kid,
            "fid_pooled": round(fid_ci["pooled"][0], 3),
            "kid_pooled": round(kid_ci["pooled"][0], 5),
            "fid_ci": fid_ci,
            "kid_ci": kid_ci,
            "samples_per_client": int(samples[0].shape[0]),
            "grid": str(grid.relative_to(self.out)),
            **extra,
        }

    def pooled_fid(
        self, partition: str, tests: list[Tensor], samples: list[Tensor], seed: int
    ) -> list[float]:
        """Pooled FID [value, low, high] of samples against the clients' held-out images."""
        s = self.settings
        real = torch.cat(self._real_features(partition, tests))
        fake = torch.cat([extract_features(x, self.features) for x in samples])
        return fid_kid_ci(real, fake, s.resamples, s.level, seed).fid.to_list()

    def copying(
        self, samples: list[Tensor], trains: list[Tensor], tests: list[Tensor], seed: int
    ) -> dict[str, Any]:
        """How often client j's samples lie nearer to client k's training images than to k's
        held-out images (classifier features), for k = j ("own") and k != j ("other").

        Training and held-out images of a client are drawn alike from its share, so a model
        that copies nothing scores 0.5. Each repetition compares against a fresh random half
        of the smaller set from each side: many samples share a few nearest neighbours, so
        which images are in the reference sets moves the share far more than which samples
        were drawn, and the interval (percentiles over the repetitions) says how much. Above
        0.5 the samples reproduce training images; "other" above 0.5 means a client receives
        copies of another client's images.
        """
        s = self.settings
        gen = torch.Generator().manual_seed(seed)
        fake = [extract_features(x, self.features) for x in samples]
        # Per (sample client j, reference client k): k, distances to k's training and
        # held-out images, (n_j, N_train) and (n_j, N_test).
        pairs: dict[str, list[tuple[int, Tensor, Tensor]]] = {"own": [], "other": []}
        sizes: list[tuple[int, int]] = []
        for k, (train, test) in enumerate(zip(trains, tests, strict=True)):
            f_train = extract_features(train, self.features)
            f_test = extract_features(test, self.features)
            for j, f in enumerate(fake):
                which = "own" if j == k else "other"
                pairs[which].append((k, torch.cdist(f, f_train), torch.cdist(f, f_test)))
            sizes.append((train.shape[0], test.shape[0]))
        shares: dict[str, list[float]] = {"own": [], "other": []}
        for _ in range(s.resamples):
            picks = []  # per client k: (training, held-out) indices, half the smaller set
            for a, b in sizes:
                m = max(1, min(a, b) // 2)
                picks.append(
                    (torch.randperm(a, generator=gen)[:m], torch.randperm(b, generator=gen)[:m])
                )
            for which, found in pairs.items():
                if found:
                    hits = [
                        d_train[:, picks[k][0]].amin(1) < d_test[:, picks[k][1]].amin(1)
                        for k, d_train, d_test in found
                    ]
                    shares[which].append(float(torch.cat(hits).double().mean()))
        out: dict[str, Any] = {
            "reference": 0.5,
            "samples": sum(x.shape[0] for x in samples),
            "repetitions": s.resamples,
        }
        for which, values in shares.items():
            if values:
                out[which] = spread(torch.tensor(values), s.level).to_list()
        return out

    def reconstruction(
        self,
        t_cut: int,
        cuts: list[Tensor],
        originals: Tensor,
        distractors: Tensor,
        attackers: dict[str, nn.Module],
        seed: int,
    ) -> dict[str, Any]:
        """Release SNR, KID(cut, train) and the best reconstruction attack, with intervals."""
        s = self.settings
        seen = torch.cat(cuts)  # (N, C, H, W)
        raw_hits = reidentification_hits(seen, originals, distractors)
        out: dict[str, Any] = {
            "snr": round(self.diffusion.snr(t_cut), 4),
            "kid_cut_vs_train": round(
                kid_between(seen, originals, self.features, kid_subset_size=s.kid_subset_size), 5
            ),
            "reid_raw_cut": round(float(raw_hits.double().mean()), 4),
            "reid_raw_cut_ci": mean_ci(raw_hits, s.resamples, s.level, seed).to_list(),
        }
        best: dict[str, Any] | None = None
        t = torch.full((seen.shape[0],), t_cut, dtype=torch.long)
        labels = torch.cat(
            [torch.full((c.shape[0],), i, dtype=torch.long) for i, c in enumerate(cuts)]
        )
        for name, model in attackers.items():
            eps = _batched(model, seen, t, labels)
            x0 = self.diffusion.x0_from_eps(seen, t, eps).clamp(-1, 1)
            per_psnr = psnr(x0, originals).clamp(max=99.0)  # identical images give inf
            hits = reidentification_hits(x0, originals, distractors)
            score = {
                "attacker": name,
                "psnr": round(float(per_psnr.mean()), 3),
                "psnr_ci": mean_ci(per_psnr, s.resamples, s.level, seed + 1).to_list(),
                "ssim": round(float(ssim(x0, originals).mean()), 4),
                "reid": round(float(hits.double().mean()), 4),
                "reid_ci": mean_ci(hits, s.resamples, s.level, seed + 2).to_list(),
            }
            if best is None or score["psnr"] > best["psnr"]:
                best = score
        if best is not None:
            out.update(
                attack_psnr=best["psnr"],
                attack_psnr_ci=best["psnr_ci"],
                attack_ssim=best["ssim"],
                attack_reid=best["reid"],
                attack_reid_ci=best["reid_ci"],
                attacker=best["attacker"],
            )
        return out

    def membership(
        self,
        model: nn.Module,
        members: Tensor,
        member_labels: Tensor,
        others: Tensor,
        other_labels: Tensor,
        t_low: int,
        seed: int,
    ) -> dict[str, Any]:
        """Loss-threshold membership attack on `model`, which owns timesteps (t_low, T].

        `members` are images the model trained on: raw images for a full-chain model (t_low =
        0), cut images x_{t_low} for the server, attacked with its own bridge loss. A lower
        loss means "member"; the same noise is used for every image at a given timestep.
        """
        s = self.settings
        T = self.diffusion.num_timesteps
        top = t_low + max(1, round(ATTACK_SPAN * (T - t_low)))
        steps = torch.linspace(t_low + 1, top, s.membership_timesteps).round().long()
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(steps), *members.shape[1:]), generator=gen)  # (K, C, H, W)
        m = -self._losses(model, members, member_labels, t_low, steps, noise)
        o = -self._losses(model, others, other_labels, t_low, steps, noise)
        r = membership_ci(m, o, s.resamples, s.level, seed)
        return {
            "auc": r.auc.to_list(),
            "tpr_at_1pct_fpr": r.tpr_at_1pct_fpr.to_list(),
            "members": r.members,
            "non_members": r.non_members,
            "timesteps": [int(steps[0]), int(steps[-1])],
        }

    @torch.inference_mode()
    def _losses(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        t_low: int,
        steps: Tensor,
        noise: Tensor,
        batch: int = 256,
    ) -> Tensor:
        """(N,) mean training loss of each image over the attack's timesteps."""
        device = next(model.parameters()).device
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        for k, step in enumerate(steps.tolist()):
            for a in range(0, x.shape[0], batch):
                xb = x[a : a + batch].to(device)
                lb = labels[a : a + batch].to(device)
                t = torch.full((xb.shape[0],), step, dtype=torch.long, device=device)
                eps = noise[k].to(device).expand_as(xb)
                den = UNetDenoiser(model, lb)
                if t_low == 0:
                    per = self.diffusion.eps_loss(den, xb, t, eps).per_sample
                else:
                    c = torch.full_like(t, t_low)
                    per = self.diffusion.bridge_loss(den, xb, c, t, eps).per_sample
                total[a : a + batch] += per.double().cpu()
        return total / len(steps)


@torch.inference_mode()
def _batched(model: nn.Module, x: Tensor, t: Tensor, labels: Tensor, batch: int = 256) -> Tensor:
    device = next(model.parameters()).device
    return torch.cat(
        [
            model(
                x[k : k + batch].to(device),
                t[k : k + batch].to(device),
                class_labels=labels[k : k + batch].to(device),
            ).sample.cpu()
            for k in range(0, x.shape[0], batch)
        ]
    )
