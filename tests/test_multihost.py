"""`collafuse demo-multihost`: its plan, its delaying relay, and a tiny run on real namespaces."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from collafuse.common.config import ConfigError
from collafuse.experiments.multihost import list_namespaces, missing_requirements, plan, teardown

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
POOR_MBIT = 0.5
IMAGES = 600
TINY = [
    "--clients", "2", "--data", "digits", "--images-per-client", str(IMAGES),
    "--server-steps", "20", "--client-steps", "10", "--timesteps", "50", "--samples", "4",
    "--server-width", "8", "--client-width", "4", "--batch-size", "8",
    "--rate", "20", "--poor-rate", str(POOR_MBIT), "--delay-ms", "40", "--timeout", "90",
]  # fmt: skip


def test_plan_gives_the_server_the_first_address_and_the_last_client_the_poor_link() -> None:
    topo = plan("cfx", "10.77.0.0/24", 3, rate=20, poor_rate=1, delay_ms=40)
    assert (topo.server.address, topo.server.rate_mbit) == ("10.77.0.1", None)
    assert [c.address for c in topo.clients] == ["10.77.0.2", "10.77.0.3", "10.77.0.4"]
    assert [c.rate_mbit for c in topo.clients] == [20, 20, 1]
    assert topo.namespaces() == ["cfx-sw", "cfx-srv", "cfx-c0", "cfx-c1", "cfx-c2"]
    assert topo.relay_address(1) == "10.77.0.1:50101"
    with pytest.raises(ConfigError, match="private"):
        plan("cfx", "8.8.8.0/24", 2, 20, 1, 40)
    with pytest.raises(ConfigError, match="too few"):
        plan("cfx", "10.77.0.0/30", 2, 20, 1, 40)
    with pytest.raises(ConfigError, match="--name"):
        plan("Bad-Name", "10.77.0.0/24", 2, 20, 1, 40)


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    """A loopback TCP server on port 0 that echoes one connection until end of stream."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(30)
        with conn:
            for _ in range(100_000):  # far more reads than the test sends
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_relay_holds_each_direction_for_the_delay_and_keeps_the_bytes(tmp_path: Path) -> None:
    listener, echo = _echo_server()
    port = listener.getsockname()[1]
    ready = tmp_path / "relay.json"
    relay = subprocess.Popen(
        [sys.executable, "-m", "collafuse.experiments.multihost", "relay",
         "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{port}", "--delay-ms", "150",
         "--ready", str(ready), "--max-seconds", "60"],
        env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        host, _, relay_port = json.loads(ready.read_text())["listen"][0].rpartition(":")
        with socket.create_connection((host, int(relay_port)), timeout=30) as conn:
            started = time.monotonic()
            conn.sendall(b"ping")
            assert conn.recv(16) == b"ping"
            round_trip = time.monotonic() - started
            # 150 ms on the way there and 150 ms back, and not a lot more.
            assert 0.3 <= round_trip < 2.0, round_trip
            payload = os.urandom(1 << 20)
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            got = bytearray()
            for _ in range(100_000):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += chunk
        assert bytes(got) == payload
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=30) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(timeout=10)
        listener.close()
        echo.join(timeout=10)


def _need_network(name: str) -> None:
    reason = missing_requirements(name)
    if reason is not None:
        pytest.skip(f"the multi-host demo {reason}")
    pytest.importorskip("sklearn", reason="the tiny run uses scikit-learn's digits")


def _leftovers(name: str) -> tuple[list[str], list[str]]:
    """The run's namespaces, and links in this test's namespace named like the run's links."""
    shown = subprocess.run(
        ["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    links = [str(link["ifname"]) for link in json.loads(shown)]
    ours = [n for n in links if name in n or n in {"br0", "srv", "c0", "c1"}]
    return list_namespaces(name), ours


def test_tiny_multihost_demo_shapes_each_link_and_leaves_nothing(tmp_path: Path) -> None:
    name = f"cft{os.getpid() % 10**7}"
    _need_network(name)
    out = tmp_path / "demo"
    # A namespace a crashed run would have left behind: the demo deletes it at start.
    subprocess.run(["ip", "netns", "add", f"{name}-c7"], check=True, timeout=30)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "collafuse", "demo-multihost", "--name", name,
             "--out", str(out), *TINY],
            capture_output=True, text=True, env=ENV, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"deleted the leftovers of an earlier run: {name}-c7" in proc.stdout
        assert "server step" in proc.stdout
        assert list_namespaces(name) == [] and _leftovers(name) == ([], [])
        server_pid = json.loads((out / "server" / "server.json").read_text())["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)

        summary = json.loads((out / "summary.json").read_text())
        assert summary["server"]["model_version"] == 20
        assert summary["server"]["pool"] == {"client-0": IMAGES, "client-1": IMAGES}
        fast, poor = summary["clients"]
        assert (fast["rate_mbit"], poor["rate_mbit"]) == (20, POOR_MBIT)
        payload = IMAGES * 8 * 8 * 4  # float32 cut images of 8x8 digits
        uploaded = 0
        for c in (fast, poor):
            status = json.loads((out / "clients" / c["client_id"] / "status.json").read_text())
            assert status["phase"] == "done" and status["train_step"] == 10
            assert c["bytes_uploaded"] == payload and c["local_steps"] == 10
            # The kernel counted at least the payload leaving each client's own veth.
            assert c["link_after_training"]["tx_bytes"] > payload
            assert c["link_total"]["rx_bytes"] > c["link_after_training"]["rx_bytes"] > 0
            uploaded += c["link_total"]["tx_bytes"]
            assert c["synthesis_samples"] == 4 and Path(c["grid"]).exists()
            assert len(list((out / "samples" / c["client_id"]).glob("sample-*.png"))) == 4
        # What the clients sent is what reached the server, give or take ARP.
        assert abs(summary["server"]["link"]["rx_bytes"] - uploaded) < 2000
        # The poor link is slower than its payload allows at its rate, and slower than the other.
        assert poor["upload_s"] >= 0.8 * payload * 8 / (POOR_MBIT * 1e6)
        assert poor["upload_s"] > 2 * fast["upload_s"]
        text = (out / "summary.md").read_text()
        assert text.startswith("# CollaFuse multi-host demo summary")
        assert "| client-1 | 10.77.0.3 | 0.5 |" in text
    finally:
        teardown(name)


def test_sigterm_mid_run_takes_the_network_down(tmp_path: Path) -> None:
    name = f"cfs{os.getpid() % 10**7}"
    _need_network(name)
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "collafuse", "demo-multihost", "--name", name,
         "--out", str(out), *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (out / "logs" / "client-1.log").exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        assert len(list_namespaces(name)) == 4  # the switch, the server and two clients
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
        assert proc.returncode == 130, output[-3000:]
        assert "deleted the demo's network" in output
        assert _leftovers(name) == ([], [])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        teardown(name)
