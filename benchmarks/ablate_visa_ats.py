#!/usr/bin/env python
"""Ablation of UnSAM's training aids: plain, +ViSA, +ATS, +both, same seed and budget.

Trains the tiny config four times and prints class-agnostic AR@100 (and AR@10, AP) on held-out
images:

  python benchmarks/ablate_visa_ats.py                      # synthetic shapes (train + held-out)
  python benchmarks/ablate_visa_ats.py --iters 300          # a larger budget
  python benchmarks/ablate_visa_ats.py --pseudo DIR         # SA-1B pseudo labels in DIR; held-out
                                                            # = --eval-dataset (default: the shared
                                                            # tiny COCO val set, human masks)

Schedules scale with the budget: ViSA decays from iteration 0 to ``--visa-end`` × iters, ATS
turns adaptive at ``--ats-start`` × iters. Trailing KEY VALUE pairs override config keys for every
variant. The tiny model has 50 queries, so at most 50 detections per image count toward AR@100.
"""
import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import unsam  # noqa: E402,F401  (detectron2 compatibility layer first)
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.evaluation import inference_on_dataset  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402

from unsam.config import get_unsam_cfg  # noqa: E402
from unsam.data.coco import register_builtin_datasets  # noqa: E402
from unsam.data.sa1b import register_sa1b  # noqa: E402
from unsam.data.synthetic import make_shapes_dataset  # noqa: E402
from unsam.engine.trainer import Trainer  # noqa: E402
from unsam.evaluation.whole_image import ClassAgnosticEvaluator  # noqa: E402

VARIANTS = {
    "plain": {},
    "+ViSA": {"UNSAM.VISA.ENABLED": True},
    "+ATS": {"UNSAM.ATS.ENABLED": True},
    "+ViSA+ATS": {"UNSAM.VISA.ENABLED": True, "UNSAM.ATS.ENABLED": True},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=str(REPO / "configs" / "tiny" / "unsam_tiny.yaml"))
    p.add_argument("--iters", type=int, default=100, help="training iterations per variant (the budget)")
    p.add_argument("--batch", type=int, default=4, help="images per iteration")
    p.add_argument("--image-size", type=int, default=128, help="training crop / test short side (px)")
    p.add_argument("--train-images", type=int, default=48, help="synthetic training images")
    p.add_argument("--val-images", type=int, default=16, help="synthetic held-out images")
    p.add_argument("--pseudo", help="SA-1B folder of pseudo labels to train on (else synthetic shapes)")
    p.add_argument("--eval-dataset", help="registered held-out set (default: synthetic held-out, or "
                   "coco_tiny_val_agnostic with --pseudo)")
    p.add_argument("--visa-end", type=float, default=0.5, help="ViSA END_ITER as a share of --iters")
    p.add_argument("--ats-start", type=float, default=0.25, help="ATS START_ITER as a share of --iters")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="working folder (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def build_cfg(args, variant: str, train_name: str, out_dir: Path):
    cfg = get_unsam_cfg()
    cfg.merge_from_file(args.config_file)
    it = args.iters
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "SEED", args.seed, "OUTPUT_DIR", str(out_dir),
        "DATASETS.TRAIN", (train_name,), "DATASETS.TEST", (),
        "SOLVER.IMS_PER_BATCH", args.batch, "SOLVER.MAX_ITER", it,
        "SOLVER.STEPS", (max(1, int(0.8 * it)),), "SOLVER.WARMUP_ITERS", min(10, it // 10),
        "SOLVER.CHECKPOINT_PERIOD", 10 * it + 1,
        "INPUT.IMAGE_SIZE", args.image_size, "INPUT.MIN_SIZE_TEST", args.image_size,
        "INPUT.MAX_SIZE_TEST", 2 * args.image_size, "TEST.EVAL_PERIOD", 0,
        "UNSAM.VISA.START_ITER", 0, "UNSAM.VISA.END_ITER", max(1, int(args.visa_end * it)),
        "UNSAM.ATS.START_ITER", int(args.ats_start * it),
        "UNSAM.ATS.BLOCK_SIZE", max(args.batch, 16),
    ])
    for key, value in VARIANTS[variant].items():
        cfg.merge_from_list([key, value])
    if args.opts:
        cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def run_variant(args, variant: str, train_name: str, eval_name: str, work: Path) -> dict:
    cfg = build_cfg(args, variant, train_name, work / variant.replace("+", "plus_"))
    seed_all_rng(args.seed)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    model = trainer.model
    model.eval()
    loader = Trainer.build_test_loader(cfg, eval_name)
    evaluator = ClassAgnosticEvaluator(eval_name, output_dir=None, distributed=False)
    metrics = inference_on_dataset(model, loader, evaluator)["segm"]
    return {"variant": variant, "AR@100": metrics["AR@100"], "AR@10": metrics["AR@10"],
            "AP": metrics["AP"], "train_s": train_s, "s_per_iter": train_s / max(1, args.iters)}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    register_builtin_datasets()
    with tempfile.TemporaryDirectory(prefix="ablate_visa_ats_") as tmp:
        work = Path(args.output) if args.output else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.pseudo:
            if not Path(args.pseudo).is_dir():
                print(f"error: --pseudo folder '{args.pseudo}' not found", file=sys.stderr)
                return 2
            train_name = "ablate_pseudo_train"
            register_sa1b(train_name, args.pseudo)
            eval_name = args.eval_dataset or "coco_tiny_val_agnostic"
            source = f"pseudo labels in {args.pseudo}"
        else:
            train_name, eval_name = "ablate_shapes_train", args.eval_dataset or "ablate_shapes_val"
            register_sa1b(train_name, make_shapes_dataset(work / "shapes_train", args.train_images,
                                                          size=args.image_size, seed=args.seed))
            if not args.eval_dataset:
                register_sa1b(eval_name, make_shapes_dataset(work / "shapes_val", args.val_images,
                                                             size=args.image_size, seed=args.seed + 1000))
            source = f"synthetic shapes ({args.train_images} train images)"
        if eval_name not in DatasetCatalog.list():
            print(f"error: held-out dataset '{eval_name}' is not registered (shared data missing? "
                  "pass --eval-dataset)", file=sys.stderr)
            return 2
        results = [run_variant(args, v, train_name, eval_name, work) for v in args.variants]

    print(f"\nViSA/ATS ablation: {source}; held-out {eval_name}; {args.iters} iterations x "
          f"{args.batch} images, {args.image_size} px, seed {args.seed}")
    print(f"{'variant':<12}{'AR@100':>8}{'AR@10':>8}{'AP':>8}{'s/iter':>8}")
    for r in results:
        print(f"{r['variant']:<12}{100 * r['AR@100']:>8.1f}{100 * r['AR@10']:>8.1f}"
              f"{100 * r['AP']:>8.1f}{r['s_per_iter']:>8.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
