"""`collafuse export` and warm starts: real checkpoints, real folders, a real server on port 0."""

from __future__ import annotations

import hashlib
import json
import logging
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DModel
from test_integration import tiny_client_config, tiny_server_config
from torch import nn

from collafuse.cli import main
from collafuse.client.daemon import ClientDaemon, state_paths
from collafuse.client.ledger import Ledger
from collafuse.client.trainer import LocalTrainer
from collafuse.common.config import ClientConfig, ServerConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.export import (
    CLIENT_CHECKPOINT,
    MANIFEST,
    SERVER_CHECKPOINT,
    WarmStartError,
    export_client,
    export_server,
    load_exported_unet,
    read_manifest,
)
from collafuse.common.nets import build_unet
from collafuse.server.app import StartupError, start_server
from collafuse.server.trainer import Trainer, build_server_unet

T_CUT = 20  # cut_ratio 0.4 of T = 50 in the tiny configs


def server_config(data_dir: Path, **changes: Any) -> ServerConfig:
    return tiny_server_config(data_dir).model_copy(update=changes)


def make_server_checkpoint(data_dir: Path, steps: int) -> Trainer:
    """A server trainer on a fixed pool that trained `steps` steps, saving after each."""
    config = server_config(data_dir)
    trainer = Trainer(
        config,
        Diffusion.from_config(config.schedule),
        pool=None,
        device=torch.device("cpu"),
        checkpoint_path=data_dir / SERVER_CHECKPOINT,
    )
    cuts = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # (N, 1, 8, 8)
    trainer.add_cuts(cuts, torch.full((32,), T_CUT), torch.zeros(32, dtype=torch.long))
    for _ in range(steps):
        trainer.train_step()
        assert trainer.save()
    return trainer


def client_config(state_dir: Path, **extra: Any) -> ClientConfig:
    return tiny_client_config(state_dir, "127.0.0.1:1", 0, **extra)


def make_client_checkpoint(state_dir: Path, steps: int = 3) -> LocalTrainer:
    config = client_config(state_dir)
    schedule = tiny_server_config(state_dir).schedule
    trainer = LocalTrainer(config, schedule, T_CUT, state_paths(config)["checkpoint"])
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for _ in range(steps):
        trainer.train_step(images)
    trainer.save()
    return trainer


def outputs(model: nn.Module, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The network's answer on a fixed batch: x_t (3, 1, 8, 8) at t = 1, 20, 50."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out: torch.Tensor = model(x, torch.tensor([1, 20, 50]), class_labels=labels).sample
    return out


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def exported(folder: Path) -> nn.Module:
    """The folder's network as any diffusers program loads it."""
    model = UNet2DModel.from_pretrained(
        str(folder / "unet"), local_files_only=True, low_cpu_mem_usage=False
    )
    return model.eval()


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# ----- export ------------------------------------------------------------------------------


def test_a_server_export_computes_what_the_checkpoint_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "server"
    trainer = make_server_checkpoint(data_dir, steps=3)
    ckpt = data_dir / SERVER_CHECKPOINT
    out = tmp_path / "export"
    assert main(["export", "--server-checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "exported the server model (EMA weights of step 3" in capsys.readouterr().out

    assert sorted(p.name for p in (out / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700  # private, like the data dir it came from
    source = build_server_unet(trainer.config)
    source.load_state_dict(trainer.ema.state_dict())
    source.eval()
    labels = torch.tensor([0, 3, 16])  # a client, another, the unconditional token
    assert torch.equal(outputs(exported(out), labels), outputs(source, labels))

    meta = json.loads((out / MANIFEST).read_text())
    diffusion = Diffusion.from_config(trainer.config.schedule)
    min_cut = diffusion.equivalent_timestep(1.0)
    assert meta["role"] == "server" and meta["prediction"] == "epsilon"
    assert meta["schedule"] == trainer.config.schedule.model_dump(mode="json")
    assert meta["schedule_hash"] == diffusion.hash
    assert meta["image_shape"] == [1, 8, 8]
    assert meta["unet"] == trainer.config.model.model_dump(mode="json")
    assert meta["t_range"] == [min_cut + 1, 50] and meta["t_cut"] == min_cut
    assert meta["conditioning"]["num_class_embeds"] == 17
    assert meta["conditioning"]["unconditional_label"] == 16
    assert meta["conditioning"]["trained_labels"] == [0]
    assert meta["source"]["step"] == 3
    assert meta["source"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["source"]["checksum_verified"] is True
    assert set(meta["files"]) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}

    # The data dir names the same checkpoint, and the library call writes the same model.
    again = export_server(data_dir, tmp_path / "again")
    assert again.source.sha256 == meta["source"]["sha256"]
    assert again.files == meta["files"]


def test_a_client_export_computes_what_the_checkpoint_does(tmp_path: Path) -> None:
    state_dir = tmp_path / "client"
    trainer = make_client_checkpoint(state_dir)
    # The export finds a client's model where the daemon keeps it.
    assert state_paths(trainer.config)["checkpoint"] == state_dir / CLIENT_CHECKPOINT
    out = tmp_path / "export"
    assert main(["export", "--client-state", str(state_dir), "--out", str(out)]) == 0

    source = build_unet(trainer.config.model, trainer.config.image)
    source.load_state_dict(trainer.ema.state_dict())
    source.eval()
    assert torch.equal(outputs(exported(out)), outputs(source))
    meta = read_manifest(out)
    assert meta.role == "client" and meta.t_cut == T_CUT and meta.cut_ratio == 0.4
    assert meta.t_range == (1, T_CUT)
    assert meta.conditioning.num_class_embeds is None
    assert meta.source.step == 3 and meta.source.kind == "client-checkpoint"
    loaded, again = load_exported_unet(out)
    assert again == meta and same_weights(loaded, source)


def test_a_damaged_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "server"
    make_server_checkpoint(data_dir, steps=3)  # server.pt, server.pt.1, server.pt.2
    ckpt = data_dir / SERVER_CHECKPOINT
    flip_byte(ckpt)
    out = tmp_path / "export"
    assert main(["export", "--server-checkpoint", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(ckpt) in err and "sha256" in err
    assert "server.pt.1" in err  # the older generation to export instead
    assert not out.exists()
    # An older generation is exported as asked.
    older = ckpt.with_name("server.pt.1")
    assert main(["export", "--server-checkpoint", str(older), "--out", str(out)]) == 0
    assert read_manifest(out).source.step == 2

    client_ckpt = tmp_path / "client" / CLIENT_CHECKPOINT
    make_client_checkpoint(tmp_path / "client")
    client_ckpt.write_bytes(client_ckpt.read_bytes()[:-100])  # a partial copy
    assert main(["export", "--client-state", str(tmp_path / "client"), "--out", str(out)]) == 1
    assert "truncated" in capsys.readouterr().err


def test_bad_usage_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_client_checkpoint(tmp_path / "client")
    out = str(tmp_path / "out")
    assert main(["export", "--server-checkpoint", str(tmp_path / "nothing"), "--out", out]) == 2
    assert "no server checkpoint" in capsys.readouterr().err
    client = str(tmp_path / "client" / CLIENT_CHECKPOINT)
    assert main(["export", "--server-checkpoint", client, "--out", out]) == 2
    assert "--client-state" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: neither or both sources
        main(["export", "--out", out])
    assert exit_info.value.code == 2


def test_overwrite_is_explicit_and_replaces_only_an_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "client"
    make_client_checkpoint(state_dir, steps=2)
    out = tmp_path / "export"
    args = ["export", "--client-state", str(state_dir), "--out", str(out)]
    assert main(args) == 0
    before = (out / MANIFEST).read_text()
    make_client_checkpoint(state_dir, steps=1)  # resumes: step 3
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / MANIFEST).read_text() == before
    assert main([*args, "--overwrite"]) == 0
    assert read_manifest(out).source.step == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert (
        main(["export", "--client-state", str(state_dir), "--out", str(other), "--overwrite"]) == 2
    )
    assert "not an export" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--client-state", str(state_dir), "--out", str(empty)]) == 0


# ----- warm start of a server --------------------------------------------------------------


def test_a_server_starts_from_an_export_and_its_own_checkpoint_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = make_server_checkpoint(tmp_path / "old", steps=3)
    folder = tmp_path / "export"
    export_server(tmp_path / "old", folder)
    expected = exported(folder)

    data_dir = tmp_path / "new"
    with caplog.at_level(logging.INFO, logger="collafuse.server"):
        running = start_server(server_config(data_dir, init_from=folder))
    try:
        hub = running.trainer.hub
        assert hub.version == 0 and running.trainer.step == 0
        # The first published model is the exported one, and training continues from it.
        assert same_weights(hub.model, expected)
        assert same_weights(running.trainer.model, expected)
        assert same_weights(running.trainer.ema, expected)
        assert running.trainer.checkpoint_path == data_dir / SERVER_CHECKPOINT
        assert f"starting from {folder}" in messages(caplog)
        running.trainer.save()  # now the server has a checkpoint of its own
    finally:
        running.stop()

    # Its own checkpoint wins over the folder: here a later model of the old server.
    trainer.train_step()
    assert trainer.save()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="collafuse.server"):
        running = start_server(server_config(tmp_path / "old", init_from=folder))
    try:
        assert running.trainer.step == 4
        assert same_weights(running.trainer.hub.model, trainer.ema)
        assert not same_weights(running.trainer.hub.model, expected)
        assert f"init_from {folder} ignored" in messages(caplog)
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"model": {"block_out_channels": [8, 32], "attention_levels": [], "norm_num_groups": 4}}, "its model is"),
        ({"image": {"channels": 1, "size": 16}}, "image shape is (1, 8, 8)"),
        ({"schedule": {"num_timesteps": 60}}, "schedule hash"),
        ({"policy": {"max_clients": 4}}, "it has 17 label embeddings, this server needs 5"),
    ],
)  # fmt: skip
def test_a_server_refuses_a_folder_that_does_not_fit(
    tmp_path: Path, changes: dict[str, Any], words: str
) -> None:
    make_server_checkpoint(tmp_path / "old", steps=1)
    folder = tmp_path / "export"
    export_server(tmp_path / "old", folder)
    data = tiny_server_config(tmp_path / "new").model_dump(mode="json")
    data.update(changes, init_from=str(folder))
    with pytest.raises(StartupError, match="cannot start from") as info:
        start_server(ServerConfig.model_validate(data))
    assert words in str(info.value)


def test_a_server_refuses_a_client_model_and_a_damaged_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_client_checkpoint(tmp_path / "client")
    folder = tmp_path / "client-export"
    export_client(tmp_path / "client", folder)
    with pytest.raises(StartupError, match="it holds a client model, this is a server"):
        start_server(server_config(tmp_path / "a", init_from=folder))
    with pytest.raises(StartupError, match=r"no collafuse\.json"):
        start_server(server_config(tmp_path / "b", init_from=tmp_path / "client"))

    make_server_checkpoint(tmp_path / "old", steps=1)
    folder = tmp_path / "export"
    export_server(tmp_path / "old", folder)
    flip_byte(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(StartupError, match="does not match the sha256"):
        start_server(server_config(tmp_path / "c", init_from=folder))

    # From the command line a folder that does not fit is a configuration error: exit 2.
    config = tmp_path / "server.toml"
    config.write_text(f'init_from = "{tmp_path / "client-export"}"\n')
    args = ["server", "--config", str(config), "--data-dir", str(tmp_path / "d")]
    assert main([*args, "--listen", "127.0.0.1:0", "--insecure"]) == 2
    assert "cannot start from" in capsys.readouterr().err


# ----- warm start of a client --------------------------------------------------------------


def test_a_client_starts_from_an_export_and_its_own_checkpoint_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_client_checkpoint(tmp_path / "old")
    folder = tmp_path / "export"
    export_client(tmp_path / "old", folder)
    expected = exported(folder)

    config = client_config(tmp_path / "new", init_from=folder)
    schedule = tiny_server_config(tmp_path).schedule
    checkpoint = state_paths(config)["checkpoint"]
    fresh = LocalTrainer(config, schedule, T_CUT, checkpoint)
    assert fresh.step == 0
    assert same_weights(fresh.model, expected) and same_weights(fresh.ema, expected)

    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    fresh.train_step(images)
    fresh.save()
    with caplog.at_level(logging.INFO, logger="collafuse.client.trainer"):
        resumed = LocalTrainer(config, schedule, T_CUT, checkpoint)
    assert resumed.step == 1 and same_weights(resumed.ema, fresh.ema)
    assert f"init_from {folder} ignored" in messages(caplog)

    # A model trained up to another cut would hand over at the wrong noise level.
    other = client_config(tmp_path / "other", init_from=folder, cut_ratio=0.5)
    with pytest.raises(WarmStartError, match="t_cut=20, this client's cut is t_cut=25"):
        LocalTrainer(other, schedule, 25, state_paths(other)["checkpoint"])


def test_a_client_daemon_refuses_a_folder_before_releasing_anything(tmp_path: Path) -> None:
    make_client_checkpoint(tmp_path / "old")
    folder = tmp_path / "export"
    export_client(tmp_path / "old", folder)
    running = start_server(tiny_server_config(tmp_path / "server"))
    try:
        # cut_ratio 0.5 gives t_cut = 25; the folder's model was trained up to t_cut = 20.
        config = tiny_client_config(
            tmp_path / "c0", running.address, 0, cut_ratio=0.5, init_from=str(folder)
        )
        result: dict[str, BaseException] = {}

        def run() -> None:
            try:
                ClientDaemon(config).run()
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=60)
        assert isinstance(result.get("error"), WarmStartError)
        assert "t_cut=25" in str(result["error"])
        ledger = Ledger(state_paths(config)["ledger"])
        try:
            assert ledger.summary().images_released == 0
        finally:
            ledger.close()
        status = json.loads(state_paths(config)["status"].read_text())
        assert status["phase"] == "refused" and "cannot start from" in status["last_error"]
    finally:
        running.stop()
