#!/usr/bin/env python
"""The whole UnSAM loop, offline, on a folder of photos (default: the shared COCO samples).

1. pseudo-label the training images (classical features, no weights needed);
2. train the tiny config on those pseudo labels with ``train_net.py``;
3. evaluate on COCO-format ground truth: pseudo labels, the trained model, and the
   Felzenszwalb selective-search baseline, side by side (class-agnostic AR/AP);
4. run the demos (segment everything on two validation images, a point prompt on one) and
   measure 1-click prompt mIoU;
5. write ``REPORT.md`` with the figures, the commands, and for the two demo photos the pseudo
   labels' and the trained model's top masks side by side (each drawn once, blended with the
   photo), ending with the command that opens the same model in the browser demo.

Every step is a command a user could type (printed and recorded in the report) and resumes
when re-run: finished outputs are kept, training continues from its last checkpoint.
"""

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import unsam.compat  # noqa: E402,F401

from unsam.data import coco  # noqa: E402
from unsam.io.sa1b import rle_to_mask  # noqa: E402
from unsam.utils.files import atomic_write  # noqa: E402
from unsam.utils.images import read_rgb  # noqa: E402
from unsam.visualize import draw_masks, draw_title  # noqa: E402

logger = logging.getLogger("unsam.quickstart")
CONFIG = "configs/tiny/unsam_quickstart.yaml"
TOP_MASKS = 30  # masks per panel of the side-by-side comparison: enough to read, few enough to see


def shared_data_dir() -> Optional[Path]:
    """The shared sample data: ``$UNSAM_SHARED/data``, else ``../shared/data`` beside the checkout
    (a script may look there; the library reads only ``$UNSAM_SHARED``)."""
    return coco.shared_data_dir(os.environ.get("UNSAM_SHARED") or REPO.parent / "shared")


def parse_args(argv=None):
    shared = shared_data_dir()
    train_default = shared / "coco_tiny_train2017" / "images" if shared else None
    gt_default = shared / "coco_tiny_val2017" / "instances.json" if shared else None
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=Path, default=train_default, help="training images (folder)")
    ap.add_argument(
        "--gt", type=Path, default=gt_default, help="COCO instances JSON of the evaluation set"
    )
    ap.add_argument(
        "--val-images",
        type=Path,
        default=None,
        help="images of --gt (default: the 'images' folder beside it)",
    )
    ap.add_argument("--output", type=Path, default=REPO / "outputs" / "quickstart")
    ap.add_argument(
        "--iters", type=int, default=None, help="training iterations (default: the config's)"
    )
    ap.add_argument(
        "--max-val-images",
        type=int,
        default=40,
        help="evaluate every method on the first N images of --gt (0: all); the default keeps "
        "the loop within ~20 min on 2 CPU cores",
    )
    ap.add_argument(
        "--max-train-images", type=int, default=None, help="pseudo-label only the first N images"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes of the pseudo-label engine and the baseline",
    )
    ap.add_argument(
        "--skip-baseline", action="store_true", help="do not run the Felzenszwalb baseline"
    )
    ap.add_argument(
        "--max-prompt-images", type=int, default=20, help="images used for the prompt mIoU"
    )
    args = ap.parse_args(argv)
    if args.images is None or args.gt is None:
        ap.error("shared sample data not found: pass --images and --gt (or set UNSAM_SHARED)")
    if args.val_images is None:
        args.val_images = args.gt.parent / "images"
    for path in (args.images, args.gt, args.val_images):
        if not path.exists():
            ap.error(f"'{path}' not found")
    return args


class Runner:
    """Runs and records the commands of the loop; their output goes to ``output/log_name``."""

    def __init__(self, output: Path, log_name: str = "quickstart.log"):
        self.output = output
        self.log = output / log_name
        self.commands: List[str] = []
        self.timings: Dict[str, float] = {}

    def run(self, step: str, cmd: List[str]) -> None:
        text = " ".join(shlex.quote(str(c)) for c in cmd)
        self.commands.append(text)
        logger.info("[%s] %s", step, text)
        start = time.time()
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        with open(self.log, "a") as log:
            log.write(f"\n$ {text}\n")
            log.flush()
            proc = subprocess.run(
                [str(c) for c in cmd], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.timings[step] = self.timings.get(step, 0.0) + time.time() - start
        if proc.returncode != 0:
            raise SystemExit(
                f"error: step '{step}' failed (exit {proc.returncode}); see {self.log}"
            )


def read_metrics(path: Path) -> Optional[Dict[str, float]]:
    return json.loads(path.read_text()) if path.is_file() else None


def last_eval_metrics(metrics_json: Path, dataset: str) -> Optional[Dict[str, float]]:
    if not metrics_json.is_file():
        return None
    prefix = f"{dataset}/segm/"
    for line in reversed(metrics_json.read_text().strip().splitlines()):
        record = json.loads(line)
        found = {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}
        if found:
            return found
    return None


def schedule_overrides(iters: Optional[int]) -> List[str]:
    """Config overrides that train ``iters`` iterations with the quickstart config's schedule
    scaled to them (LR steps, checkpoints, ViSA's fade-out, ATS's start); none for None."""
    if not iters:
        return []
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        f"({int(iters * 0.8)},)",
        "SOLVER.CHECKPOINT_PERIOD",
        str(max(1, iters // 4)),
        "UNSAM.VISA.END_ITER",
        str(max(1, iters // 2)),
        "UNSAM.ATS.START_ITER",
        str(iters // 4),
    ]


def subset_range(n: Optional[int]) -> List[str]:
    return ["--end-id", str(n)] if n else []


def subset_gt(gt: Path, n: int, out: Path) -> Path:
    """GT restricted to the first ``n`` images by file name (the order the engine uses), so
    that pseudo labels, baseline and model are all evaluated on the same images."""
    data = json.loads(gt.read_text())
    keep = sorted(data["images"], key=lambda im: im["file_name"])[:n]
    ids = {im["id"] for im in keep}
    data["images"] = keep
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = out / f"gt_first{n}.json"
    path.write_text(json.dumps(data))
    return path


def top_masks(anns: List[Dict], score_key: str, k: int, shape) -> np.ndarray:
    """The ``k`` best-scored masks of SA-1B / demo-JSON annotations, k×H×W bool."""
    best = sorted(anns, key=lambda a: -float(a[score_key]))[:k]
    return np.array([rle_to_mask(a["segmentation"]) for a in best], bool).reshape(-1, *shape[:2])


def compare_top_masks(
    image_path: Path, pseudo_json: Path, model_json: Path, out_path: Path, k: int = TOP_MASKS
) -> Path:
    """One PNG: the photo, its pseudo labels' and the model's top ``k`` masks, side by side."""
    image = read_rgb(image_path)
    panels = [draw_title(image, image_path.name)]
    for name, path, score_key in (
        ("pseudo labels", pseudo_json, "predicted_iou"),
        ("model", model_json, "score"),
    ):
        anns = json.loads(path.read_text())["annotations"] if path.is_file() else []
        masks = top_masks(anns, score_key, k, image.shape)
        panels.append(
            draw_title(draw_masks(image, masks), f"{name}: top {len(masks)} of {len(anns)}")
        )
    with atomic_write(out_path, "wb") as f:
        Image.fromarray(np.concatenate(panels, axis=1)).save(f, format="PNG")
    return out_path


def write_report(
    args,
    runner: Runner,
    rows: Dict[str, Optional[Dict[str, float]]],
    prompt: Dict[str, float],
    comparisons: List[Path],
    prompt_overlays: List[Path],
    weights: Path,
    wall: float,
) -> Path:
    keys = ["AR@10", "AR@100", "AR@1000", "AP", "AP50"]
    lines = [
        "# UnSAM quickstart report",
        "",
        f"Training images: `{args.images}`  ",
        f"Evaluation GT: `{args.gt}`  ",
        f"Wall time: {wall / 60:.1f} min",
        "",
        "## Class-agnostic results on the evaluation set",
        "",
        "| method | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for name, metrics in rows.items():
        cells = [f"{100 * metrics[k]:.1f}" if metrics and k in metrics else "–" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Figures are percentages, all on the same evaluation images.",
        "",
        "## Prompted segmentation (1 click at each instance's innermost point)",
        "",
    ]
    if prompt:
        lines += [
            f"- mIoU, top-scored mask: {100 * prompt['mIoU_max']:.1f}",
            f"- mIoU, best of the granularities (oracle): {100 * prompt['mIoU_oracle']:.1f}",
            f"- mIoU, box prompt: {100 * prompt.get('mIoU_box', float('nan')):.1f}",
            f"- instances: {int(prompt.get('num_instances', 0))} on "
            f"{int(prompt.get('num_images', 0))} images",
        ]
    lines += ["", "## Step times", ""]
    lines += [f"- {step}: {seconds:.0f} s" for step, seconds in runner.timings.items()]
    lines += [
        "",
        "## Commands",
        "",
        "```bash",
        *runner.commands,
        "```",
        "",
        "## Top masks: pseudo labels vs the trained model",
        "",
        f"Each row: the photo, then the {TOP_MASKS} best-scored masks of the pseudo labels and of "
        "the model, each drawn once (a pixel takes the colour of the smallest mask covering it, "
        "blended with the photo; outlines largest first).",
        "",
    ]
    lines += [f"![{p.name}]({p.relative_to(args.output)})" for p in comparisons]
    lines += ["", "## Point prompt (the demo's centre click, every granularity)", ""]
    lines += [f"![{p.name}]({p.relative_to(args.output)})" for p in prompt_overlays]
    app = (
        f"python -m unsam.app --config-file {CONFIG} "
        f"--opts MODEL.WEIGHTS {shlex.quote(str(weights))}"
    )
    lines += [
        "",
        "## Try it in the browser",
        "",
        "Segment everything, click to prompt and browse the pseudo-label hierarchy on your own "
        "photos (offline, then open http://127.0.0.1:7860):",
        "",
        "```bash",
        app,
        "```",
    ]
    report = args.output / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[quickstart] %(message)s")
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.output = out
    runner = Runner(out)
    py = sys.executable
    if args.max_val_images:
        args.gt = subset_gt(args.gt, args.max_val_images, out)
    start = time.time()

    # 1. pseudo labels for training and (to measure them) for the evaluation images
    runner.run(
        "pseudo-label train",
        [
            py,
            "-m",
            "unsam.pseudo",
            "--input",
            args.images,
            "--output",
            out / "pseudo_train",
            "--workers",
            args.workers,
            *subset_range(args.max_train_images),
        ],
    )
    runner.run(
        "pseudo-label val",
        [
            py,
            "-m",
            "unsam.pseudo",
            "--input",
            args.val_images,
            "--output",
            out / "pseudo_val",
            "--workers",
            args.workers,
            "--max-masks",
            "1000",
            *subset_range(args.max_val_images),
        ],
    )
    runner.run(
        "evaluate pseudo labels",
        [
            py,
            "-m",
            "unsam.pseudo.evaluate",
            "--gt",
            args.gt,
            "--pred",
            out / "pseudo_val",
            "--out",
            out / "metrics_pseudo.json",
        ],
    )
    if not args.skip_baseline:
        runner.run(
            "Felzenszwalb baseline",
            [
                py,
                "benchmarks/baseline_selective_search.py",
                "--input",
                args.val_images,
                "--output",
                out / "baseline",
                "--gt",
                args.gt,
                "--out",
                out / "metrics_baseline.json",
                "--workers",
                args.workers,
                *subset_range(args.max_val_images),
            ],
        )

    # 2. train on the pseudo labels, exactly as a user would
    train_dir = out / "train"
    overrides = [
        "UNSAM.DATA.SA1B_ROOTS",
        json.dumps([f"quickstart_pseudo:{out / 'pseudo_train'}"]),
        "UNSAM.DATA.COCO_SETS",
        json.dumps([["quickstart_val", str(args.gt), str(args.val_images)]]),
        "DATASETS.TRAIN",
        '("quickstart_pseudo",)',
        "DATASETS.TEST",
        '("quickstart_val",)',
        "TEST.EVAL_PERIOD",
        "0",
        *schedule_overrides(args.iters),
    ]
    weights = train_dir / "model_final.pth"
    if not weights.is_file():
        runner.run(
            "train",
            [
                py,
                "train_net.py",
                "--config-file",
                CONFIG,
                "--resume",
                *overrides,
                "OUTPUT_DIR",
                train_dir,
            ],
        )
    # 3. evaluate the trained model
    eval_dir = out / "eval"
    runner.run(
        "evaluate model",
        [
            py,
            "train_net.py",
            "--config-file",
            CONFIG,
            "--eval-only",
            *overrides,
            "OUTPUT_DIR",
            eval_dir,
            "MODEL.WEIGHTS",
            weights,
        ],
    )

    # 4. demos on two evaluation images
    val_images = sorted(
        p for p in args.val_images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )[:2]
    demo_dir = out / "demo"
    runner.run(
        "demo whole image",
        [
            py,
            "whole_image_segmentation/demo_whole_image.py",
            "--config-file",
            CONFIG,
            "--input",
            *val_images,
            "--output",
            demo_dir,
            "--confidence-threshold",
            "0.0",
            "--save-json",
            "--opts",
            "MODEL.WEIGHTS",
            weights,
        ],
    )
    point_dir = out / "demo_point"
    runner.run(
        "demo point prompt",
        [
            py,
            "prompt_segmentation/demo_point_image.py",
            "--config-file",
            CONFIG,
            "--input",
            val_images[0],
            "--output",
            point_dir,
            "--multimask",
            "--opts",
            "MODEL.WEIGHTS",
            weights,
        ],
    )
    comparisons = [
        compare_top_masks(
            p,
            out / "pseudo_val" / f"{p.stem}.json",
            demo_dir / f"{p.stem}.json",
            out / "compare" / f"{p.stem}.png",
        )
        for p in val_images
    ]
    runner.run(
        "evaluate prompts",
        [
            py,
            "-m",
            "unsam.evaluation.prompt",
            "--gt",
            args.gt,
            "--images",
            args.val_images,
            "--out",
            out / "metrics_prompt.json",
            "--config-file",
            CONFIG,
            "--max-images",
            str(args.max_prompt_images),
            "--opts",
            "MODEL.WEIGHTS",
            weights,
        ],
    )
    prompt_metrics = read_metrics(out / "metrics_prompt.json") or {}

    rows = {
        "Felzenszwalb selective search": read_metrics(out / "metrics_baseline.json"),
        "UnSAM pseudo labels (classical)": read_metrics(out / "metrics_pseudo.json"),
        "UnSAM tiny model, trained on pseudo labels": last_eval_metrics(
            eval_dir / "metrics.json", "quickstart_val"
        ),
    }
    report = write_report(
        args,
        runner,
        rows,
        prompt_metrics,
        comparisons,
        sorted(point_dir.glob("*.png")),
        weights,
        time.time() - start,
    )
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
