"""The ViSA/ATS ablation's summary (``benchmarks/ablate_visa_ats.py``): per-seed statistics of
the finished runs' records, the "exceeds the seed spread" verdicts against plain, the markdown page
and the figure of held-out AR@100 against iteration. Pure functions of the records, no training."""

import json
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from unsam.utils.files import atomic_write

AR_KEYS = ("AR@10", "AR@100", "AR@1000")
METRIC_NAMES = {"mIoU_max": "1-click mIoU (max)", "mIoU_oracle": "1-click mIoU (oracle)"}
LEVEL_NAMES = {
    "all": "all masks",
    "L0": "level 0 (wholes)",
    "L1": "level 1 (parts)",
    "L2": "level 2 (sub-parts)",
}


def flat_metrics(record: Dict) -> Dict[str, float]:
    """A run's final metrics as ``{"<set>/<subset>/<metric>": value}``."""
    return {
        f"{name}/{subset}/{metric}": value
        for name, subsets in record["final"].items()
        for subset, metrics in subsets.items()
        for metric, value in metrics.items()
    }


def seed_stats(values: Sequence[float]) -> Dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "values": [float(x) for x in v],
    }


def exceeds_spread(a: Sequence[float], b: Sequence[float]) -> Optional[bool]:
    """Whether the difference of the means of two variants' per-seed values is larger than the
    seed spread of each: ``|mean a − mean b| > max(range a, range b)``, range = max − min over
    seeds. None (no verdict) when either has fewer than 2 seeds."""
    if len(a) < 2 or len(b) < 2:
        return None
    spread = max(np.ptp(a), np.ptp(b))
    return bool(abs(np.mean(a) - np.mean(b)) > spread)


def _curves(records: Sequence[Dict]) -> Dict:
    """Held-out AR@100 (all masks) against iteration: mean, min and max over seeds, per set, at the
    iterations every seed evaluated."""
    curves = {}
    for name in records[0]["final"]:
        per_seed = [
            {e["iter"]: e["metrics"][name]["all"]["AR@100"] for e in r["evals"]} for r in records
        ]
        iters = sorted(set.intersection(*(set(c) for c in per_seed)))
        values = np.asarray([[c[it] for it in iters] for c in per_seed], dtype=np.float64).reshape(
            len(per_seed), -1
        )
        curves[name] = {
            "iters": iters,
            "mean": values.mean(0).tolist(),
            "min": values.min(0).tolist(),
            "max": values.max(0).tolist(),
        }
    return curves


def redundant_ar(detections_per_image: int) -> set:
    """The AR@k that repeat a smaller one: with at most D detections per image every AR@k, k ≥ D,
    is AR@D; the smallest such k is kept."""
    capped = [k for k in AR_KEYS if int(k.split("@")[1]) >= detections_per_image]
    return set(capped[1:])


def summarize(records: Sequence[Dict], order: Sequence[str]) -> Dict:
    """Per variant (in ``order``) and metric: mean, std, min, max over seeds; per variant ≠ plain
    and distinct metric (not :func:`redundant_ar`): the difference of means vs plain, the spread it
    is compared with and the verdict (:func:`exceeds_spread`); the AR@100 curves; the seconds of
    every run."""
    groups: Dict[str, List[Dict]] = {}
    for variant in [v for v in order if any(r["variant"] == v for r in records)]:
        groups[variant] = sorted(
            (r for r in records if r["variant"] == variant), key=lambda r: r["seed"]
        )
    flat = {v: [flat_metrics(r) for r in rs] for v, rs in groups.items()}
    keys = list(dict.fromkeys(k for per_run in flat.values() for m in per_run for k in m))
    values = {
        v: {k: [m[k] for m in per_run if k in m] for k in keys} for v, per_run in flat.items()
    }
    stats = {
        v: {k: seed_stats(x) for k, x in per_key.items() if x} for v, per_key in values.items()
    }
    comparisons = {}
    skip = redundant_ar(records[0]["schedule"]["detections_per_image"])
    if "plain" in groups:
        for variant in [v for v in groups if v != "plain"]:
            comparisons[variant] = {}
            for k in [k for k in keys if k.split("/")[-1] not in skip]:
                a, b = values[variant][k], values["plain"][k]
                if a and b:
                    comparisons[variant][k] = {
                        "diff": float(np.mean(a) - np.mean(b)),
                        "spread": float(max(np.ptp(a), np.ptp(b))),
                        "exceeds": exceeds_spread(a, b),
                    }
    first = records[0]
    return {
        "variants": list(groups),
        "labels": {v: rs[0]["label"] for v, rs in groups.items()},
        "seeds": sorted({r["seed"] for r in records}),
        "metrics": keys,
        "stats": stats,
        "comparisons": comparisons,
        "curves": {v: _curves(rs) for v, rs in groups.items()},
        "seconds": {v: {str(r["seed"]): r["seconds"] for r in rs} for v, rs in groups.items()},
        "budget": first["budget"],
        "schedule": first["schedule"],
        "data": first["data"],
        "machines": _machines(records),
    }


def _machines(records: Sequence[Dict]) -> List[Dict]:
    """The distinct machines the runs were trained on (``None``: not noted) and how many runs
    each."""
    counts: Dict[str, int] = defaultdict(int)
    for r in records:
        counts[json.dumps(r.get("machine"), sort_keys=True)] += 1
    return [{"machine": json.loads(m), "runs": n} for m, n in counts.items()]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _metric_label(key: str) -> str:
    name, subset, metric = key.split("/")
    return f"{name} {subset} {METRIC_NAMES.get(metric, metric)}"


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    if seconds < 60:
        return f"{seconds:.0f} s"
    return (
        f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{seconds / 60:.1f} min"
    )


def _md_commands(invocations: Sequence[Dict]) -> Tuple[List[str], float]:
    """The lines naming the command(s) that trained the runs, and their wall time added up."""
    trained = [i for i in invocations if i["runs_trained"]]
    if not trained:
        return ["Generated from finished runs; the command that trained them is not recorded."], 0.0
    total = sum(i["seconds"] for i in trained)
    if len(trained) == 1 and "stopped" not in trained[0]:
        return [f"Generated by `{trained[0]['command']}`."], total
    return (
        ["Generated by these commands (a resumed ablation), runs trained by each:", ""]
        + [
            f"- `{i['command']}`: {i['runs_trained']} run(s), {_duration(i['seconds'])}"
            + (f" ({i['stopped']})" if "stopped" in i else "")
            for i in trained
        ]
    ), total


def _md_header(summary: Dict, invocations: Sequence[Dict]) -> List[str]:
    b, s = summary["budget"], summary["schedule"]
    commands, total = _md_commands(invocations)
    run_seconds = [x for per_seed in summary["seconds"].values() for x in per_seed.values()]
    dets = s["detections_per_image"]
    cap = (
        f" The model returns at most {dets} detections per image ({s['num_queries']} queries), so "
        f"AR@100 and AR@1000 both equal AR@{dets}."
        if dets <= 100
        else ""
    )
    overrides = f" Overrides: `{' '.join(b['opts'])}`." if b["opts"] else ""
    return (
        ["# ViSA / ATS ablation", ""]
        + commands
        + [
            "",
            f"- **Data**: {summary['data']}.",
            f"- **Budget**: {b['iters']} iterations × batch {b['batch']} at {b['image_size']} px "
            f"on {b['device']}, "
            f"config `{b['config_file']}`{' with the prompt path' if b['prompt'] else ''}, "
            f"lr {s['base_lr']} (×0.1 at {', '.join(map(str, s['steps']))}); held-out evaluation "
            f"every {b['eval_period']} iterations. ViSA decays 1 → 0 over iterations "
            f"0–{s['visa_end_iter']}; ATS samples "
            f"adaptively from iteration {s['ats_start_iter']}.{overrides}",
            f"- **Seeds**: {', '.join(map(str, summary['seeds']))} (the training seed: "
            "initialisation, data order, augmentation; the data are the same for every seed).",
            f"- **Wall time**: {_duration(total) if total else 'not recorded'} for the whole "
            f"ablation; {len(run_seconds)} runs of {_duration(min(run_seconds))} to "
            f"{_duration(max(run_seconds))} each "
            "(training + periodic evaluation; table at the end).",
            f"- **Machine**: {_md_machines(summary.get('machines', []))}",
            f"- **Cells**: held-out metrics in percent, mean over seeds (min–max).{cap}",
            "",
        ]
    )


def _md_machines(machines: Sequence[Dict]) -> str:
    parts = [
        f"{m['runs']} run(s) not noted (trained before the records noted it)"
        if m["machine"] is None
        else f"{m['runs']} run(s) on {m['machine']['cpu']} ({m['machine']['device']}), "
        f"torch {m['machine']['torch']}, {m['machine']['threads']} thread(s)"
        for m in machines
    ]
    return "; ".join(parts) + (
        ". A run repeats bit for bit only on the same CPU and thread count." if parts else ""
    )


def _column(metric: str, detections_per_image: int) -> str:
    k = int(metric.split("@")[1]) if metric in AR_KEYS else 0
    suffix = f" (= AR@{detections_per_image})" if k > detections_per_image else ""
    return METRIC_NAMES.get(metric, metric) + suffix


def _md_tables(summary: Dict) -> List[str]:
    lines, dets = [], summary["schedule"]["detections_per_image"]
    by_table: Dict[Tuple[str, str], List[str]] = OrderedDict()
    for key in summary["metrics"]:
        name, subset, metric = key.split("/")
        by_table.setdefault((name, subset), []).append(metric)
    for (name, subset), metrics in by_table.items():
        lines += [
            f"## Held-out `{name}`: {LEVEL_NAMES.get(subset, subset)}",
            "",
            "| variant | seeds | " + " | ".join(_column(m, dets) for m in metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]
        for variant in summary["variants"]:
            cells = []
            for metric in metrics:
                st = summary["stats"][variant].get(f"{name}/{subset}/{metric}")
                cells.append(
                    f"{_pct(st['mean'])} ({_pct(st['min'])}–{_pct(st['max'])})" if st else "–"
                )
            seeds = len(summary["seconds"][variant])
            lines.append(f"| {summary['labels'][variant]} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _md_comparisons(summary: Dict) -> List[str]:
    lines = [
        "## Differences vs plain",
        "",
        "Rule (computed): a difference of means counts when it is larger than the seed spread of "
        "both variants, |Δ| > max(range plain, range variant), range = max − min over seeds; no "
        "verdict with fewer than 2 seeds. Points are percentage points. AR@k that only repeat a "
        "smaller AR (the detections per image cap them) are not compared twice.",
        "",
    ]
    if not summary["comparisons"]:
        missing = "plain" if "plain" not in summary["variants"] else "a variant other than plain"
        return lines + [f"No comparison: {missing} was not run.", ""]
    exceeding, compared = 0, 0
    for variant, per_key in summary["comparisons"].items():
        judged = {k: c for k, c in per_key.items() if c["exceeds"] is not None}
        hits = [
            f"{_metric_label(k)} ({100 * c['diff']:+.1f} > {100 * c['spread']:.1f})"
            for k, c in judged.items()
            if c["exceeds"]
        ]
        exceeding, compared = exceeding + len(hits), compared + len(judged)
        label = summary["labels"][variant]
        if not judged:
            lines.append(f"- {label} vs plain: no verdict (fewer than 2 seeds).")
        elif hits:
            lines.append(
                f"- {label} vs plain: exceeds the seed spread on {'; '.join(hits)}; within it on "
                f"the other {len(judged) - len(hits)} metric(s)."
            )
        else:
            lines.append(
                f"- {label} vs plain: within the seed spread on all {len(judged)} metrics."
            )
    if not compared:
        verdict = "no verdict: fewer than 2 seeds per variant."
    elif exceeding:
        verdict = f"{exceeding} of {compared} differences exceed the seed spread."
    else:
        verdict = f"no difference exceeds the seed spread ({compared} compared)."
    return lines + ["", f"**Result**: {verdict}", ""]


def _md_runtimes(summary: Dict) -> List[str]:
    seeds = summary["seeds"]
    lines = [
        "## Run times",
        "",
        "Seconds per run (training + periodic held-out evaluation).",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for variant in summary["variants"]:
        per_seed = summary["seconds"][variant]
        cells = [f"{per_seed[str(s)]:.0f}" if str(s) in per_seed else "–" for s in seeds]
        lines.append(f"| {summary['labels'][variant]} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(summary: Dict, invocations: Sequence[Dict], figure: str) -> str:
    """The ablation page: header (command, data, budget, seeds, wall time), one table per held-out
    set and level, the verdicts vs plain, the figure, the run times."""
    lines = _md_header(summary, invocations) + _md_tables(summary) + _md_comparisons(summary)
    lines += [
        "## Held-out AR@100 against iteration",
        "",
        f"![held-out AR@100 against iteration, mean over seeds, band min–max]({figure})",
        "",
        "Lines: mean over seeds; bands: min–max over seeds.",
        "",
    ]
    return "\n".join(lines + _md_runtimes(summary))


def plot_curves(summary: Dict, path: Path) -> None:
    """Held-out AR@100 against iteration, one panel per held-out set: per variant the mean over
    seeds with a min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(summary["curves"].values())))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for variant in summary["variants"]:
            c = summary["curves"][variant][name]
            mean = 100 * np.asarray(c["mean"])
            (line,) = ax.plot(c["iters"], mean, marker=".", label=summary["labels"][variant])
            ax.fill_between(
                c["iters"],
                100 * np.asarray(c["min"]),
                100 * np.asarray(c["max"]),
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set(title=f"held-out {name}", xlabel="iteration", ylabel="AR@100 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
