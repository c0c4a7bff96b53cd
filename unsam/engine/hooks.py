"""Training hooks for UnSAM's two training aids: the ViSA schedule and the ATS difficulty feedback.

Both act in the main process around the training model
(:class:`~unsam.engine.train_model.UnSAMTrain`):

* :class:`VisaScheduleHook` publishes the iteration before every step to ViSA's two consumers:
  the training loader's :class:`~unsam.data.visa_transforms.VisaBatchLoader` (granularity
  curriculum + boundary-band ``gt_mask_weights`` of the next batch) and the (unwrapped) training
  model (``UnSAMTrain.set_visa_iteration``), which owns ViSA's schedule (``UnSAMTrain.visa``, from
  the config) and reads its semantic-guidance weight at that iteration.
* :class:`ATSFeedbackHook` measures a per-sample difficulty of every training step and feeds the
  :class:`~unsam.data.ats.AdaptiveTaskSampler`'s difficulty table (``update`` → ``sync`` every
  ``SYNC_PERIOD`` → ``set_iteration``). It observes the model through PyTorch module hooks, not
  through model code: a forward *pre*-hook on the model records the batch's ``ats_index`` /
  ``ats_task_id``, a forward hook on ``model.criterion`` sees the predictions and the targets and
  scores each image (see :func:`per_image_difficulty`: the matcher's mask costs and assignment,
  :mod:`unsam.modeling.matcher`). Models without a ``criterion`` fall back
  to the batch's total loss, assigned to every sample of the batch.

Register both before detectron2's ``PeriodicCheckpointer`` (``Trainer.build_hooks`` does) so a
checkpoint written after step ``it`` holds the sampler state of iteration ``it + 1``.
"""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import unsam.compat  # noqa: F401

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.engine import HookBase

from ..data.visa_transforms import VisaBatchLoader
from ..modeling.matcher import batch_mask_cost, hungarian_match
from ..utils.dist import unwrap_model

logger = logging.getLogger(__name__)

__all__ = [
    "VisaScheduleHook",
    "ATSFeedbackHook",
    "per_image_difficulty",
    "per_prompt_difficulty",
]

# predictions / targets are compared on at most this grid (per side): difficulty is a ranking
# signal, a coarse grid ranks images the same at a fraction of the cost
_DIFFICULTY_MAX_SIDE = 64


# ---------------------------------------------------------------------------------------------
# ViSA
# ---------------------------------------------------------------------------------------------
class VisaScheduleHook(HookBase):
    """Advances ViSA's two consumers to the current iteration and logs the schedule.

    Before every step: ``batch_loader.iteration = it`` (curriculum + boundary weights of the next
    batch) and ``model.set_visa_iteration(it)`` on the unwrapped training model (semantic
    guidance inside its forward, with its own ``visa`` schedule). After the step the three part
    weights go to the event storage as ``visa/curriculum``, ``visa/boundary``, ``visa/guidance``.
    """

    def __init__(self, batch_loader: Optional[VisaBatchLoader] = None):
        self.batch_loader = batch_loader

    def before_step(self):
        it = self.trainer.iter
        if self.batch_loader is not None:
            self.batch_loader.iteration = it
        unwrap_model(self.trainer.model).set_visa_iteration(it)

    def after_step(self):
        w = unwrap_model(self.trainer.model).visa.weights(self.trainer.iter)
        self.trainer.storage.put_scalars(
            **{
                "visa/curriculum": w.curriculum,
                "visa/boundary": w.boundary,
                "visa/guidance": w.guidance,
            },
            smoothing_hint=False,
        )


# ---------------------------------------------------------------------------------------------
# ATS
# ---------------------------------------------------------------------------------------------
def _coarse(x: torch.Tensor, size) -> torch.Tensor:
    """N×H×W → N×h×w by area averaging (N may be 0)."""
    if x.shape[0] == 0:
        return x.new_zeros((0, *size))
    return F.interpolate(x[:, None], size=size, mode="area")[:, 0]


def _coarse_logits(pred_masks: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """B×Q×h×w logits → float32 logits at most :data:`_DIFFICULTY_MAX_SIDE` per side, and that
    size."""
    pred = pred_masks.detach().float()
    h, w = pred.shape[-2:]
    scale = min(1.0, _DIFFICULTY_MAX_SIDE / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size != (h, w):
        pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
    return pred, size


@torch.no_grad()
def per_image_difficulty(
    outputs: Dict, targets: List[Dict], kind: str = "loss"
) -> List[Optional[float]]:
    """Difficulty of each image of a batch from the final prediction and the criterion targets.

    Every target is matched one-to-one to a query on a coarse grid (at most 64 px per side, the
    padded batch's field of view on both sides) with the matcher's mask cost and assignment
    (:func:`~unsam.modeling.matcher.batch_mask_cost`: sigmoid BCE + dice, without the class
    term; :func:`~unsam.modeling.matcher.hungarian_match`).

    Args:
        outputs: the criterion's ``outputs`` (``pred_masks`` B×Q×h×w logits).
        targets: the criterion's targets (per image ``masks`` N×Hp×Wp bool).
        kind: ``"loss"``: mean matched BCE + dice; ``"iou"``: 1 − mean matched mask IoU.
    Returns:
        B values; ``None`` for an image without targets (nothing to measure).
    """
    if kind not in ("loss", "iou"):
        raise ValueError(f"UNSAM.ATS.DIFFICULTY must be 'loss' or 'iou', got {kind!r}")
    pred, size = _coarse_logits(outputs["pred_masks"])  # B×Q×h×w
    out: List[Optional[float]] = []
    # called inside the AMP forward: float32 costs (float16 BCE sums overflow)
    with torch.autocast(pred.device.type, enabled=False):
        for b, t in enumerate(targets):
            masks = t["masks"]
            if masks.shape[0] == 0:
                out.append(None)
                continue
            tgt = (
                (_coarse(masks.to(pred.device, torch.float32), size) >= 0.5).float().flatten(1)
            )  # N×P
            logits = pred[b].flatten(1)  # Q×P
            cost = batch_mask_cost(logits, tgt).cpu()  # Q×N
            rows, cols = hungarian_match(cost)
            if kind == "loss":
                out.append(float(cost[rows, cols].mean()))
            else:
                hard = (logits[rows] > 0).float()
                inter = (hard * tgt[cols]).sum(1)
                union = hard.sum(1) + tgt[cols].sum(1) - inter
                iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
                out.append(float(1.0 - iou.mean()))
    return out


@torch.no_grad()
def per_prompt_difficulty(
    outputs: Dict, targets: List[torch.Tensor], kind: str = "loss"
) -> List[Optional[float]]:
    """Difficulty of each prompt from the prompt criterion's inputs: how far the BEST of its K
    outputs is from the closest of the masks it may mean (a prompt is answered well when one
    granularity fits).

    Args:
        outputs: ``pred_masks`` N×K×h×w logits (N prompts).
        targets: N bool tensors T_i×Hp×Wp.
        kind: ``"loss"``: min over (output, target) of BCE + dice; ``"iou"``: 1 − max mask IoU.
    Returns:
        N values; ``None`` for a prompt without targets.
    """
    if kind not in ("loss", "iou"):
        raise ValueError(f"UNSAM.ATS.DIFFICULTY must be 'loss' or 'iou', got {kind!r}")
    pred, size = _coarse_logits(outputs["pred_masks"])  # N×K×h×w
    out: List[Optional[float]] = []
    with torch.autocast(pred.device.type, enabled=False):  # float32, as above
        for logits, tgt in zip(pred.flatten(2), targets):
            if tgt.shape[0] == 0:
                out.append(None)
                continue
            t = (_coarse(tgt.to(pred.device, torch.float32), size) >= 0.5).float().flatten(1)  # T×P
            if kind == "loss":
                out.append(float(batch_mask_cost(logits, t).min()))  # K×T: the matcher's cost
            else:
                hard = (logits > 0).float()
                inter = hard @ t.T
                union = hard.sum(1, keepdim=True) + t.sum(1)[None] - inter
                iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
                out.append(float(1.0 - iou.max()))
    return out


class ATSFeedbackHook(HookBase):
    """Reports per-sample difficulties to the ATS difficulty table after every step.

    Whole-image samples are scored from ``model.criterion``'s inputs
    (:func:`per_image_difficulty`), prompt samples from ``model.prompt_criterion``'s
    (:func:`per_prompt_difficulty`, averaged over the image's prompts). Outputs that carry a
    ``batch_index`` (the model's mixed-task training) say which batch element each image or
    prompt belongs to; without it the criterion saw the whole batch in order.

    After step ``it``: ``table.update(indices, task_ids, difficulties)``; ``table.sync()`` every
    ``sync_period`` steps and before every step whose end writes a checkpoint (so no observation
    is lost from a checkpoint); ``sampler.set_iteration(it + 1)``.

    Args:
        sampler: the :class:`~unsam.data.ats.AdaptiveTaskSampler` the training loader draws from.
        sync_period: ``UNSAM.ATS.SYNC_PERIOD``.
        difficulty: ``UNSAM.ATS.DIFFICULTY`` (``"loss"`` or ``"iou"``, see
            :func:`per_image_difficulty`).
        checkpoint_period: ``SOLVER.CHECKPOINT_PERIOD`` (0: none), to sync before saves.
    """

    def __init__(
        self, sampler, sync_period: int = 1, difficulty: str = "loss", checkpoint_period: int = 0
    ):
        if sync_period < 1:
            raise ValueError(f"UNSAM.ATS.SYNC_PERIOD must be >= 1, got {sync_period}")
        if difficulty not in ("loss", "iou"):
            raise ValueError(f"UNSAM.ATS.DIFFICULTY must be 'loss' or 'iou', got {difficulty!r}")
        self.sampler = sampler
        self.table = sampler.table
        self.sync_period = int(sync_period)
        self.difficulty = difficulty
        self.checkpoint_period = int(checkpoint_period)
        self._handles = []
        self._batch_keys: Optional[List] = None
        self._batch_difficulty: Optional[Dict[int, List[float]]] = None  # batch element → values
        self._batch_loss: Optional[float] = None
        self._warned_fallback = False

    # ---- module hooks (run inside the model's forward, main process) ---------------------------
    def _on_model_input(self, module, args, kwargs=None):
        if not module.training or not args:
            return
        batch = args[0]
        if (
            isinstance(batch, (list, tuple))
            and batch
            and isinstance(batch[0], dict)
            and "ats_index" in batch[0]
        ):
            self._batch_keys = [(int(x["ats_index"]), int(x["ats_task_id"])) for x in batch]
            self._batch_difficulty, self._batch_loss = None, None

    def _on_criterion(self, module, args, output):
        self._record(module, args, per_image_difficulty)

    def _on_prompt_criterion(self, module, args, output):
        self._record(module, args, per_prompt_difficulty)

    def _record(self, module, args, measure):
        if not module.training or len(args) < 2 or self._batch_keys is None:
            return
        outputs, targets = args[0], args[1]
        owners = outputs.get("batch_index", range(len(targets)))
        if len(owners) != len(targets) or (owners and max(owners) >= len(self._batch_keys)):
            return
        values = measure(outputs, targets, self.difficulty)
        if self._batch_difficulty is None:
            self._batch_difficulty = {}
        for owner, v in zip(owners, values):
            if v is not None:
                self._batch_difficulty.setdefault(int(owner), []).append(v)

    def _on_model_output(self, module, args, output):
        if module.training and isinstance(output, dict) and output:
            self._batch_loss = float(sum(v.detach().float().sum() for v in output.values()))

    def before_train(self):
        model = unwrap_model(self.trainer.model)
        self._handles.append(model.register_forward_pre_hook(self._on_model_input))
        criterion = getattr(model, "criterion", None)
        if isinstance(criterion, torch.nn.Module):
            self._handles.append(criterion.register_forward_hook(self._on_criterion))
            prompt_criterion = getattr(model, "prompt_criterion", None)
            if isinstance(prompt_criterion, torch.nn.Module):
                self._handles.append(
                    prompt_criterion.register_forward_hook(self._on_prompt_criterion)
                )
        else:
            self._handles.append(model.register_forward_hook(self._on_model_output))
        if self.sampler.iteration != self.trainer.start_iter:
            # Trainer.resume_or_load aligns them; a mismatch means the loader's position and the
            # training iteration disagree, and the resume point saved next would be wrong
            logger.warning(
                "ATS: sampler at iteration %d, training starts at %d",
                self.sampler.iteration,
                self.trainer.start_iter,
            )

    def after_step(self):
        it = self.trainer.iter
        keys = self._batch_keys
        if keys:
            values: Sequence[Optional[float]]
            if self._batch_difficulty is not None:
                values = [
                    float(np.mean(self._batch_difficulty[i]))
                    if i in self._batch_difficulty
                    else None
                    for i in range(len(keys))
                ]
            else:
                if not self._warned_fallback:
                    logger.warning(
                        "ATS: no per-image difficulty from the model's criterion; "
                        "using the batch's total loss for every sample"
                    )
                    self._warned_fallback = True
                values = [self._batch_loss] * len(keys)
            pairs = [(k, v) for k, v in zip(keys, values) if v is not None]
            if pairs:
                self.table.update(
                    [k[0] for k, _ in pairs], [k[1] for k, _ in pairs], [v for _, v in pairs]
                )
                self.trainer.storage.put_scalar(
                    "ats/difficulty", float(np.mean([v for _, v in pairs])), smoothing_hint=True
                )
        self._batch_keys, self._batch_difficulty, self._batch_loss = None, None, None
        done = it + 1
        saving = self.checkpoint_period > 0 and done % self.checkpoint_period == 0
        if done % self.sync_period == 0 or saving or done >= self.trainer.max_iter:
            self.table.sync()  # collective: every rank reaches this line at the same iteration
        self.sampler.set_iteration(done)
        self.trainer.storage.put_scalar(
            "ats/adaptive", float(self.sampler.adaptive), smoothing_hint=False
        )

    def after_train(self):
        for h in self._handles:
            h.remove()
        self._handles = []
