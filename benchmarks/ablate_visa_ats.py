#!/usr/bin/env python
"""Ablation of UnSAM's training aids: plain, +ViSA, +ATS, +ViSA+ATS and ViSA's three parts one at
a time, several seeds each, at a budget where the tiny model learns (issue 19).

  python benchmarks/ablate_visa_ats.py                          # the full ablation (hours on CPU)
  python benchmarks/ablate_visa_ats.py --jobs 2 --docs          # 2 runs at a time; docs/ablation.md
  python benchmarks/ablate_visa_ats.py --variants plain visa --seeds 0 1 --iters 200
  python benchmarks/ablate_visa_ats.py --data pseudo --pseudo DIR  # shared photos' pseudo labels
  python benchmarks/ablate_visa_ats.py --summarize-only         # rebuild table from finished runs

Data (``--data``): ``nested`` synthetic scenes (wholes, parts and sub-parts at levels 0/1/2,
textured so that colour edges and objects disagree; held-out AR per level), ``shapes`` (the
synthetic shapes of ``tests/test_learning.py``), or ``pseudo``: train on the SA-1B pseudo labels
in ``--pseudo DIR`` and evaluate on the human masks of both shared COCO sets. The data are the
same for every seed; the seed sets initialisation, data order and augmentation. A run repeats
bit for bit on the same machine with the same ``--threads`` (default 1): a different thread count,
or a CPU with other vector instructions, sums in another order and the run drifts apart like one
of another seed. Each record notes its CPU, torch version and thread count.

The default budget is that of ``tests/test_learning.py``: 800 iterations × batch 8 at 128 px, 1500
training images, lr 0.0005 with a step at 80 %. Held-out AR@10/100/1000 is measured every
``--eval-period`` iterations (the curve) and at the end; ``--prompt`` trains the prompt path too
and adds 1-click mIoU. ViSA decays from iteration 0 to ``--visa-end`` × iters, ATS turns adaptive
at ``--ats-start`` × iters.

Each (variant, seed) run writes ``OUT/runs/<variant>_seed<k>.json`` when it finishes (with
``--docs``: ``docs/ablation_runs/runs/``, or ``docs/ablation_runs_<data>/runs/`` for ``--data``
other than ``nested``; committed, so that an ablation can be trained over several sessions); a
rerun skips finished runs of the same budget (``--force`` redoes them). The summary —
``ablation.md`` (tables: mean and min–max over seeds; per comparison, whether the difference of
means exceeds the seed spread), ``ablation.json`` and ``ablation_ar.png`` (held-out AR@100
against iteration) — is built from those files, also alone with ``--summarize-only``. ``--docs``
writes the markdown and the figure to ``docs/`` instead (``docs/ablation_<data>.md`` for data
other than ``nested``).
"""

import argparse
import contextlib
import copy
import datetime
import functools
import hashlib
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import unsam.compat  # noqa: E402,F401  (detectron2 compatibility layer first)

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import ablation_report as report  # noqa: E402
from benchmarks.ablation_report import AR_KEYS  # noqa: E402
from unsam.config.loading import ConfigError, load_config  # noqa: E402
from unsam.data.coco import register_builtin_datasets, shared_data_dir  # noqa: E402
from unsam.data.sa1b import register_sa1b  # noqa: E402
from unsam.data.synthetic import make_nested_scenes_dataset, make_shapes_dataset  # noqa: E402
from unsam.engine.trainer import Trainer  # noqa: E402
from unsam.evaluation.whole_image import (  # noqa: E402
    ClassAgnosticEvaluator,
    coco_eval_agnostic,
    dataset_dicts_to_coco,
    load_coco_gt,
)
from unsam.io.sa1b import DatasetError, find_sa1b_files  # noqa: E402
from unsam.utils.files import atomic_write  # noqa: E402
from unsam.utils.threads import torch_threads  # noqa: E402

logger = logging.getLogger("ablate_visa_ats")

_VISA = "UNSAM.VISA."
VARIANTS = OrderedDict(
    [
        ("plain", ("plain", {})),
        ("visa", ("+ViSA", {_VISA + "ENABLED": True})),
        ("ats", ("+ATS", {"UNSAM.ATS.ENABLED": True})),
        ("visa_ats", ("+ViSA+ATS", {_VISA + "ENABLED": True, "UNSAM.ATS.ENABLED": True})),
        (
            "visa_curriculum",
            (
                "+ViSA curriculum only",
                {
                    _VISA + "ENABLED": True,
                    _VISA + "BOUNDARY.ENABLED": False,
                    _VISA + "GUIDANCE.ENABLED": False,
                },
            ),
        ),
        (
            "visa_boundary",
            (
                "+ViSA boundary only",
                {
                    _VISA + "ENABLED": True,
                    _VISA + "CURRICULUM.ENABLED": False,
                    _VISA + "GUIDANCE.ENABLED": False,
                },
            ),
        ),
        (
            "visa_guidance",
            (
                "+ViSA guidance only",
                {
                    _VISA + "ENABLED": True,
                    _VISA + "CURRICULUM.ENABLED": False,
                    _VISA + "BOUNDARY.ENABLED": False,
                },
            ),
        ),
    ]
)
PROMPT_KEYS = ("mIoU_max", "mIoU_oracle")
SHARED_SETS = ("coco_tiny_val_agnostic", "coco_tiny_train_agnostic")
TRAIN_NAME = "ablation_train"
TRAIN_DATA_SEED, VAL_DATA_SEED = 11, 12  # as tests/test_learning.py
# the flags that change results: a finished run is reused only when all of them match
BUDGET_KEYS = (
    "data",
    "pseudo",
    "config_file",
    "device",
    "iters",
    "batch",
    "image_size",
    "train_images",
    "val_images",
    "eval_period",
    "visa_end",
    "ats_start",
    "prompt",
    "opts",
)


class UsageError(ValueError):
    """Bad input (flags, missing data); the message is one line."""


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        choices=("nested", "shapes", "pseudo"),
        help="training / held-out data (default: pseudo with --pseudo, else nested)",
    )
    p.add_argument("--pseudo", help="folder of SA-1B pseudo labels to train on (--data pseudo)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        metavar="VARIANT",
        help=f"variants to run, of: {', '.join(VARIANTS)} (default: all)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)"
    )
    p.add_argument("--iters", type=int, default=800, help="training iterations per run")
    p.add_argument("--batch", type=int, default=8, help="images per iteration")
    p.add_argument(
        "--image-size", type=int, default=128, help="training crop / test short side (px)"
    )
    p.add_argument("--train-images", type=int, default=1500, help="generated training images")
    p.add_argument("--val-images", type=int, default=48, help="generated held-out images")
    p.add_argument(
        "--eval-period",
        type=int,
        help="held-out evaluation every N iterations (default: iters / 8)",
    )
    p.add_argument(
        "--visa-end", type=float, default=0.5, help="ViSA END_ITER as a share of --iters"
    )
    p.add_argument(
        "--ats-start", type=float, default=0.25, help="ATS START_ITER as a share of --iters"
    )
    p.add_argument(
        "--prompt", action="store_true", help="train the prompt path too; report 1-click mIoU"
    )
    p.add_argument(
        "--config-file", help="default: configs/tiny/unsam_tiny.yaml (_prompt.yaml with --prompt)"
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument(
        "--out", default=str(REPO / "outputs" / "ablation"), help="working and result folder"
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="write the markdown and figure to docs/ instead of --out",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, as subprocesses")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="numeric threads per run (default 1; results repeat only at the same count)",
    )
    p.add_argument("--force", action="store_true", help="redo runs that have finished")
    p.add_argument(
        "--summarize-only", action="store_true", help="only rebuild the summary from OUT/runs"
    )
    p.add_argument(
        "--skip-summary", action="store_true", help=argparse.SUPPRESS
    )  # the --jobs children
    p.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides (last)"
    )
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on other flags; raise :class:`UsageError` for bad input."""
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant '{unknown[0]}' (choose from: {', '.join(VARIANTS)})")
    if args.data is None:
        args.data = "pseudo" if args.pseudo else "nested"
    if args.data == "pseudo":
        if not args.pseudo:
            raise UsageError("--data pseudo needs --pseudo DIR (a folder of SA-1B pseudo labels)")
        if not Path(args.pseudo).is_dir():
            raise UsageError(f"--pseudo folder '{args.pseudo}' not found")
        args.pseudo = str(Path(args.pseudo).resolve())
    elif args.pseudo:
        raise UsageError(f"--pseudo is for --data pseudo, not --data {args.data}")
    for name in ("iters", "batch", "image_size", "train_images", "val_images", "jobs", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    args.eval_period = args.eval_period or max(1, args.iters // 8)
    if args.config_file is None:
        args.config_file = str(
            REPO
            / "configs"
            / "tiny"
            / ("unsam_tiny_prompt.yaml" if args.prompt else "unsam_tiny.yaml")
        )
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.variants = list(dict.fromkeys(args.variants))
    args.seeds = list(dict.fromkeys(args.seeds))
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    if args.jobs * args.threads > cores:
        logger.warning(
            "--jobs %d x --threads %d exceeds the %d cores: runs will be slower (same results)",
            args.jobs,
            args.threads,
            cores,
        )


def machine_of(args) -> Dict:
    """What a run's floating-point sums depend on besides its budget and seed."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "torch": torch.__version__, "threads": args.threads, "device": args.device}


def _portable(path: Optional[str]) -> Optional[str]:
    """``path`` relative to the repository when it lies inside it (records are committed)."""
    if path is None:
        return path
    # abspath, not resolve: configs/ is a link to unsam/configs/, and records name the path typed
    full = Path(os.path.abspath(path))
    return str(full.relative_to(REPO)) if full.is_relative_to(REPO) else path


def budget_of(args) -> Dict:
    """The flags that define a run's result (see :data:`BUDGET_KEYS`), paths inside the repository
    relative to it; with ``--data pseudo`` also the labels' digest, so that runs on labels written
    again by a changed engine are redone rather than mixed with the old ones."""
    budget = {k: getattr(args, k) for k in BUDGET_KEYS}
    budget["config_file"], budget["pseudo"] = _portable(args.config_file), _portable(args.pseudo)
    if args.data == "pseudo":
        budget["pseudo_sha256"] = pseudo_digest(args.pseudo)
    return budget


@functools.lru_cache(maxsize=None)
def pseudo_digest(folder: str) -> str:
    """SHA-256 over the SA-1B JSON files of ``folder``: their paths inside it and their contents,
    the image's ``file_name`` cut to its base name (the engine writes where the photos lay)."""
    digest = hashlib.sha256()
    for path in find_sa1b_files(folder):
        text = path.read_text()
        try:
            labels = json.loads(text)
            labels["image"]["file_name"] = Path(labels["image"]["file_name"]).name
        except (ValueError, KeyError, TypeError):
            labels = text  # not SA-1B: training will name it; the digest takes it as it is
        digest.update(json.dumps([str(path.relative_to(folder)), labels], sort_keys=True).encode())
    return digest.hexdigest()


def _docs_suffix(args) -> str:
    """``--docs`` file names: ``ablation*`` for the nested scenes, ``ablation_<data>*`` for other
    data."""
    return "" if (args.data or "nested") == "nested" else f"_{args.data}"


def records_dir(args) -> Path:
    """Where finished runs (``runs/*.json``) and ``invocations.json`` are kept: ``OUT``, or with
    ``--docs`` the committed ``docs/ablation_runs`` (``docs/ablation_runs_<data>`` for data other
    than the nested scenes) — the runs of one ablation take several sessions of CPU time, and
    ``outputs/`` does not survive a fresh checkout."""
    return REPO / "docs" / f"ablation_runs{_docs_suffix(args)}" if args.docs else Path(args.out)


def summary_paths(args) -> Tuple[Path, Path, Path]:
    """Where the markdown, the figure and the JSON summary go."""
    if not args.docs:
        return (
            Path(args.out) / "ablation.md",
            Path(args.out) / "ablation_ar.png",
            Path(args.out) / "ablation.json",
        )
    name = f"ablation{_docs_suffix(args)}"
    return (
        REPO / "docs" / f"{name}.md",
        REPO / "docs" / f"{name}_ar.png",
        records_dir(args) / "ablation.json",
    )


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _generated(out: Path, kind: str, split: str, num_images: int, size: int, seed: int) -> Path:
    """A generated SA-1B folder under ``OUT/data``, written once (a ``.complete`` marker)."""
    root = out / "data" / f"{kind}_{split}_{num_images}x{size}px_seed{seed}"
    if not (root / ".complete").is_file():
        logger.info("writing %d %s %s images to %s", num_images, kind, split, root)
        make = make_nested_scenes_dataset if kind == "nested" else make_shapes_dataset
        make(root, num_images, size=size, seed=seed)
        (root / ".complete").touch()
    return root


def prepare_data(args) -> Dict:
    """Write (once) and register the training set and the held-out sets of ``args.data``.

    Returns ``{"eval": [held-out names], "description": str}``.
    """
    register_builtin_datasets()
    if args.data == "pseudo":
        try:
            count = len(find_sa1b_files(args.pseudo))
        except DatasetError as e:
            raise UsageError(str(e)) from None
        if not count:
            raise UsageError(f"--pseudo folder '{args.pseudo}' holds no SA-1B JSON file")
        if shared_data_dir() is None:
            raise UsageError(
                "shared data missing: the COCO sets for held-out evaluation were not found "
                "(set UNSAM_SHARED to the folder holding data/)"
            )
        register_sa1b(TRAIN_NAME, args.pseudo)
        return {
            "eval": list(SHARED_SETS),
            "description": f"SA-1B pseudo labels in `{_portable(args.pseudo)}` ({count} images); "
            f"held-out: the human masks of the shared COCO sets "
            f"{', '.join(f'`{s}`' for s in SHARED_SETS)}",
        }
    out = Path(args.out)
    train = _generated(out, args.data, "train", args.train_images, args.image_size, TRAIN_DATA_SEED)
    val = _generated(out, args.data, "val", args.val_images, args.image_size, VAL_DATA_SEED)
    val_name = f"{args.data}_val"
    register_sa1b(TRAIN_NAME, train)
    register_sa1b(val_name, val)
    kind = (
        "nested synthetic scenes (levels 0/1/2)"
        if args.data == "nested"
        else "synthetic shapes (levels 0/1)"
    )
    return {
        "eval": [val_name],
        "description": f"{kind}, {args.image_size} px: {args.train_images} training images "
        f"(data seed {TRAIN_DATA_SEED}), held-out `{val_name}` {args.val_images} images (data seed "
        f"{VAL_DATA_SEED})",
    }


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
_GT_CACHE: Dict[Tuple[str, str], Dict] = {}


def ground_truth_subsets(dataset_name: str) -> Dict:
    """``{"all": COCO, "L0": COCO, ...}`` for a registered set: every mask, and each ``level`` of
    masks alone when its annotations carry levels (SA-1B sets; the COCO sets have none). Cached
    per name and source."""
    meta = MetadataCatalog.get(dataset_name)
    json_file = getattr(meta, "json_file", None)
    key = (dataset_name, json_file or getattr(meta, "root", ""))
    if key not in _GT_CACHE:
        if json_file:
            _GT_CACHE[key] = {"all": load_coco_gt(json_file)}
        else:
            dicts = DatasetCatalog.get(dataset_name)
            subsets = {"all": load_coco_gt(dataset_dicts_to_coco(dicts))}
            levels = sorted({a["level"] for d in dicts for a in d["annotations"] if "level" in a})
            for level in levels if len(levels) > 1 else []:
                only = [
                    dict(d, annotations=[a for a in d["annotations"] if a.get("level") == level])
                    for d in dicts
                ]
                subsets[f"L{level}"] = load_coco_gt(dataset_dicts_to_coco(only))
            _GT_CACHE[key] = subsets
    return _GT_CACHE[key]


class LevelEvaluator(ClassAgnosticEvaluator):
    """Class-agnostic AR on all masks and on each granularity level's masks alone (same
    predictions): ``{"all": metrics, "L0": metrics, ...}``. Single process."""

    def __init__(self, dataset_name: str):
        super().__init__(dataset_name, output_dir=None, distributed=False)

    def evaluate(self):
        image_ids = sorted(set(self._image_ids)) or None
        return OrderedDict(
            (
                subset,
                {k: coco_eval_agnostic(coco, self._predictions, image_ids)[k] for k in AR_KEYS},
            )
            for subset, coco in ground_truth_subsets(self.dataset_name).items()
        )


def _image_root(dataset_name: str) -> str:
    root = getattr(MetadataCatalog.get(dataset_name), "image_root", None)
    return root or os.path.dirname(DatasetCatalog.get(dataset_name)[0]["file_name"])


def prompt_metrics(cfg, weights: Path, eval_names: Sequence[str]) -> Dict:
    """1-click mIoU of the learned prompt head of ``weights`` on each held-out set and level."""
    from unsam.evaluation.prompt import evaluate_prompts
    from unsam.predictor import PromptPredictor

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS, cfg.UNSAM.PROMPT.MODE = str(weights), "learned"
    cfg.freeze()
    predictor = PromptPredictor.from_config(cfg)
    metrics = {}
    for name in eval_names:
        metrics[name] = {}
        for subset, coco in ground_truth_subsets(name).items():
            result = evaluate_prompts(predictor, coco.dataset, _image_root(name), box=False)
            metrics[name][subset] = {k: result[k] for k in PROMPT_KEYS}
    return metrics


def eval_history(storage, eval_names: Sequence[str], max_iter: int) -> List[Dict]:
    """The held-out metrics detectron2's EvalHook put in the event storage, by iteration:
    ``[{"iter": iterations done, "metrics": {set: {subset: {AR key: value}}}}]``.

    With one test set detectron2 drops the set name from the keys (``all/AR@100``), with several
    it keeps it (``<set>/all/AR@100``). Periodic evaluations are stored at the 0-based iteration
    of their step, the final one (after training) at ``max_iter``."""
    by_iter: Dict[int, Dict] = defaultdict(lambda: defaultdict(dict))
    for key, history in storage.histories().items():
        parts = key.split("/")
        if parts[-1] not in AR_KEYS or len(parts) not in (2, 3):
            continue
        dataset, subset, metric = parts if len(parts) == 3 else (eval_names[0], *parts)
        for value, iteration in history.values():
            by_iter[min(iteration + 1, max_iter)][dataset].setdefault(subset, {})[metric] = float(
                value
            )
    return [
        {"iter": it, "metrics": {name: dict(subsets) for name, subsets in by_iter[it].items()}}
        for it in sorted(by_iter)
    ]


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
class AblationTrainer(Trainer):
    """UnSAM's trainer with the per-level held-out evaluator."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return LevelEvaluator(dataset_name)


class ProgressHook(HookBase):
    """A tqdm bar over training iterations."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None

    def before_train(self):
        self.bar = tqdm(
            total=self.trainer.max_iter,
            initial=self.trainer.start_iter,
            desc=self.description,
            unit="it",
            disable=None,
            leave=False,
        )

    def after_step(self):
        self.bar.update(1)

    def after_train(self):
        self.bar.close()


def build_cfg(args, variant: str, seed: int, eval_names: Sequence[str], run_dir: Path):
    """The tiny config at the ablation's budget, with the variant's aids on; ``--opts`` last."""
    it = args.iters
    opts = [
        "MODEL.DEVICE",
        args.device,
        "SEED",
        seed,
        "OUTPUT_DIR",
        str(run_dir),
        "DATASETS.TRAIN",
        (TRAIN_NAME,),
        "DATASETS.TEST",
        tuple(eval_names),
        "SOLVER.IMS_PER_BATCH",
        args.batch,
        "SOLVER.MAX_ITER",
        it,
        "SOLVER.BASE_LR",
        0.0005,
        "SOLVER.STEPS",
        (max(1, int(0.8 * it)),),
        "SOLVER.CHECKPOINT_PERIOD",
        it + 1,
        "INPUT.IMAGE_SIZE",
        args.image_size,
        "INPUT.MIN_SCALE",
        0.75,
        "INPUT.MAX_SCALE",
        1.25,
        "INPUT.MIN_SIZE_TEST",
        args.image_size,
        "INPUT.MAX_SIZE_TEST",
        2 * args.image_size,
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
        512,
        "TEST.EVAL_PERIOD",
        args.eval_period,
        "UNSAM.VISA.START_ITER",
        0,
        "UNSAM.VISA.END_ITER",
        max(1, int(args.visa_end * it)),
        "UNSAM.ATS.START_ITER",
        int(args.ats_start * it),
        "UNSAM.ATS.BLOCK_SIZE",
        max(args.batch, 16),
    ]
    # without the prompt path ATS has the whole-image task alone (else it warns and drops the
    # others)
    opts += ["UNSAM.PROMPT.ENABLED", True] if args.prompt else ["UNSAM.ATS.TASKS", ["whole"]]
    for key, value in VARIANTS[variant][1].items():
        opts += [key, value]
    return load_config(args.config_file, opts + list(args.opts))


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def train_one(args, data: Dict, variant: str, seed: int) -> Dict:
    """Train and evaluate one (variant, seed); return its record (see :func:`write_record`)."""
    run_dir = Path(args.out) / "work" / run_name(variant, seed)
    cfg = build_cfg(args, variant, seed, data["eval"], run_dir)
    seed_all_rng(seed)
    start = time.perf_counter()
    trainer = AblationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([ProgressHook(f"{variant} seed {seed}")])
    trainer.train()
    evals = eval_history(trainer.storage, data["eval"], args.iters)
    final = copy.deepcopy(evals[-1]["metrics"])
    if args.prompt:
        for name, subsets in prompt_metrics(cfg, run_dir / "model_final.pth", data["eval"]).items():
            for subset, values in subsets.items():
                final[name][subset].update(values)
    seconds = time.perf_counter() - start
    for checkpoint in run_dir.glob(
        "*.pth"
    ):  # ~100 MB each; the record holds what the summary needs
        checkpoint.unlink()
    return {
        "variant": variant,
        "label": VARIANTS[variant][0],
        "seed": seed,
        "budget": budget_of(args),
        "data": data["description"],
        "seconds": seconds,
        "evals": evals,
        "final": final,
        "schedule": {
            "base_lr": cfg.SOLVER.BASE_LR,
            "steps": list(cfg.SOLVER.STEPS),
            "visa_end_iter": cfg.UNSAM.VISA.END_ITER,
            "ats_start_iter": cfg.UNSAM.ATS.START_ITER,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
        },
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_of(args),
    }


def record_path(out, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{run_name(variant, seed)}.json"


def write_record(out, record: Dict) -> None:
    with atomic_write(record_path(out, record["variant"], record["seed"])) as f:
        json.dump(record, f, indent=1)


def read_record(path: Path) -> Optional[Dict]:
    """A finished run's record, or None when the file is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("unreadable run record %s: ignored", path)
        return None


def pending_runs(args) -> List[Tuple[str, int]]:
    """The requested (variant, seed) runs without a finished record of this budget, seed by seed:
    an ablation stopped part way has every variant at its first seeds, not some variants at all."""
    todo = []
    for seed in args.seeds:
        for variant in args.variants:
            path = record_path(records_dir(args), variant, seed)
            record = read_record(path) if path.is_file() and not args.force else None
            if record is not None and record.get("budget") == budget_of(args):
                logger.info("%s seed %d: finished earlier (%s), skipped", variant, seed, path.name)
                continue
            if record is not None:
                logger.info(
                    "%s seed %d: finished earlier with another budget, redone", variant, seed
                )
            todo.append((variant, seed))
    return todo


# ---------------------------------------------------------------------------------------------
# running all
# ---------------------------------------------------------------------------------------------
def run_in_process(args, data: Dict, todo: Sequence[Tuple[str, int]]) -> int:
    """Train the runs one after the other in this process; return the number that failed."""
    failed = 0
    with torch_threads(args.threads):
        for variant, seed in tqdm(todo, desc="runs", unit="run", disable=None):
            logger.info("%s seed %d: training %d iterations", variant, seed, args.iters)
            try:
                record = train_one(args, data, variant, seed)
            except Exception:  # one failed run must not lose the others of a long ablation
                logger.exception("%s seed %d failed", variant, seed)
                failed += 1
                continue
            write_record(records_dir(args), record)
            logger.info(
                "%s seed %d: done in %.0f s; final %s",
                variant,
                seed,
                record["seconds"],
                json.dumps(record["final"]),
            )
    return failed


def child_command(args, variant: str, seed: int) -> List[str]:
    """This script for one run, same budget, no summary."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--variants",
        variant,
        "--seeds",
        str(seed),
        "--out",
        args.out,
        "--threads",
        str(args.threads),
        "--skip-summary",
    ] + (["--docs"] if args.docs else [])
    for key in BUDGET_KEYS:
        value = getattr(args, key)
        if key == "opts" or value in (None, False):
            continue
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    if args.force:
        cmd.append("--force")
    return cmd + (["--opts", *args.opts] if args.opts else [])


def run_in_subprocesses(args, todo: Sequence[Tuple[str, int]]) -> int:
    """Train up to ``--jobs`` runs at once, each a child process with ``--threads`` threads and a
    log in ``OUT/logs``; return the number that failed."""
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logger.info(
        "%d runs, %d at a time, %s threads each; logs in %s", len(todo), args.jobs, threads, logs
    )
    pending, running, failed = list(todo), {}, 0
    with (
        tqdm(total=len(todo), desc="runs", unit="run", disable=None) as bar,
        _stopping_children(running),
    ):
        while pending or running:
            while pending and len(running) < args.jobs:
                variant, seed = pending.pop(0)
                log = open(logs / f"{run_name(variant, seed)}.log", "w")
                proc = subprocess.Popen(
                    child_command(args, variant, seed),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=REPO,
                )
                running[proc] = (variant, seed, log)
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                variant, seed, log = running.pop(proc)
                log.close()
                if proc.returncode != 0:
                    failed += 1
                    logger.error(
                        "%s seed %d failed (exit %d): see %s",
                        variant,
                        seed,
                        proc.returncode,
                        log.name,
                    )
                bar.update(1)
    return failed


@contextlib.contextmanager
def _stopping_children(running: Dict):
    """Terminate the children still in ``running`` when the parent stops early."""
    try:
        yield
    finally:
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()


def log_invocation(
    args,
    argv: Sequence[str],
    seconds: float,
    trained: int,
    not_finished: int,
    stopped: Optional[str] = None,
) -> None:
    """Append this command and its wall time to ``invocations.json`` beside the run records (the
    summary adds them up); ``stopped`` names what ended it early (a signal, Ctrl-C)."""
    path = records_dir(args) / "invocations.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append(
        {
            "command": "python benchmarks/ablate_visa_ats.py " + shlex.join(argv),
            "seconds": seconds,
            "runs_trained": trained,
            "runs_not_finished": not_finished,
            "runs_requested": len(args.variants) * len(args.seeds),
            "started": datetime.datetime.fromtimestamp(time.time() - seconds).isoformat(
                timespec="seconds"
            ),
            **({"stopped": stopped} if stopped else {}),
        }
    )
    with atomic_write(path) as f:
        json.dump(entries, f, indent=1)


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def load_records(out, args=None) -> List[Dict]:
    """The finished runs in ``OUT/runs`` (those of ``args``' variants, seeds and budget when given);
    :class:`UsageError` when they mix budgets."""
    records = [r for r in map(read_record, sorted((Path(out) / "runs").glob("*.json"))) if r]
    if args is not None:
        records = [
            r
            for r in records
            if r["variant"] in args.variants
            and r["seed"] in args.seeds
            and r["budget"] == budget_of(args)
        ]
    if not records:
        raise UsageError(f"no finished run in {Path(out) / 'runs'} to summarize")
    budgets = {json.dumps(r["budget"], sort_keys=True) for r in records}
    if len(budgets) > 1:
        raise UsageError(
            f"the runs in {Path(out) / 'runs'} have {len(budgets)} different budgets; rerun the "
            "training command (it summarizes its own runs) or remove the stale ones"
        )
    return records


def write_summary(args, records: Sequence[Dict]) -> Dict:
    """Write the markdown, the figure and the JSON summary of ``records``; print the markdown."""
    md_path, png_path, json_path = summary_paths(args)
    summary = report.summarize(records, list(VARIANTS))
    invocations_file = records_dir(args) / "invocations.json"
    invocations = json.loads(invocations_file.read_text()) if invocations_file.is_file() else []
    summary["invocations"] = invocations
    with atomic_write(json_path) as f:
        json.dump(summary, f, indent=1)
    report.plot_curves(summary, png_path)
    markdown = report.render_markdown(summary, invocations, png_path.name)
    with atomic_write(md_path) as f:
        f.write(markdown)
    print(markdown)
    logger.info("wrote %s, %s and %s", md_path, png_path, json_path)
    return summary


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def run_all(args, argv: Sequence[str]) -> int:
    """Train the pending runs (in process or in ``--jobs`` children); return the number that
    failed."""
    data = prepare_data(args)
    build_cfg(
        args, args.variants[0], args.seeds[0], data["eval"], Path(args.out)
    )  # config errors now
    todo = pending_runs(args)
    start, started_at, failed, stopped = time.perf_counter(), time.time(), 0, None
    try:
        if args.jobs > 1 and len(todo) > 1:
            failed = run_in_subprocesses(args, todo)
        else:
            failed = run_in_process(args, data, todo)
    except (KeyboardInterrupt, SystemExit) as e:
        stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped (exit {e.code})"
        raise
    finally:
        if not args.skip_summary:
            folder = records_dir(args)
            trained = sum(
                record_path(folder, v, s).is_file()
                and record_path(folder, v, s).stat().st_mtime >= started_at
                for v, s in todo
            )
            log_invocation(
                args, argv, time.perf_counter() - start, trained, len(todo) - trained, stopped
            )
    return failed


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # a terminated ablation (a session's end, `kill`) still logs what it trained: SIGTERM unwinds;
    # the caller's handler comes back on return (main is also called in process, by the tests)
    caller_handler = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run_command(args, argv)
    finally:
        signal.signal(signal.SIGTERM, caller_handler)


def run_command(args, argv: Sequence[str]) -> int:
    """Check the arguments, train what is pending, write the summary; the exit status."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("detectron2", "fvcore", "unsam", "d2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        check_args(args)
        failed = 0 if args.summarize_only else run_all(args, argv)
        if not args.skip_summary:
            write_summary(
                args, load_records(records_dir(args), None if args.summarize_only else args)
            )
    except (UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
