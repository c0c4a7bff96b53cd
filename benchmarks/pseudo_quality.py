"""Classical pseudo labels vs the selective-search-style baseline, side by side on one COCO set.

::

    python benchmarks/pseudo_quality.py --data ../shared/data/coco_tiny_val2017 \
        --work outputs/pseudo_quality/val [--workers 2] [--max-masks 1000] [--end-id N] \
        [--out table.json] [-- extra engine options]

``--data`` is a folder with ``images/`` and ``instances.json`` (the shared COCO subsets). Runs
``python -m unsam.pseudo`` (default settings, ``--max-masks``) and
``benchmarks/baseline_selective_search.py`` on the same photos, each in its own process with
``--workers`` workers and ``OMP_NUM_THREADS=1`` per worker, into ``WORK/engine`` and
``WORK/baseline`` (finished images are kept: a second call only evaluates; ``--fresh`` starts
over), scores both with :func:`unsam.pseudo.evaluate.evaluate_dir` (class-agnostic, all
instances one class) and prints AR@10/100/1000 and AP with the engine / baseline ratio, and the
wall-clock seconds per image of each run (on a shared machine these are inflated).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("AR@10", "AR@100", "AR@1000", "AP")


def _run(cmd, env) -> float:
    """Run ``cmd``; returns its wall-clock seconds (raises on failure)."""
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=str(ROOT))
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder with images/ and instances.json")
    ap.add_argument("--work", required=True, help="output folder (engine/, baseline/)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-masks", type=int, default=1000)
    ap.add_argument("--end-id", type=int, default=None, help="only the first N photos")
    ap.add_argument("--fresh", action="store_true", help="delete earlier outputs in --work first")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    ap.add_argument(
        "engine_args", nargs="*", help="extra options for python -m unsam.pseudo (after --)"
    )
    args = ap.parse_args(argv)
    data, work = Path(args.data), Path(args.work)
    images, gt = data / "images", data / "instances.json"
    engine_dir, base_dir = work / "engine", work / "baseline"
    if args.fresh:
        shutil.rmtree(engine_dir, ignore_errors=True)
        shutil.rmtree(base_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    limit = ["--end-id", str(args.end_id)] if args.end_id is not None else []
    n_images = len([p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")])
    n_images = min(n_images, args.end_id) if args.end_id is not None else n_images
    todo = {
        name: n_images - len(list(d.glob("*.json"))) if d.exists() else n_images
        for name, d in (("engine", engine_dir), ("baseline", base_dir))
    }
    seconds = {}
    seconds["engine"] = _run(
        [
            sys.executable,
            "-m",
            "unsam.pseudo",
            "--input",
            str(images),
            "--output",
            str(engine_dir),
            "--workers",
            str(args.workers),
            "--max-masks",
            str(args.max_masks),
            "--quiet",
        ]
        + limit
        + args.engine_args,
        env,
    )
    seconds["baseline"] = _run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "baseline_selective_search.py"),
            "--input",
            str(images),
            "--output",
            str(base_dir),
            "--workers",
            str(args.workers),
            "--max-masks",
            str(args.max_masks),
        ]
        + limit,
        env,
    )
    from unsam.pseudo.evaluate import evaluate_dir

    metrics = {
        name: evaluate_dir(gt, d) for name, d in (("engine", engine_dir), ("baseline", base_dir))
    }
    print(
        f"\n{data.name}: {int(metrics['engine']['num_images'])} photos, "
        f"at most {args.max_masks} masks each"
    )
    print(f"{'':10s}" + "".join(f"{k:>9s}" for k in KEYS) + f"{'s/image':>10s}")
    for name in ("engine", "baseline"):
        rate = seconds[name] / todo[name] if todo[name] else float("nan")
        print(f"{name:10s}" + "".join(f"{metrics[name][k]:9.3f}" for k in KEYS) + f"{rate:10.2f}")
    ratio = {
        k: metrics["engine"][k] / metrics["baseline"][k] if metrics["baseline"][k] else float("nan")
        for k in KEYS
    }
    print(f"{'ratio':10s}" + "".join(f"{ratio[k]:9.2f}" for k in KEYS))
    print(
        f"(s/image: wall clock with {args.workers} workers over the photos labelled in this call; "
        "nan when all were already done)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "data": str(data),
                    "metrics": metrics,
                    "ratio": ratio,
                    "seconds_per_image": {
                        k: seconds[k] / todo[k] if todo[k] else None for k in seconds
                    },
                    "workers": args.workers,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
