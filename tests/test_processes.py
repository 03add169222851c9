"""Real processes: SIGKILL the server mid-training and restart it; run the demo end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from collafuse.client.remote import Remote, open_channel
from collafuse.common.config import ScheduleConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import ServerStatus

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _toml(data: dict[str, Any]) -> str:
    out = []
    tables = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            out.append(f"{k} = {json.dumps(v)}")
    for k, v in tables:
        out.append(f"[{k}]")
        out += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    return "\n".join(out) + "\n"


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "collafuse", *args],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=ENV,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def _status(address: str) -> ServerStatus | None:
    remote = Remote(open_channel(address, insecure=True))
    try:
        return remote.status(timeout=2)
    except Exception:
        return None
    finally:
        remote.close()


def test_server_sigkill_restart_keeps_pool_and_step(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    data_dir = tmp_path / "server"
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(
        _toml(
            {
                "data_dir": str(data_dir),
                "insecure": True,
                "threads": 1,
                "schedule": {"num_timesteps": 50},
                "image": {"channels": 1, "size": 8},
                "model": {
                    "block_out_channels": [8, 16],
                    "attention_levels": [],
                    "norm_num_groups": 4,
                },
                "train": {"batch_size": 8, "checkpoint_every": 5, "publish_every": 5},
            }
        )
    )
    log = tmp_path / "server.log"
    procs.append(_spawn(["server", "--config", str(server_toml), "--listen", "127.0.0.1:0"], log))
    info = data_dir / "server.json"
    _wait(info.exists, 60, "the server to start")
    address = json.loads(info.read_text())["address"]
    port = int(json.loads(info.read_text())["port"])

    client_toml = tmp_path / "client.toml"
    client_toml.write_text(
        _toml(
            {
                "client_id": "edge-1",
                "server": address,
                "insecure": True,
                "threads": 1,
                "state_dir": str(tmp_path / "client"),
                "cut_ratio": 0.5,  # release SNR 0.074 at T=50: both default policies admit it
                "heartbeat_s": 0.3,
                "max_backoff_s": 0.5,
                "image": {"channels": 1, "size": 8},
                "data": {"source": "digits", "limit": 80},
                "model": {
                    "block_out_channels": [4, 8],
                    "attention_levels": [],
                    "norm_num_groups": 4,
                },
                "train": {"steps": 10, "batch_size": 8},
            }
        )
    )
    client_status = tmp_path / "client" / "status.json"
    procs.append(_spawn(["client", "run", "--config", str(client_toml)], tmp_path / "client.log"))

    def client_state() -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(client_status.read_text())
            return data
        except (OSError, ValueError):
            return {}

    _wait(lambda: client_state().get("phase") == "idle", 120, "the client to upload and train")
    ckpt = data_dir / "checkpoints" / "server.pt"
    _wait(
        lambda: ckpt.exists() and (_status(address) or _dummy()).train_step >= 10, 120, "training"
    )
    before = _status(address)
    assert before is not None
    saved_step = int(torch.load(ckpt, weights_only=True)["step"])
    assert saved_step >= 5

    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=10)
    # The client's heartbeats now fail and it backs off.
    _wait(lambda: "UNAVAILABLE" in client_state().get("last_error", ""), 30, "the client to notice")

    procs.append(
        _spawn(["server", "--config", str(server_toml), "--listen", f"127.0.0.1:{port}"], log)
    )
    _wait(lambda: _status(address) is not None, 60, "the restarted server")
    after = _status(address)
    assert after is not None
    assert {p.client_id: p.num_images for p in after.pools} == {"edge-1": 80}
    assert after.train_step >= saved_step  # resumed from the checkpoint, not from zero
    # The running client found the server again and carries on.
    _wait(lambda: client_state().get("reconnects", 0) >= 1, 30, "the client to reconnect")
    state = client_state()
    assert state["phase"] == "idle" and state["last_error"] == ""
    assert procs[1].poll() is None
    # Training continues after the restart.
    _wait(lambda: (_status(address) or _dummy()).train_step > after.train_step, 60, "more training")
    procs[1].send_signal(signal.SIGTERM)
    assert procs[1].wait(timeout=30) == 0


def _dummy() -> Any:
    class _S:
        train_step = -1

    return _S()


def test_demo_tiny(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable, "-m", "collafuse", "demo", "--clients", "2", "--out", str(out),
            "--server-steps", "20", "--client-steps", "10", "--timesteps", "50",
            "--images-per-client", "100", "--samples", "4", "--fid-samples", "8",
            "--server-width", "8", "--client-width", "4", "--batch-size", "8",
        ],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "server step" in proc.stdout  # progress was shown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["server"]["train_step"] == 20 and summary["server"]["model_version"] == 20
    assert summary["server"]["pool"] == {"client-0": 100, "client-1": 100}
    # What the server saw: t_cut = round(0.5 * 50), at the SNR the schedule gives there.
    snr = Diffusion.from_config(ScheduleConfig(num_timesteps=50)).snr(25)
    assert summary["release"] == {
        "T": 50, "t_cut": [25], "t_cut_over_T": [0.5], "snr": [round(snr, 4)],
        "policy_max_release_snr": 0.1,
    }  # fmt: skip
    # Quality: 8 samples per client against each client's 5,000 held-out test images.
    q = summary["quality"]
    assert q["samples"] == 16 and q["real"] == 10_000
    assert 0 < q["fid_reference"] < q["fid_pooled"] < 1e4
    assert 0 <= q["own_class_rate"] <= 1 and q["own_class_chance"] == 0.5
    assert q["classifier_test_accuracy"] > 0.85
    for c in summary["clients"]:
        assert c["images_released"] == 100
        assert c["bytes_uploaded"] == 100 * 28 * 28 * 4
        assert c["local_steps"] == 10
        assert c["release_snr"] == round(snr, 4)
        assert c["fid"] > 0 and 0 <= c["own_class_rate"] <= 1
        grid = Image.open(c["grid"])
        assert grid.size[0] > 28 and grid.mode == "L"
        # The grid shows --samples of the 8 images synthesized for the FID.
        assert len(list(Path(c["grid"]).parent.glob("sample-*.png"))) == 4
    text = (out / "summary.md").read_text()
    assert text.startswith("# CollaFuse demo summary")
    assert f"release SNR abar/(1-abar) {snr:.3g}" in text and "t_cut/T 0.5" in text
    assert f"pooled FID {q['fid_pooled']:.1f} of 16 samples against 10,000 held-out" in text
    assert "pooled FID" in proc.stdout and "What the server saw" in proc.stdout


def test_sighup_reloads_tokens_and_sigterm_exits_cleanly(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    from collafuse.server.auth import hash_token

    data_dir = tmp_path / "server"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'alice = "{hash_token("alice-secret")}"\n')
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(
        _toml(
            {
                "data_dir": str(data_dir),
                "insecure": True,
                "threads": 1,
                "auth_tokens": str(tokens),
                "schedule": {"num_timesteps": 50},
                "image": {"channels": 1, "size": 8},
                "model": {
                    "block_out_channels": [8, 16],
                    "attention_levels": [],
                    "norm_num_groups": 4,
                },
            }
        )
    )
    log = tmp_path / "server.log"
    server = _spawn(["server", "--config", str(server_toml), "--listen", "127.0.0.1:0"], log)
    procs.append(server)
    info = data_dir / "server.json"
    _wait(info.exists, 60, "the server to start")
    address = json.loads(info.read_text())["address"]

    def status_as(token: str) -> ServerStatus | None:
        remote = Remote(open_channel(address, insecure=True, token=token))
        try:
            return remote.status(timeout=5)
        except Exception:
            return None
        finally:
            remote.close()

    _wait(lambda: status_as("alice-secret") is not None, 30, "alice to be served")
    assert status_as("bob-secret") is None  # not known yet
    tokens.write_text(tokens.read_text() + f'bob = "{hash_token("bob-secret")}"\n')
    server.send_signal(signal.SIGHUP)
    _wait(lambda: status_as("bob-secret") is not None, 30, "bob's token after SIGHUP")
    assert status_as("alice-secret") is not None
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0
    assert "reloaded 2 tokens" in log.read_text()
