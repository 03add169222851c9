"""The documented examples run as a user runs them: a subprocess, checked by what it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from collafuse.common.export import MANIFEST, read_manifest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def test_the_python_api_example_runs_a_federation_and_exports_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--out", str(out), "--server-steps", "10", "--client-steps", "6", "--samples", "2"]
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "python_api.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("server listening on 127.0.0.1:")
    assert "client-0: uploaded 60 of 60 cut images at t_cut=25" in proc.stdout
    assert "client-1: uploaded 60 of 60 cut images at t_cut=25" in proc.stdout
    assert "server: trained 10 steps" in proc.stdout
    assert lines[-2] == "a new server started from the export serves the exported weights: True"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["server"]["train_step"] == 10
    assert summary["server"]["pools"] == {"client-0": 60, "client-1": 60}
    for cid in ("client-0", "client-1"):
        assert summary["clients"][cid]["train_step"] == 6
        assert Path(summary["samples"][cid]).is_file()
        assert read_manifest(out / "export" / cid).role == "client"
    assert summary["warm_start_serves_export"] is True
    server = read_manifest(out / "export" / "server")
    assert server.role == "server" and server.source.step == 10
    assert (out / "export" / "server" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "export" / "server" / MANIFEST).is_file()
    assert summary["exports"]["server"]["parameters"] > 0
