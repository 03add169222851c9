"""Configuration: TOML loading, overrides, constraints and the checkpoint record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from collafuse import __version__
from collafuse.common.config import (
    CLIENT_UNET,
    SERVER_UNET,
    ClientConfig,
    ConfigError,
    ImageConfig,
    ServerConfig,
    config_record,
    load_config,
)
from collafuse.common.nets import build_unet, count_parameters


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('listen = "0.0.0.0:9000"\n[train]\nbatch_size = 8\n')
    cfg = load_config(ServerConfig, path, ["train.lr=0.01", "schedule.beta_schedule=cosine"])
    assert cfg.listen == "0.0.0.0:9000"
    assert cfg.train.batch_size == 8 and cfg.train.lr == 0.01
    assert cfg.schedule.beta_schedule == "cosine" and cfg.schedule.num_timesteps == 1000
    with pytest.raises(Exception, match="frozen"):
        cfg.listen = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["cut_ratio=1.5"], "cut_ratio"),
        (["client_id='no spaces'"], "client_id"),
        (["train.steps=-1"], "steps"),
        (["nonsense=1"], "nonsense"),
        (["model.norm_num_groups=3"], "norm_num_groups"),
        (["data.client_index=3", "data.num_clients=2"], "client_index"),
        (["just-a-word"], "key.path=value"),
    ],
)
def test_invalid_config_is_refused_clearly(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(ClientConfig, None, overrides)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ServerConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(ServerConfig, bad)


def test_record_holds_config_and_version() -> None:
    record = config_record(ClientConfig())
    assert record["code_version"] == __version__
    assert ClientConfig.model_validate(record["config"]) == ClientConfig()


def test_client_model_is_small() -> None:
    image = ImageConfig()
    server = count_parameters(build_unet(SERVER_UNET, image, num_class_embeds=17))
    client = count_parameters(build_unet(CLIENT_UNET, image))
    assert client <= 0.1 * server, (client, server)


def test_example_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "deploy"
    server = load_config(ServerConfig, root / "server.example.toml")
    client = load_config(ClientConfig, root / "client.example.toml")
    assert server.image == client.image
    assert (
        client.cut_ratio == 0.5 and server.policy.max_release_snr == client.max_release_snr == 0.1
    )


def test_ema_update_moves_every_parameter_toward_the_model() -> None:
    import copy

    from collafuse.common.nets import ema_update

    model = build_unet(CLIENT_UNET, ImageConfig(size=8))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    pairs = zip(ema.parameters(), model.parameters(), strict=True)
    expected = [pe + 0.25 * (pm - pe) for pe, pm in pairs]
    ema_update(ema, model, 0.75)
    assert all(torch.allclose(a, b) for a, b in zip(ema.parameters(), expected, strict=True))
