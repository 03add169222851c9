"""Run a small CollaFuse federation from Python: one server, two client daemons, an export.

    python docs/examples/python_api.py                 # into a new temporary folder
    python docs/examples/python_api.py --out run/      # into run/ (absent or empty)

Step by step, with the public API that docs/examples/README.md describes:

1. start a server on a free loopback port (`start_server` with a `ServerConfig` built in code);
2. run two client daemons in threads (`ClientDaemon(config, stop).run()`), each holding a
   by-class share of scikit-learn's 8x8 digits: they register, upload their cut images once,
   train their small local models and exit;
3. wait until the server has trained its steps (`Remote.status`, the GetStatus RPC);
4. synthesize a few images per client (`synthesize`): the server's chain to t_cut, the
   client's own chain from there;
5. stop the server (it writes a final checkpoint) and export the server's and each client's
   model as diffusers folders (`export_server`, `export_client`);
6. load the exported server model back (`load_exported_unet`) and start a second server from
   the folder (`init_from`) to show that it serves exactly the exported weights;
7. print what happened and write it to OUT/summary.json.

The sizes are tiny (T = 50, 8x8 images, tens of training steps) so that it runs in well under
a minute on a 2-core CPU; the images it makes are not meant to look like digits yet. Scale
`--server-steps`, `--client-steps` and the model sizes below for real use.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from collafuse.client.daemon import ClientDaemon
from collafuse.client.remote import Remote, open_channel
from collafuse.client.synth import synthesize, write_images
from collafuse.common.config import (
    ClientConfig,
    ClientTrainConfig,
    DataConfig,
    ImageConfig,
    ScheduleConfig,
    ServerConfig,
    ServerTrainConfig,
    SynthConfig,
    UNetConfig,
)
from collafuse.common.export import export_client, export_server, load_exported_unet
from collafuse.server.app import RunningServer, start_server

NUM_CLIENTS = 2
# Both sides agree on the image shape; the server owns the schedule and tells the clients.
IMAGE = ImageConfig(channels=1, size=8)
SCHEDULE = ScheduleConfig(num_timesteps=50)
SERVER_NET = UNetConfig(block_out_channels=(8, 16), attention_levels=(), norm_num_groups=4)
CLIENT_NET = UNetConfig(block_out_channels=(4, 8), attention_levels=(), norm_num_groups=4)


def server_config(data_dir: Path, steps: int, init_from: Path | None = None) -> ServerConfig:
    """A plaintext server on a free loopback port (port 0); TLS needs certificates, see README."""
    return ServerConfig(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        init_from=init_from,
        insecure=True,
        device="cpu",  # tiny networks: a GPU would spend more time on launches than on maths
        schedule=SCHEDULE,
        image=IMAGE,
        model=SERVER_NET,
        train=ServerTrainConfig(
            batch_size=16, max_steps=steps, publish_every=5, checkpoint_every=10
        ),
    )


def client_config(index: int, address: str, state_dir: Path, steps: int) -> ClientConfig:
    """Client `index` of NUM_CLIENTS: its share of the digits, a cut at half the chain."""
    return ClientConfig(
        client_id=f"client-{index}",
        server=address,
        insecure=True,
        state_dir=state_dir,
        cut_ratio=0.5,  # the default: t_cut = 25 of T = 50, release SNR 0.074 <= the bound 0.1
        exit_when_done=True,  # upload, train, exit (a long-running daemon stays connected)
        image=IMAGE,
        data=DataConfig(
            source="digits",
            partition="classes",  # client 0 holds digits 0, 2, 4, 6, 8; client 1 the others
            num_clients=NUM_CLIENTS,
            client_index=index,
            limit=60,
        ),
        model=CLIENT_NET,
        train=ClientTrainConfig(steps=steps, batch_size=16, checkpoint_every=10),
        synth=SynthConfig(server_steps=10),
    )


def run_clients(configs: list[ClientConfig], stop: threading.Event) -> list[ClientDaemon]:
    """Run one daemon per config in a thread each; returns them once all have exited."""
    daemons = [ClientDaemon(config, stop) for config in configs]
    codes: dict[str, int] = {}

    def run(daemon: ClientDaemon) -> None:
        codes[daemon.config.client_id] = daemon.run()  # 0: done; 1: refused (see its status)

    threads = [threading.Thread(target=run, args=(d,), name=d.config.client_id) for d in daemons]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = {cid: code for cid, code in codes.items() if code != 0}
    if len(codes) != len(daemons) or failed:
        raise RuntimeError(f"client daemons failed: {failed or 'a daemon raised'}")
    return daemons


def wait_for_training(running: RunningServer, steps: int, timeout_s: float) -> dict[str, Any]:
    """Poll GetStatus, as any client could, until the server has trained `steps` steps."""
    remote = Remote(open_channel(running.address, insecure=True))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            status = remote.status(timeout=10)
            if status.train_step >= steps or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        remote.close()
    if status.train_step < steps:
        raise RuntimeError(f"the server trained {status.train_step} of {steps} steps in time")
    return {
        "train_step": status.train_step,
        "model_version": status.model_version,
        "last_loss": status.last_loss,
        "pools": {p.client_id: p.num_images for p in status.pools},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the whole example; returns 0 when everything worked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for everything (absent or empty)")
    parser.add_argument("--server-steps", type=int, default=30, help="server training steps")
    parser.add_argument("--client-steps", type=int, default=20, help="steps of each client")
    parser.add_argument("--samples", type=int, default=4, help="images per client")
    args = parser.parse_args(argv)
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="collafuse-example-"))
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty; the example starts from nothing")
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)  # server, two clients and gRPC share a small machine

    # 1. The server: pool, trainer, batching sampler and gRPC, all in this process.
    running = start_server(server_config(out / "server", args.server_steps))
    print(f"server listening on {running.address}")
    stop = threading.Event()  # set it to stop the daemons early (e.g. on Ctrl-C)
    summary: dict[str, Any] = {"address": running.address}
    try:
        # 2. Two client daemons; each keeps its images, secret and ledger in its state dir.
        configs = [
            client_config(i, running.address, out / f"client-{i}", args.client_steps)
            for i in range(NUM_CLIENTS)
        ]
        daemons = run_clients(configs, stop)
        summary["clients"] = {}
        for daemon in daemons:
            s = daemon.status
            summary["clients"][s.client_id] = {
                "images": s.images,
                "uploaded": s.uploaded,
                "bytes_released": s.bytes_released,
                "t_cut": s.t_cut,
                "train_step": s.train_step,
                "last_loss": s.last_loss,
            }
            print(
                f"{s.client_id}: uploaded {s.uploaded} of {s.images} cut images at "
                f"t_cut={s.t_cut} ({s.bytes_released} bytes), trained {s.train_step} local "
                f"steps, loss {s.last_loss:.3f}"
            )

        # 3. The server trains in the background on what the clients uploaded.
        summary["server"] = wait_for_training(running, args.server_steps, timeout_s=120)
        print(
            f"server: trained {summary['server']['train_step']} steps on pools "
            f"{summary['server']['pools']}, model version {summary['server']['model_version']}"
        )

        # 4. Synthesis: the server's chain T..t_cut, then each client's own t_cut..0.
        summary["samples"] = {}
        for i, config in enumerate(configs):
            result = synthesize(config, n=args.samples, seed=i)
            grid = write_images(result, out / "samples" / config.client_id)
            summary["samples"][config.client_id] = str(grid)
            print(
                f"{config.client_id}: {args.samples} images of shape "
                f"{tuple(result.images.shape[1:])} from server model version "
                f"{result.model_version}, grid in {grid}"
            )
    except BaseException:
        stop.set()
        raise
    finally:
        # 5. A clean stop: no new calls, the trainer writes its final checkpoint.
        running.stop()

    # 5. Export: diffusers folders (unet/ with safetensors) plus collafuse.json.
    exports = out / "export"
    server_export = export_server(out / "server", exports / "server")
    summary["exports"] = {"server": {"step": server_export.source.step}}
    print(
        f"exported the server model of step {server_export.source.step} to "
        f"{exports / 'server'} (timesteps {server_export.t_range[0]}..{server_export.t_range[1]})"
    )
    for config in configs:
        manifest = export_client(config.state_dir, exports / config.client_id)
        summary["exports"][config.client_id] = {"step": manifest.source.step}
        print(f"exported {config.client_id}'s model (t_cut={manifest.t_cut}) too")

    # 6. Load the export back, and start a new server from it.
    model, manifest = load_exported_unet(exports / "server")
    parameters = sum(p.numel() for p in model.parameters())  # frozen: count_parameters says 0
    summary["exports"]["server"]["parameters"] = parameters
    print(
        f"loaded the export back: {parameters} parameters, schedule hash "
        f"{manifest.schedule_hash}, labels: {manifest.conditioning.meaning}"
    )
    warm = start_server(server_config(out / "server-2", 0, init_from=exports / "server"))
    try:
        with warm.trainer.hub.lock:
            served = warm.trainer.hub.model.state_dict()
            same = all(torch.equal(served[k], v) for k, v in model.state_dict().items())
    finally:
        warm.stop()
    summary["warm_start_serves_export"] = same
    print(f"a new server started from the export serves the exported weights: {same}")

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"everything is in {out}; summary in {out / 'summary.json'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
