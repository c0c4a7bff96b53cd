#!/usr/bin/env python
"""One self-training round on the shared photos, measured (``make selftrain``).

Does a second round on the model's own predictions beat the first round, and the pseudo labels
it started from? Steps, each a command a user could type (recorded in the report), each resumed
when re-run:

0. round-0 labels: the classical pseudo labels of the training photos (``python -m unsam.pseudo``
   with its defaults; ``make ablation-pseudo``'s folder is reused when present, it is the same
   command), and the same labels of the other evaluation set's photos, to score them there;
1. round 1: ``train_net.py`` with the quickstart config and schedule on the round-0 labels;
2. round-1 labels: ``python -m unsam.selftrain`` — round 1's predictions on the training photos
   (score band, de-duplication at its defaults), merged with the round-0 labels (``--previous``:
   every old label kept, a prediction added where it matches none at IoU 0.5);
3. round 2: the same training (same config, iterations and seed, from scratch by default) on
   the round-1 labels — only the labels differ from round 1;
4. class-agnostic AR@10/100/1000 (and AP) on the human masks of both shared sets
   (``coco_tiny_val2017`` and ``coco_tiny_train2017``: the training photos' own human masks,
   never used in training) of the round-0 labels, round 1, the round-1 labels (training
   photos) and round 2;
5. ``REPORT.md``: the table, round 2 − round 1 per set, step times, wall time, commands.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import unsam.compat  # noqa: E402,F401

from quickstart import (  # noqa: E402
    CONFIG,
    Runner,
    last_eval_metrics,
    read_metrics,
    schedule_overrides,
    shared_data_dir,
    subset_gt,
)

from unsam.selftrain import DEDUP_IOU, MAX_IOU_WITH_PREVIOUS, SCORE_HIGH, SCORE_LOW  # noqa: E402

logger = logging.getLogger("unsam.selftrain.script")
ABLATION_LABELS = REPO / "outputs" / "ablation" / "pseudo_coco_tiny_train2017"
KEYS = ["AR@10", "AR@100", "AR@1000", "AP"]
SEED = 0


def parse_args(argv=None):
    shared = shared_data_dir()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--shared",
        type=Path,
        default=shared,
        help="folder holding coco_tiny_train2017 and coco_tiny_val2017",
    )
    ap.add_argument("--output", type=Path, default=REPO / "outputs" / "selftrain")
    ap.add_argument(
        "--round0",
        type=Path,
        default=None,
        help=f"round-0 labels of the training photos "
        f"(default: {ABLATION_LABELS.relative_to(REPO)} when "
        f"present, else OUTPUT/round0, made here)",
    )
    ap.add_argument(
        "--iters",
        type=int,
        default=None,
        help="training iterations per round (default: the quickstart's)",
    )
    ap.add_argument(
        "--round2-init",
        choices=("scratch", "round1"),
        default="scratch",
        help="round 2 starts from scratch (default: only the labels differ) or from round 1's "
        "weights",
    )
    ap.add_argument(
        "--no-previous",
        action="store_true",
        help="round-1 labels are the model's predictions alone, not merged with the round-0 labels",
    )
    ap.add_argument("--score-low", type=float, default=SCORE_LOW)
    ap.add_argument("--score-high", type=float, default=SCORE_HIGH)
    ap.add_argument("--dedup-iou", type=float, default=DEDUP_IOU)
    ap.add_argument("--max-iou-with-previous", type=float, default=MAX_IOU_WITH_PREVIOUS)
    ap.add_argument(
        "--max-images",
        type=int,
        default=0,
        help="only the first N photos of each set (a cut-down run; 0: all)",
    )
    ap.add_argument("--workers", type=int, default=2, help="processes of the label makers")
    args = ap.parse_args(argv)
    if args.shared is None:
        ap.error("shared sample data not found: pass --shared (or set UNSAM_SHARED)")
    args.train = args.shared / "coco_tiny_train2017"
    args.val = args.shared / "coco_tiny_val2017"
    for p in (
        args.train / "images",
        args.train / "instances.json",
        args.val / "images",
        args.val / "instances.json",
    ):
        if not p.exists():
            ap.error(f"'{p}' not found")
    if args.round0 is None and ABLATION_LABELS.is_dir() and not args.max_images:
        args.round0 = ABLATION_LABELS
    return args


def metrics_row(path: Path) -> Optional[Dict[str, float]]:
    return read_metrics(path)


def write_report(
    args,
    runner: Runner,
    table: Dict[str, Dict[str, Optional[Dict[str, float]]]],
    wall: float,
    sets: List[Tuple[str, Path]],
    round0: Path,
    images: Dict[str, int],
) -> Path:
    iters = args.iters or "the config's"
    lines = [
        "# Self-training on the shared photos: round 1 vs round 2 vs the pseudo labels",
        "",
        f"Config `{CONFIG}` (CPU-sized), {iters} iterations per round, seed {SEED}, "
        f"round 2 from {'scratch' if args.round2_init == 'scratch' else 'round 1'}; round-0 labels "
        f"`{round0}`; round-1 labels: round 1's predictions in "
        f"({args.score_low}, {args.score_high}], "
        f"de-duplicated at IoU > {args.dedup_iou}"
        + (
            ""
            if args.no_previous
            else f", merged with the round-0 labels (added when IoU < "
            f"{args.max_iou_with_previous} with every old one)"
        )
        + ".  ",
        f"Wall time: {wall / 60:.1f} min (the steps' times, summed over the runs that made this "
        f"folder)",
        "",
    ]
    for name, gt in sets:
        lines += [
            f"## {name} ({images[name]} photos, human masks of `{gt}`)",
            "",
            "| labels / model | " + " | ".join(KEYS) + " |",
            "|---" * (len(KEYS) + 1) + "|",
        ]
        for row, metrics in table[name].items():
            cells = [f"{100 * metrics[k]:.1f}" if metrics and k in metrics else "–" for k in KEYS]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        r1, r2 = table[name].get("round-1 model"), table[name].get("round-2 model")
        if r1 and r2:
            diffs = ", ".join(f"{k} {100 * (r2[k] - r1[k]):+.1f}" for k in KEYS)
            lines += ["", f"Round 2 − round 1: {diffs} (points)."]
        lines.append("")
    lines += [
        "Figures are percentages (class-agnostic COCO AR/AP, `useCats=0`). The models return at "
        "most `TEST.DETECTIONS_PER_IMAGE` masks (100 here), so their AR@1000 is their AR@100; "
        "label folders hold up to 500 (round 0) or more (merged) masks per photo. The training "
        "photos' human masks are never used in training: there the figures measure how well a "
        "round describes the photos it learnt from; the validation set measures photos no round "
        "has seen.",
        "",
        "## Step times",
        "",
    ]
    lines += [f"- {step}: {seconds:.0f} s" for step, seconds in runner.timings.items()]
    lines += ["", "## Commands", "", "```bash", *runner.commands, "```", ""]
    report = args.output / "REPORT.md"
    report.write_text("\n".join(lines))
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[selftrain] %(message)s")
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.output = out
    runner = Runner(out, "selftrain.log")
    py = sys.executable
    start = time.time()
    subset = ["--end-id", str(args.max_images)] if args.max_images else []
    sets = [("coco_tiny_val2017", args.val), ("coco_tiny_train2017", args.train)]
    gts: Dict[str, Path] = {}
    for name, root in sets:
        gts[name] = root / "instances.json"
        if (
            args.max_images
        ):  # the first N photos by name: the ones the label makers' --end-id selects
            (out / name).mkdir(exist_ok=True)
            gts[name] = subset_gt(gts[name], args.max_images, out / name)
    images = {name: len(json.loads(Path(gts[name]).read_text())["images"]) for name, _ in sets}

    # 0. round-0 labels of the training photos (the training set) and of the validation photos
    # (scored only)
    round0 = args.round0 or out / "round0"
    if args.round0 is None:
        runner.run(
            "round-0 labels, train photos",
            [
                py,
                "-m",
                "unsam.pseudo",
                "--input",
                args.train / "images",
                "--output",
                round0,
                "--workers",
                args.workers,
                "--quiet",
                *subset,
            ],
        )
    pseudo_val = out / "round0_val"
    runner.run(
        "round-0 labels, val photos",
        [
            py,
            "-m",
            "unsam.pseudo",
            "--input",
            args.val / "images",
            "--output",
            pseudo_val,
            "--workers",
            args.workers,
            "--quiet",
            *subset,
        ],
    )
    for name, folder in (("coco_tiny_val2017", pseudo_val), ("coco_tiny_train2017", round0)):
        runner.run(
            f"score round-0 labels, {name}",
            [
                py,
                "-m",
                "unsam.pseudo.evaluate",
                "--gt",
                gts[name],
                "--pred",
                folder,
                "--out",
                out / f"metrics_round0_{name}.json",
            ],
        )

    coco_sets = json.dumps(
        [[f"st_{name}", str(gts[name]), str(root / "images")] for name, root in sets]
    )
    # config overrides (train_net.py takes its flags first, then KEY VALUE pairs)
    common = [
        "UNSAM.DATA.COCO_SETS",
        coco_sets,
        "SEED",
        str(SEED),
        "TEST.EVAL_PERIOD",
        "0",
        *schedule_overrides(args.iters),
    ]

    def train(step: str, labels: Path, folder: Path, init: Optional[Path] = None) -> Path:
        weights = folder / "model_final.pth"
        if not weights.is_file():
            runner.run(
                step,
                [
                    py,
                    "train_net.py",
                    "--config-file",
                    CONFIG,
                    "--resume",
                    *common,
                    "UNSAM.DATA.SA1B_ROOTS",
                    json.dumps([f"st_{labels.name}:{labels}"]),
                    "DATASETS.TRAIN",
                    f'("st_{labels.name}",)',
                    "DATASETS.TEST",
                    "()",
                    *(["MODEL.WEIGHTS", init] if init else []),
                    "OUTPUT_DIR",
                    folder,
                ],
            )
        return weights

    def evaluate(step: str, weights: Path, folder: Path) -> None:
        if all(last_eval_metrics(folder / "metrics.json", f"st_{name}") for name, _ in sets):
            return
        runner.run(
            step,
            [
                py,
                "train_net.py",
                "--config-file",
                CONFIG,
                "--eval-only",
                *common,
                "DATASETS.TEST",
                "(" + "".join(f'"st_{name}",' for name, _ in sets) + ")",
                "MODEL.WEIGHTS",
                weights,
                "OUTPUT_DIR",
                folder,
            ],
        )

    # 1. round 1 on the round-0 labels
    round1 = train("train round 1", round0, out / "round1")
    # 2. round 1's predictions on the training photos → the round-1 labels
    labels1 = out / "round1_labels"
    runner.run(
        "round-1 labels (self-training)",
        [
            py,
            "-m",
            "unsam.selftrain",
            "--config-file",
            CONFIG,
            "--weights",
            round1,
            "--input",
            args.train / "images",
            "--output",
            labels1,
            "--device",
            "cpu",
            "--workers",
            args.workers,
            "--quiet",
            "--score-low",
            args.score_low,
            "--score-high",
            args.score_high,
            "--dedup-iou",
            args.dedup_iou,
            *subset,
            *(
                []
                if args.no_previous
                else ["--previous", round0, "--max-iou-with-previous", args.max_iou_with_previous]
            ),
        ],
    )
    runner.run(
        "score round-1 labels, coco_tiny_train2017",
        [
            py,
            "-m",
            "unsam.pseudo.evaluate",
            "--gt",
            gts["coco_tiny_train2017"],
            "--pred",
            labels1,
            "--out",
            out / "metrics_round1_labels_coco_tiny_train2017.json",
        ],
    )
    # 3. round 2 on the round-1 labels
    round2 = train(
        "train round 2", labels1, out / "round2", round1 if args.round2_init == "round1" else None
    )
    # 4. both models on both sets
    evaluate("evaluate round 1", round1, out / "eval_round1")
    evaluate("evaluate round 2", round2, out / "eval_round2")

    table: Dict[str, Dict[str, Optional[Dict[str, float]]]] = {}
    for name, _ in sets:
        table[name] = {
            "round-0 labels (classical pseudo labels)": metrics_row(
                out / f"metrics_round0_{name}.json"
            ),
            "round-1 model": last_eval_metrics(out / "eval_round1" / "metrics.json", f"st_{name}"),
        }
        if name == "coco_tiny_train2017":
            table[name][
                "round-1 labels (round-1 predictions"
                + ("" if args.no_previous else " + round 0")
                + ")"
            ] = metrics_row(out / f"metrics_round1_labels_{name}.json")
        table[name]["round-2 model"] = last_eval_metrics(
            out / "eval_round2" / "metrics.json", f"st_{name}"
        )
    # step times and commands of the earlier (interrupted or finished) runs into this folder too
    record_file = out / "selftrain_steps.json"
    record = (
        json.loads(record_file.read_text())
        if record_file.is_file()
        else {"timings": {}, "commands": []}
    )
    for step, seconds in runner.timings.items():
        record["timings"][step] = record["timings"].get(step, 0.0) + seconds
    record["commands"] += [c for c in runner.commands if c not in record["commands"]]
    record_file.write_text(json.dumps(record, indent=1))
    runner.timings, runner.commands = record["timings"], record["commands"]
    timings = runner.timings
    logger.info("this run: %.1f min", (time.time() - start) / 60)
    report = write_report(
        args, runner, table, sum(timings.values()), [(n, gts[n]) for n, _ in sets], round0, images
    )
    (out / "selftrain_metrics.json").write_text(json.dumps(table, indent=1))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
