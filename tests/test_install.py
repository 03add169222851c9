"""Installs and devices: the base install runs without the extras, device choice, exit codes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from collafuse.cli import main
from collafuse.common.config import ConfigError, ServerConfig, load_config
from collafuse.common.nets import DeviceError, pick_device

REPO = Path(__file__).resolve().parents[1]
# What only the `experiments` extra installs.
EXTRAS = ("sklearn", "matplotlib", "torchmetrics")
HAS_GPU = torch.cuda.is_available()

# Run in a child before anything of collafuse: the extras' packages then import as on a machine
# without them (ModuleNotFoundError; importlib.util.find_spec answers None).
BLOCK_EXTRAS = f"import sys\nsys.modules.update(dict.fromkeys({EXTRAS!r}))\n"


def _python(code: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _collafuse(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collafuse", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _client_config(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "client.toml"
    path.write_text(
        f'client_id = "edge-0"\ninsecure = true\nstate_dir = "{tmp_path / "state"}"\n'
        f"exit_when_done = true\n[data]\n{data}\n"
    )
    return path


def test_client_and_server_never_import_the_experiment_packages(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import contextlib, io, json, sys
        import collafuse.client.daemon, collafuse.server.app
        from collafuse.cli import build_parser, main
        build_parser()
        for argv in (["client", "run", "--help"], ["server", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as exc:
                    assert exc.code == 0, (argv, exc.code)
        print(json.dumps(sorted({m.partition(".")[0] for m in sys.modules})))
        """
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert {"collafuse", "torch", "grpc"} <= loaded  # it did import the real thing
    assert loaded.isdisjoint(EXTRAS)


def test_the_command_line_parses_without_torch(tmp_path: Path) -> None:
    # Health probes and --help run often (Kubernetes probes every 30 s): parsing the command
    # line and dispatching `server health` must not pay for torch and diffusers.
    code = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from collafuse.cli import build_parser, main
        build_parser()
        for argv in (["--help"], ["server", "health", "--help"], ["client", "run", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as exc:
                    assert exc.code == 0, (argv, exc.code)
        print(json.dumps(sorted({m.partition(".")[0] for m in sys.modules})))
        """
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert "collafuse" in loaded
    assert loaded.isdisjoint({"torch", "diffusers", "numpy", *EXTRAS}), loaded


def test_without_the_extras_the_commands_that_need_them_say_what_to_install(
    tmp_path: Path,
) -> None:
    digits = _client_config(tmp_path, 'source = "digits"')
    code = BLOCK_EXTRAS + textwrap.dedent(
        f"""
        import contextlib, io, json
        from collafuse.cli import main
        codes = {{}}
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["client", "run", "--help"])
            except SystemExit as exc:
                codes["help"] = exc.code
        codes["experiment"] = main(
            ["experiment", "--config", {str(REPO / "experiments" / "smoke.toml")!r},
             "--out", {str(tmp_path / "run")!r}]
        )
        codes["bench"] = main(["bench", "--quick", "--out", {str(tmp_path / "b.json")!r}])
        codes["digits"] = main(["client", "run", "--config", {str(digits)!r}])
        print(json.dumps(codes))
        """
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.splitlines()[-1])
    assert codes == {"help": 0, "experiment": 2, "bench": 2, "digits": 2}
    assert proc.stderr.count("needs the experiments extra") == 2
    assert "pip install 'collafuse[experiments]'" in proc.stderr
    assert "data source 'digits' needs scikit-learn" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_without_the_extras_the_demo_says_how_to_get_its_fid(tmp_path: Path) -> None:
    # The demo runs on the base install; only its FID needs the classifier's module.
    code = BLOCK_EXTRAS + textwrap.dedent(
        """
        import torch
        from collafuse.client.demo import QualityUnavailable, quality_line, score_samples
        from collafuse.common.config import ClientConfig
        try:
            score_samples([ClientConfig()], {"client-0": torch.zeros(2, 1, 28, 28)})
        except QualityUnavailable as exc:
            print(quality_line({"skipped": str(exc)}))
        """
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "Quality: no FID (FID needs the experiments extra (torchmetrics is missing): "
        "pip install 'collafuse[experiments]')."
    )


@pytest.mark.skipif(HAS_GPU, reason="a GPU is usable here")
def test_server_with_device_cuda_and_no_gpu_exits_2_saying_what_to_do(tmp_path: Path) -> None:
    proc = _collafuse(
        "server", "--insecure", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "srv"),
        "--device", "cuda",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "device 'cuda' is not usable" in proc.stderr
    assert "has no CUDA support" in proc.stderr
    assert "--device cpu" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_device_spelling_is_checked_by_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    for good, canonical in [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"),
                            ("cuda:0", "cuda:0"), ("cuda:07", "cuda:7")]:  # fmt: skip
        assert load_config(ServerConfig, overrides=[f"device={good!r}"]).device == canonical
    for bad in ["cuda:abc", "cuda:", "cuda:-1", "gpu", "CUDA", "cuda:1:2", "cuda:²"]:
        with pytest.raises(ConfigError, match=r"device must be auto, cpu, cuda or cuda:N"):
            load_config(ServerConfig, overrides=[f"device={bad!r}"])
        with pytest.raises(DeviceError, match="device must be"):
            pick_device(bad)
    code = main(["server", "--insecure", "--listen", "127.0.0.1:0", "--device", "cuda:abc"])
    assert code == 2
    assert "device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.skipif(HAS_GPU, reason="a GPU is usable here")
def test_auto_takes_the_cpu_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="collafuse.device"):
        assert pick_device("auto") == torch.device("cpu")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "device auto: no usable GPU" in record.getMessage()
    assert "running on the CPU" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="collafuse.device"):
        assert pick_device("cpu") == torch.device("cpu")
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=rf"device '{name}' is not usable"):
            pick_device(name)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_gpu_devices_are_named_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="collafuse.device"):
        assert pick_device("auto") == torch.device("cuda", 0)
        assert pick_device("cuda") == torch.device("cuda", 0)
        assert pick_device("cuda:0") == torch.device("cuda", 0)
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert torch.cuda.get_device_name(0) in caplog.records[0].getMessage()
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError) as info:
        pick_device(f"cuda:{count}")
    shown = "1 GPU, cuda:0" if count == 1 else f"{count} GPUs, cuda:0 to cuda:{count - 1}"
    assert f"device 'cuda:{count}' is not usable: this machine shows {shown}" in str(info.value)


def test_client_data_errors_exit_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = _client_config(tmp_path, f'source = "folder"\npath = "{tmp_path / "nope"}"')
    proc = _collafuse("client", "run", "--config", str(missing), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"data.path {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    # An unknown source is refused by the config before anything else happens.
    code = main(["client", "run", "--config", str(missing), "--set", 'data.source="mnist"'])
    assert code == 2
    assert "data.source" in capsys.readouterr().err
