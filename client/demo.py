"""`collafuse demo`: one server and N client daemons as separate processes on loopback.

Each client holds a by-class share of Fashion-MNIST. The demo waits for the uploads and the
training, synthesizes for every client at once (the server batches them), writes per-client
grids and a summary, shuts everything down and exits 0. The summary scores the samples with
the committed Fashion-MNIST classifier (FID against held-out images of the clients' classes,
and how many land in their own client's classes) and states what the server saw: the release
SNR of the cut.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collafuse.common import pki
from collafuse.common.config import ClientConfig, ServerConfig, load_config

if TYPE_CHECKING:  # the wire and ledger modules bring torch, which `collafuse --help` needs not
    from torch import Tensor

    from collafuse.common.domain import ServerStatus

FASHION_CLASSES = [
    "T-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "boot",
]  # fmt: skip


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    """Register `collafuse demo`."""
    p = sub.add_parser("demo", help="run a server and N clients on loopback, end to end")
    p.add_argument("--clients", type=int, default=3, help="number of client processes")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    add_size_arguments(p, server_steps=1200, client_steps=800, images_per_client=3000, timeout=3600)
    p.add_argument(
        "--fid-samples",
        type=int,
        default=64,
        help="images per client the summary's FID scores (the grid shows the first --samples "
        "of them); 0 = no FID",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC on loopback instead of mutual TLS with identities it provisions",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo in --out (its files only)"
    )
    p.set_defaults(func=run_demo)


def add_size_arguments(
    p: argparse.ArgumentParser,
    *,
    server_steps: int,
    client_steps: int,
    images_per_client: int,
    timeout: float,
) -> None:
    """The flags that size a demo run, read by `write_configs` (also `collafuse demo-multihost`)."""
    p.add_argument("--server-steps", type=int, default=server_steps, help="server training steps")
    p.add_argument("--client-steps", type=int, default=client_steps, help="local steps per client")
    p.add_argument(
        "--images-per-client", type=int, default=images_per_client, help="0 = the whole share"
    )
    p.add_argument("--timesteps", type=int, default=1000, help="T")
    p.add_argument("--cut-ratio", type=float, default=0.5, help="every client's cut ratio")
    p.add_argument("--samples", type=int, default=16, help="images synthesized per client")
    p.add_argument("--server-width", type=int, default=16, help="server UNet base channels")
    p.add_argument("--client-width", type=int, default=8, help="client UNet base channels")
    p.add_argument("--batch-size", type=int, default=32, help="batch size on both sides")
    p.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    p.add_argument("--timeout", type=float, default=timeout, help="give up after this many seconds")


@dataclass
class Proc:
    """A child process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path


def _toml(data: dict[str, Any]) -> str:
    """A tiny TOML writer for the flat-with-tables configs the demo writes."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def _spawn(name: str, args: list[str], log_dir: Path) -> Proc:
    log = log_dir / f"{name}.log"
    fh = log.open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(
        [sys.executable, "-m", "collafuse", *args], stdout=fh, stderr=subprocess.STDOUT, env=env
    )
    return Proc(name, popen, log)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class DemoFailed(RuntimeError):
    """A child process failed; the message carries its log tail."""


def _check_alive(procs: list[Proc], allow_exit_zero: set[str]) -> None:
    for p in procs:
        code = p.popen.poll()
        if code is not None and not (code == 0 and p.name in allow_exit_zero):
            raise DemoFailed(f"{p.name} exited with code {code}; last log lines:\n{_tail(p.log)}")


def _unet(width: int, levels: int, attention: bool) -> dict[str, Any]:
    chans = [width * min(2**i, 4) for i in range(levels)]
    return {
        "block_out_channels": chans,
        "layers_per_block": 1,
        "attention_levels": [1] if attention else [],
        "norm_num_groups": max(1, min(8, width // 2)),
    }


ADMIN = "demo-admin"


def provision(
    out: Path,
    clients: int,
    *,
    server_hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    dials: Mapping[str, str] | None = None,
    ca_name: str = "CollaFuse demo CA",
) -> dict[str, dict[str, str]]:
    """A CA, a server certificate for `server_hosts` (its SANs) and one kit per client
    (client-0, client-1, ...) plus an admin kit, as `collafuse pki` writes them.

    dials: the server address an identity's kit names, by identity (pki's default otherwise).
    Returns the TLS settings for the server and for each identity, as config entries.
    """
    ca_dir = out / "pki" / "ca"
    pki.init_ca(ca_dir, name=ca_name)
    srv = pki.issue_server(ca_dir, list(server_hosts), out / "pki" / "server")
    tls = {
        "server": {
            "tls_cert": str(srv.cert),
            "tls_key": str(srv.key),
            "tls_client_ca": str(srv.ca_cert),
            "tls_revoked": str(ca_dir / pki.REVOKED),
        }
    }
    for name in [f"client-{i}" for i in range(clients)] + [ADMIN]:
        address = (dials or {}).get(name)
        kit = (
            pki.issue_client(ca_dir, name, out / "pki" / name)
            if address is None
            else pki.issue_client(ca_dir, name, out / "pki" / name, server_address=address)
        )
        tls[name] = {
            "tls_ca": str(kit.ca_cert),
            "tls_cert": str(kit.cert),
            "tls_key": str(kit.key),
        }
    return tls


def write_configs(
    args: argparse.Namespace, out: Path, tls: dict[str, dict[str, str]] | None = None
) -> tuple[Path, list[Path]]:
    """The server's and each client's TOML, as a user would write them (TLS when tls given)."""
    size = 28 if args.data == "fashion-mnist" else 8
    server: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "data_dir": str(out / "server"),
        **({"insecure": True} if tls is None else {**tls["server"], "admins": [ADMIN]}),
        # One thread per process: the server and the clients share the machine, and
        # oversubscribed torch threads slow everyone down.
        "threads": 1,
        "schedule": {"num_timesteps": args.timesteps},
        "image": {"channels": 1, "size": size},
        "model": _unet(args.server_width, 3 if size >= 16 else 2, attention=False),
        "train": {
            "batch_size": args.batch_size,
            "max_steps": args.server_steps,
            "checkpoint_every": max(50, args.server_steps // 10),
            "publish_every": max(10, args.server_steps // 20),
            "lr": 1e-3,
        },
        "policy": {"max_clients": max(16, args.clients)},
    }
    server_path = out / "server.toml"
    server_path.write_text(_toml(server))
    clients = []
    for i in range(args.clients):
        cfg: dict[str, Any] = {
            "client_id": f"client-{i}",
            "server": "SET-AT-RUN-TIME",
            **({"insecure": True} if tls is None else tls[f"client-{i}"]),
            "state_dir": str(out / "clients" / f"client-{i}"),
            "cut_ratio": args.cut_ratio,
            "exit_when_done": True,
            "threads": 1,
            "image": {"channels": 1, "size": size},
            "data": {
                "source": args.data,
                "partition": "classes",
                "num_clients": args.clients,
                "client_index": i,
                "limit": args.images_per_client,
            },
            "model": _unet(args.client_width, 3 if size >= 16 else 2, attention=False),
            "train": {"steps": args.client_steps, "batch_size": args.batch_size, "lr": 2e-3},
            # Strided DDPM on both halves: 50 steps from T to t_cut on the server, 100 on the
            # client. Its fresh noise at every step washes out the small models' errors, which
            # DDIM (eta 0) carries to the end as speckle: pooled FID 42 against 76 with DDIM
            # from the same trained models, 64 samples per client.
            "synth": {"sampler": "ddpm", "server_steps": 50, "client_steps": 100},
        }
        path = out / "clients" / f"client-{i}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_toml(cfg))
        clients.append(path)
    return server_path, clients


def _wait_for_address(server: Proc, data_dir: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    info = data_dir / "server.json"
    while time.monotonic() < deadline:
        _check_alive([server], set())
        if info.exists():
            data = json.loads(info.read_text())
            if data.get("pid") == server.popen.pid:
                return str(data["address"])
        time.sleep(0.2)
    raise DemoFailed(f"the server did not start within {timeout:.0f}s:\n{_tail(server.log)}")


def _client_status(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((path / "status.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def _progress_line(
    status: ServerStatus | None, max_steps: int, clients: list[dict[str, Any]]
) -> str:
    srv = (
        f"server step {status.train_step}/{max_steps} loss {status.last_loss:.3f}"
        if status
        else "server starting"
    )
    parts = [
        f"{c.get('client_id', '?')}: {c.get('phase', 'starting')} "
        f"up {c.get('uploaded', 0)}/{c.get('images', 0)} "
        f"train {c.get('train_step', 0)}/{c.get('train_steps', 0)}"
        for c in clients
    ]
    return f"[{time.strftime('%H:%M:%S')}] {srv} | " + " | ".join(parts)


def run_demo(args: argparse.Namespace) -> int:
    """The whole demo; exit code 0 on success."""
    from collafuse.client.synth import SynthesisResult, synthesize, write_images

    if args.clients < 1:
        raise ValueError("--clients must be at least 1")
    out: Path = args.out
    earlier = [out / name for name in ("server", "clients", "samples", "logs", "pki")]
    if any(old.exists() for old in earlier):
        if not args.overwrite:
            raise ValueError(
                f"{out} holds an earlier demo; choose another --out or pass --overwrite"
            )
        for old in earlier:
            shutil.rmtree(old, ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    tls = None if args.insecure else provision(out, args.clients)
    server_toml, client_tomls = write_configs(args, out, tls)
    server_cfg = load_config(ServerConfig, server_toml)
    times: dict[str, float] = {}
    t0 = time.monotonic()
    procs: list[Proc] = []
    security = "plaintext" if tls is None else "mutual TLS, identities in " + str(out / "pki")
    print(
        f"CollaFuse demo: 1 server + {args.clients} clients on loopback ({security}); "
        f"output in {out}"
    )
    try:
        server = _spawn("server", ["server", "--config", str(server_toml)], out / "logs")
        procs.append(server)
        address = _wait_for_address(server, server_cfg.data_dir, 120)
        times["server_start_s"] = time.monotonic() - t0
        print(f"server listening on {address} (log: {server.log})")
        for i, path in enumerate(client_tomls):
            procs.append(
                _spawn(
                    f"client-{i}",
                    ["client", "run", "--config", str(path), "--set", f"server={address!r}"],
                    out / "logs",
                )
            )
        admin = {} if tls is None else tls[ADMIN]
        from collafuse.client.remote import Remote, open_channel

        remote = Remote(
            open_channel(
                address,
                insecure=tls is None,
                tls_ca=Path(admin["tls_ca"]) if admin else None,
                tls_cert=Path(admin["tls_cert"]) if admin else None,
                tls_key=Path(admin["tls_key"]) if admin else None,
            )
        )
        client_dirs = [out / "clients" / f"client-{i}" for i in range(args.clients)]
        status: ServerStatus | None = None
        last_print = 0.0
        clients_done_at: float | None = None
        deadline = time.monotonic() + args.timeout
        while True:
            _check_alive(procs, allow_exit_zero={p.name for p in procs[1:]})
            states = [_client_status(d) for d in client_dirs]
            try:
                status = remote.status(timeout=5)
            except Exception:
                status = None
            if time.monotonic() - last_print > 5:
                print(_progress_line(status, args.server_steps, states), flush=True)
                last_print = time.monotonic()
            all_done = all(s.get("phase") == "done" for s in states) and all(
                p.popen.poll() == 0 for p in procs[1:]
            )
            if all_done and clients_done_at is None:
                clients_done_at = time.monotonic() - t0
            if all_done and status is not None and status.model_version >= args.server_steps:
                break
            if time.monotonic() > deadline:
                raise DemoFailed(f"the demo did not finish within {args.timeout:.0f}s")
            time.sleep(1.0)
        times["training_s"] = time.monotonic() - t0 - times["server_start_s"]
        times["clients_done_s"] = clients_done_at or 0.0
        print(_progress_line(status, args.server_steps, states), flush=True)

        n = max(args.samples, args.fid_samples)
        print(f"synthesizing {n} images for each client (batched on the server)")
        started = time.monotonic()
        configs = [load_config(ClientConfig, p, [f"server={address!r}"]) for p in client_tomls]
        results: dict[str, SynthesisResult] = {}
        errors: list[str] = []

        def one(cfg: ClientConfig, seed: int) -> None:
            try:
                results[cfg.client_id] = synthesize(cfg, n, seed=seed)
            except Exception as exc:
                errors.append(f"{cfg.client_id}: {exc}")

        threads = [threading.Thread(target=one, args=(c, i)) for i, c in enumerate(configs)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise DemoFailed("synthesis failed: " + "; ".join(errors))
        times["synthesis_s"] = time.monotonic() - started
        grids = {}
        for cid, res in results.items():
            shown = replace(res, images=res.images[: args.samples])
            grids[cid] = write_images(shown, out / "samples" / cid)
        final_status = remote.status(timeout=10)
        remote.close()
        server.popen.send_signal(signal.SIGTERM)
        server.popen.wait(timeout=60)
        quality: DemoQuality | str = "not asked for (--fid-samples 0)"
        if args.fid_samples > 0:
            started = time.monotonic()
            print(f"scoring {args.fid_samples} images per client with the committed classifier")
            try:
                quality = score_samples(
                    configs, {cid: r.images[: args.fid_samples] for cid, r in results.items()}
                )
            except QualityUnavailable as exc:
                quality = str(exc)
            times["scoring_s"] = time.monotonic() - started
        times["total_s"] = time.monotonic() - t0
        summary = build_summary(args, out, final_status, states, results, grids, times, quality)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "summary.md").write_text(summary_markdown(summary))
        print(summary_markdown(summary))
        print(f"grids: {', '.join(str(g) for g in grids.values())}")
        return 0
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.popen.kill()


class QualityUnavailable(RuntimeError):
    """The samples cannot be scored here; the message says why and what would change that."""


@dataclass(frozen=True)
class ClientQuality:
    """How one client's samples score against held-out images of its own classes."""

    fid: float
    """FID of its samples against its held-out images, in the classifier's features."""
    own_class_rate: float
    """Share of its samples the classifier puts in one of this client's classes."""
    samples: int
    real: int
    """Held-out images of its classes (the same count for every client)."""


@dataclass(frozen=True)
class DemoQuality:
    """The demo's samples scored with the committed Fashion-MNIST classifier."""

    fid: float
    """Pooled FID: every client's samples against the held-out images of every client's classes,
    the same number per client on both sides."""
    reference_fid: float
    """FID of as many of the clients' own training images against the same held-out set: what
    a generator that copied its training data would score at this sample count. FID is biased
    upwards for small sets, so this, not 0, is the floor to read `fid` against."""
    own_class_rate: float
    own_class_chance: float
    """The own-class rate of samples with random classes: the clients' mean share of classes."""
    samples: int
    real: int
    classifier_accuracy: float
    """The classifier's accuracy on the Fashion-MNIST test set, from its checkpoint."""
    clients: dict[str, ClientQuality]


def score_samples(configs: list[ClientConfig], samples: dict[str, Tensor]) -> DemoQuality:
    """FID and own-class rate of each client's samples (N, C, H, W) in [-1, 1].

    The real side is each client's share of the Fashion-MNIST test split (its classes, images
    it never trained on), cut to the smallest client's count so that the pooled sets weigh the
    clients alike. Raises QualityUnavailable for other data, or without the experiments extra.
    """
    import torch

    from collafuse.common.data import load_local_data

    if any(c.data.source != "fashion-mnist" for c in configs):
        raise QualityUnavailable("the committed classifier scores Fashion-MNIST only")
    try:
        # The classifier's module imports torchmetrics, a package of the experiments extra.
        from collafuse.experiments.metrics import extract_features, load_feature_net
    except ModuleNotFoundError as exc:
        package = (exc.name or "a package").partition(".")[0]
        raise QualityUnavailable(
            f"FID needs the experiments extra ({package} is missing): "
            "pip install 'collafuse[experiments]'"
        ) from None
    from collafuse.experiments.stats import fid_from_features

    net = load_feature_net()
    gen = torch.Generator().manual_seed(0)
    held_out = [
        load_local_data(c.data.model_copy(update={"limit": 0}), c.image, "test") for c in configs
    ]
    m = min(len(h) for h in held_out)
    real, fake, own, ref, chance = [], [], [], [], []
    clients = {}
    for cfg, h in zip(configs, held_out, strict=True):
        x = samples[cfg.client_id]  # (n, C, H, W)
        f_real = extract_features(h.images[torch.randperm(len(h), generator=gen)[:m]], net)
        f_fake = extract_features(x, net)
        classes = torch.unique(h.labels)
        with torch.no_grad():
            hits = torch.isin(net(x).argmax(dim=1), classes)  # (n,)
        train = load_local_data(cfg.data, cfg.image).images
        pick = torch.randperm(train.shape[0], generator=gen)[: x.shape[0]]
        real.append(f_real)
        fake.append(f_fake)
        own.append(hits)
        ref.append(extract_features(train[pick], net))
        chance.append(classes.numel() / h.num_classes)
        clients[cfg.client_id] = ClientQuality(
            fid=fid_from_features(f_real, f_fake),
            own_class_rate=float(hits.double().mean()),
            samples=x.shape[0],
            real=m,
        )
    pooled_real = torch.cat(real)
    meta = net.meta
    return DemoQuality(
        fid=fid_from_features(pooled_real, torch.cat(fake)),
        reference_fid=fid_from_features(pooled_real, torch.cat(ref)),
        own_class_rate=float(torch.cat(own).double().mean()),
        own_class_chance=sum(chance) / len(chance),
        samples=sum(c.samples for c in clients.values()),
        real=pooled_real.shape[0],
        classifier_accuracy=meta.test_accuracy if meta is not None else float("nan"),
        clients=clients,
    )


def build_summary(
    args: argparse.Namespace,
    out: Path,
    status: ServerStatus,
    states: list[dict[str, Any]],
    results: dict[str, Any],
    grids: dict[str, Path],
    times: dict[str, float],
    quality: DemoQuality | str,
) -> dict[str, Any]:
    """Everything the demo measured, as plain data; `quality`: the scores or why there are none."""
    from collafuse.common.diffusion import Diffusion

    diffusion = Diffusion.from_config(status.schedule.config)
    clients = []
    for i, st in enumerate(states):
        cid = st["client_id"]
        cfg = tomllib.loads((out / "clients" / f"client-{i}.toml").read_text())
        from collafuse.client.ledger import Ledger

        ledger = Ledger(out / "clients" / cid / "ledger.sqlite")
        summary = ledger.summary()
        ledger.close()
        classes = (
            [c for c in range(10) if c % args.clients == i] if args.data == "fashion-mnist" else []
        )
        res = results[cid]
        clients.append(
            {
                "client_id": cid,
                "classes": [FASHION_CLASSES[c] for c in classes],
                "images": st["images"],
                "cut_ratio": cfg["cut_ratio"],
                "t_cut": st["t_cut"],
                "images_released": summary.images_released,
                "bytes_uploaded": summary.bytes_released,
                "upload_s": round(st["upload_seconds"], 2),
                "local_train_s": round(st["train_seconds"], 2),
                "local_steps": st["train_step"],
                "final_local_loss": round(st["last_loss"], 4),
                "model_parameters": st["model_parameters"],
                "release_snr": round(diffusion.snr(st["t_cut"]), 4),
                "synthesis_server_s": round(res.server_seconds, 2),
                "synthesis_client_s": round(res.client_seconds, 2),
                "grid": str(grids[cid]),
            }
        )
        if isinstance(quality, DemoQuality):
            q = quality.clients[cid]
            clients[-1].update(fid=round(q.fid, 2), own_class_rate=round(q.own_class_rate, 3))
    T = diffusion.num_timesteps
    cuts = sorted({c["t_cut"] for c in clients})
    policy = load_config(ServerConfig, out / "server.toml").policy
    return {
        "release": {
            "T": T,
            "t_cut": cuts,
            "t_cut_over_T": [round(t / T, 4) for t in cuts],
            "snr": [round(diffusion.snr(t), 4) for t in cuts],
            "policy_max_release_snr": policy.max_release_snr,
        },
        "quality": (
            {
                "feature_net": "committed Fashion-MNIST classifier "
                "(common/assets/fmnist_classifier.pt), penultimate features",
                "classifier_test_accuracy": quality.classifier_accuracy,
                "fid_pooled": round(quality.fid, 2),
                "fid_reference": round(quality.reference_fid, 2),
                "own_class_rate": round(quality.own_class_rate, 3),
                "own_class_chance": round(quality.own_class_chance, 3),
                "samples": quality.samples,
                "real": quality.real,
            }
            if isinstance(quality, DemoQuality)
            else {"skipped": quality}
        ),
        "clients": clients,
        "server": {
            "model_version": status.model_version,
            "train_step": status.train_step,
            "final_loss": round(status.last_loss, 4),
            "model_parameters": status.model_parameters,
            "device": status.device,
            "pool": {p.client_id: p.num_images for p in status.pools},
            "T": status.schedule.config.num_timesteps,
        },
        "times_s": {k: round(v, 1) for k, v in times.items()},
    }


def summary_markdown(s: dict[str, Any]) -> str:
    """The summary as a Markdown report."""
    srv = s["server"]
    lines = [
        "# CollaFuse demo summary",
        "",
        f"Server: {srv['model_parameters']:,} parameters on {srv['device']}, T={srv['T']}, "
        f"{srv['train_step']} training steps, model version {srv['model_version']}, "
        f"final bridge loss {srv['final_loss']}.",
        "",
        "| client | classes | images | t_cut | released | bytes uploaded | upload s | local steps"
        " | local train s | local loss | params | synth server s | synth client s | FID"
        " | own class |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in s["clients"]:
        own = f"{c['own_class_rate']:.0%}" if "own_class_rate" in c else "-"
        lines.append(
            f"| {c['client_id']} | {', '.join(c['classes'])} | {c['images']} | {c['t_cut']} | "
            f"{c['images_released']} | {c['bytes_uploaded']:,} | {c['upload_s']} | "
            f"{c['local_steps']} | {c['local_train_s']} | {c['final_local_loss']} | "
            f"{c['model_parameters']:,} | {c['synthesis_server_s']} | {c['synthesis_client_s']} | "
            f"{c.get('fid', '-')} | {own} |"
        )
    lines += ["", release_line(s["release"]), "", quality_line(s["quality"])]
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in s["times_s"].items()), ""]
    lines += [f"![{c['client_id']}](samples/{c['client_id']}/grid.png)" for c in s["clients"]]
    return "\n".join(lines)


def release_line(r: dict[str, Any]) -> str:
    """One line on what the server saw: the noise level of the cut images it was sent."""
    cuts = " and ".join(
        f"t_cut {t} of T={r['T']} (t_cut/T {f:g}, release SNR abar/(1-abar) {snr:.3g})"
        for t, f, snr in zip(r["t_cut"], r["t_cut_over_T"], r["snr"], strict=True)
    )
    return (
        f"What the server saw: cut images only, noised to {cuts}; its policy admits release "
        f"SNR up to {r['policy_max_release_snr']:g}."
    )


def quality_line(q: dict[str, Any]) -> str:
    """The samples' scores in one paragraph, or why there are none."""
    if "skipped" in q:
        return f"Quality: no FID ({q['skipped']})."
    return (
        f"Quality: pooled FID {q['fid_pooled']:.1f} of {q['samples']} samples against "
        f"{q['real']:,} held-out test images of the clients' classes, in the features of the "
        f"committed Fashion-MNIST classifier (test accuracy {q['classifier_test_accuracy']:.1%}); "
        f"as many of the clients' own training images score {q['fid_reference']:.1f} against the "
        f"same set, the floor at this sample count (FID of a few hundred images is biased "
        f"upwards and noisy: compare runs with equal counts only). The classifier puts "
        f"{q['own_class_rate']:.0%} of the samples in their own client's classes "
        f"(chance {q['own_class_chance']:.0%})."
    )
