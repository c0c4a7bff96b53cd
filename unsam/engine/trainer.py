"""detectron2 ``DefaultTrainer`` for UnSAM: loaders, optimizer, schedule, evaluators, hooks.

Differences from detectron2's defaults, and why:

* AdamW with a backbone LR multiplier, no weight decay on norms / ``nn.Embedding`` modules / Swin's
  position tables and full-model gradient-norm clipping: the published Mask2Former/UnSAM groups
  (:func:`build_optimizer_for`).
* ``WarmupPolyLR`` in addition to detectron2's schedules.
* DDP on CPU (gloo) as well as GPU, and AMP only where it exists (CUDA).
* Class-agnostic COCO evaluation for every test set.
* ``UNSAM.ATS.ENABLED``: the training loader draws (image, task) cells from the adaptive task
  sampler in the main process (:func:`build_ats_loader`), fed by :class:`ATSFeedbackHook`; the
  sampler is a checkpointable (``"ats_sampler"``), so ``--resume`` continues its exact stream.
* ``UNSAM.VISA.ENABLED``: batches pass through ViSA's curriculum / boundary weighting
  (:class:`~unsam.data.visa_transforms.VisaBatchLoader`) at the iteration
  :class:`VisaScheduleHook` publishes.
  With both off, loader, hooks and resume are detectron2's, unchanged.
* The model it trains is the training model (:func:`~unsam.engine.train_model.build_train_model`:
  :class:`~unsam.engine.train_model.UnSAMTrain` around the inference ``UnSAM``); evaluation during
  training runs it in eval mode, which is the inference model's path.
"""

import itertools
import logging
import math
import os
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Sequence, Set, Tuple

import unsam.compat  # noqa: F401

import torch
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_setup
from detectron2.engine import hooks as d2_hooks
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, JSONWriter
from detectron2.utils.logger import setup_logger
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from ..config.loading import ConfigError, load_config
from ..data.ats import (
    AdaptiveTaskSampler,
    TaskMapDataset,
    build_ats_sampler,
    build_ats_train_loader,
)
from ..data.coco import register_builtin_datasets, register_coco_agnostic
from ..data.index import IndexedDataset
from ..data.mapper import UnSAMDatasetMapper
from ..data.sa1b import iter_roots_from_config, register_sa1b
from ..data.samplers import ResumableTrainingSampler
from ..data.training import (
    ReplacedSampleMeter,
    TrainingRecords,
    _has_mask,
    open_training_index,
    serialized_list,
)
from ..data.visa_transforms import VisaBatchLoader
from ..evaluation.whole_image import ClassAgnosticEvaluator
from ..io.sa1b import DatasetError
from ..modeling.visa import VisaState
from ..tasks import WHOLE_TASK
from ..utils.dist import create_ddp_model
from .checkpointer import TrainingCheckpointer
from .hooks import ATSFeedbackHook, VisaScheduleHook
from .train_model import build_train_model

logger = logging.getLogger("detectron2")

_NORM_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)
# parameters (by their own name) that get SOLVER.WEIGHT_DECAY_EMBED besides nn.Embedding modules:
# Swin's position tables. The published rule: a plain parameter such as the pixel decoder's
# level_embed is decayed.
_EMBED_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def register_datasets(cfg) -> None:
    """Built-in names plus every ``UNSAM.DATA.SA1B_ROOTS`` entry (``name:path``)."""
    register_builtin_datasets()
    for name, path in iter_roots_from_config(cfg.UNSAM.DATA.SA1B_ROOTS):
        register_sa1b(name, path, skip_empty=cfg.UNSAM.DATA.SKIP_EMPTY)
    for entry in cfg.UNSAM.DATA.COCO_SETS:
        if len(entry) != 3:
            raise ConfigError(
                f"UNSAM.DATA.COCO_SETS entry {list(entry)} must be [name, json_file, image_root]"
            )
        register_coco_agnostic(*entry)


def setup_config(args):
    """Load and check the config named by ``args``, run detectron2's ``default_setup`` (logs,
    seed) and register the datasets; a nonsense value or unknown dataset is a
    :class:`ConfigError` naming the key (``train_net.py``: one ``error:`` line, exit 2)."""
    cfg = load_config(args.config_file, args.opts, freeze=False)
    training = not getattr(args, "eval_only", False)
    validate_config(cfg, comm.get_world_size(), training=training)
    if cfg.MODEL.DEVICE == "cuda" and not torch.cuda.is_available():
        raise ConfigError("MODEL.DEVICE is 'cuda' but no GPU is visible; pass MODEL.DEVICE cpu")
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        # torch's CPU autocast would silently train in bf16; mixed precision is a CUDA feature here
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="unsam")
    register_datasets(cfg)
    for key, names in (
        ("DATASETS.TRAIN", cfg.DATASETS.TRAIN if training else ()),
        ("DATASETS.TEST", cfg.DATASETS.TEST),
    ):
        check_dataset_names(key, names)
        check_dataset_files(key, names)
    return cfg


# ----------------------------------------------------------------------------- config checks
# (predicate, what a valid value is) for the numeric keys whose nonsense values would otherwise
# end in a traceback deep in model or loader code, or worse, a run that trains nothing
def _finite(test: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and math.isfinite(v) and test(v)


_POSITIVE = (_finite(lambda v: v > 0), "> 0")
_NON_NEGATIVE = (_finite(lambda v: v >= 0), ">= 0 (and finite)")
_AT_LEAST_ONE = (_finite(lambda v: v >= 1), ">= 1")
_FRACTION = (_finite(lambda v: 0 <= v <= 1), "between 0 and 1")

# checked for every run: they shape the model and the test-time input
_MODEL_RULES: Sequence[Tuple[str, Tuple[Callable[[Any], bool], str]]] = (
    ("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", _POSITIVE),
    ("MODEL.MASK_FORMER.HIDDEN_DIM", _POSITIVE),
    ("MODEL.MASK_FORMER.NHEADS", _POSITIVE),
    ("MODEL.MASK_FORMER.DIM_FEEDFORWARD", _POSITIVE),
    ("MODEL.MASK_FORMER.DEC_LAYERS", _AT_LEAST_ONE),
    ("MODEL.MASK_FORMER.TEST.UPSAMPLE_CHUNK", _POSITIVE),
    ("MODEL.SEM_SEG_HEAD.CONVS_DIM", _POSITIVE),
    ("MODEL.SEM_SEG_HEAD.MASK_DIM", _POSITIVE),
    ("MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", _NON_NEGATIVE),
    ("MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", _POSITIVE),
    ("MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS", _POSITIVE),
    ("INPUT.MIN_SIZE_TEST", _POSITIVE),
    ("INPUT.MAX_SIZE_TEST", _POSITIVE),
    ("TEST.DETECTIONS_PER_IMAGE", _POSITIVE),
    ("DATALOADER.NUM_WORKERS", _NON_NEGATIVE),
)
# checked when training
_TRAIN_RULES: Sequence[Tuple[str, Tuple[Callable[[Any], bool], str]]] = (
    ("SOLVER.IMS_PER_BATCH", _POSITIVE),
    ("SOLVER.MAX_ITER", _POSITIVE),
    ("SOLVER.BASE_LR", _NON_NEGATIVE),
    ("SOLVER.BACKBONE_MULTIPLIER", _NON_NEGATIVE),
    ("SOLVER.WEIGHT_DECAY", _NON_NEGATIVE),
    ("SOLVER.WEIGHT_DECAY_NORM", _NON_NEGATIVE),
    ("SOLVER.WEIGHT_DECAY_EMBED", _NON_NEGATIVE),
    ("SOLVER.MOMENTUM", _NON_NEGATIVE),
    ("SOLVER.WARMUP_ITERS", _NON_NEGATIVE),
    ("SOLVER.WARMUP_FACTOR", _FRACTION),
    ("SOLVER.CHECKPOINT_PERIOD", _POSITIVE),
    ("TEST.EVAL_PERIOD", _NON_NEGATIVE),
    ("INPUT.IMAGE_SIZE", _POSITIVE),
    ("INPUT.MIN_SCALE", _POSITIVE),
    ("INPUT.MAX_SCALE", _POSITIVE),
    ("INPUT.MAX_INSTANCES_PER_IMAGE", _POSITIVE),
    ("MODEL.MASK_FORMER.TRAIN_NUM_POINTS", _POSITIVE),
    ("MODEL.MASK_FORMER.OVERSAMPLE_RATIO", _AT_LEAST_ONE),
    ("MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO", _FRACTION),
    ("MODEL.MASK_FORMER.CLASS_WEIGHT", _NON_NEGATIVE),
    ("MODEL.MASK_FORMER.DICE_WEIGHT", _NON_NEGATIVE),
    ("MODEL.MASK_FORMER.MASK_WEIGHT", _NON_NEGATIVE),
    ("MODEL.MASK_FORMER.NO_OBJECT_WEIGHT", _NON_NEGATIVE),
)
_OPTIMIZERS = ("ADAMW", "SGD")
_SCHEDULERS = ("WarmupPolyLR", "WarmupMultiStepLR", "WarmupCosineLR")
_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _divisible(cfg, key: str, by_key: str) -> Iterator[str]:
    value, by = _value(cfg, key), _value(cfg, by_key)
    if isinstance(by, int) and by > 0 and value % by:
        yield f"{key} {value!r}: must be divisible by {by_key} {by!r}"


def _choice(cfg, key: str, choices: Sequence[str], upper: bool = False) -> Iterator[str]:
    value = _value(cfg, key)
    if (str(value).upper() if upper else value) not in choices:
        yield f"{key} {value!r}: must be one of {', '.join(choices)}"


def _config_problems(cfg, world_size: int, training: bool) -> Iterator[str]:
    """Every invalid value of ``cfg``, one sentence each naming the key and the value."""
    rules = list(_MODEL_RULES) + (list(_TRAIN_RULES) if training else [])
    for key, (valid, must) in rules:
        if not valid(_value(cfg, key)):
            yield f"{key} {_value(cfg, key)!r}: must be {must}"
    # MultiheadAttention / MSDeformAttn split the width evenly over the heads
    yield from _divisible(cfg, "MODEL.MASK_FORMER.HIDDEN_DIM", "MODEL.MASK_FORMER.NHEADS")
    yield from _divisible(
        cfg,
        "MODEL.SEM_SEG_HEAD.CONVS_DIM",
        "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS",
    )
    if not training:
        return
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch > 0 and batch % world_size:
        yield (
            f"SOLVER.IMS_PER_BATCH {batch}: must be divisible by the {world_size} processes "
            "(each takes an equal share of the batch)"
        )
    lo, hi = cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE
    if math.isfinite(lo) and math.isfinite(hi) and 0 < hi < lo:
        yield f"INPUT.MAX_SCALE {hi!r}: must be >= INPUT.MIN_SCALE {lo!r}"
    if not cfg.DATASETS.TRAIN:
        yield "DATASETS.TRAIN is empty: name at least one training set"
    yield from _choice(cfg, "SOLVER.OPTIMIZER", _OPTIMIZERS, upper=True)
    yield from _choice(cfg, "SOLVER.LR_SCHEDULER_NAME", _SCHEDULERS)
    if not cfg.UNSAM.ATS.ENABLED:  # the ATS loader has its own sampler
        yield from _choice(cfg, "DATALOADER.SAMPLER_TRAIN", _SAMPLERS)
    visa = cfg.UNSAM.VISA
    if visa.ENABLED and visa.GUIDANCE.ENABLED and visa.GUIDANCE.WEIGHT > 0:
        yield from _choice(cfg, "UNSAM.VISA.GUIDANCE.FEATURES", ("classical",))


def validate_config(cfg, world_size: int = 1, training: bool = True) -> None:
    """Refuse nonsense numbers before any model or loader is built: :class:`ConfigError` with the
    first problem (key and value), the others logged. ``training``: also the solver and
    training-input keys (``--eval-only`` does not use them)."""
    problems = list(_config_problems(cfg, world_size, training))
    for extra in problems[1:]:
        logger.error("config: %s", extra)
    if problems:
        more = f" (and {len(problems) - 1} more, logged)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


# ----------------------------------------------------------------------------- datasets
def _our_dataset_names() -> List[str]:
    """The registered sets UnSAM can train/evaluate on (built-in, SA1B_ROOTS, COCO_SETS)."""
    return sorted(
        n
        for n in DatasetCatalog.list()
        if MetadataCatalog.get(n).get("evaluator_type", None) in ("sa1b", "coco_agnostic")
    )


def check_dataset_names(key: str, names: Sequence[str]) -> None:
    """:class:`ConfigError` naming the first of ``names`` (config ``key``) that is not registered,
    with the names that are and how to add one — detectron2 would raise a KeyError deep in the
    loader (or, for a test set, after the whole training run)."""
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise ConfigError(
                f"{key}: dataset '{name}' is not registered; UnSAM's registered sets: "
                f"{', '.join(_our_dataset_names()) or 'none'}. Add a pseudo-label folder with "
                f"UNSAM.DATA.SA1B_ROOTS \"('{name}:/path/to/folder',)\" or a COCO-format set with "
                "UNSAM.DATA.COCO_SETS"
            )


def check_dataset_files(key: str, names: Sequence[str]) -> None:
    """:class:`DatasetError` when a registered set's folder or annotation file is missing.

    Registration is lazy, so a missing test set was found only by the evaluation after the last
    iteration: hours of training, then a traceback. Checked at start instead.
    """
    for name in names:
        meta = MetadataCatalog.get(name)
        for field in ("json_file", "image_root", "root"):
            path = meta.get(field, None)
            if path and not os.path.exists(path):
                raise DatasetError(
                    f"{key}: dataset '{name}' needs {field} '{path}', which does not exist "
                    "(set DETECTRON2_DATASETS, or name another set)"
                )


def _where(names: Sequence[str]) -> str:
    """``'name' (root or json file)`` for each dataset name, for error messages."""
    parts = []
    for name in names:
        meta = MetadataCatalog.get(name)
        place = meta.get("root", None) or meta.get("json_file", None)
        parts.append(f"'{name}' ({place})" if place else f"'{name}'")
    return ", ".join(parts)


def load_train_dicts(cfg) -> TrainingRecords:
    """The training images of ``cfg.DATASETS.TRAIN``, as one dataset, checked before any
    iteration runs.

    SA-1B style roots (registered with ``index_root``: every ``UNSAM.DATA.SA1B_ROOTS`` entry) are
    read through their dataset index, built or updated on rank 0 first (:mod:`unsam.data.training`):
    no record is read here, the checks below use the index's counts, and each sample reads its
    one record in the loader. Other sets (COCO-format) are loaded as lists and held serialized.
    Sets of both kinds mix, in the order named.

    A training set in which no image has a non-empty mask trains nothing (``loss_mask`` 0 to
    the end): :class:`DatasetError` naming the sets and their roots. Images without one are left
    out (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``) or kept as all-background targets; the log says
    which, with the count.
    """
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ConfigError("DATASETS.TRAIN is empty: name at least one training set")
    check_dataset_names("DATASETS.TRAIN", names)
    filter_empty = bool(cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    loaded = []  # (name, all images, images with a mask, the dataset to train on)
    for name in names:
        meta = MetadataCatalog.get(name)
        root = meta.get("index_root", None)
        if root:
            index = open_training_index(root, cfg.OUTPUT_DIR)
            info = index.summary
            skip_empty = filter_empty or meta.get("skip_empty", False)
            logger.log(
                logging.WARNING if info["skipped"] else logging.INFO,
                "SA-1B root %s (index %s): %d images, %d records not indexed%s, "
                "%d empty masks dropped, %d images without a mask %s",
                root,
                os.path.dirname(index.index_dir),
                info["images"],
                info["skipped"],
                f" (first: {info['first_skipped'][0]})" if info["skipped"] else "",
                info["empty_masks"],
                info["images"] - info["labelled"],
                "left out" if skip_empty else "kept",
            )
            if meta.get("skip_empty", False) and not info["labelled"]:
                raise DatasetError(
                    f"SA-1B root '{root}' has no usable image ({info['images']} indexed, none with "
                    "a non-empty mask; UNSAM.DATA.SKIP_EMPTY leaves those out)"
                )
            images = info["labelled"] if meta.get("skip_empty", False) else info["images"]
            dataset = index
            if skip_empty and info["labelled"] < info["images"] and info["labelled"]:
                dataset = IndexedDataset(index.root, index.cache_dir, skip_empty=True)
            loaded.append((name, images, info["labelled"], dataset))
            continue
        dicts = DatasetCatalog.get(name)
        if not isinstance(dicts, list):
            raise DatasetError(
                f"training set '{name}': its registered loader returned a {type(dicts).__name__}, "
                "not a list of dataset dicts; register SA-1B style folders with "
                "UNSAM.DATA.SA1B_ROOTS (read through the dataset index)"
            )
        if not dicts:
            raise DatasetError(f"training set {_where([name])} is empty")
        masked = [d for d in dicts if _has_mask(d)]
        loaded.append(
            (name, len(dicts), len(masked), serialized_list(masked if filter_empty else dicts))
        )
    total, labelled = sum(n for _, n, _, _ in loaded), sum(m for _, _, m, _ in loaded)
    if not labelled:
        raise DatasetError(
            f"training set {_where(names)}: no image has a non-empty mask "
            f"({total} images); nothing to train on"
        )
    unmasked = total - labelled
    if unmasked:
        if filter_empty:
            how = "left out (DATALOADER.FILTER_EMPTY_ANNOTATIONS True)"
        else:
            how = "kept as all-background targets (DATALOADER.FILTER_EMPTY_ANNOTATIONS False)"
        logger.warning("%d of %d training images have no non-empty mask: %s", unmasked, total, how)
    return TrainingRecords([(name, dataset) for name, _, _, dataset in loaded])


def build_optimizer_for(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW/SGD with one group per parameter, by the published Mask2Former/UnSAM rule
    (``train_net.py``'s ``build_optimizer``), so a step changes every parameter as theirs does:

    * learning rate ``BASE_LR``, times ``BACKBONE_MULTIPLIER`` when "backbone" is in the module's
      name;
    * weight decay ``WEIGHT_DECAY``, except: ``WEIGHT_DECAY_EMBED`` for Swin's position tables (by
      parameter name), ``WEIGHT_DECAY_NORM`` for the parameters of norm modules, and
      ``WEIGHT_DECAY_EMBED`` for ``nn.Embedding`` modules (the last rule that applies wins).
      Learned queries and the decoder's level embedding are ``nn.Embedding`` (no decay); the pixel
      decoder's ``level_embed`` is a plain parameter and is decayed, as published;
    * a parameter shared by several modules is listed once, under its first module.
    """
    base_lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    params: List[Dict[str, Any]] = []
    seen: Set[torch.nn.parameter.Parameter] = set()
    for module_name, module in model.named_modules():
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            hyper = {"lr": base_lr, "weight_decay": wd}
            if "backbone" in module_name:
                hyper["lr"] = base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER
            if any(k in name for k in _EMBED_NAMES):
                hyper["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_EMBED
            if isinstance(module, _NORM_TYPES):
                hyper["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_NORM
            if isinstance(module, torch.nn.Embedding):
                hyper["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_EMBED
            params.append({"params": [value], **hyper})

    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model_clip = clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE > 0

    def with_full_model_clipping(optim_cls):
        if not full_model_clip:
            return optim_cls

        class FullModelClipping(optim_cls):
            def step(self, closure=None):
                all_params = itertools.chain(*[g["params"] for g in self.param_groups])
                torch.nn.utils.clip_grad_norm_(
                    all_params, clip.CLIP_VALUE, norm_type=clip.NORM_TYPE
                )
                return super().step(closure=closure)

        return FullModelClipping

    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer = with_full_model_clipping(torch.optim.AdamW)(params, base_lr)
    elif name == "SGD":
        optimizer = with_full_model_clipping(torch.optim.SGD)(
            params, base_lr, momentum=cfg.SOLVER.MOMENTUM
        )
    else:
        raise ConfigError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got '{cfg.SOLVER.OPTIMIZER}'")
    if clip.ENABLED and not full_model_clip:
        from detectron2.solver.build import maybe_add_gradient_clipping

        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer


def build_scheduler_for(cfg, optimizer):
    if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":
        sched = PolynomialDecayParamScheduler(1.0, cfg.SOLVER.POLY_LR_POWER)
        sched = WarmupParamScheduler(
            sched,
            cfg.SOLVER.WARMUP_FACTOR,
            min(cfg.SOLVER.WARMUP_ITERS / max(cfg.SOLVER.MAX_ITER, 1), 1.0),
            cfg.SOLVER.WARMUP_METHOD,
        )
        return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)
    return d2_build_lr_scheduler(cfg, optimizer)


def ats_task_names(cfg) -> List[str]:
    """The ``UNSAM.ATS.TASKS`` this model can train.

    With the prompt path on (``UNSAM.PROMPT.ENABLED``) every listed task is sampled: the model
    trains each image on the task of its cell (``ats_task``). Without it the prompt tasks are
    left out with a warning and ATS samples images for ``whole`` alone. Levels are not a task
    axis for ``whole``: a whole-image sample trains on all levels.
    """
    names = list(cfg.UNSAM.ATS.TASKS)
    if cfg.UNSAM.PROMPT.ENABLED:
        return names
    dropped = [n for n in names if n != WHOLE_TASK]
    if WHOLE_TASK not in names:
        raise ConfigError(
            f"UNSAM.ATS.TASKS={names} has no 'whole' task and UNSAM.PROMPT.ENABLED is False: "
            "nothing to train; add 'whole' or enable the prompt path"
        )
    if dropped:
        logger.warning(
            "ATS: tasks %s need the prompt path (UNSAM.PROMPT.ENABLED False); "
            "sampling 'whole' only",
            dropped,
        )
    return [WHOLE_TASK]


def build_ats_loader(cfg, mapper=None):
    """ATS training loader for ``cfg.DATASETS.TRAIN``; the sampler is ``loader.ats_sampler``.

    Batches are lists of ``IMS_PER_BATCH / world_size`` mapped dicts carrying ``ats_index`` /
    ``ats_task_id``. Seeded by ``cfg.SEED`` (a shared random seed when negative).
    """
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH <= 0 or cfg.SOLVER.IMS_PER_BATCH % world != 0:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH}: must be > 0 and divisible by the "
            f"{world} processes"
        )
    dataset = load_train_dicts(cfg)
    per_rank = cfg.SOLVER.IMS_PER_BATCH // world
    ats_cfg = cfg.clone()
    ats_cfg.defrost()
    ats_cfg.UNSAM.ATS.TASKS = ats_task_names(cfg)
    sampler = build_ats_sampler(ats_cfg, len(dataset), items_per_iteration=per_rank)
    mapper = mapper if mapper is not None else UnSAMDatasetMapper(cfg, is_train=True)
    loader = build_ats_train_loader(
        TaskMapDataset(dataset, mapper, sampler.task_space),
        sampler,
        per_rank,
        cfg.DATALOADER.NUM_WORKERS,
    )
    loader.ats_sampler = sampler
    logger.info(
        "ATS: %d images x %d tasks, adaptive from iteration %d",
        len(dataset),
        len(sampler.task_space),
        sampler.start_iter,
    )
    return loader


def build_resumable_train_loader(cfg):
    """detectron2's training loader over :func:`load_train_dicts`, with a resumable sampler.

    With ``DATALOADER.SAMPLER_TRAIN`` ``TrainingSampler`` (the default) the stream is detectron2's,
    index for index, but ``--resume`` continues it (``loader.train_sampler``, a checkpointable);
    other samplers are detectron2's own and restart from their seed on a resume. The dataset is
    handed to detectron2 as a map-style dataset (not a list), which it wraps without copying.
    """
    dataset = load_train_dicts(cfg)
    sampler = None
    if cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler":
        sampler = ResumableTrainingSampler(len(dataset), cfg.SOLVER.IMS_PER_BATCH)
    loader = build_detection_train_loader(
        cfg, mapper=UnSAMDatasetMapper(cfg, is_train=True), dataset=dataset, sampler=sampler
    )
    if sampler is not None:
        loader.train_sampler = sampler
    return loader


class Trainer(DefaultTrainer):
    """DefaultTrainer with UnSAM's loaders/optimizer/evaluator and CPU-capable DDP."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=False)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = TrainingCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """The training model (:func:`~unsam.engine.train_model.build_train_model`); inference
        code builds the architecture itself (``detectron2.modeling.build_model``)."""
        model = build_train_model(cfg)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer_for(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_scheduler_for(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader, or the ATS loader (``UNSAM.ATS.ENABLED``); wrapped for ViSA, and
        for the count of replaced samples that loader workers report (``data/replaced_samples``)."""
        if cfg.UNSAM.ATS.ENABLED:
            loader = build_ats_loader(cfg)
        else:
            loader = build_resumable_train_loader(cfg)
        loader = ReplacedSampleMeter(loader)
        if cfg.UNSAM.VISA.ENABLED:
            loader = VisaBatchLoader(loader, VisaState.from_config(cfg))
        return loader

    @property
    def ats_sampler(self) -> "AdaptiveTaskSampler | None":
        return getattr(self._trainer.data_loader, "ats_sampler", None)

    @property
    def train_sampler(self) -> "ResumableTrainingSampler | None":
        return getattr(self._trainer.data_loader, "train_sampler", None)

    def build_hooks(self):
        """detectron2's hooks plus the ViSA / ATS hooks, placed before the checkpointer."""
        ret = super().build_hooks()
        extra = []
        loader = self._trainer.data_loader
        if self.cfg.UNSAM.VISA.ENABLED:
            visa_loader = loader if isinstance(loader, VisaBatchLoader) else None
            extra.append(VisaScheduleHook(visa_loader))
        sampler = self.ats_sampler
        if sampler is not None:
            ats = self.cfg.UNSAM.ATS
            extra.append(
                ATSFeedbackHook(
                    sampler, ats.SYNC_PERIOD, ats.DIFFICULTY, self.cfg.SOLVER.CHECKPOINT_PERIOD
                )
            )
            # saved with every checkpoint and restored by --resume (fvcore loads checkpointables)
            self.checkpointer.checkpointables["ats_sampler"] = sampler
        if self.train_sampler is not None:  # its seed: --resume continues the same data stream
            self.checkpointer.checkpointables["train_sampler"] = self.train_sampler
        if extra:
            at = next(
                (
                    i
                    for i, h in enumerate(ret)
                    if isinstance(
                        h,
                        (d2_hooks.PeriodicCheckpointer, d2_hooks.EvalHook, d2_hooks.PeriodicWriter),
                    )
                ),
                len(ret),
            )
            ret[at:at] = extra
        return ret

    def resume_or_load(self, resume=True):
        """detectron2's resume, then the training loader continues the uninterrupted data stream.

        detectron2's ``SimpleTrainer`` creates the loader iterator in its constructor, before the
        checkpoint is loaded; a prefetching iterator would already hold batches of the old stream,
        so it is made again once the sampler (ATS, or :class:`ResumableTrainingSampler`) is at
        ``start_iter``. A resume past the last iteration from any file but ``model_final.pth``
        (lost to a kill while it was written) writes it now: no step will run to write it.
        """
        super().resume_or_load(resume=resume)
        resumed = os.path.basename(self.checkpointer.resumed_from)
        if resume and self.start_iter >= self.max_iter and resumed and resumed != "model_final.pth":
            logger.warning(
                "training had finished but model_final.pth is missing or unreadable; "
                "writing it from %s",
                resumed,
            )
            self.checkpointer.save("model_final", iteration=self.start_iter - 1)
        sampler = self.ats_sampler or self.train_sampler
        if sampler is None or (sampler.iteration == self.start_iter == 0):
            return
        if (
            sampler is self.ats_sampler
            and sampler.iteration != self.start_iter
            and self.start_iter > 0
        ):
            logger.warning(
                "ATS: the checkpoint has no sampler state; continuing the sampler from "
                "iteration %d (not the uninterrupted stream)",
                self.start_iter,
            )
        sampler.set_iteration(self.start_iter)
        self._trainer._data_loader_iter = iter(self._trainer.data_loader)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=UnSAMDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return ClassAgnosticEvaluator(dataset_name, output_folder)


def write_eval_metrics(cfg, results: Dict, iteration: int = 0) -> None:
    """Append flattened ``results`` to ``OUTPUT_DIR/metrics.json`` with detectron2's JSONWriter."""
    if not comm.is_main_process():
        return
    if "segm" in results:  # DefaultTrainer.test unwraps the dict when there is one test set
        results = {cfg.DATASETS.TEST[0]: results}
    flat = OrderedDict()
    for dataset, tasks in results.items():
        for task, metrics in tasks.items() if isinstance(tasks, dict) else []:
            if isinstance(metrics, dict):
                for k, v in metrics.items():
                    flat[f"{dataset}/{task}/{k}"] = float(v)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with EventStorage(iteration) as storage:
        storage.put_scalars(**flat, smoothing_hint=False)
        writer = JSONWriter(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))
        writer.write()
        writer.close()
