"""detectron2 ``DefaultTrainer`` for UnSAM: loaders, optimizer, schedule, evaluators, hooks.

Differences from detectron2's defaults, and why:

* AdamW with a backbone LR multiplier, no weight decay on norms/embeddings and full-model
  gradient-norm clipping, as the public Mask2Former/UnSAM recipe.
* ``WarmupPolyLR`` in addition to detectron2's schedules.
* DDP on CPU (gloo) as well as GPU, and AMP only where it exists (CUDA).
* Class-agnostic COCO evaluation for every test set.
* ``UNSAM.ATS.ENABLED``: the training loader draws (image, task) cells from the adaptive task
  sampler in the main process (:func:`build_ats_loader`), fed by :class:`ATSFeedbackHook`; the
  sampler is a checkpointable (``"ats_sampler"``), so ``--resume`` continues its exact stream.
* ``UNSAM.VISA.ENABLED``: batches pass through ViSA's curriculum / boundary weighting
  (:class:`VisaBatchLoader`) at the iteration :class:`VisaScheduleHook` publishes.
  With both off, loader, hooks and resume are detectron2's, unchanged.
"""
import copy
import itertools
import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Set

import torch

import unsam.compat  # noqa: F401
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import hooks as d2_hooks
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_setup
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, JSONWriter
from detectron2.utils.logger import setup_logger
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from ..data.ats import AdaptiveTaskSampler, TaskMapDataset, build_ats_sampler, build_ats_train_loader
from ..data.coco import register_builtin_datasets, register_coco_agnostic
from ..data.mapper import UnSAMDatasetMapper
from ..data.prompts import WHOLE_TASK
from ..data.sa1b import iter_roots_from_config, register_sa1b
from ..evaluation.whole_image import ClassAgnosticEvaluator
from ..modeling.visa import VisaState
from .checkpointer import TrainingCheckpointer
from .hooks import ATSFeedbackHook, VisaBatchLoader, VisaScheduleHook
from ..utils.arguments import load_config
from ..utils.dist import create_ddp_model

logger = logging.getLogger("detectron2")

_NORM_TYPES = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm, torch.nn.LocalResponseNorm,
)
_EMBED_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "query_feat", "query_embed", "level_embed")


def register_datasets(cfg) -> None:
    """Built-in names plus every ``UNSAM.DATA.SA1B_ROOTS`` entry (``name:path``)."""
    register_builtin_datasets()
    for name, path in iter_roots_from_config(cfg.UNSAM.DATA.SA1B_ROOTS):
        register_sa1b(name, path, skip_empty=cfg.UNSAM.DATA.SKIP_EMPTY)
    for entry in cfg.UNSAM.DATA.COCO_SETS:
        if len(entry) != 3:
            raise ValueError(f"UNSAM.DATA.COCO_SETS entry {entry} must be [name, json_file, image_root]")
        register_coco_agnostic(*entry)


def setup_config(args):
    """Load the config named by ``args`` and run detectron2's ``default_setup`` (logs, seed)."""
    cfg = load_config(args.config_file, args.opts, freeze=False)
    if cfg.MODEL.DEVICE == "cuda" and not torch.cuda.is_available():
        raise ValueError("MODEL.DEVICE is 'cuda' but no GPU is visible; pass MODEL.DEVICE cpu")
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        # torch's CPU autocast would silently train in bf16; mixed precision is a CUDA feature here
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="unsam")
    register_datasets(cfg)
    return cfg


def build_optimizer_for(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW/SGD with per-parameter groups (backbone multiplier, no decay on norms/embeddings)."""
    base_lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    params: List[Dict[str, Any]] = []
    seen: Set[torch.nn.parameter.Parameter] = set()
    for module_name, module in model.named_modules():
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            hyper = {"lr": base_lr, "weight_decay": wd}
            if module_name.startswith("backbone") or ".backbone" in module_name:
                hyper["lr"] = base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER
            if any(k in f"{module_name}.{name}" for k in _EMBED_NAMES):
                hyper["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_EMBED
            if isinstance(module, _NORM_TYPES):
                hyper["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_NORM
            params.append({"params": [value], **hyper})

    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model_clip = clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE > 0

    def with_full_model_clipping(optim_cls):
        if not full_model_clip:
            return optim_cls

        class FullModelClipping(optim_cls):
            def step(self, closure=None):
                all_params = itertools.chain(*[g["params"] for g in self.param_groups])
                torch.nn.utils.clip_grad_norm_(all_params, clip.CLIP_VALUE, norm_type=clip.NORM_TYPE)
                return super().step(closure=closure)

        return FullModelClipping

    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer = with_full_model_clipping(torch.optim.AdamW)(params, base_lr)
    elif name == "SGD":
        optimizer = with_full_model_clipping(torch.optim.SGD)(params, base_lr, momentum=cfg.SOLVER.MOMENTUM)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got '{cfg.SOLVER.OPTIMIZER}'")
    if clip.ENABLED and not full_model_clip:
        from detectron2.solver.build import maybe_add_gradient_clipping

        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer


def build_scheduler_for(cfg, optimizer):
    if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":
        sched = PolynomialDecayParamScheduler(1.0, cfg.SOLVER.POLY_LR_POWER)
        sched = WarmupParamScheduler(sched, cfg.SOLVER.WARMUP_FACTOR,
                                     min(cfg.SOLVER.WARMUP_ITERS / max(cfg.SOLVER.MAX_ITER, 1), 1.0),
                                     cfg.SOLVER.WARMUP_METHOD)
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
        raise ValueError(f"UNSAM.ATS.TASKS={names} has no 'whole' task and UNSAM.PROMPT.ENABLED is False: "
                         "nothing to train; add 'whole' or enable the prompt path")
    if dropped:
        logger.warning("ATS: tasks %s need the prompt path (UNSAM.PROMPT.ENABLED False); sampling 'whole' only",
                       dropped)
    return [WHOLE_TASK]


def build_ats_loader(cfg, mapper=None):
    """ATS training loader for ``cfg.DATASETS.TRAIN``; the sampler is ``loader.ats_sampler``.

    Batches are lists of ``IMS_PER_BATCH / world_size`` mapped dicts carrying ``ats_index`` /
    ``ats_task_id``. Seeded by ``cfg.SEED`` (a shared random seed when negative).
    """
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world != 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by {world} processes")
    per_rank = cfg.SOLVER.IMS_PER_BATCH // world
    ats_cfg = cfg.clone()
    ats_cfg.defrost()
    ats_cfg.UNSAM.ATS.TASKS = ats_task_names(cfg)
    sampler = build_ats_sampler(ats_cfg, len(dicts), items_per_iteration=per_rank)
    mapper = mapper if mapper is not None else UnSAMDatasetMapper(cfg, is_train=True)
    loader = build_ats_train_loader(TaskMapDataset(dicts, mapper, sampler.task_space), sampler, per_rank,
                                    cfg.DATALOADER.NUM_WORKERS)
    loader.ats_sampler = sampler
    logger.info("ATS: %d images x %d tasks, adaptive from iteration %d", len(dicts), len(sampler.task_space),
                sampler.start_iter)
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
        import unsam.modeling  # noqa: F401  (fills detectron2's registries)

        return super().build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer_for(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_scheduler_for(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader, or the ATS loader (``UNSAM.ATS.ENABLED``); wrapped for ViSA."""
        if cfg.UNSAM.ATS.ENABLED:
            loader = build_ats_loader(cfg)
        else:
            loader = build_detection_train_loader(cfg, mapper=UnSAMDatasetMapper(cfg, is_train=True))
        if cfg.UNSAM.VISA.ENABLED:
            loader = VisaBatchLoader(loader, VisaState.from_config(cfg))
        return loader

    @property
    def ats_sampler(self) -> "AdaptiveTaskSampler | None":
        return getattr(self._trainer.data_loader, "ats_sampler", None)

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
            extra.append(ATSFeedbackHook(sampler, ats.SYNC_PERIOD, ats.DIFFICULTY, self.cfg.SOLVER.CHECKPOINT_PERIOD))
            # saved with every checkpoint and restored by --resume (fvcore loads checkpointables)
            self.checkpointer.checkpointables["ats_sampler"] = sampler
        if extra:
            at = next((i for i, h in enumerate(ret) if isinstance(h, (d2_hooks.PeriodicCheckpointer,
                                                                       d2_hooks.EvalHook,
                                                                       d2_hooks.PeriodicWriter))), len(ret))
            ret[at:at] = extra
        return ret

    def resume_or_load(self, resume=True):
        """detectron2's resume, then the ATS loader restarts from the restored sampler position.

        detectron2's ``SimpleTrainer`` creates the loader iterator in its constructor, before the
        checkpoint is loaded; a prefetching iterator would already hold batches of the old stream.
        A resume past the last iteration from any file but ``model_final.pth`` (lost to a kill
        while it was written) writes it now: no step will run to write it.
        """
        super().resume_or_load(resume=resume)
        resumed = os.path.basename(self.checkpointer.resumed_from)
        if resume and self.start_iter >= self.max_iter and resumed and resumed != "model_final.pth":
            logger.warning("training had finished but model_final.pth is missing or unreadable; "
                           "writing it from %s", resumed)
            self.checkpointer.save("model_final", iteration=self.start_iter - 1)
        sampler = self.ats_sampler
        if sampler is None:
            return
        if sampler.iteration != self.start_iter:
            if self.start_iter > 0:
                logger.warning("ATS: the checkpoint has no sampler state; continuing the sampler from "
                               "iteration %d (not the uninterrupted stream)", self.start_iter)
            sampler.set_iteration(self.start_iter)
        self._trainer._data_loader_iter = iter(self._trainer.data_loader)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=UnSAMDatasetMapper(cfg, is_train=False))

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
        for task, metrics in (tasks.items() if isinstance(tasks, dict) else []):
            if isinstance(metrics, dict):
                for k, v in metrics.items():
                    flat[f"{dataset}/{task}/{k}"] = float(v)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with EventStorage(iteration) as storage:
        storage.put_scalars(**flat, smoothing_hint=False)
        writer = JSONWriter(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))
        writer.write()
        writer.close()
