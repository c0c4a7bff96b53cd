#!/usr/bin/env python
"""Exercise UnSAM's GPU path end to end and print one JSON of figures (issue 16).

Five steps, each timed, each recorded with its error when it fails (the others still run):

  train      the public R50 config (configs/unsam_only_sa-1b_R50.yaml), AMP on (SOLVER.AMP.ENABLED),
             its published fixed 1024 crop, 2 images/step, ViSA + ATS on, on synthetic SA-1B data
             (up to 300 masks/image): losses finite, s/iteration, data s/iteration, peak GPU memory.
             Then the Swin-L config at 1 image/step: "fits": false (not a failure) on out-of-memory.
  inference  whole-image at 1024 px, 1000 detections, fp32 and AMP (autocast fp16): s/image and
             peak GPU memory; pred_logits of the same weights and input on the GPU (strict fp32:
             TF32 off) within 1e-3 of the CPU (the default-settings difference, with cuDNN's TF32
             convolutions, is reported too).
  prompt     PromptPredictor set_image and one-point predict latency, modes learned and select.
  pseudo     s/image of `python -m unsam.pseudo` --recipe classical and --recipe unsam (random
             DINO ViT-B/8 and CutLER detector weights made here, in the published formats;
             --quick: ViT-S/8 and the detector at 128 px).
  multiproc  torchrun --nproc_per_node=N (N visible GPUs, NCCL) when N >= 2, else one process;
             5 iterations with the prompt path and ATS on; every rank's weights hashed and
             all-gathered: the ranks must hold identical weights.

`--device cpu --quick` runs a cut-down version of every step on the CPU (small images, small
heads, few iterations; 2 gloo processes for the multi-process step); tests/test_gpu_check.py runs
it so the script cannot rot. CPU runs have no AMP (reported as skipped) and no GPU memory figures.

Only the final JSON goes to stdout (also to --out FILE); logs go to stderr. Exit status 0 when
every step passed, 1 when any failed.

  python scripts/gpu_check.py                       # full check on the GPU (make gpu-check)
  python scripts/gpu_check.py --device cpu --quick  # CI-sized check on the CPU
  python scripts/gpu_check.py --steps train,inference --out gpu.json --keep --work-dir /tmp/gc
"""

import argparse
import contextlib
import gc
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/gpu_check.py` from anywhere
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("gpu_check")

STEPS = ("train", "inference", "prompt", "pseudo", "multiproc")
R50 = REPO / "configs" / "unsam_only_sa-1b_R50.yaml"
SWINL = REPO / "configs" / "unsam_only_sa-1b_swinL.yaml"
LOGIT_TOL = 1e-3

# --quick: the public configs shrunk to CPU size (same files and code paths; a ResNet-18 trunk, a
# 64-d head, 20 queries, 3 decoder layers, 1 encoder layer; Swin with 2 blocks per stage)
QUICK_HEAD = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM",
    "64",
    "MODEL.SEM_SEG_HEAD.MASK_DIM",
    "64",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS",
    "1",
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS",
    "4",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_DIM_FEEDFORWARD",
    "128",
    "MODEL.MASK_FORMER.HIDDEN_DIM",
    "64",
    "MODEL.MASK_FORMER.NHEADS",
    "4",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD",
    "128",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
    "20",
    "MODEL.MASK_FORMER.DEC_LAYERS",
    "3",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
    "256",
    "MODEL.MASK_FORMER.TEST.UPSAMPLE_CHUNK",
    "16",
    "UNSAM.PROMPT.PROMPTS_PER_IMAGE",
    "4",
]
QUICK_SWIN = [
    "MODEL.SWIN.EMBED_DIM",
    "32",
    "MODEL.SWIN.DEPTHS",
    "[2, 2, 2, 2]",
    "MODEL.SWIN.NUM_HEADS",
    "[1, 2, 4, 8]",
]


class CheckFailed(RuntimeError):
    """A figure was measured but is out of bounds (the step's result keeps the figure)."""


# ---------------------------------------------------------------------------------------- plan
def make_plan(device: str, quick: bool, iters: Optional[int]) -> Dict:
    """Every size the steps use, for the full (GPU) check or --quick."""
    if quick:
        plan = dict(
            n_images=4,
            height=96,
            width=128,
            max_masks=20,
            image_size=64,
            test_size=64,
            max_test=128,
            detections=20,
            train_iters=2,
            ats_start=1,
            block=2,
            timed_runs=1,
            warmup=0,
            clicks=3,
            pseudo_images=1,
            dist_iters=5,
            dist_ims_per_rank=1,
            head=list(QUICK_HEAD),
            swin=list(QUICK_SWIN),
            workers=0,
            dist_timeout=300,
        )
    else:
        plan = dict(
            n_images=8,
            height=1024,
            width=1365,
            max_masks=300,
            image_size=1024,
            test_size=1024,
            max_test=2048,
            detections=1000,
            train_iters=30,
            ats_start=10,
            block=8,
            timed_runs=3,
            warmup=1,
            clicks=20,
            pseudo_images=3,
            dist_iters=5,
            dist_ims_per_rank=2,
            head=[],
            swin=[],
            workers=4,
            dist_timeout=900,
        )
    if iters is not None:
        plan["train_iters"] = int(iters)
        plan["ats_start"] = min(plan["ats_start"], max(int(iters) // 3, 1))
    plan["device"] = device
    plan["quick"] = quick
    return plan


# ------------------------------------------------------------------------------ synthetic data
# rounder and more varied shapes than the learning tests' (unsam.data.synthetic defaults)
_SHAPE_STYLE = dict(min_aspect=0.4, max_vertices=7, min_radius=0.5)


def write_synthetic_sa1b(
    root: Path, n: int, height: int, width: int, max_masks: int, seed: int = 0
) -> Dict:
    """``n`` images with SA-1B JSONs holding up to ``max_masks`` nested masks each (the first image
    exactly ``max_masks``): level-0 objects, level-1 parts inside them, level-2 parts of parts,
    each part clipped to its parent (``parent_id``). Returns counts."""
    import numpy as np
    from PIL import Image

    from unsam.data.synthetic import draw_random_shape
    from unsam.io.sa1b import annotation_from_mask, write_sa1b_json

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = min(height, width)
    counts = []
    for i in range(n):
        target = max_masks if i == 0 else int(rng.integers(max(max_masks // 2, 1), max_masks + 1))
        xx = np.arange(width, dtype=np.float32)[None, :, None] / width
        image = (
            rng.uniform(60, 200, 3)
            + rng.uniform(-40, 40, 3) * xx
            + rng.normal(0, 8, (height, width, 3))
        )
        anns: List[Dict] = []
        parents: List[tuple] = []  # (mask, level, ann id, box, pixel coords) of levels 0 and 1
        n0 = max(1, target // 10)
        attempts = 0
        while len(anns) < target and attempts < 20 * target:
            attempts += 1
            mask = np.zeros((height, width), np.uint8)
            if len(anns) < n0 or not parents:
                level, parent = 0, -1
                draw_random_shape(
                    rng,
                    mask,
                    rng.uniform(0, width),
                    rng.uniform(0, height),
                    max(rng.uniform(0.04, 0.3) * side, 2.0),
                    **_SHAPE_STYLE,
                )
            else:
                pmask, plevel, parent, (y0, y1, x0, x1), (ys, xs) = parents[
                    int(rng.integers(0, len(parents)))
                ]
                j = int(rng.integers(0, len(xs)))
                r = math.sqrt(len(xs) / math.pi) * rng.uniform(0.2, 0.7)
                sub = np.ascontiguousarray(mask[y0:y1, x0:x1])
                draw_random_shape(
                    rng, sub, xs[j] - x0, ys[j] - y0, max(r, 2.0), **_SHAPE_STYLE
                )  # in the parent's box
                mask[y0:y1, x0:x1] = sub & pmask[y0:y1, x0:x1]
                level = plevel + 1
            ann = annotation_from_mask(
                mask.astype(bool), ann_id=len(anns), level=level, parent_id=parent
            )
            if ann["area"] < 16:
                continue
            anns.append(ann)
            bx, by, bw, bh = ann["bbox"]
            box = (by, by + bh, bx, bx + bw)
            region = mask[box[0] : box[1], box[2] : box[3]].astype(bool)
            patch = image[box[0] : box[1], box[2] : box[3]]
            patch[region] = 0.7 * rng.uniform(0, 255, 3) + 0.3 * patch[region]
            if level < 2:
                ys, xs = np.nonzero(region)
                parents.append((mask, level, ann["id"], box, (ys + box[0], xs + box[2])))
        name = f"synthetic_{i:04d}"
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / f"{name}.jpg", quality=92)
        write_sa1b_json(
            root / f"{name}.json",
            {"image_id": i + 1, "width": width, "height": height, "file_name": f"{name}.jpg"},
            anns,
        )
        counts.append(len(anns))
    return {
        "images": n,
        "height": height,
        "width": width,
        "masks_per_image": counts,
        "max_masks": max(counts),
    }


def load_rgb(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


# -------------------------------------------------------------------------------- GPU helpers
def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _gb(n: int) -> float:
    return round(n / 2**30, 3)


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> Optional[float]:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return _gb(torch.cuda.max_memory_allocated())


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed(device: str, fn: Callable, runs: int) -> List[float]:
    out = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _stats(times: List[float], warmup: int = 0) -> Dict:
    import numpy as np

    steady = times[warmup:] if len(times) > warmup else times
    return {
        "first_s": round(times[0], 4),
        "mean_s": round(float(np.mean(steady)), 4),
        "median_s": round(float(np.median(steady)), 4),
        "n": len(steady),
    }


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def load_cfg(config_file: Path, opts: List[str]):
    from unsam.config.loading import load_config

    return load_config(str(config_file), opts)


def train_args(config_file: Path, opts: List[str]) -> argparse.Namespace:
    """What train_net.py's parser gives ``setup_config`` (detectron2's default_setup reads it)."""
    return argparse.Namespace(
        config_file=str(config_file),
        opts=list(opts),
        eval_only=False,
        resume=False,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
    )


# ---------------------------------------------------------------------------------- train step
def _train_hook_cls():
    from detectron2.engine import HookBase

    class StepProbe(HookBase):
        """Per iteration: wall time (synchronised), data time and every loss from the storage."""

        def __init__(self, device: str):
            self.device = device
            self.times: List[float] = []
            self.data_times: List[float] = []
            self.losses: List[Dict[str, float]] = []
            self.t0 = 0.0

        def before_step(self):
            _sync(self.device)
            self.t0 = time.perf_counter()

        def after_step(self):
            _sync(self.device)
            self.times.append(time.perf_counter() - self.t0)
            latest = self.trainer.storage.latest()
            self.losses.append(
                {
                    k: float(v)
                    for k, (v, _) in latest.items()
                    if k == "total_loss" or k.startswith("loss")
                }
            )
            if "data_time" in latest:
                self.data_times.append(float(latest["data_time"][0]))

    return StepProbe


def train_opts(
    plan: Dict,
    data_name: str,
    data_root: Path,
    out_dir: Path,
    ims: int,
    iters: int,
    extra: List[str] = (),
) -> List[str]:
    opts = [
        "MODEL.DEVICE",
        plan["device"],
        "MODEL.WEIGHTS",
        "",
        "UNSAM.DATA.SA1B_ROOTS",
        json.dumps([f"{data_name}:{data_root}"]),
        "DATASETS.TRAIN",
        f'("{data_name}",)',
        "DATASETS.TEST",
        "()",
        "SOLVER.IMS_PER_BATCH",
        str(ims),
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        f"({iters * 2},)",
        "SOLVER.CHECKPOINT_PERIOD",
        str(iters * 10),
        "INPUT.IMAGE_SIZE",
        str(plan["image_size"]),
        "UNSAM.VISA.ENABLED",
        "True",
        "UNSAM.VISA.START_ITER",
        "0",
        "UNSAM.VISA.END_ITER",
        str(iters),
        "UNSAM.ATS.ENABLED",
        "True",
        "UNSAM.ATS.START_ITER",
        str(plan["ats_start"]),
        "UNSAM.ATS.BLOCK_SIZE",
        str(plan["block"]),
        "DATALOADER.NUM_WORKERS",
        str(plan["workers"]),
        "SEED",
        "1",
        "OUTPUT_DIR",
        str(out_dir),
    ]
    return opts + list(plan["head"]) + list(extra)


def train_one(plan: Dict, config_file: Path, opts: List[str]) -> Dict:
    """Train in this process with detectron2's Trainer as train_net.py does; figures per
    iteration."""
    import numpy as np

    from unsam.engine.trainer import Trainer, setup_config

    device = plan["device"]
    res: Dict = {"config": str(config_file.relative_to(REPO)), "ok": True}
    cfg = setup_config(train_args(config_file, opts))
    res.update(
        amp=bool(cfg.SOLVER.AMP.ENABLED),
        ims_per_batch=int(cfg.SOLVER.IMS_PER_BATCH),
        image_size=int(cfg.INPUT.IMAGE_SIZE),
        iterations=int(cfg.SOLVER.MAX_ITER),
        visa=bool(cfg.UNSAM.VISA.ENABLED),
        ats=bool(cfg.UNSAM.ATS.ENABLED),
        queries=int(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES),
    )
    if device == "cuda" and not cfg.SOLVER.AMP.ENABLED:
        raise CheckFailed("SOLVER.AMP.ENABLED is off on CUDA: the check is meant to train with AMP")
    _free()
    _reset_peak(device)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    probe = _train_hook_cls()(device)
    trainer.register_hooks([probe])
    trainer.resume_or_load(resume=False)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    res["params_m"] = round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 2)
    try:
        trainer.train()
        sampler = trainer.ats_sampler
        res["ats_adaptive_at_end"] = bool(sampler.adaptive) if sampler is not None else None
    finally:
        res["peak_gpu_gb"] = _peak(device)
        del trainer
        _free()
    warm = min(5 if not plan["quick"] else 1, max(len(probe.times) - 1, 0))
    res["iterations_run"] = len(probe.times)
    if probe.times:
        steady = probe.times[warm:]
        res["s_per_iter"] = round(float(np.median(steady)), 4)
        res["s_per_iter_mean"] = round(float(np.mean(steady)), 4)
        res["first_iter_s"] = round(probe.times[0], 3)
    if probe.data_times:
        res["data_s_per_iter"] = round(
            float(np.median(probe.data_times[warm:] or probe.data_times)), 4
        )
    if probe.losses:
        res["total_loss_first"] = round(probe.losses[0].get("total_loss", float("nan")), 4)
        res["total_loss_last"] = round(probe.losses[-1].get("total_loss", float("nan")), 4)
        res["loss_terms"] = len(probe.losses[-1])
    bad = [
        (i, k, v) for i, d in enumerate(probe.losses) for k, v in d.items() if not math.isfinite(v)
    ]
    if len(probe.times) != res["iterations"]:
        raise CheckFailed(f"ran {len(probe.times)} of {res['iterations']} iterations")
    if bad:
        res["ok"] = False
        res["error"] = f"non-finite losses: {bad[:5]}"
    return res


def step_train(plan: Dict, work: Path, data_root: Path) -> Dict:
    out: Dict = {"ok": True}
    iters = plan["train_iters"]
    r50 = train_opts(plan, "gpu_check_train", data_root, work / "train_r50", 2, iters)
    out["r50"] = guarded("train.r50", lambda: train_one(plan, R50, r50))
    swin = train_opts(
        plan, "gpu_check_train", data_root, work / "train_swinL", 1, iters, plan["swin"]
    )
    out["swinL"] = guarded("train.swinL", lambda: train_one(plan, SWINL, swin), oom_ok=True)
    out["ok"] = out["r50"]["ok"] and out["swinL"]["ok"]
    return out


# ------------------------------------------------------------------------------ weights (random)
def save_random_weights(plan: Dict, path: Path, prompt: bool) -> Path:
    """Random-init R50 (whole-image, or with the prompt path) saved as a detectron2 checkpoint."""
    import torch

    from unsam.predictor import build_inference_model

    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "UNSAM.PROMPT.ENABLED", str(prompt)] + plan[
        "head"
    ]
    torch.manual_seed(0)
    model = build_inference_model(load_cfg(R50, opts))
    torch.save({"model": model.state_dict(), "iteration": 0}, path)
    return path


def infer_opts(plan: Dict, device: str, weights: Path, extra: List[str] = ()) -> List[str]:
    return (
        [
            "MODEL.DEVICE",
            device,
            "MODEL.WEIGHTS",
            str(weights),
            "INPUT.MIN_SIZE_TEST",
            str(plan["test_size"]),
            "INPUT.MAX_SIZE_TEST",
            str(plan["max_test"]),
            "INPUT.IMAGE_SIZE",
            str(plan["image_size"]),
            "TEST.DETECTIONS_PER_IMAGE",
            str(plan["detections"]),
        ]
        + plan["head"]
        + list(extra)
    )


# ------------------------------------------------------------------------------ inference step
def _logits(model, image, min_size, max_size):
    """pred_logits of ``model`` for one RGB image resized as WholeImagePredictor does."""
    import numpy as np
    import torch
    from detectron2.data import transforms as T

    with torch.no_grad():
        resized = T.ResizeShortestEdge(min_size, max_size).get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        images = model.preprocess_image([{"image": tensor}])
        out = model.decode(model.extract_features(images), final_masks=False)
        return out["pred_logits"].float().cpu()


def step_inference(plan: Dict, work: Path, image_path: Path, weights: Path) -> Dict:
    import torch

    from unsam.predictor import WholeImagePredictor

    device = plan["device"]
    image = load_rgb(image_path)
    res: Dict = {
        "ok": True,
        "image": list(image.shape[:2]),
        "test_size": plan["test_size"],
        "detections": plan["detections"],
    }
    cfg = load_cfg(R50, infer_opts(plan, device, weights))
    res["queries"] = int(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES)
    _free()
    predictor = WholeImagePredictor.from_config(cfg)
    res["weights_gpu_gb"] = _gb(torch.cuda.memory_allocated()) if device == "cuda" else None
    runs = plan["timed_runs"]

    def figures(ctx) -> Dict:
        holder = {}

        def once():
            with ctx():
                holder["inst"] = predictor(image)

        _reset_peak(device)
        warm = plan["warmup"]  # first run(s): warm-up (cuDNN autotuning, allocator)
        times = _timed(device, once, runs + warm)
        inst = holder["inst"]
        scores = inst.scores
        out = {
            **_stats(times, warmup=warm),
            "peak_gpu_gb": _peak(device),
            "num_detections": len(inst),
            "mask_shape": list(inst.pred_masks.shape[1:]),
        }
        out["s_per_image"] = out["median_s"]
        if not torch.isfinite(scores).all():
            raise CheckFailed(f"non-finite scores among {len(scores)} detections")
        if list(inst.pred_masks.shape[1:]) != list(image.shape[:2]):
            raise CheckFailed(
                f"masks {tuple(inst.pred_masks.shape[1:])} for an image {image.shape[:2]}"
            )
        return out

    res["fp32"] = guarded("inference.fp32", lambda: figures(contextlib.nullcontext))
    if device == "cuda":
        res["amp"] = guarded(
            "inference.amp", lambda: figures(lambda: torch.autocast("cuda", dtype=torch.float16))
        )
    else:
        res["amp"] = {"ok": True, "skipped": "AMP is a CUDA feature (CPU autocast would be bf16)"}
    predictor = None  # noqa: F841 — frees the model before the comparison builds two more
    _free()
    res["logits_vs_cpu"] = guarded("inference.logits", lambda: compare_logits(plan, image, weights))
    res["ok"] = all(res[k]["ok"] for k in ("fp32", "amp", "logits_vs_cpu"))
    return res


def compare_logits(plan: Dict, image, weights: Path) -> Dict:
    """pred_logits on ``device`` vs the CPU: same weights file, same input."""
    import torch

    from unsam.predictor import build_inference_model

    device = plan["device"]

    def logits_on(dev: str):
        cfg = load_cfg(R50, infer_opts(plan, dev, weights))
        model = build_inference_model(cfg)
        try:
            return _logits(model, image, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        finally:
            del model
            _free()

    res: Dict = {"ok": True, "tolerance": LOGIT_TOL}
    t0 = time.perf_counter()
    ref = logits_on("cpu")
    res["cpu_s"] = round(time.perf_counter() - t0, 2)
    res["shape"] = list(ref.shape)
    if device == "cuda":
        cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        try:
            dev_default = logits_on("cuda")  # the user's default: cuDNN may use TF32 convolutions
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            dev_strict = logits_on("cuda")
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
        res["default_tf32"] = {"cudnn_allow_tf32": cudnn, "matmul_allow_tf32": matmul}
        res["max_abs_diff_default"] = float((dev_default - ref).abs().max())
    else:
        dev_strict = logits_on("cpu")  # --device cpu: a second model from the same file
    diff = float((dev_strict - ref).abs().max())
    res["max_abs_diff"] = diff
    res["logit_range"] = [float(ref.min()), float(ref.max())]
    if not math.isfinite(diff) or diff > LOGIT_TOL:
        res["ok"] = False
        res["error"] = f"pred_logits differ from the CPU by {diff:.3g} > {LOGIT_TOL}"
    return res


# --------------------------------------------------------------------------------- prompt step
def step_prompt(plan: Dict, image_path: Path, whole: Path, prompt: Path) -> Dict:
    import numpy as np

    from unsam.predictor import PromptPredictor

    device = plan["device"]
    image = load_rgb(image_path)
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    clicks = [np.array([[rng.uniform(0, w), rng.uniform(0, h)]]) for _ in range(plan["clicks"])]

    def one(mode: str, weights: Path) -> Dict:
        cfg = load_cfg(R50, infer_opts(plan, device, weights, ["UNSAM.PROMPT.MODE", mode]))
        _free()
        predictor = PromptPredictor.from_config(cfg)
        out: Dict = {"ok": True, "mode": predictor.mode, "weights": weights.name}
        if predictor.mode != mode:
            raise CheckFailed(f"asked for prompt mode {mode}, the predictor ran {predictor.mode}")
        try:
            _reset_peak(device)
            warm = plan["warmup"]
            out["set_image"] = _stats(
                _timed(device, lambda: predictor.set_image(image), plan["timed_runs"] + warm), warm
            )
            shapes = []
            it = iter(clicks * 2)

            def click():
                masks, iou, low = predictor.predict(
                    point_coords=next(it), point_labels=np.array([1])
                )
                shapes.append((masks.shape, iou.shape, bool(np.isfinite(iou).all())))

            if warm:
                predictor.predict(point_coords=clicks[0], point_labels=np.array([1]))
            out["predict_point"] = _stats(_timed(device, click, len(clicks)))
            out["peak_gpu_gb"] = _peak(device)
            out["outputs_per_click"] = int(shapes[-1][0][0])
            if any(s[0][1:] != (h, w) or not s[2] for s in shapes):
                raise CheckFailed(f"bad predict outputs: {shapes[:3]}")
        finally:
            predictor = None  # noqa: F841
            _free()
        return out

    res: Dict = {"image": [h, w], "clicks": len(clicks)}
    res["learned"] = guarded("prompt.learned", lambda: one("learned", prompt))
    res["select"] = guarded("prompt.select", lambda: one("select", whole))
    res["ok"] = res["learned"]["ok"] and res["select"]["ok"]
    return res


# --------------------------------------------------------------------------------- pseudo step
def make_pseudo_weights(work: Path, quick: bool, arch: str) -> Dict[str, str]:
    """Random DINO ``arch`` (official checkpoint layout: a bare backbone state dict) and a random
    CutLER detector (detectron2 checkpoint ``{"model": ...}``), both from the library's own
    builders; the detector's mask bias is raised so that its random masks fill their boxes (as
    tests/test_pseudo_unsam.py does) — otherwise they are specks and nothing is conquered."""
    import torch

    from unsam.features import DinoFeatures
    from unsam.pseudo.detector import DEFAULT_DIVIDE_CONFIG, build_detector, divide_config

    torch.manual_seed(0)
    dino = DinoFeatures(None, arch, allow_random=True)
    dino_path = work / f"dino_{arch}_random.pth"
    torch.save({k: v.clone() for k, v in dino.model.state_dict().items()}, dino_path)
    del dino
    detector = build_detector(divide_config())
    with torch.no_grad():
        detector.roi_heads.mask_head.predictor.bias.fill_(4.0)
    det_path = work / "cutler_random.pth"
    torch.save({"model": detector.state_dict(), "iteration": 0}, det_path)
    del detector
    divide_cfg = DEFAULT_DIVIDE_CONFIG
    if quick:  # the published detector config at a small input size with at most 3 regions
        divide_cfg = str(work / "divide_quick.yaml")
        Path(divide_cfg).write_text(
            f"_BASE_: {DEFAULT_DIVIDE_CONFIG}\n"
            "MODEL:\n  RPN:\n    PRE_NMS_TOPK_TEST: 200\n    POST_NMS_TOPK_TEST: 100\n"
            "INPUT:\n  MIN_SIZE_TEST: 128\n  MAX_SIZE_TEST: 192\nTEST:\n  DETECTIONS_PER_IMAGE: 3\n"
        )
    return {"dino": str(dino_path), "detector": str(det_path), "divide_config": divide_cfg}


_SUMMARY = re.compile(r"(\d+) labelled, (\d+) already done, (\d+) failed \((\d+) masks, ([\d.]+) s")


def run_pseudo_cli(argv: List[str]) -> Dict:
    """``python -m unsam.pseudo ARGV`` in this process (its CLI function), summary parsed."""
    from unsam.pseudo.__main__ import main as pseudo_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = pseudo_main(argv)
    text = buf.getvalue()
    m = _SUMMARY.search(text)
    if rc != 0 or m is None:
        raise CheckFailed(f"python -m unsam.pseudo exited {rc}: {text.strip()[-300:]}")
    done, _, failed, masks, seconds = m.groups()
    return {
        "done": int(done),
        "failed": int(failed),
        "masks": int(masks),
        "engine_s": float(seconds),
    }


def step_pseudo(plan: Dict, work: Path, images: List[Path]) -> Dict:
    device = plan["device"]
    inp = work / "pseudo_in"
    inp.mkdir(exist_ok=True)
    for p in images:
        shutil.copy(p, inp / p.name)
    res: Dict = {"images": len(images)}
    # the published ViT-B/8; --quick: ViT-S/8 (same code, a quarter of the weights to make and load)
    arch = "vit_small_patch8_224" if plan["quick"] else "vit_base_patch8_224"
    res["dino_arch"] = arch
    weights = guarded("pseudo.weights", lambda: make_pseudo_weights(work, plan["quick"], arch))
    quick = (
        ["--resolution", "128", "--superpixels", "200", "--refine-top", "20"]
        if plan["quick"]
        else []
    )

    def one(recipe: str, extra: List[str]) -> Dict:
        out_dir = work / f"pseudo_{recipe}"
        argv = [
            "--input",
            str(inp),
            "--output",
            str(out_dir),
            "--recipe",
            recipe,
            "--device",
            device,
            "--quiet",
        ] + extra
        t0 = time.perf_counter()
        s = run_pseudo_cli(argv)
        out = {
            "ok": True,
            "recipe": recipe,
            **s,
            "wall_s": round(time.perf_counter() - t0, 2),
            "s_per_image": round(s["engine_s"] / max(s["done"], 1), 3),
            "masks_per_image": round(s["masks"] / max(s["done"], 1), 1),
        }
        if s["failed"] or s["done"] != len(images):
            raise CheckFailed(f"{s['done']} of {len(images)} images labelled, {s['failed']} failed")
        return out

    res["classical"] = guarded("pseudo.classical", lambda: one("classical", quick))
    if weights.get("ok") is False:
        res["unsam"] = {"ok": False, "error": f"no weights: {weights.get('error')}"}
    else:
        unsam_args = [
            "--dino-weights",
            weights["dino"],
            "--dino-arch",
            arch,
            "--divide-weights",
            weights["detector"],
            "--divide-config",
            weights["divide_config"],
        ]
        if plan["quick"]:
            unsam_args += ["--conquer-size", "64"]
        res["unsam"] = guarded("pseudo.unsam", lambda: one("unsam", unsam_args))
    res["ok"] = res["classical"]["ok"] and res["unsam"]["ok"]
    return res


# ------------------------------------------------------------------------------ multi-process
def _param_digest(model) -> Dict:
    """sha256 of every parameter and of every buffer (bytes, in name order), and per tensor."""
    import torch

    out: Dict = {}
    for kind, named in (
        ("parameters", model.named_parameters()),
        ("buffers", model.named_buffers()),
    ):
        h = hashlib.sha256()
        per: Dict[str, str] = {}
        for name, t in sorted(named, key=lambda kv: kv[0]):
            t = t.detach().cpu().contiguous()
            data = (t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes()
            per[name] = hashlib.sha256(data).hexdigest()[:16]
            h.update(name.encode())
            h.update(data)
        out[kind] = {"sha256": h.hexdigest(), "per_tensor": per}
    return out


def _dist_main(spec: Dict) -> None:
    """Runs on every rank (under torchrun): train, then all-gather a digest of the weights."""
    import torch
    from detectron2.utils import comm

    from unsam.engine.trainer import Trainer, setup_config
    from unsam.utils.dist import unwrap_model

    cfg = setup_config(train_args(Path(spec["config"]), spec["opts"]))
    device = cfg.MODEL.DEVICE
    trainer = Trainer(cfg)
    tasks: List[List[str]] = []
    model = unwrap_model(trainer.model)

    def record(_module, inputs):
        batch = inputs[0] if inputs else []
        if model.training and isinstance(batch, list):
            tasks.append(sorted(str(x.get("ats_task", "?")) for x in batch))

    model.register_forward_pre_hook(record)
    probe = _train_hook_cls()(device)
    trainer.register_hooks([probe])
    trainer.resume_or_load(resume=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    sampler = trainer.ats_sampler
    mine = {
        "rank": comm.get_rank(),
        "digest": _param_digest(model),
        "tasks": tasks,
        "s_per_iter": sorted(probe.times)[len(probe.times) // 2] if probe.times else None,
        "train_s": round(wall, 2),
        "iterations": len(probe.times),
        "backend": torch.distributed.get_backend() if comm.get_world_size() > 1 else None,
        "ats_adaptive_at_end": bool(sampler.adaptive) if sampler is not None else None,
        "peak_gpu_gb": _gb(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
    }
    everyone = comm.all_gather(mine)
    if comm.is_main_process():
        Path(spec["result"]).write_text(
            json.dumps({"world_size": comm.get_world_size(), "ranks": everyone})
        )
    comm.synchronize()


def dist_worker(spec_path: str) -> int:
    """Entry of ``--dist-worker SPEC`` (started by torchrun): join the group, run
    :func:`_dist_main`."""
    from unsam.utils.dist import launch

    spec = json.loads(Path(spec_path).read_text())
    launch(_dist_main, 1, args=(spec,))
    return 0


def step_multiproc(plan: Dict, work: Path, data_root: Path, args) -> Dict:
    import torch

    device = plan["device"]
    if device == "cuda":
        gpus = torch.cuda.device_count() if args.num_gpus is None else args.num_gpus
        nproc = gpus if gpus >= 2 else 1
    else:
        nproc = 2 if args.num_gpus is None else args.num_gpus
    iters = plan["dist_iters"]
    out_dir = work / "multiproc"
    opts = train_opts(
        plan,
        "gpu_check_dist",
        data_root,
        out_dir,
        plan["dist_ims_per_rank"] * nproc,
        iters,
        ["UNSAM.PROMPT.ENABLED", "True", "UNSAM.ATS.START_ITER", "2", "UNSAM.ATS.BLOCK_SIZE", "2"],
    )
    spec = {"config": str(R50), "opts": opts, "result": str(work / "multiproc_result.json")}
    spec_path = work / "multiproc_spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo, even on a machine that has GPUs
        env["OMP_NUM_THREADS"] = "1"  # one thread per process: the processes share the cores
    else:
        env.setdefault("OMP_NUM_THREADS", "4")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()),
        "--dist-worker",
        str(spec_path),
    ]
    res: Dict = {
        "ok": True,
        "nproc": nproc,
        "iterations": iters,
        "prompt_path": True,
        "ats": True,
        "ims_per_batch": plan["dist_ims_per_rank"] * nproc,
    }
    logger.info("multi-process: %s", " ".join(cmd))
    t0 = time.perf_counter()
    # own session: on a hang the whole process group (torchrun and its workers) is killed
    proc = subprocess.Popen(
        cmd,
        cwd=str(REPO),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timeout = args.dist_timeout or plan["dist_timeout"]
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        (work / "multiproc_stderr.txt").write_text(stderr or "")
        raise CheckFailed(
            f"torchrun did not finish in {timeout} s (a hung collective?); "
            f"stderr tail: {_error_tail(stderr or '')}"
        )
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    (work / "multiproc_stderr.txt").write_text(stderr)
    if proc.returncode != 0:
        raise CheckFailed(f"torchrun exited {proc.returncode}: {_error_tail(stderr)}")
    result = json.loads(Path(spec["result"]).read_text())
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    res["world_size"] = result["world_size"]
    res["backend"] = ranks[0]["backend"]
    for kind in ("parameters", "buffers"):
        tensors = [r["digest"][kind]["per_tensor"] for r in ranks]
        differ = sorted(k for k in tensors[0] if len({t.get(k) for t in tensors}) > 1)
        res[f"identical_{kind}"] = len({r["digest"][kind]["sha256"] for r in ranks}) == 1
        res[f"num_{kind}"] = len(tensors[0])
        if differ:
            res[f"differing_{kind}"] = differ[:20] + (
                [f"... {len(differ) - 20} more"] if len(differ) > 20 else []
            )
    res["identical_weights"] = res["identical_parameters"] and res["identical_buffers"]
    res["s_per_iter"] = [r["s_per_iter"] for r in ranks]
    res["peak_gpu_gb"] = [r["peak_gpu_gb"] for r in ranks]
    res["ats_adaptive_at_end"] = ranks[0]["ats_adaptive_at_end"]
    per_iter = list(zip(*[r["tasks"] for r in ranks]))
    res["tasks_per_iteration"] = [list(t) for t in per_iter]
    # iterations where the ranks' batches mixed whole-image and prompt tasks differently: the
    # case in which a per-task collective would deadlock (unsam.utils.dist.mean_over_ranks)
    kinds = [
        [tuple(sorted({"whole" if t == "whole" else "prompt" for t in r})) for r in it]
        for it in per_iter
    ]
    res["iterations_with_different_task_mix"] = sum(len(set(k)) > 1 for k in kinds)
    if result["world_size"] != nproc:
        raise CheckFailed(f"world size {result['world_size']} != {nproc}")
    if any(r["iterations"] != iters for r in ranks):
        raise CheckFailed(f"iterations per rank {[r['iterations'] for r in ranks]} != {iters}")
    if not res["identical_weights"]:
        res["ok"] = False
        res["error"] = "ranks hold different weights: " + ", ".join(
            f"{len(res.get('differing_' + k, []))} {k} differ "
            f"(first: {res.get('differing_' + k, ['-'])[0]})"
            for k in ("parameters", "buffers")
            if not res[f"identical_{k}"]
        )
    if nproc == 1:
        res["note"] = "one process (fewer than 2 GPUs): the identical-weights check is trivial"
    elif res["iterations_with_different_task_mix"] == 0:
        logger.warning("multi-process: no iteration had different task mixes across ranks")
    return res


def _error_tail(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return " | ".join((errs[-3:] if errs else lines[-3:]))[-1500:]


# ------------------------------------------------------------------------------------- driver
def guarded(name: str, fn: Callable[[], Dict], oom_ok: bool = False) -> Dict:
    """Run one step or sub-step: its figures, or ``ok: false`` with the error (logged in full)."""
    t0 = time.perf_counter()
    try:
        res = fn() or {}
        res.setdefault("ok", True)
        if not res["ok"]:
            logger.error("%s failed: %s", name, res.get("error"))
    except Exception as e:  # noqa: BLE001 — every failure is recorded, the other steps still run
        if oom_ok and is_oom(e):
            logger.warning("%s: out of GPU memory: %s", name, str(e).splitlines()[0])
            res = {
                "ok": True,
                "fits": False,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
            }
        else:
            logger.error("%s failed:\n%s", name, traceback.format_exc())
            first = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
            res = {"ok": False, "error": f"{type(e).__name__}: {first}"}
        _free()
    else:
        if oom_ok:
            res.setdefault("fits", True)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def environment(device: str) -> Dict:
    import detectron2
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["gpu_memory_gb"] = _gb(torch.cuda.get_device_properties(0).total_memory)
    from unsam.modeling.pixel_decoder import fused_deform_attn_available

    env["fused_deformable_attention"] = fused_deform_attn_available()
    return env


def failures(tree: Dict, prefix: str = "") -> List[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = failures(v, f"{prefix}{k}.")
            if sub:
                out += sub
            elif v.get("ok") is False:
                out.append(f"{prefix}{k}: {v.get('error', 'failed')}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/gpu_check.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="where the checks run (default cuda; cpu is for --quick CI runs)",
    )
    ap.add_argument("--quick", action="store_true", help="cut-down sizes of every step (CPU CI)")
    ap.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"comma-separated subset of {','.join(STEPS)} (default: all)",
    )
    ap.add_argument(
        "--iters", type=int, default=None, help="training iterations (default 30; 2 with --quick)"
    )
    ap.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="processes of the multi-process step (default: every visible GPU; 2 on cpu)",
    )
    ap.add_argument(
        "--dist-timeout",
        type=int,
        default=None,
        help="seconds before the multi-process step counts as hung (default 900; 300 --quick)",
    )
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument(
        "--work-dir", default=None, help="data, weights, checkpoints (default: a temporary dir)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--dist-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [s for s in args.steps.split(",") if s not in STEPS]
    if bad:
        ap.error(f"unknown steps {bad}; choose from {','.join(STEPS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.dist_worker:
        return dist_worker(args.dist_worker)
    real_stdout = sys.stdout
    # detectron2's loggers and a few libraries print to stdout: only the JSON goes there
    with contextlib.redirect_stdout(sys.stderr):
        report = run_checks(args)
    text = json.dumps(report, indent=2, sort_keys=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    real_stdout.write(text + "\n")
    real_stdout.flush()
    return 0 if report["ok"] else 1


def run_checks(args) -> Dict:
    import importlib

    importlib.import_module("unsam")  # detectron2 compatibility layer first
    import torch

    t_start = time.perf_counter()
    device = args.device
    plan = make_plan(device, args.quick, args.iters)
    steps = [s for s in STEPS if s in args.steps.split(",")]
    report: Dict = {
        "ok": False,
        "device": device,
        "mode": "quick" if args.quick else "full",
        "steps_run": steps,
    }
    if device == "cuda" and not torch.cuda.is_available():
        report["error"] = (
            "--device cuda but no GPU is visible (use --device cpu --quick for the CPU check)"
        )
        report["failures"] = [report["error"]]
        logger.error(report["error"])
        return report
    report["environment"] = environment(device)
    report["plan"] = {k: v for k, v in plan.items() if k not in ("head", "swin")}
    work = (
        Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="unsam_gpu_check_"))
    )
    work.mkdir(parents=True, exist_ok=True)
    logger.info("work dir %s, plan %s", work, report["plan"])
    results: Dict = {}
    try:
        data_root = work / "sa1b"
        results["data"] = guarded(
            "data",
            lambda: write_synthetic_sa1b(
                data_root, plan["n_images"], plan["height"], plan["width"], plan["max_masks"]
            ),
        )
        images = sorted(data_root.glob("*.jpg"))
        need_weights = {"inference", "prompt"} & set(steps)
        weights: Dict = {}
        if need_weights:
            weights = guarded(
                "weights",
                lambda: {
                    "whole": str(
                        save_random_weights(plan, work / "r50_whole_random.pth", prompt=False)
                    ),
                    "prompt": str(
                        save_random_weights(plan, work / "r50_prompt_random.pth", prompt=True)
                    ),
                },
            )
        no_data = {"ok": False, "error": "no synthetic data (see steps.data)"}
        no_weights = {"ok": False, "error": f"no weights: {weights.get('error')}"}
        for step in steps:
            if not results["data"]["ok"]:
                results[step] = dict(no_data)
                continue
            logger.info("==== step %s", step)
            if step == "train":
                results[step] = guarded(step, lambda: step_train(plan, work, data_root))
            elif step == "inference":
                results[step] = (
                    no_weights
                    if not weights.get("ok")
                    else guarded(
                        step, lambda: step_inference(plan, work, images[0], Path(weights["whole"]))
                    )
                )
            elif step == "prompt":
                results[step] = (
                    no_weights
                    if not weights.get("ok")
                    else guarded(
                        step,
                        lambda: step_prompt(
                            plan, images[0], Path(weights["whole"]), Path(weights["prompt"])
                        ),
                    )
                )
            elif step == "pseudo":
                results[step] = guarded(
                    step, lambda: step_pseudo(plan, work, images[: plan["pseudo_images"]])
                )
            elif step == "multiproc":
                results[step] = guarded(step, lambda: step_multiproc(plan, work, data_root, args))
            logger.info("==== step %s: %s", step, "ok" if results[step]["ok"] else "FAILED")
    finally:
        if args.keep or args.work_dir:
            report["work_dir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["steps"] = results
    report["failures"] = failures(results)
    report["ok"] = not report["failures"] and all(results[s]["ok"] for s in steps)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    return report


if __name__ == "__main__":
    sys.exit(main())
