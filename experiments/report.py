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
from collafuse.experiments.stats import Interval

BASELINES = ("local", "centralised", "fedavg")
EQUAL_COST = ("local-size", "local-flops")
LABELS = {
    "local": "local-only (full size)",
    "local-size": "local-only (client size)",
    "local-flops": "local-only (client FLOPs)",
    "centralised": "centralised (raw data)",
    "fedavg": "FedAvg",
    "collafuse": "CollaFuse (exact split)",
    "heuristic": "paper heuristic",
}
COLOURS = {"local": "tab:red", "centralised": "tab:green", "fedavg": "tab:purple"}


def _repeat(r: dict[str, Any]) -> bool:
    """A key arm's run with a later seed (results saved before `repeat` existed: by key)."""
    return bool(r.get("repeat", r["key"].endswith(f"-s{r.get('seed')}")))


def _name(r: dict[str, Any]) -> str:
    base = LABELS[r["arm"]]
    parts = []
    if r.get("cut_ratio") is not None:
        parts.append(f"c={r['cut_ratio']:g}")
    if r.get("client") is not None:
        parts.append(f"client {r['client']}")
    if _repeat(r):
        parts.append(f"seed {r['seed']}")
    return f"{base} {', '.join(parts)}" if parts else base


def _ci(r: dict[str, Any], metric: str, which: str = "pooled") -> Interval | None:
    values = r.get(f"{metric}_ci", {}).get(which)
    return None if values is None else Interval.from_list(values)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def _fmt_ci(values: list[float] | Interval | None, digits: int = 3) -> str:
    if values is None:
        return "-"
    i = values if isinstance(values, Interval) else Interval.from_list(values)
    return f"{i.value:.{digits}g} [{i.low:.{digits}g}, {i.high:.{digits}g}]"


def flat_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per arm for CSV; intervals as _lo/_hi columns."""
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "key": r["key"],
            "partition": r["partition"],
            "arm": r["arm"],
            "cut_ratio": r.get("cut_ratio"),
            "client": r.get("client"),
            "seed": r.get("seed"),
            "client_params": r.get("client_params"),
            "t_cut": r.get("t_cut"),
            "fid_pooled": r["fid_pooled"],
            "kid_pooled": r["kid_pooled"],
            "wall_s": r["wall_s"],
        }
        for metric in ("fid", "kid"):
            for which, values in r.get(f"{metric}_ci", {}).items():
                row[f"{metric}_{which}"] = values[0]
                row[f"{metric}_{which}_lo"] = values[1]
                row[f"{metric}_{which}_hi"] = values[2]
        d = r.get("disclosure", {})
        for k, v in d.items():
            if k == "note":
                continue
            if k == "membership":
                for m in ("auc", "tpr_at_1pct_fpr"):
                    row[f"mia_{m}"], row[f"mia_{m}_lo"], row[f"mia_{m}_hi"] = v[m]
            elif isinstance(v, list):
                row[k.removesuffix("_ci") + "_lo"], row[k.removesuffix("_ci") + "_hi"] = v[1:]
            else:
                row[k] = v
        row.update(r["cost"])
        rows.append(row)
    return rows


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _first_seed(mine: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The arms run with the first seed (every arm has one); repeats are reported apart."""
    return [r for r in mine if not _repeat(r)]


def _sizes(mine: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in mine:
        if r.get("client") is not None and r["client"] not in seen:
            seen.append(r["client"])
    return seen


def _errorbar(ax: Any, xs: list[float], rows: list[dict[str, Any]], which: str, **kw: Any) -> None:
    cis = [_ci(r, "fid", which) for r in rows]
    ys = [c.value if c else math.nan for c in cis]
    lo = [c.value - c.low if c else 0.0 for c in cis]
    hi = [c.high - c.value if c else 0.0 for c in cis]
    ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, **kw)


def _plots(mine: list[dict[str, Any]], out: Path, partition: str, n: int) -> list[str]:
    split = [r for r in mine if r["arm"] == "collafuse"]
    sizes = _sizes(mine)
    files = []

    # 1. FID against cut ratio, one line per client size (first seed), baselines as bands and
    # each size's equal-cost local-only model as a dotted line in that size's colour.
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    first = _first_seed(mine)
    for k, size in enumerate(sizes):
        colour = f"C{k}"
        rows = sorted(
            (r for r in first if r["arm"] == "collafuse" and r["client"] == size),
            key=lambda r: r["cut_ratio"],
        )
        if rows:
            _errorbar(
                ax, [r["cut_ratio"] for r in rows], rows, "pooled", fmt="o-", color=colour,
                label=f"CollaFuse, client {size}",
            )  # fmt: skip
        twin = next((r for r in first if r["arm"] == "local-size" and r["client"] == size), None)
        if twin is not None:
            ax.axhline(
                twin["fid_pooled"], ls=":", color=colour, label=f"local-only, client {size} alone"
            )
    for r in mine:
        if r["arm"] in BASELINES:
            ci = _ci(r, "fid")
            if ci is not None:
                ax.axhspan(ci.low, ci.high, color=COLOURS[r["arm"]], alpha=0.15)
                ax.axhline(ci.value, ls="--", color=COLOURS[r["arm"]], label=LABELS[r["arm"]])
    heur = [r for r in mine if r["arm"] == "heuristic"]
    if heur:
        _errorbar(
            ax, [r["cut_ratio"] for r in heur], heur, "pooled", fmt="s", label=LABELS["heuristic"]
        )
    ax.set_xlabel("cut ratio c (share of the chain on the client)")
    ax.set_ylabel("pooled FID (classifier features, lower is better)")
    ax.set_title(f"Fidelity by client size ({partition} split), 95% bootstrap intervals")
    ax.legend(fontsize=7)
    files.append(_save(fig, out / f"fid_vs_cut_{partition}.png"))

    # 2. Disclosure against cut ratio: one server per cut, whatever the client size.
    by_cut: dict[float, dict[str, Any]] = {}
    for r in split:
        by_cut.setdefault(r["cut_ratio"], r)
    if by_cut:
        cuts = sorted(by_cut)
        fig, ax = plt.subplots(figsize=(6.5, 4.2))

        def line(key: str, label: str, style: str, sub: str | None = None) -> None:
            vals = []
            for c in cuts:
                d = by_cut[c]["disclosure"]
                v = d.get("membership", {}).get(sub) if sub else d.get(key)
                vals.append(Interval.from_list(v) if isinstance(v, list) else None)
            if all(v is not None for v in vals):
                ax.errorbar(
                    cuts,
                    [v.value for v in vals if v],
                    yerr=[
                        [v.value - v.low for v in vals if v],
                        [v.high - v.value for v in vals if v],
                    ],
                    fmt=style,
                    capsize=3,
                    label=label,
                )

        line("attack_reid_ci", "re-identification (best attacker)", "s--")
        line("reid_raw_cut_ci", "re-identification of the raw cut", "^:")
        line("", "membership AUC (server model)", "o-", "auc")
        line("", "membership TPR at 1% FPR", "d-.", "tpr_at_1pct_fpr")
        central = next((r for r in mine if r["arm"] == "centralised"), None)
        if central is not None and "membership" in central.get("disclosure", {}):
            ax.axhline(
                central["disclosure"]["membership"]["auc"][0],
                ls="--",
                color=COLOURS["centralised"],
                label="membership AUC, centralised model on raw data",
            )
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("cut ratio c")
        ax.set_ylabel("rate / AUC")
        ax.set_title(f"What the server can infer ({partition} split)")
        ax.legend(fontsize=7)
        files.append(_save(fig, out / f"disclosure_vs_cut_{partition}.png"))

    # 3. Client training compute of every arm.
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = [r for r in mine if r["cost"]["client_train_gflops"] > 0]
    ax.barh([_name(r) for r in rows], [r["cost"]["client_train_gflops"] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("client training GFLOPs per client (log)")
    ax.tick_params(axis="y", labelsize=6)
    ax.set_title(f"Client compute ({partition} split)")
    files.append(_save(fig, out / f"client_compute_vs_cut_{partition}.png"))

    # 4. The trade-off in one figure (pooled), 5. the frontier per client.
    for which, title, stem in [("pooled", "pooled", "tradeoff")] + [
        (f"client-{i}", f"client {i}", f"frontier_client{i}") for i in range(n)
    ]:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in mine:
            ci = _ci(r, "fid", which)
            if ci is None:
                continue
            if r["cost"]["client_train_gflops"] == 0:
                # No client training (centralised): a reference line, not a point at 0 FLOPs.
                ax.axhspan(ci.low, ci.high, color=COLOURS.get(r["arm"], "grey"), alpha=0.12)
                ax.axhline(ci.value, ls="--", color=COLOURS.get(r["arm"], "grey"), lw=1)
                ax.annotate(
                    _name(r), (0.01, ci.value), xycoords=("axes fraction", "data"), fontsize=6
                )
                continue
            # Arms of one client size spend the same FLOPs: spread them a little to stay legible.
            nudge = {"local-size": 0.94, "local-flops": 1.06, "heuristic": 1.1}
            cost = r["cost"]["client_train_gflops"] * nudge.get(r["arm"], 1.0)
            marker = {"collafuse": "o", "heuristic": "s", "local-size": "v", "local-flops": "^"}
            known = {"local": 0.0, "local-size": 0.0, "local-flops": 0.0, "centralised": 1.0}
            reid = known.get(r["arm"], r.get("disclosure", {}).get("attack_reid"))
            colour = "tab:gray" if reid is None else plt.get_cmap("coolwarm")(reid)
            ax.errorbar(
                cost,
                ci.value,
                yerr=[[ci.value - ci.low], [ci.high - ci.value]],
                fmt=marker.get(r["arm"], "D"),
                color=colour,
                capsize=2,
                ms=6,
            )
            ax.annotate(
                _name(r).replace("local-only", "local").replace("CollaFuse (exact split) ", ""),
                (cost, ci.value),
                fontsize=5,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("client training GFLOPs (log)")
        ax.set_ylabel(f"FID ({title})")
        ax.set_title(
            f"Quality vs client compute ({title}, {partition}); colour = re-identification "
            "(blue 0, red 1)",
            fontsize=8,
        )
        files.append(_save(fig, out / f"{stem}_{partition}.png"))
    return files


def _copying(mine: list[dict[str, Any]]) -> list[str]:
    """The table of how often samples lie nearer to training images than to held-out ones."""
    rows = [r for r in mine if "copying" in r]
    if not rows:
        return []
    lines = [
        "",
        "### What clients receive: copies of training images?",
        "",
        "| arm | own training images | another client's training images |",
        "|---|---|---|",
    ]
    for r in rows:
        c = r["copying"]
        lines.append(f"| {_name(r)} | {_fmt_ci(c.get('own'))} | {_fmt_ci(c.get('other'))} |")
    c = rows[0]["copying"]
    lines += [
        "",
        f"Share of the clients' {c.get('samples')} samples whose nearest training image of a "
        "client, in the classifier's features, is nearer than its nearest held-out image of that "
        "client. Training and held-out images are drawn alike from each client's share, so 0.5 "
        "means the samples copy nothing. Each of "
        f"{c.get('repetitions')} repetitions compares against a random half of each set; the "
        "interval is the middle 95% of those repetitions (many samples share a few nearest "
        "neighbours, so which images are in the sets moves the share most). Above 0.5 the "
        'samples reproduce training images; "another client\'s" above 0.5 would mean a client '
        "receives copies of another client's images through the shared server. The local-only "
        "arms never saw another client's images: their column shows what no copying looks like.",
    ]
    return lines


def _few_step_samplers(mine: list[dict[str, Any]]) -> list[str]:
    """The table of pooled FIDs with each client sampler at few steps, same hand-off."""
    rows = [r for r in mine if "few_step_samplers" in r]
    if not rows:
        return []
    lines = [
        "",
        "### The client's sampler at few steps",
        "",
        "| arm | client steps | DDIM | DDPM | Analytic-DPM | DDPM, both halves | "
        "Analytic-DPM, both halves |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["few_step_samplers"]
        lines.append(
            f"| {_name(r)} | {f['steps']} | {_fmt_ci(f.get('ddim'))} | {_fmt_ci(f.get('ddpm'))} "
            f"| {_fmt_ci(f.get('analytic'))} | {_fmt_ci(f.get('ddpm_both'))} | "
            f"{_fmt_ci(f.get('analytic_both'))} |"
        )
    lines += [
        "",
        "Pooled FID (95% interval) when each client finishes its chain in that many steps. "
        "The first three start from the study's server hand-off (drawn with the study's "
        "sampler) and differ in the client's sampler; the last two draw the server's half again "
        "with that sampler too, from the same seeds. Analytic-DPM is DDPM's mean with the "
        "optimal variance: Gamma_t from the client's own training images on the client's half, "
        "from the cut images it holds on the server's.",
    ]
    return lines


def _verdict(a: Interval, b: Interval) -> str:
    """How FID interval `a` compares with `b`: a difference only where they separate."""
    if not a.separated_from(b):
        return "not separable from"
    return "better than" if a.value < b.value else "worse than"


def summarise(mine: list[dict[str, Any]]) -> list[str]:
    """Statements read off one split's numbers; a difference is claimed only where the 95%
    intervals of the two FIDs do not overlap."""
    first = _first_seed(mine)
    split = sorted(
        (r for r in first if r["arm"] == "collafuse"), key=lambda r: (r["client"], r["cut_ratio"])
    )
    out: list[str] = []
    full = next((r for r in first if r["arm"] == "local"), None)
    central = next((r for r in first if r["arm"] == "centralised"), None)
    for r in split:
        fid = _ci(r, "fid")
        if fid is None:
            continue
        parts = []
        for kind in EQUAL_COST:
            twin = next((b for b in first if b["arm"] == kind and b["client"] == r["client"]), None)
            other = _ci(twin, "fid") if twin else None
            if other is not None:
                parts.append(f"{_verdict(fid, other)} {LABELS[kind]} ({_fmt_ci(other)})")
        if full is not None and (other := _ci(full, "fid")) is not None:
            parts.append(f"{_verdict(fid, other)} {LABELS['local']} ({_fmt_ci(other)})")
        d = r.get("disclosure", {})
        mia = d.get("membership", {}).get("auc")
        out.append(
            f"- c={r['cut_ratio']:g}, client {r['client']} "
            f"({r['cost']['client_train_gflops']:.4g} client GFLOPs): FID {_fmt_ci(fid)}, "
            + "; ".join(parts)
            + f". Server side: SNR {d.get('snr', math.nan):.3g}, re-identification "
            f"{_fmt_ci(d.get('attack_reid_ci'))}, membership AUC {_fmt_ci(mia)}."
        )
    if central is not None and "membership" in central.get("disclosure", {}):
        m = central["disclosure"]["membership"]
        out.append(
            f"- The same membership attack on the centralised model (raw images): AUC "
            f"{_fmt_ci(m['auc'])}, TPR at 1% FPR {_fmt_ci(m['tpr_at_1pct_fpr'])}."
        )
    for h in (r for r in first if r["arm"] == "heuristic"):
        twin = next(
            (r for r in split if r["cut_ratio"] == h["cut_ratio"] and r["client"] == h["client"]),
            None,
        )
        a, b = (_ci(twin, "fid") if twin else None), _ci(h, "fid")
        if a is not None and b is not None:
            out.append(
                f"- At c={h['cut_ratio']:g} the exact split ({_fmt_ci(a)}) is {_verdict(a, b)} "
                f"the paper heuristic ({_fmt_ci(b)}; client starts at t={h['t_start_client']} "
                f"instead of {h['t_cut']})."
            )
    return out or ["- (no split arm in this study)"]


def write_report(
    config: ExperimentConfig, results: list[dict[str, Any]], out: Path, machine: str
) -> Path:
    """report.md + plots + results.json/csv in `out`; returns the report's path."""
    (out / "results.json").write_text(
        json.dumps({"config": config.model_dump(mode="json"), "results": results}, indent=2)
    )
    rows = flat_rows(results)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    d, t, ev = config.data, config.train, config.eval
    n = d.num_clients
    lines = [
        f"# CollaFuse study: {config.name}",
        "",
        f"Machine: {machine} ({platform.machine()}, torch threads as configured). "
        f"Data: {d.source}, {n} clients, {d.train_per_client} training and "
        f"{d.test_per_client} held-out images per client, {d.image_size}x{d.image_size}. "
        f"T={config.num_timesteps} ({config.beta_schedule}). Budgets: {t.epochs:g} epochs over "
        f"its data for every full-size model (local-only at full size, centralised, FedAvg, the "
        f"split arms' server) and {t.client_epochs:g} for each client model, batch "
        f"{t.batch_size}, lr {t.lr:g}. Sampling: {ev.sampler}, {ev.steps} steps over the chain.",
        "",
        f"Counts: {ev.samples_per_client} generated images per client and arm against "
        f"{d.test_per_client} held-out images per client (pooled: {ev.samples_per_client * n} "
        f"vs {d.test_per_client * n}). Every interval is a {config.eval.level:.0%} percentile "
        f"bootstrap over {ev.bootstrap} resamples of the images (generated and held-out sets "
        "resampled separately; members and non-members separately); it covers sampling noise, "
        "not training-seed noise, which the repeated seeds show. Resampling repeats images, so "
        "the bootstrap FIDs sit mostly above the point estimate; compare intervals with each "
        "other. Split/secret seed "
        f"{config.seed}; training seeds {list(config.seeds)} (the first for every arm, all for "
        f"{', '.join(config.key_arms) or 'no arm'}).",
        "",
        "FID/KID use features of the small Fashion-MNIST classifier committed in "
        "`common/assets/` (KID: unbiased MMD^2 over all images at once); with few samples FID is "
        "biased upwards, so compare arms with each other, not with published numbers. "
        "Equal client cost: `local-only (client size)` trains the client's own network on the "
        "full chain for the client's steps (exactly its training FLOPs); `local-only (client "
        "FLOPs)` spends the same FLOPs on the full-size network.",
        "",
    ]
    for partition in d.partitions:
        mine = [r for r in results if r["partition"] == partition]
        if not mine:
            continue
        first = _first_seed(mine)
        lines += [f"## {partition} split", "", "### Summary", "", *summarise(mine)]
        lines += ["", "### Fidelity", ""]
        clients = [f"client-{i}" for i in range(n)]
        lines.append(
            "| arm | client params | client train GFLOPs | "
            + " | ".join(f"FID {c}" for c in clients)
            + " | pooled FID [95% CI] | pooled KID [95% CI] |"
        )
        lines.append("|---" * (n + 5) + "|")
        for r in mine:
            lines.append(
                f"| {_name(r)} | {_fmt(r.get('client_params'))} | "
                f"{_fmt(r['cost']['client_train_gflops'])} | "
                + " | ".join(_fmt_ci(r["fid_ci"].get(c)) for c in clients)
                + f" | {_fmt_ci(r['fid_ci']['pooled'])} | {_fmt_ci(r['kid_ci']['pooled'])} |"
            )
        lines += [
            "",
            "Local-only models see one client's data; FedAvg's global model is unconditional "
            "(clients share no labels), so it generates the mixture of all clients, which "
            "per-client FIDs penalise on a by-class split; the centralised model and the split "
            "arms' server are conditioned on the client.",
        ]
        if any("fid_inception_pooled" in r for r in mine):
            lines += [
                "",
                "Inception-v3 features (pooled): "
                + "; ".join(
                    f"{_name(r)} FID {_fmt(r.get('fid_inception_pooled'))}, "
                    f"KID {_fmt(r.get('kid_inception_pooled'))}"
                    for r in mine
                ),
            ]
        lines += _seeds(mine)
        lines += _frontier(first, n)
        lines += ["", "### Disclosure (what the server can infer)", ""]
        lines.append(
            "| arm | t_cut | release SNR | KID(cut, train) | re-id of raw cut | best attacker | "
            "attack PSNR dB | attack SSIM | attack re-id | membership AUC | TPR at 1% FPR |"
        )
        lines.append("|---" * 11 + "|")
        seen_servers: set[tuple[float, int]] = set()
        for r in mine:
            dd = r.get("disclosure", {})
            m = dd.get("membership", {})
            if "snr" not in dd:
                lines.append(
                    f"| {_name(r)} | - | - | - | - | {dd.get('note', 'nothing sent')} | - | - | - | "
                    f"{_fmt_ci(m.get('auc'))} | {_fmt_ci(m.get('tpr_at_1pct_fpr'))} |"
                )
                continue
            if r["arm"] == "collafuse":
                # One server per cut and seed, whatever the client size: list it once.
                server = (r["cut_ratio"], r.get("seed", 0))
                if server in seen_servers:
                    continue
                seen_servers.add(server)
            name = _name(r) if r["arm"] != "collafuse" else _name({**r, "client": None})
            lines.append(
                f"| {name} | {r['t_cut']} | {_fmt(dd['snr'])} | {_fmt(dd['kid_cut_vs_train'])} | "
                f"{_fmt_ci(dd.get('reid_raw_cut_ci'))} | {dd.get('attacker', '-')} | "
                f"{_fmt_ci(dd.get('attack_psnr_ci'))} | {_fmt(dd.get('attack_ssim'))} | "
                f"{_fmt_ci(dd.get('attack_reid_ci'))} | {_fmt_ci(m.get('auc'))} | "
                f"{_fmt_ci(m.get('tpr_at_1pct_fpr'))} |"
            )
        lines += [
            "",
            "Re-identification: the reconstruction's nearest neighbour (pixel L2) among all "
            f"{(d.train_per_client + d.test_per_client) * n} training and held-out images is its "
            "own original. Membership: the attacked model's training loss, averaged over "
            f"{ev.membership_timesteps} timesteps in the lowest 30% of the chain it owns, tells "
            "members (for the server: the cut images it trained on) from held-out images cut "
            "the same way; AUC 0.5 is chance.",
        ]
        lines += _copying(mine)
        lines += _few_step_samplers(mine)
        lines += ["", "### Cost", ""]
        lines.append(
            "| arm | client train steps | client train GFLOPs | server train GFLOPs | client "
            "MFLOPs/image | server MFLOPs/image | client train s | server train s | synth s | "
            "training bytes/client | bytes down/image |"
        )
        lines.append("|---" * 11 + "|")
        for r in mine:
            c = r["cost"]
            lines.append(
                f"| {_name(r)} | {_fmt(c.get('client_train_steps'))} | "
                f"{_fmt(c['client_train_gflops'])} | {_fmt(c['server_train_gflops'])} | "
                f"{_fmt(c['client_synth_mflops_per_image'])} | "
                f"{_fmt(c['server_synth_mflops_per_image'])} | {_fmt(c['client_train_s'])} | "
                f"{_fmt(c['server_train_s'])} | {_fmt(c['synth_s'])} | "
                f"{c['bytes_up_per_client'] + c['bytes_model_down_per_client']:,} | "
                f"{c['bytes_down_per_image']:,} |"
            )
        lines += [
            "",
            "Split arms at one cut and seed share one server (trained once): its seconds are "
            "repeated in each client size's row.",
            "",
            "### Plots and samples",
            "",
        ]
        lines += [f"![{f}]({f})" for f in _plots(mine, out, partition, n)]
        lines += [""] + [f"- {_name(r)}: ![{r['key']}]({r['grid']})" for r in mine] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _seeds(mine: list[dict[str, Any]]) -> list[str]:
    """The key arms at every seed: how far training noise moves the pooled FID."""
    names = sorted({r["name"] for r in mine if _repeat(r) and "name" in r})
    if not names:
        return []
    lines = [
        "",
        "### Seeds (key arms)",
        "",
        "| arm | seed | pooled FID [95% CI] | pooled KID [95% CI] |",
        "|---|---|---|---|",
    ]
    for name in names:
        for r in sorted((r for r in mine if r.get("name") == name), key=lambda r: r["seed"]):
            lines.append(
                f"| {_name({**r, 'repeat': False})} | {r['seed']} | "
                f"{_fmt_ci(r['fid_ci']['pooled'])} | {_fmt_ci(r['kid_ci']['pooled'])} |"
            )
    return lines


def _frontier(first: list[dict[str, Any]], n: int) -> list[str]:
    """Per client: quality vs disclosure vs client compute for every client size and cut."""
    sizes = _sizes(first)
    if not sizes:
        return []
    lines = [
        "",
        "### Frontier per client (quality vs disclosure vs client compute)",
        "",
        "Per client FID [95% CI] of each arm with a client network, by client size; the split "
        "arms' disclosure is the server's (one per cut).",
        "",
    ]
    header = (
        "| client size (params) | arm | client train GFLOPs | release SNR | attack re-id | "
        "membership AUC | " + " | ".join(f"FID client-{i}" for i in range(n)) + " |"
    )
    lines += [header, "|---" * (6 + n) + "|"]
    for size in sizes:
        rows = [r for r in first if r.get("client") == size]
        rows.sort(
            key=lambda r: (
                r["arm"] != "local-size",
                r["arm"] != "local-flops",
                r.get("cut_ratio") or 0,
            )
        )
        for r in rows:
            dd = r.get("disclosure", {})
            lines.append(
                f"| {size} ({_fmt(r.get('client_params'))}) | "
                f"{_name({**r, 'client': None})} | {_fmt(r['cost']['client_train_gflops'])} | "
                f"{_fmt(dd.get('snr'))} | {_fmt(dd.get('attack_reid'))} | "
                f"{_fmt(dd.get('membership', {}).get('auc', [None])[0])} | "
                + " | ".join(_fmt_ci(r["fid_ci"].get(f"client-{i}")) for i in range(n))
                + " |"
            )
    return lines
