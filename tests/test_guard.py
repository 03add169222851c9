"""The upload guard refuses poisoned cut images, never honest ones; the trainer survives what
slips through: it never takes, keeps, saves or publishes a non-finite step."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor

from collafuse.common.checkpoint import load_checkpoint
from collafuse.common.config import (
    DataConfig,
    ImageConfig,
    PolicyConfig,
    ScheduleConfig,
    ServerConfig,
)
from collafuse.common.data import FASHION_MNIST_DIR, load_local_data
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import CutBatch
from collafuse.server.policy import (
    KURTOSIS_MIN_PIXELS,
    Policy,
    PolicyError,
    chi2_quantile,
    cut_bounds,
    excess_kurtosis,
    measure_noise_std,
    nearest_other,
    noise_below,
)
from collafuse.server.trainer import Trainer, all_finite

T50 = Diffusion.from_config(ScheduleConfig(num_timesteps=50))
T1000 = Diffusion.from_config(ScheduleConfig(num_timesteps=1000))
T_CUT = 20  # cut_ratio 0.4 at T=50, abar 0.195: what the integration tests register


@pytest.fixture(scope="module")
def digits() -> Tensor:
    """All 1,797 scikit-learn digits, 8x8, rescaled to [-1, 1]; (N, 1, 8, 8)."""
    images = torch.tensor(load_digits().images, dtype=torch.float32)
    return (images / 16.0 * 2.0 - 1.0)[:, None]


def policy(diffusion: Diffusion = T50, size: int = 8) -> Policy:
    return Policy(PolicyConfig(), ImageConfig(channels=1, size=size), diffusion)


def cut(diffusion: Diffusion, x0: Tensor, t: int, seed: int = 0) -> Tensor:
    """Honest cut images with their own noise draw each."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    return diffusion.q_sample(x0, torch.full((x0.shape[0],), t), noise)


def check(pol: Policy, cuts: Tensor, t: int, ids: list[str] | None = None) -> list[str | None]:
    ids = ids if ids is not None else [f"img-{i}" for i in range(cuts.shape[0])]
    return pol.check_batch(CutBatch("client", t, ids, cuts), t)


def refused(reasons: list[str | None]) -> list[str]:
    return [r for r in reasons if r is not None]


# ----- honest uploads pass ---------------------------------------------------------------------


def noise_images(n: int, size: int, seed: int) -> dict[str, Tensor]:
    """Images in [-1, 1] that push the bounds: uniform and +-1 pixels (the largest variance and
    the lowest kurtosis x0 in [-1, 1] can have), flat images at 0 and at +1 (the largest mean)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1, size, size)
    return {
        "uniform": torch.rand(shape, generator=gen) * 2 - 1,
        "plus-minus-one": torch.randint(0, 2, shape, generator=gen).float() * 2 - 1,
        "zeros": torch.zeros(shape),
        "ones": torch.ones(shape),
    }


@pytest.mark.parametrize(
    ("diffusion", "cuts"),
    [(T50, [1, 10, 20, 30, 45, 49]), (T1000, [5, 100, 200, 400, 600, 900, 999])],
    ids=["T50", "T1000"],
)
def test_honest_8x8_uploads_pass(digits: Tensor, diffusion: Diffusion, cuts: list[int]) -> None:
    pol = policy(diffusion)
    sources = {"digits": digits, **noise_images(512, 8, seed=1)}
    total = 0
    for k, t in enumerate(cuts):
        for name, x0 in sources.items():
            xc = cut(diffusion, x0, t, seed=1000 + k)  # a stream apart from x0's
            # One big message (pooled tests, kurtosis on), client-sized ones, single images.
            for size in (xc.shape[0], 64, 1):
                for start in range(0, min(xc.shape[0], 128 if size == 1 else xc.shape[0]), size):
                    part = xc[start : start + size]
                    bad = refused(check(pol, part, t))
                    assert not bad, (name, t, size, bad[:1])
                    total += part.shape[0]
    assert total > 20_000


@pytest.fixture(scope="module")
def fashion() -> Tensor:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}")
    config = DataConfig(source="fashion-mnist", partition="iid", limit=2000)
    return load_local_data(config, ImageConfig(channels=1, size=28)).images


@pytest.mark.parametrize(
    ("diffusion", "cuts"), [(T50, [5, 20, 40]), (T1000, [50, 300, 700])], ids=["T50", "T1000"]
)
def test_honest_28x28_uploads_pass(fashion: Tensor, diffusion: Diffusion, cuts: list[int]) -> None:
    pol = policy(diffusion, size=28)
    sources = {"fashion-mnist": fashion, **noise_images(334, 28, seed=2)}
    for k, t in enumerate(cuts):
        for name, x0 in sources.items():
            xc = cut(diffusion, x0, t, seed=1000 + k)  # a stream apart from x0's
            for start in range(0, xc.shape[0], 334):  # a client's 1 MiB message
                bad = refused(check(pol, xc[start : start + 334], t))
                assert not bad, (name, t, bad[:1])
            assert not refused(check(pol, xc[:5], t))  # small messages: no kurtosis test


# ----- attacks are refused, with a reason that says what to fix --------------------------------


def _with_nonfinite(xc: Tensor) -> Tensor:
    xc = xc.clone()
    xc[0::2, 0, 3, 4] = math.inf
    xc[1::2, 0, 0, 0] = math.nan
    return xc


def _uniform_noise(x0: Tensor) -> Tensor:
    """sqrt(abar) x0 + sqrt(1 - abar) u with u uniform of variance 1 instead of N(0, 1)."""
    abar = T50.alpha_bar(T_CUT)
    u = (torch.rand(x0.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * math.sqrt(3)
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * u


def _laplace_noise(x0: Tensor) -> Tensor:
    """Laplace noise of variance 1 (scale 1 / sqrt(2)), by the inverse CDF."""
    abar = T50.alpha_bar(T_CUT)
    u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(4)) - 0.5
    e = -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2.0)
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * e


def _half_noise(x0: Tensor) -> Tensor:
    """Under-noised by half: each image passes alone, the message as a whole does not."""
    abar = T50.alpha_bar(T_CUT)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    return math.sqrt(abar) * x0 + 0.5 * math.sqrt(1 - abar) * noise


ATTACKS: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "huge finite values": (lambda x0: torch.full_like(x0, 1e30), "exceeds"),
    "inf and nan": (lambda x0: _with_nonfinite(cut(T50, x0, T_CUT)), "NaN or infinite"),
    "clean images": (lambda x0: x0, "clean or under-noised"),
    "constant images": (lambda x0: torch.full_like(x0, 0.3), "clean or under-noised"),
    "cut scaled x10": (lambda x0: 10 * cut(T50, x0, T_CUT), "exceeds"),
    "cut scaled x2": (lambda x0: 2 * cut(T50, x0, T_CUT), "scale images to [-1, 1]"),
    "cut scaled x0.1": (lambda x0: 0.1 * cut(T50, x0, T_CUT), "clean or under-noised"),
    "half the noise": (_half_noise, "clean or under-noised"),
    "images outside [-1, 1]": (lambda x0: cut(T50, 4 * x0, T_CUT), "scale images to [-1, 1]"),
    "uniform noise": (_uniform_noise, "lighter-tailed than Gaussian"),
    "laplace noise": (_laplace_noise, "heavier-tailed than Gaussian"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_with_its_reason(digits: Tensor, name: str) -> None:
    make, reason = ATTACKS[name]
    x0 = digits[:256]  # 16,384 pixels: every per-message test runs
    reasons = check(policy(), make(x0), T_CUT)
    assert all(r is not None for r in reasons), name
    # Every image is refused; most for the reason this attack is about (a few may trip an
    # earlier per-image test first, e.g. a Laplace outlier the amplitude bound).
    assert sum(reason in r for r in refused(reasons)) > len(reasons) / 2, (name, reasons[0])


def test_poisoned_images_do_not_take_honest_ones_down(digits: Tensor) -> None:
    xc = cut(T50, digits[:200], T_CUT)
    xc[7] = 1e30
    xc[9, 0, 2, 2] = math.nan
    xc[11] = 10 * xc[11]
    reasons = check(policy(), xc, T_CUT)
    assert [i for i, r in enumerate(reasons) if r is not None] == [7, 9, 11]


def test_duplicate_tensors_under_two_ids_are_refused(digits: Tensor) -> None:
    xc = cut(T50, digits[:100], T_CUT)
    xc[50] = xc[3]  # the same tensor under another id: the same noise
    # A near copy: the same noise plus a little.
    xc[60] = xc[4] + 0.01 * torch.randn(xc[4].shape, generator=torch.Generator().manual_seed(6))
    reasons = check(policy(), xc, T_CUT)
    assert sorted(i for i, r in enumerate(reasons) if r is not None) == [3, 4, 50, 60]
    assert "'img-50'" in (reasons[3] or "") and "'img-3'" in (reasons[50] or "")
    assert "draw independent noise" in (reasons[60] or "")
    # One id sent twice is a re-send (the pool keeps one copy), not a duplicate.
    ids = [f"img-{i}" for i in range(100)]
    ids[50] = "img-3"
    assert [i for i, r in enumerate(check(policy(), xc, T_CUT, ids)) if r] == [4, 60]


def test_the_same_image_with_fresh_noise_is_no_duplicate(digits: Tensor) -> None:
    x0 = digits[:1].expand(300, 1, 8, 8)  # 300 copies of one digit, each with its own noise
    assert not refused(check(policy(), cut(T50, x0.contiguous(), T_CUT), T_CUT))


def test_exact_copies_are_found_across_blocks() -> None:
    x = torch.randn(50, 16)
    x[49] = x[0]
    dist, other = nearest_other(x, [str(i) for i in range(50)], block=16, chunk=4)
    assert float(dist[49]) == 0.0 and int(other[49]) == 0 and int(other[0]) == 49
    assert bool((dist[1:49] > 1.0).all())


def test_wrong_t_cut_refuses_the_message(digits: Tensor) -> None:
    with pytest.raises(PolicyError, match="registered t_cut"):
        policy().check_batch(CutBatch("c", T_CUT + 1, ["a"], digits[:1]), T_CUT)


# ----- the thresholds ----------------------------------------------------------------------------


def test_chi2_quantiles_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for dof in (15, 63, 783, 4032):
        for p in (1e-9, 1e-13):
            assert chi2_quantile(dof, p, False) == pytest.approx(stats.chi2.ppf(p, dof), rel=1e-9)
            assert chi2_quantile(dof, p, True) == pytest.approx(stats.chi2.isf(p, dof), rel=1e-9)


def test_bounds_hold_for_extreme_honest_images() -> None:
    """The worst x0 in [-1, 1] for each bound, noised honestly, stays inside it."""
    abar = T50.alpha_bar(T_CUT)
    b = cut_bounds(abar, 64)
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    assert b.amplitude == pytest.approx(a + 6.74 * s, abs=0.01 * s)
    assert b.var_low < s * s < b.var_high and abar + s * s < b.var_high
    x0 = torch.randint(0, 2, (4096, 1, 8, 8)).float() * 2 - 1
    xc = cut(T50, x0, T_CUT).flatten(1)
    assert float(xc.var(dim=1, correction=0).max()) < b.var_high
    assert float(cut(T50, torch.ones(4096, 1, 8, 8), T_CUT).mean(dim=(1, 2, 3)).max()) < b.mean
    assert KURTOSIS_MIN_PIXELS <= 256 * 64


@pytest.mark.parametrize("size", [8, 28])
def test_noise_below_decides_as_the_noise_estimate_does(digits: Tensor, size: int) -> None:
    """The counting test agrees with `measure_noise_std(x) < floor` image by image, at floors
    on both sides of every estimate: honest cuts, clean images and half-noised ones."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.nn.functional.interpolate(digits[:200], size=(size, size), mode="bilinear")
    sigma = math.sqrt(1.0 - T50.alpha_bar(T_CUT))
    images = torch.cat(
        [
            cut(T50, x0, T_CUT, seed=4),
            x0,
            x0 + 0.5 * sigma * torch.randn(x0.shape, generator=gen),
        ]
    )
    estimate = measure_noise_std(images)
    # Floors between neighbouring estimates (the two differ in float32 rounding only when a
    # floor meets an estimate exactly), from the lowest to the highest.
    levels = torch.unique(estimate)
    between = (levels[1:] + levels[:-1]) / 2
    picks = torch.linspace(0, between.numel() - 1, 9).long()
    for floor in [0.0, *between[picks].tolist(), 9.0]:
        assert torch.equal(noise_below(images, floor), estimate < floor), floor
    assert bool(noise_below(images, 0.7 * sigma)[200:400].all())  # clean images fall below


def test_excess_kurtosis_matches_float64() -> None:
    gen = torch.Generator().manual_seed(5)
    for values in (
        torch.randn(300, 784, generator=gen) * 0.3 + 0.8,
        torch.rand(64, 64, generator=gen) * 2 - 1,
        torch.distributions.Laplace(0.0, 1.0).sample((20, 500)),
    ):
        d = values.double() - values.double().mean()
        exact = float(d.pow(4).mean() / d.square().mean().square() - 3.0)
        assert excess_kurtosis(values) == pytest.approx(exact, abs=1e-4)


# ----- the trainer never takes, keeps, saves or publishes a non-finite step ---------------------


def tiny_config(data_dir: Path) -> ServerConfig:
    return ServerConfig.model_validate(
        {
            "data_dir": str(data_dir),
            "schedule": {"num_timesteps": 50},
            "image": {"channels": 1, "size": 8},
            "model": {"block_out_channels": [8, 16], "attention_levels": [], "norm_num_groups": 4},
            "train": {"batch_size": 16, "publish_every": 1, "checkpoint_every": 5},
        }
    )


def make_trainer(tmp_path: Path) -> Trainer:
    return Trainer(
        tiny_config(tmp_path),
        T50,
        pool=None,
        device=torch.device("cpu"),
        checkpoint_path=tmp_path / "c.pt",
    )


def test_trainer_skips_poisoned_steps_and_saves_finite_weights(
    digits: Tensor, tmp_path: Path
) -> None:
    trainer = make_trainer(tmp_path)
    honest = cut(T50, digits[:300], T_CUT)
    poisoned = torch.full((16, 1, 8, 8), 1e30)  # bypasses the guard on purpose
    trainer.add_cuts(honest, torch.full((300,), T_CUT), torch.zeros(300, dtype=torch.long))
    trainer.add_cuts(poisoned, torch.full((16,), T_CUT), torch.ones(16, dtype=torch.long))
    # A batch of 16 drawn from the pool of 316 holds a poisoned image about half the time.
    losses = [trainer.train_step() for _ in range(8)]
    assert trainer.step == 8
    assert 0 < trainer.nonfinite_steps < 8
    assert sum(not math.isfinite(v) for v in losses) == trainer.nonfinite_steps
    assert all_finite((trainer.model.state_dict(), trainer.ema.state_dict()))
    assert math.isfinite(trainer.last_loss)
    assert trainer._publish() and all_finite(trainer.hub.model.state_dict())
    assert trainer.save()
    state = load_checkpoint(tmp_path / "c.pt")
    assert state is not None and state["step"] == 8
    assert state["last_loss"] == trainer.last_loss
    assert all_finite((state["model"], state["ema"], state["optimizer"]))


def test_trainer_rolls_back_a_step_that_overflows_the_weights(
    digits: Tensor, tmp_path: Path
) -> None:
    trainer = make_trainer(tmp_path)
    trainer.add_cuts(cut(T50, digits[:32], T_CUT), torch.full((32,), T_CUT), torch.zeros(32))
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer._remember_good()
    # A finite loss and gradient can still give non-finite weights: a corrupt AdamW moment.
    param = next(trainer.model.parameters())
    trainer.optimizer.state[param]["exp_avg"].fill_(math.inf)
    assert math.isfinite(trainer.train_step())
    assert trainer.nonfinite_steps == 1 and trainer.step == 2
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all_finite((after, trainer.ema.state_dict(), trainer.optimizer.state_dict()))
    # The optimizer came back too: training goes on with finite steps.
    assert math.isfinite(trainer.train_step()) and trainer.nonfinite_steps == 1
    assert all_finite(trainer.model.state_dict())


def test_trainer_never_saves_or_publishes_non_finite_weights(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    version = trainer.hub.version
    with torch.no_grad():
        next(trainer.ema.parameters()).fill_(math.nan)
    assert not trainer.save() and not (tmp_path / "c.pt").exists()
    assert not trainer._publish() and trainer.hub.version == version
    assert all_finite(trainer.hub.model.state_dict())
