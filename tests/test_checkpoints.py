"""State on disk is verified (checksums, rotation, refusals) and training is supervised."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_integration import tiny_server_config

from collafuse.common.checkpoint import (
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    load_latest,
    save_atomic,
)
from collafuse.common.diffusion import Diffusion
from collafuse.server.trainer import Trainer

T_CUT = 20  # of T = 50 in the tiny config


def state_of(step: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(step)
    return {"step": step, "weight": torch.randn(64, 32, generator=gen), "name": "unit"}


def flip_inside(path: Path, tensor: torch.Tensor) -> None:
    """Overwrite 64 bytes in the middle of `tensor`'s bytes inside the file at `path`."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().cpu().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes are not in the file once"
    middle = at + len(raw) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# ----- the file format ---------------------------------------------------------------------


def test_bit_flip_in_a_tensor_falls_back_to_the_previous_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ck" / "server.pt"
    save_atomic(state_of(1), path)
    save_atomic(state_of(2), path)
    flip_inside(path, state_of(2)["weight"])  # type: ignore[arg-type]
    # torch alone would hand back the damaged weights without a word.
    assert torch.load(path, weights_only=True)["step"] == 2
    with caplog.at_level(logging.WARNING, logger="collafuse.checkpoint"):
        loaded = load_latest(path)
    assert loaded is not None and loaded.verified
    assert loaded.path == path.with_name("server.pt.1") and loaded.state["step"] == 1
    assert torch.equal(loaded.state["weight"], state_of(1)["weight"])  # type: ignore[arg-type]
    assert [(p, "sha256" in why) for p, why in loaded.skipped] == [(path, True)]
    text = messages(caplog)
    assert f"{path} is damaged" in text and f"using the older checkpoint {path}.1" in text


def test_bit_flip_in_the_only_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "server.pt"
    save_atomic(state_of(1), path)
    flip_inside(path, state_of(1)["weight"])  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="sha256") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "restore" in str(err.value)


def _zero(data: bytes, scratch: Path) -> bytes:
    return b""


def _truncated(data: bytes, scratch: Path) -> bytes:
    return data[: len(data) * 2 // 3]


def _garbage(data: bytes, scratch: Path) -> bytes:
    return os.urandom(len(data))


def _tail_cut(data: bytes, scratch: Path) -> bytes:
    return data[:-30]  # the end-of-archive record and part of the checksum are gone


def _unsafe_pickle(data: bytes, scratch: Path) -> bytes:
    torch.save({"step": 1, "thing": argparse.Namespace(a=1)}, scratch)  # an arbitrary class
    return scratch.read_bytes()


@pytest.mark.parametrize(
    "damage", [_zero, _truncated, _garbage, _tail_cut, _unsafe_pickle], ids=lambda f: f.__name__
)
def test_damaged_files_are_refused_in_plain_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[bytes, Path], bytes]
) -> None:
    path = tmp_path / "ck" / "server.pt"
    save_atomic(state_of(1), path)
    path.write_bytes(damage(path.read_bytes(), tmp_path / "scratch.pt"))
    with caplog.at_level(logging.DEBUG), pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert str(path) in text and "restore" in text
    assert isinstance(err.value, ValueError)
    # torch's own advice is to load with weights_only=False, i.e. to run the file's code.
    for said in (text, messages(caplog)):
        assert "weights_only" not in said and "weights only" not in said.lower()


def test_a_checkpoint_without_checksum_is_still_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.pt"
    torch.save(state_of(3), path)  # as written before checksums existed
    with caplog.at_level(logging.WARNING, logger="collafuse.checkpoint"):
        loaded = load_latest(path)
    assert loaded is not None and not loaded.verified and loaded.state["step"] == 3
    assert "has no sha256" in messages(caplog)
    flip_inside(path, state_of(3)["weight"])  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="CRC-32"):
        load_checkpoint(path)


def test_rotation_keeps_k_private_files_and_torch_still_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "server.pt"
    for step in range(1, 6):
        save_atomic(state_of(step), path)
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["server.pt", "server.pt.1", "server.pt.2"]  # K = 3 by default, no temps
    assert [load_checkpoint(p)["step"] for p in checkpoint_files(path)] == [5, 4, 3]  # type: ignore[index]
    assert torch.load(path, weights_only=True)["step"] == 5  # still a plain torch.save file
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in path.parent.iterdir())
    save_atomic(state_of(6), path, keep=2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["server.pt", "server.pt.1"]
    save_atomic(state_of(7), path, keep=1)
    assert [p.name for p in path.parent.iterdir()] == ["server.pt"]
    assert load_checkpoint(path)["step"] == 7  # type: ignore[index]


def test_a_missing_newest_file_falls_back_and_nothing_at_all_is_none(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "server.pt"
    assert load_checkpoint(path) is None
    save_atomic(state_of(1), path)
    save_atomic(state_of(2), path)
    path.unlink()
    loaded = load_latest(path)
    assert loaded is not None and loaded.state["step"] == 1
    assert loaded.skipped == ((path, "is missing"),)


# ----- the trainer: resume, history, --start-over --------------------------------------------


def make_trainer(tmp_path: Path, start_over: bool = False, **train: object) -> Trainer:
    config = tiny_server_config(tmp_path / "server", **train)
    return Trainer(
        config,
        Diffusion.from_config(config.schedule),
        pool=None,
        device=torch.device("cpu"),
        checkpoint_path=tmp_path / "checkpoints" / "server.pt",
        start_over=start_over,
    )


def feed(trainer: Trainer, n: int = 64) -> None:
    cuts = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # (N, 1, 8, 8)
    trainer.add_cuts(cuts, torch.full((n,), T_CUT), torch.zeros(n, dtype=torch.long))


def trained(tmp_path: Path, saves: int) -> Trainer:
    """A trainer that trained `saves` steps and saved after each."""
    trainer = make_trainer(tmp_path)
    feed(trainer)
    for _ in range(saves):
        trainer.train_step()
        assert trainer.save()
    return trainer


def test_a_lost_checkpoint_is_refused_unless_starting_over(tmp_path: Path) -> None:
    trained(tmp_path, saves=2)
    history = tmp_path / "checkpoints" / "history.json"
    assert '"step": 2' in history.read_text()
    for p in checkpoint_files(tmp_path / "checkpoints" / "server.pt"):
        p.unlink()
    with pytest.raises(ValueError, match="--start-over") as err:
        make_trainer(tmp_path)
    assert str(tmp_path / "checkpoints" / "server.pt") in str(err.value)
    assert "step 2" in str(err.value)
    fresh = make_trainer(tmp_path, start_over=True)
    assert fresh.step == 0 and not history.exists()
    (aside,) = (tmp_path / "checkpoints").glob("before-start-over-*")
    assert [p.name for p in aside.iterdir()] == ["history.json"]
    assert make_trainer(tmp_path).step == 0  # the record is gone: a plain restart is fine now


def test_a_damaged_checkpoint_falls_back_and_the_lost_steps_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = trained(tmp_path, saves=2)
    path = tmp_path / "checkpoints" / "server.pt"
    weights = first.model.state_dict().values()
    flip_inside(path, max(weights, key=lambda w: w.numel()))
    with caplog.at_level(logging.WARNING):
        resumed = make_trainer(tmp_path)
    assert resumed.step == 1
    text = messages(caplog)
    assert f"{path} is damaged" in text and f"{path}.1" in text and "to step 2 is lost" in text


def test_no_intact_checkpoint_names_start_over_which_moves_them_aside(tmp_path: Path) -> None:
    trained(tmp_path, saves=1)
    path = tmp_path / "checkpoints" / "server.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="--start-over") as err:
        make_trainer(tmp_path)
    assert f"checkpoint {path} is empty" in str(err.value)
    assert make_trainer(tmp_path, start_over=True).step == 0
    (aside,) = path.parent.glob("before-start-over-*")
    assert sorted(p.name for p in aside.iterdir()) == ["history.json", "server.pt"]
    assert not path.exists()


# ----- the trainer: supervision --------------------------------------------------------------


def test_the_trainer_restarts_after_failures_and_reports_its_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = make_trainer(tmp_path, max_steps=4)
    assert trainer.state == "waiting for data" and trainer.restarts == 0
    feed(trainer)
    assert trainer.state == "training"
    real = trainer.train_step
    calls = 0

    def flaky() -> float:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("injected fault\nsecond line")
        return real()

    monkeypatch.setattr(trainer, "train_step", flaky)
    seen: list[str] = []
    with caplog.at_level(logging.INFO, logger="collafuse.server.trainer"):
        trainer.start()
        deadline = time.monotonic() + 15
        while trainer.state != "finished" and time.monotonic() < deadline:
            if not seen or seen[-1] != trainer.state:
                seen.append(trainer.state)
            time.sleep(0.01)
        assert trainer.state == "finished", seen
        assert trainer.restarts == 2 and trainer.step == 4
        started = time.monotonic()
        trainer.stop()
    assert time.monotonic() - started < 2
    assert trainer.state == "stopped"
    assert "restarting in 1s after: RuntimeError: injected fault" in seen
    assert "restarting in 2s after: RuntimeError: injected fault" in seen
    assert seen.index("restarting in 1s after: RuntimeError: injected fault") < seen.index(
        "restarting in 2s after: RuntimeError: injected fault"
    )
    # The traceback is logged once; the same error again gets one line.
    failures = [r for r in caplog.records if "training loop failed" in r.getMessage()]
    assert [r.exc_info is not None for r in failures] == [True, False]
    assert load_checkpoint(tmp_path / "checkpoints" / "server.pt")["step"] == 4  # type: ignore[index]


def test_stop_is_prompt_while_waiting_to_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_trainer(tmp_path)
    feed(trainer)
    trainer.train_step()

    def broken() -> float:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "train_step", broken)
    trainer.RESTART_BACKOFF_S = 30.0  # a long wait, as after many failures
    trainer.start()
    deadline = time.monotonic() + 10
    while not trainer.state.startswith("restarting") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trainer.state.startswith("restarting in 30s after: OSError:"), trainer.state
    started = time.monotonic()
    trainer.stop()
    assert time.monotonic() - started < 2 and trainer.restarts == 0
    assert trainer.state == "stopped"
    assert load_checkpoint(tmp_path / "checkpoints" / "server.pt")["step"] == 1  # type: ignore[index]


def test_a_background_checkpoint_is_the_state_at_its_step_while_training_goes_on(
    tmp_path: Path,
) -> None:
    trainer = make_trainer(tmp_path)
    feed(trainer)
    for _ in range(3):
        trainer.train_step()
    at_save = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.save(background=True)
    # The host copy is the rollback point at once, before the write ends.
    assert trainer._good is not None and trainer._good.step == 3
    for _ in range(2):  # training goes on beside the writer
        trainer.train_step()
    trainer.wait_for_checkpoint()
    state = load_checkpoint(tmp_path / "checkpoints" / "server.pt")
    assert state is not None and state["step"] == 3
    assert all(torch.equal(state["model"][k], at_save[k]) for k in at_save)
    assert not torch.equal(trainer.model.state_dict()["conv_in.weight"], at_save["conv_in.weight"])
    assert '"step": 3' in (tmp_path / "checkpoints" / "history.json").read_text()
    # A second save waits for the first write: the files stay in step order.
    assert trainer.save(background=True) and trainer.save()
    assert load_checkpoint(tmp_path / "checkpoints" / "server.pt")["step"] == 5  # type: ignore[index]
    resumed = make_trainer(tmp_path)
    assert resumed.step == 5
