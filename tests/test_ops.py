"""Operations: /metrics of the server and the daemon, JSON logs, config layers and `config show`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_integration import tiny_client_config, tiny_server_config

from collafuse.cli import main
from collafuse.client.daemon import ClientDaemon
from collafuse.client.remote import Remote, open_channel
from collafuse.common.config import (
    ClientConfig,
    ConfigError,
    ServerConfig,
    config_toml,
    load_config,
    load_config_layers,
)
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import CutBatch, Registration
from collafuse.common.obs import JsonFormatter
from collafuse.server.app import RunningServer, read_server_info, start_server
from collafuse.server.training_set import memory_budget

CLI = [sys.executable, "-m", "collafuse"]
# The server of these tests, as flags: tiny enough to start in a few seconds on a CPU.
TINY_SETS = [
    "schedule.num_timesteps=50",
    "image.size=8",
    "model.block_out_channels=[8, 16]",
    "model.attention_levels=[]",
    "model.norm_num_groups=4",
    "train.min_pool=1000000",
]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_for(check: Callable[[], object], seconds: float = 20.0) -> None:
    """Poll until check() is true, at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def metered_server(tmp_path: Path) -> Iterator[RunningServer]:
    config = tiny_server_config(tmp_path / "server", min_pool=1000).model_copy(
        update={"metrics_listen": "127.0.0.1:0"}
    )
    running = start_server(config)
    try:
        yield running
    finally:
        running.stop()


def _cuts(diffusion: Diffusion, t_cut: int, n: int) -> torch.Tensor:
    """Genuine cut images of a flat grey image: what the guard admits."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 1, 8, 8), 0.25)
    eps = torch.randn((n, 1, 8, 8), generator=g)
    return diffusion.q_sample(x0, torch.full((n,), t_cut, dtype=torch.long), eps)


def test_server_metrics_count_calls_by_method_and_code_and_read_the_pool(
    metered_server: RunningServer,
) -> None:
    running = metered_server
    assert running.metrics is not None and running.metrics.port > 0
    info = read_server_info(running.config.data_dir)
    assert info["metrics_port"] == running.metrics.port

    channel = open_channel(running.address, insecure=True)
    remote = Remote(channel)
    try:
        session = remote.register(Registration("alpha", (1, 8, 8), 0.4))
        diffusion = Diffusion.from_config(running.config.schedule)
        batch = CutBatch(
            "alpha",
            session.t_cut,
            [f"img-{i}" for i in range(5)],
            _cuts(diffusion, session.t_cut, 5),
        )
        result = remote.upload([batch])
        assert result.accepted == 5 and result.rejected == 0
        # Bytes that are no RegisterRequest: the gate refuses them as INVALID_ARGUMENT.
        raw = channel.unary_unary(
            "/collafuse.v1.CollaFuse/Register", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as bad:
            raw(b"\xff\xff\xff", timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A refusal by the policy: a cut far cleaner than max_release_snr allows.
        with pytest.raises(grpc.RpcError) as refused:
            remote.register(Registration("beta", (1, 8, 8), 0.01))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        remote.status()
    finally:
        remote.close()

    # Each call is counted as it ends, before its answer leaves; poll all the same.
    port = running.metrics.port
    wait_for(
        lambda: value(scrape(port), "collafuse_rpc_handled_total", method="GetStatus", code="OK")
    )
    m = scrape(port)
    handled = {
        (dict(labels)["method"], dict(labels)["code"]): v
        for (name, labels), v in m.items()
        if name == "collafuse_rpc_handled_total"
    }
    assert handled == {
        ("Register", "OK"): 1,
        ("Register", "INVALID_ARGUMENT"): 1,
        ("Register", "FAILED_PRECONDITION"): 1,
        ("UploadCuts", "OK"): 1,
        ("GetStatus", "OK"): 1,
    }
    assert value(m, "collafuse_rpc_handling_seconds_count", method="Register") == 3
    assert value(m, "collafuse_rpc_handling_seconds_bucket", method="UploadCuts", le="+Inf") == 1
    assert value(m, "collafuse_rpc_in_flight", method="Register") == 0
    assert value(m, "collafuse_pool_client_images", client_id="alpha") == 5
    assert value(m, "collafuse_pool_images") == 5
    assert value(m, "collafuse_pool_clients") == 1
    assert value(m, "collafuse_upload_images_accepted_total") == 5
    assert value(m, "collafuse_malformed_requests_total") == 1
    assert value(m, "collafuse_train_step") == 0  # min_pool keeps the tiny trainer waiting
    assert value(m, "collafuse_train_nonfinite_steps_total") == 0
    assert value(m, "collafuse_trainer_up") == 1
    # The tiny pool fits the default budget (a quarter of the host's memory): held whole.
    assert value(m, "collafuse_train_pool_budget_bytes") == memory_budget(torch.device("cpu"), 0)
    assert value(m, "collafuse_train_pool_streaming") == 0
    assert value(m, "collafuse_train_pool_chunks_loaded_total") == 0
    assert value(m, "collafuse_train_pool_resident_images") in (0, 5)  # 5 once refreshed
    assert value(m, "collafuse_model_version") == running.trainer.hub.version
    assert value(m, "collafuse_sampler_queue_depth") == 0
    assert value(m, "collafuse_sampler_max_batch") == 64
    assert value(m, "collafuse_sampler_forward_calls_total") == 0
    assert ("process_resident_memory_bytes", ()) in m


def test_metrics_listener_is_off_by_default_and_loopback_only(tmp_path: Path) -> None:
    assert ServerConfig().metrics_listen == "" and ClientConfig().metrics_listen == ""
    with pytest.raises(ConfigError, match="not loopback"):
        load_config(ServerConfig, None, ["metrics_listen=0.0.0.0:9464"])
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(ClientConfig, None, ["metrics_listen=9464"])
    ok = load_config(
        ServerConfig, None, ["metrics_listen=0.0.0.0:9464", "metrics_allow_remote=true"]
    )
    assert ok.metrics_listen == "0.0.0.0:9464"
    running = start_server(tiny_server_config(tmp_path / "server"))
    try:
        assert running.metrics is None
        assert "metrics_port" not in read_server_info(running.config.data_dir)
    finally:
        running.stop()


def test_client_daemon_metrics(tmp_path: Path, metered_server: RunningServer) -> None:
    config = tiny_client_config(
        tmp_path / "c0",
        metered_server.address,
        0,
        exit_when_done=False,
        heartbeat_s=0.2,
        metrics_listen="127.0.0.1:0",
    )
    stop = threading.Event()
    daemon = ClientDaemon(config, stop)
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(daemon.run()))
    worker.start()
    try:
        wait_for(lambda: daemon.status.phase == "idle", 120)
        assert daemon.metrics is not None
        port = daemon.metrics.port
        m = scrape(port)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert codes == [0]
    assert value(m, "collafuse_client_phase", phase="idle") == 1
    assert value(m, "collafuse_client_phase", phase="uploading") == 0
    assert value(m, "collafuse_client_released_images_total") == 60
    assert value(m, "collafuse_client_released_bytes_total") == 60 * 4 * 8 * 8
    assert value(m, "collafuse_client_train_step") == 6
    assert value(m, "collafuse_client_train_steps") == 6
    assert value(m, "collafuse_client_t_cut") == daemon.status.t_cut > 0
    # The listener closes with the daemon.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


# ----- configuration layers -------------------------------------------------------------------


def test_layers_default_file_env_flag(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('listen = "127.0.0.1:7000"\n[train]\nbatch_size = 8\nlr = 0.01\n')
    env = {
        "COLLAFUSE_SERVER_TRAIN__BATCH_SIZE": "16",
        "COLLAFUSE_SERVER_POLICY__ALLOW_MIXTURE": "true",
        "COLLAFUSE_SERVER_ADMINS": '["ops", "root"]',
        # Variables of the other program and unrelated ones are not read.
        "COLLAFUSE_CLIENT_TRAIN__BATCH_SIZE": "999",
        "HOME": "/nowhere",
    }
    file_only = load_config_layers(ServerConfig, path)
    assert file_only.config.train.batch_size == 8
    assert file_only.origin("train.batch_size").source == "file"
    assert file_only.origin("train.ema_decay").source == "default"

    with_env = load_config_layers(ServerConfig, path, env=env)
    assert with_env.config.train.batch_size == 16 and with_env.config.train.lr == 0.01
    assert with_env.config.policy.allow_mixture is True
    assert with_env.config.admins == ("ops", "root")
    assert with_env.origin("train.batch_size").detail == "COLLAFUSE_SERVER_TRAIN__BATCH_SIZE"
    assert with_env.origin("train.lr").source == "file"

    flagged = load_config_layers(ServerConfig, path, ["train.batch_size=32"], env=env)
    assert flagged.config.train.batch_size == 32
    assert flagged.origin("train.batch_size").source == "flag"

    # The client reads its own prefix; text fields keep digits as text.
    client = load_config_layers(
        ClientConfig,
        None,
        env={"COLLAFUSE_CLIENT_CLIENT_ID": "1234", "COLLAFUSE_CLIENT_SERVER": "10.0.0.5:50051"},
    )
    assert client.config.client_id == "1234" and client.config.server == "10.0.0.5:50051"
    assert client.config.train.batch_size == ClientConfig().train.batch_size


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"COLLAFUSE_SERVER_TRAIN__BATCH_SIZE": "many"}, "COLLAFUSE_SERVER_TRAIN__BATCH_SIZE"),
        ({"COLLAFUSE_SERVER_TRAIN__BATCHSIZE": "8"}, "COLLAFUSE_SERVER_TRAIN__BATCHSIZE"),
        (
            {"COLLAFUSE_SERVER_POLICY__MAX_RELEASE_SNR": "-1"},
            "COLLAFUSE_SERVER_POLICY__MAX_RELEASE_SNR",
        ),
        ({"COLLAFUSE_SERVER_TRAIN____LR": "1"}, "COLLAFUSE_SERVER_TRAIN____LR"),
    ],
)
def test_bad_environment_value_names_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(ServerConfig, None, env=env)


def _run(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def test_config_show_prints_effective_toml_with_origins(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('data_dir = "/srv/cf"\n[train]\nbatch_size = 8\n')
    env = {"COLLAFUSE_SERVER_LISTEN": "127.0.0.1:6000", "COLLAFUSE_SERVER_TRAIN__LR": "0.003"}
    proc = _run(
        ["config", "show", "--server", "--config", str(path), "--set", "train.batch_size=24"], env
    )
    assert proc.returncode == 0, proc.stderr
    shown = tomllib.loads(proc.stdout)
    expected = load_config_layers(ServerConfig, path, ["train.batch_size=24"], env=env)
    assert ServerConfig.model_validate(shown) == expected.config
    assert proc.stdout == config_toml(expected)
    lines = proc.stdout.splitlines()

    def line(prefix: str) -> str:
        return next(x for x in lines if x.startswith(prefix))

    assert line("listen = ").endswith("# env COLLAFUSE_SERVER_LISTEN")
    assert line("data_dir = ").endswith(f"# file {path}")
    assert line("batch_size = 24").endswith("# flag train.batch_size=24")
    assert line("lr = 0.003").endswith("# env COLLAFUSE_SERVER_TRAIN__LR")
    assert line("ema_decay = ").endswith("# default")
    assert line("# tls_cert = (unset)").endswith("# default")
    # Every field is there, defaults filled.
    assert set(shown["limits"]) == set(ServerConfig.model_fields["limits"].annotation.model_fields)  # type: ignore[union-attr]


def test_config_show_client_and_a_bad_variable_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLLAFUSE_CLIENT_CUT_RATIO", "0.5")
    assert main(["config", "show", "--client"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out)["cut_ratio"] == 0.5
    assert "# env COLLAFUSE_CLIENT_CUT_RATIO" in out
    # A bad value is a configuration error (exit 2) naming the variable and the value.
    monkeypatch.setenv("COLLAFUSE_SERVER_THREADS", "several")
    assert main(["config", "show", "--server"]) == 2
    err = capsys.readouterr().err
    assert "COLLAFUSE_SERVER_THREADS" in err and "'several'" in err


# ----- logs ----------------------------------------------------------------------------------


def test_json_formatter_writes_one_object_per_record() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("collafuse.test", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    entry = json.loads(formatter.format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "collafuse.test"
    assert entry["message"] == "a b" and entry["time"].endswith("+00:00")
    assert "exception" not in entry
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        failed = logging.LogRecord(
            "collafuse.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    text = formatter.format(failed)
    assert "\n" not in text  # a traceback stays one line
    entry = json.loads(text)
    assert "RuntimeError: boom" in entry["exception"] and "Traceback" in entry["exception"]


def test_server_process_logs_json_and_serves_metrics(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    args = [
        "server",
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--set",
        "metrics_listen=127.0.0.1:0",
        *(x for s in TINY_SETS for x in ("--set", s)),
    ]
    proc = subprocess.Popen(
        [*CLI, *args],
        env={**os.environ, "COLLAFUSE_LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The server writes server.json once it serves (or exits if it cannot start).
        wait_for(lambda: (data_dir / "server.json").exists() or proc.poll() is not None, 120)
        if proc.poll() is not None:
            pytest.fail(f"the server did not start: {proc.communicate(timeout=30)[1]}")
        info = read_server_info(data_dir)
        m = scrape(int(info["metrics_port"]))  # type: ignore[call-overload]
        assert value(m, "collafuse_pool_images") == 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    entries = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert any(
        e["logger"] == "collafuse.server" and e["message"].startswith("serving on") for e in entries
    ), err
    assert any(e["message"].startswith("metrics on http://127.0.0.1:") for e in entries), err
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    # Nothing went out in the text format.
    assert not [x for x in err.splitlines() if " collafuse.server INFO " in x], err


def test_bad_log_format_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLLAFUSE_LOG_FORMAT", "xml")
    assert main(["config", "show", "--client"]) == 2
    assert "COLLAFUSE_LOG_FORMAT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse's own usage error
        main(["--log-format", "xml", "config", "show", "--client"])
    assert usage.value.code == 2


def test_server_flags_keep_paths_and_values_exactly(tmp_path: Path) -> None:
    from collafuse.cli import build_parser
    from collafuse.server.cli import server_config_from_args

    odd = tmp_path / 'back\\slash "quoted" it\'s'
    args = build_parser().parse_args(
        ["server", "--data-dir", str(odd), "--tls-cert", str(odd / "c.pem"), "--device", "cpu"]
    )
    config = server_config_from_args(args)
    assert str(config.data_dir) == str(odd) and str(config.tls_cert) == str(odd / "c.pem")
    assert config.device == "cpu"
