"""Turns a study's saved arm results into report.md, plots, results.json and results.csv."""

from __future__ import annotations

import csv
import json
import math
import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt

from collafuse.experiments.config import ExperimentConfig

BASELINES = ("local", "centralised", "fedavg")
LABELS = {
    "local": "local-only",
    "centralised": "centralised (raw data)",
    "fedavg": "FedAvg",
    "collafuse": "CollaFuse (exact split)",
    "heuristic": "paper heuristic",
}


def _name(r: dict[str, Any]) -> str:
    base = LABELS[r["arm"]]
    return f"{base} c={r['cut_ratio']:g}" if r.get("cut_ratio") is not None else base


def flat_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per arm for CSV."""
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "partition": r["partition"],
            "arm": r["arm"],
            "cut_ratio": r.get("cut_ratio"),
            "t_cut": r.get("t_cut"),
            "fid_pooled": r["fid_pooled"],
            "kid_pooled": r["kid_pooled"],
            "wall_s": r["wall_s"],
        }
        row.update({f"fid_{k}": v for k, v in r["fid"].items()})
        row.update({f"kid_{k}": v for k, v in r["kid"].items()})
        row.update({k: v for k, v in r.get("disclosure", {}).items() if k != "note"})
        row.update(r["cost"])
        rows.append(row)
    return rows


def _plots(results: list[dict[str, Any]], out: Path, partition: str) -> list[str]:
    mine = [r for r in results if r["partition"] == partition]
    split = sorted((r for r in mine if r["arm"] == "collafuse"), key=lambda r: r["cut_ratio"])
    heur = [r for r in mine if r["arm"] == "heuristic"]
    base = [r for r in mine if r["arm"] in BASELINES]
    files = []
    colors = {"local": "tab:red", "centralised": "tab:green", "fedavg": "tab:purple"}

    def baselines(ax: Any, key: str, sub: str | None = None) -> None:
        for r in base:
            value = r[key] if sub is None else r[key][sub]
            ax.axhline(value, ls="--", color=colors[r["arm"]], label=LABELS[r["arm"]])

    # 1. FID against cut ratio.
    fig, ax = plt.subplots(figsize=(6, 4))
    if split:
        ax.plot(
            [r["cut_ratio"] for r in split],
            [r["fid_pooled"] for r in split],
            "o-",
            label=LABELS["collafuse"],
        )
    if heur:
        ax.plot(
            [r["cut_ratio"] for r in heur],
            [r["fid_pooled"] for r in heur],
            "s",
            color="tab:orange",
            label=LABELS["heuristic"],
        )
    baselines(ax, "fid_pooled")
    ax.set_xlabel("cut ratio c (share of the chain on the client)")
    ax.set_ylabel("pooled FID (classifier features, lower is better)")
    ax.set_title(f"Fidelity ({partition} split)")
    ax.legend(fontsize=8)
    files.append(_save(fig, out / f"fid_vs_cut_{partition}.png"))

    # 2. Disclosure against cut ratio.
    if split:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["cut_ratio"] for r in split]
        if all("attack_psnr" in r["disclosure"] for r in split):
            ax.plot(
                xs, [r["disclosure"]["attack_psnr"] for r in split], "o-", label="attack PSNR (dB)"
            )
        ax2 = ax.twinx()
        if all("attack_reid" in r["disclosure"] for r in split):
            ax2.plot(
                xs,
                [r["disclosure"]["attack_reid"] for r in split],
                "s--",
                color="tab:red",
                label="re-identification rate",
            )
        ax2.plot(
            xs,
            [r["disclosure"]["reid_raw_cut"] for r in split],
            "^:",
            color="tab:gray",
            label="re-id of raw cut",
        )
        ax.set_xlabel("cut ratio c")
        ax.set_ylabel("PSNR of best reconstruction (dB)")
        ax2.set_ylabel("re-identification rate")
        ax2.set_ylim(0, 1.05)
        ax.set_title(f"Disclosure to the server ({partition} split)")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax2.legend(handles=handles, fontsize=8, loc="upper right")
        files.append(_save(fig, out / f"disclosure_vs_cut_{partition}.png"))

    # 3. Client compute against cut ratio.
    fig, ax = plt.subplots(figsize=(6, 4))
    if split:
        ax.plot(
            [r["cut_ratio"] for r in split],
            [r["cost"]["client_train_gflops"] for r in split],
            "o-",
            label=LABELS["collafuse"] + " (train)",
        )
    for r in base:
        if r["cost"]["client_train_gflops"] > 0:
            ax.axhline(
                r["cost"]["client_train_gflops"],
                ls="--",
                color=colors[r["arm"]],
                label=LABELS[r["arm"]],
            )
    ax.set_xlabel("cut ratio c")
    ax.set_ylabel("client training GFLOPs")
    ax.set_title(f"Client compute ({partition} split)")
    ax.legend(fontsize=8)
    files.append(_save(fig, out / f"client_compute_vs_cut_{partition}.png"))

    # 4. The trade-off in one figure.
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in mine:
        cost = r["cost"]["client_train_gflops"] + 1e-3
        marker = {"collafuse": "o", "heuristic": "s"}.get(r["arm"], "D")
        # Colour by what the server can re-identify: local-only sends nothing (0), the centralised
        # arm sends raw images (1); FedAvg's leakage through updates is not measured (grey).
        known = {"local": 0.0, "centralised": 1.0}
        reid = known.get(r["arm"], r.get("disclosure", {}).get("attack_reid"))
        colour: dict[str, Any] = (
            {"color": "tab:gray"}
            if reid is None
            else {"c": [reid], "cmap": "coolwarm", "vmin": 0, "vmax": 1}
        )
        ax.scatter(cost, r["fid_pooled"], marker=marker, s=60, **colour)
        ax.annotate(
            _name(r), (cost, r["fid_pooled"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("client training GFLOPs (log)")
    ax.set_ylabel("pooled FID")
    ax.set_title(f"Trade-off ({partition}); colour = re-identification rate (red = 1)")
    files.append(_save(fig, out / f"tradeoff_{partition}.png"))
    return files


def summarise(mine: list[dict[str, Any]]) -> list[str]:
    """Plain statements read off the numbers of one split."""
    by = {r["arm"]: r for r in mine if r["arm"] in BASELINES}
    split = sorted((r for r in mine if r["arm"] == "collafuse"), key=lambda r: r["cut_ratio"])
    out = []
    if split:
        best = min(split, key=lambda r: r["fid_pooled"])
        d = best.get("disclosure", {})
        out.append(
            f"- Best exact split by pooled FID: c={best['cut_ratio']:g} (t_cut={best['t_cut']}), "
            f"FID {best['fid_pooled']:.4g}; release SNR {d.get('snr', math.nan):.3g}, best attack "
            f"PSNR {d.get('attack_psnr', math.nan):.3g} dB, re-identification "
            f"{d.get('attack_reid', math.nan):.3g}; client training "
            f"{best['cost']['client_train_gflops']:.4g} GFLOPs."
        )
        for kind in BASELINES:
            if kind in by:
                r = by[kind]
                verdict = "better" if best["fid_pooled"] < r["fid_pooled"] else "worse"
                out.append(
                    f"- vs {LABELS[kind]}: FID {r['fid_pooled']:.4g} (the split is {verdict}); "
                    f"client training {r['cost']['client_train_gflops']:.4g} GFLOPs."
                )
        wins = [
            r["cut_ratio"]
            for r in split
            if "local" in by and r["fid_pooled"] < by["local"]["fid_pooled"]
        ]
        if "local" in by:
            out.append(
                "- Cut ratios where the split beats local-only: "
                + (", ".join(f"{c:g}" for c in wins) if wins else "none")
                + "."
            )
    for h in (r for r in mine if r["arm"] == "heuristic"):
        twin = next((r for r in split if r["cut_ratio"] == h["cut_ratio"]), None)
        if twin is not None:
            verdict = "better" if twin["fid_pooled"] < h["fid_pooled"] else "worse"
            out.append(
                f"- At c={h['cut_ratio']:g} the exact split's FID {twin['fid_pooled']:.4g} is "
                f"{verdict} than the paper heuristic's {h['fid_pooled']:.4g} (client starts at "
                f"t={h['t_start_client']} instead of {twin['t_cut']})."
            )
    return out or ["- (no split arm in this study)"]


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def write_report(
    config: ExperimentConfig, results: list[dict[str, Any]], out: Path, machine: str
) -> Path:
    """report.md + plots + results.json/csv in `out`; returns the report's path."""
    (out / "results.json").write_text(
        json.dumps({"config": config.model_dump(mode="json"), "results": results}, indent=2)
    )
    rows = flat_rows(results)
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k not in rows[0], k))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    n = config.data.num_clients
    lines = [
        f"# CollaFuse study: {config.name}",
        "",
        f"Machine: {machine} ({platform.machine()}, torch threads as configured). "
        f"Data: {config.data.source}, {n} clients, {config.data.train_per_client} training and "
        f"{config.data.test_per_client} held-out images per client, {config.data.image_size}x"
        f"{config.data.image_size}. T={config.num_timesteps} ({config.beta_schedule}). "
        f"Budgets: {config.train.epochs:g} epochs over its data for every full-size model (local-only, "
        f"centralised, FedAvg in {config.train.fedavg_rounds} rounds, the split arms' server) and "
        f"{config.train.client_epochs:g} for each small client model, "
        f"batch {config.train.batch_size}. Sampling: {config.eval.sampler}, "
        f"{config.eval.samples_per_client} images per client. Seed {config.seed}.",
        "",
        "FID/KID use features of the small Fashion-MNIST classifier committed in "
        "`common/assets/` against each client's held-out images; with few samples FID is biased "
        "upwards, so compare arms with each other, not with published numbers.",
        "",
    ]
    for partition in config.data.partitions:
        mine = [r for r in results if r["partition"] == partition]
        if not mine:
            continue
        lines += [f"## {partition} split", "", "### Summary", "", *summarise(mine)]
        lines += ["", "### Fidelity", ""]
        clients = [f"client-{i}" for i in range(n)]
        lines.append(
            "| arm | " + " | ".join(f"FID {c}" for c in clients) + " | pooled FID | pooled KID |"
        )
        lines.append("|---" * (n + 3) + "|")
        for r in mine:
            lines.append(
                f"| {_name(r)} | "
                + " | ".join(_fmt(r["fid"][c]) for c in clients)
                + f" | {_fmt(r['fid_pooled'])} | {_fmt(r['kid_pooled'])} |"
            )
        lines += [
            "",
            "Local-only models see one client's data; FedAvg's global model is unconditional "
            "(clients share no labels), so it generates the mixture of all clients, which per-client "
            "FIDs penalise on a by-class split; the centralised model and the split arms' server "
            "are conditioned on the client.",
        ]
        if any("fid_inception_pooled" in r for r in mine):
            lines += [
                "",
                "Inception-v3 features (pooled): "
                + "; ".join(
                    f"{_name(r)} FID {_fmt(r.get('fid_inception_pooled'))}, KID {_fmt(r.get('kid_inception_pooled'))}"
                    for r in mine
                ),
            ]
        lines += ["", "### Disclosure (what the server saw)", ""]
        lines.append(
            "| arm | t_cut | SNR | KID(cut, train) | re-id of raw cut | best attacker | attack PSNR dB | attack SSIM | attack re-id |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in mine:
            d = r.get("disclosure", {})
            if "snr" not in d:
                lines.append(
                    f"| {_name(r)} | - | - | - | - | {d.get('note', 'nothing sent')} | - | - | - |"
                )
                continue
            lines.append(
                f"| {_name(r)} | {r['t_cut']} | {_fmt(d['snr'])} | {_fmt(d['kid_cut_vs_train'])} | "
                f"{_fmt(d['reid_raw_cut'])} | {d.get('attacker', '-')} | {_fmt(d.get('attack_psnr'))} | "
                f"{_fmt(d.get('attack_ssim'))} | {_fmt(d.get('attack_reid'))} |"
            )
        lines += ["", "### Cost", ""]
        lines.append(
            "| arm | client train GFLOPs | server train GFLOPs | client MFLOPs/image | server MFLOPs/image | client train s | server train s | synth s | training bytes/client | bytes down/image |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in mine:
            c = r["cost"]
            lines.append(
                f"| {_name(r)} | {_fmt(c['client_train_gflops'])} | {_fmt(c['server_train_gflops'])} | "
                f"{_fmt(c['client_synth_mflops_per_image'])} | {_fmt(c['server_synth_mflops_per_image'])} | "
                f"{_fmt(c['client_train_s'])} | {_fmt(c['server_train_s'])} | {_fmt(c['synth_s'])} | "
                f"{c['bytes_up_per_client'] + c['bytes_model_down_per_client']:,} | {c['bytes_down_per_image']:,} |"
            )
        lines += ["", "### Plots and samples", ""]
        lines += [f"![{f}]({f})" for f in _plots(results, out, partition)]
        lines += [""] + [f"- {_name(r)}: ![{r['key']}]({r['grid']})" for r in mine] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
