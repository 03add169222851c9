"""`collafuse bench`: the quick run end to end (real server, load process, client daemon)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from collafuse.cli import main
from collafuse.experiments.bench import dumps

PARTS = ("P1", "P2", "P3", "P4", "P5", "P6")


def _numbers(value: Any) -> list[float]:
    """Every number inside a figure's JSON (bools are flags, not measurements)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    return []


def _check_report(doc: dict[str, Any]) -> None:
    assert set(doc["figures"]) == set(PARTS)
    for part in PARTS:
        figures = doc["figures"][part]
        assert figures, part
        for fig in figures:
            assert math.isfinite(fig["value"]) and fig["value"] > 0, (part, fig["name"])
            numbers = _numbers(fig)
            assert all(math.isfinite(x) and x > 0 for x in numbers), (part, fig)
            if fig["target"]:
                assert isinstance(fig["met"], bool)
    clients = doc["settings"]["clients"]
    assert {f["name"] for f in doc["figures"]["P1"]} >= {
        f"served/bare forward, K={k}" for k in clients
    }
    assert len(doc["figures"]["P5"]) == 2  # UploadCuts and Upload
    streamed = [f for f in doc["figures"]["P3"] if f["name"].startswith("trainer on a streamed")]
    assert len(streamed) == 1 and streamed[0]["chunks_loaded"] >= 1
    assert any("RSS" in f["name"] for f in doc["figures"]["P4"])
    device = doc["device"]
    assert device["name"] and device["torch"]
    assert doc["seconds"] > 0
    assert doc["settings"]["server_config"]["insecure"] is True


def test_quick_bench_writes_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "bench.json"
    # No time limit here: the machine is shared; the bench's own figures are its speed test.
    assert main(["bench", "--quick", "--device", "cpu", "--no-compile", "--out", str(out)]) == 0

    doc = json.loads(out.read_text())
    _check_report(doc)
    assert doc["settings"]["model_preset"] == "tiny"
    assert doc["settings"]["compile"] is False
    assert doc["settings"]["server_config"]["sampler"]["compile"] is False
    assert max(doc["settings"]["clients"]) <= 4

    printed = capsys.readouterr().out
    assert "served/bare forward, K=4" in printed  # the table
    assert '"figures"' in printed  # the JSON
    assert f"wrote {out}" in printed


def test_dumps_keeps_lists_on_one_line() -> None:
    doc = {"a": [1, 2.5], "b": {"c": ["x, y", "z"], "d": []}, "e": [{"f": [3]}]}
    text = dumps(doc)
    assert json.loads(text) == doc
    assert '"a": [1, 2.5]' in text and '"c": ["x, y", "z"]' in text


@pytest.mark.slow
def test_full_cpu_bench(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    _check_report(doc)
    assert doc["settings"]["clients"] == [1, 8, 64]
