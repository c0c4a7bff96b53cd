#!/usr/bin/env python
"""Prompt-path benchmark: ``set_image`` time and per-prompt time on CPU (random weights), for
both prompt modes.

Builds ``PromptPredictor`` from the UnSAM R50 config (random weights: the cost does not depend on
the values) in each ``UNSAM.PROMPT.MODE`` (``learned``: prompt encoder + decoder per prompt;
``select``: the whole-image decoder runs once in ``set_image``, prompts rank its 2000 queries),
encodes one random 1024-px image once, then times, after one warm-up call each: a single point
(``predict``, multimask), a box (``predict``, single mask), and 16 point prompts together
(``predict_batch``). Acceptance: a single point costs < 10 % of ``set_image`` (learned) and < 5 %
(select): prompts must be cheap once the image is encoded. Timings on a shared machine are noisy
(median of ``--repeat``); run it with nothing else heavy on the machine.

    python benchmarks/prompt.py                 # 1024x1024 input, 2 threads, both modes
    python benchmarks/prompt.py --modes select --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", default=str(REPO / "configs" / "unsam_only_sa-1b_R50.yaml"))
    p.add_argument("--size", type=int, default=1024, help="image side and INPUT.IMAGE_SIZE")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--batch", type=int, default=16, help="prompts in the batched measurement")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=tuple(LIMITS),
        default=list(LIMITS),
        help="prompt modes to time",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config KEY VALUE pairs")
    return p.parse_args(argv)


# the largest acceptable share of set_image for one point prompt, per mode
LIMITS = {"learned": 0.10, "select": 0.05}


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up (first-call allocations)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    import unsam.compat  # noqa: F401

    import numpy as np
    import torch

    from unsam.config.loading import load_config
    from unsam.predictor import PromptPredictor

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    s = args.size
    point = (np.array([[s * 0.4, s * 0.6]], np.float32), np.array([1]))
    box = np.array([s * 0.2, s * 0.3, s * 0.7, s * 0.8], np.float32)
    pts = torch.from_numpy(rng.uniform(0, s, (args.batch, 1, 2)).astype(np.float32))
    lbl = torch.ones(args.batch, 1, dtype=torch.int64)
    results, ok = {}, True
    for mode in args.modes:
        torch.manual_seed(0)
        cfg = load_config(
            args.config_file,
            [
                "MODEL.DEVICE",
                "cpu",
                "MODEL.WEIGHTS",
                "",
                "UNSAM.PROMPT.MODE",
                mode,
                "INPUT.IMAGE_SIZE",
                str(s),
                *args.opts,
            ],
        )
        predictor = PromptPredictor.from_config(cfg)
        with torch.no_grad():
            set_image_s = _median_time(lambda: predictor.set_image(image), args.repeat)
            point_s = _median_time(
                lambda: predictor.predict(*point, multimask_output=True), args.repeat
            )
            box_s = _median_time(
                lambda: predictor.predict(box=box, multimask_output=False), args.repeat
            )
            batch_s = _median_time(lambda: predictor.predict_batch(pts, lbl), args.repeat)
        res = {
            "image_size": s,
            "threads": args.threads,
            "queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "granularities": cfg.UNSAM.PROMPT.NUM_GRANULARITIES,
            "set_image_s": set_image_s,
            "point_s": point_s,
            "box_s": box_s,
            f"batch{args.batch}_s": batch_s,
            f"batch{args.batch}_per_prompt_s": batch_s / args.batch,
            "point_over_set_image": point_s / set_image_s,
        }
        print(f"mode {mode}")
        for k, v in res.items():
            print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
        passed = res["point_over_set_image"] < LIMITS[mode]
        print(
            f"single point / set_image = {100 * res['point_over_set_image']:.1f}% "
            f"({'OK' if passed else 'FAIL'}: must be < {100 * LIMITS[mode]:.0f}% in {mode} mode)"
        )
        results[mode] = res
        ok &= passed
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
