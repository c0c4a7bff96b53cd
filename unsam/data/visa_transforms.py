"""ViSA's batch transforms: the granularity curriculum and the boundary-relaxed mask weights.

The two target-side parts of ViSA (:mod:`unsam.modeling.visa` has the schedule and the
model-side semantic guidance loss) rewrite a training batch's ``instances`` right before the
model sees them, at the current training iteration:

1. **Granularity curriculum** (:func:`allowed_depth`, :func:`select_targets_by_level`,
   :func:`curriculum_keep`): only the coarse levels of the pseudo-label hierarchy are targets
   early on (a part only when its parent is also kept); the allowed depth grows as the schedule
   weight decays.
2. **Boundary-relaxed mask loss** (:func:`boundary_band_weights`, :func:`boundary_weights`):
   pixels in a thin band around a pseudo-mask boundary get a reduced weight, carried as the
   instances' ``gt_mask_weights`` (N×H×W) that the criterion takes as ``mask_weights``.

They depend on the iteration, which loader workers do not know, so they run in the main process
on whole batches: :class:`VisaBatchLoader` wraps the training loader and applies
:func:`apply_visa` to each batch when it is drawn, at the iteration the trainer's
:class:`~unsam.engine.hooks.VisaScheduleHook` sets before every step.

``visa`` arguments are :class:`unsam.modeling.visa.VisaState` objects (the ``UNSAM.VISA.*``
config and its schedule); only their schedule (``weights(iteration)``) and settings are read, so
this module imports nothing from the model.

Hierarchy convention (as written by the pseudo-label engine into SA-1B JSON): ``level`` 0 is the
coarsest granularity and a part's level is larger than its parent's; ``parent_id`` is the
annotation id of the enclosing region, -1 for a root. :func:`parent_indices` maps ids to row
indices of the target list (the mapper's ``gt_parents``).
"""

import logging
import math
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "allowed_depth",
    "parent_indices",
    "select_targets_by_level",
    "boundary_band_weights",
    "curriculum_keep",
    "boundary_weights",
    "apply_visa_to_instances",
    "apply_visa",
    "VisaBatchLoader",
]


# ---------------------------------------------------------------------------------------------
# granularity curriculum
# ---------------------------------------------------------------------------------------------
def allowed_depth(weight: float, max_level: int, min_depth: int = 0) -> int:
    """Deepest hierarchy level allowed as a target when the schedule weight is ``weight``.

    The range ``[min_depth, max_level]`` is released in equal steps of the weight: weight 1 allows
    only ``min_depth``; each further ``1 / (max_level - min_depth + 1)`` of decay adds one level;
    weight 0 allows everything (``max_level``).
    """
    if max_level <= min_depth:
        return max(max_level, min_depth)
    w = min(max(float(weight), 0.0), 1.0)
    steps = max_level - min_depth + 1
    return min(max_level, min_depth + int(math.floor((1.0 - w) * steps)))


def parent_indices(ids: Sequence[int], parent_ids: Sequence[int]) -> torch.Tensor:
    """Map annotation ``parent_id`` values to row indices of the same target list.

    Args:
        ids: annotation id of each of the N targets.
        parent_ids: ``parent_id`` of each target (-1: root).
    Returns:
        LongTensor N: index of the parent row, -1 for roots and for parents that are not in the
        list (e.g. dropped by cropping), which then count as roots.
    """
    row = {int(i): r for r, i in enumerate(ids)}
    return torch.tensor(
        [row.get(int(p), -1) if int(p) >= 0 else -1 for p in parent_ids], dtype=torch.long
    )


def select_targets_by_level(
    levels: torch.Tensor,
    parents: Optional[torch.Tensor],
    weight: float,
    max_level: Optional[int] = None,
    min_depth: int = 0,
) -> torch.Tensor:
    """Keep mask of the granularity curriculum.

    A target is kept when its level is at most :func:`allowed_depth` and (when ``parents`` is
    given) its parent is kept too, so parts never enter before the region that contains them.
    If that keeps nothing (an image whose coarse regions were cropped away) the coarsest level
    present is kept, so no image loses all its targets.

    Args:
        levels: LongTensor N, hierarchy level per target (0 = coarsest).
        parents: LongTensor N of parent row indices (-1 = root), see :func:`parent_indices`;
            ``None`` to use levels only.
        weight: ViSA schedule weight in [0, 1]; 0 keeps every target.
        max_level: deepest level of the hierarchy; ``None`` or < 0: the deepest level present.
        min_depth: levels ``<= min_depth`` are always allowed.
    Returns:
        BoolTensor N (on ``levels.device``).
    """
    levels = torch.as_tensor(levels, dtype=torch.long)
    n = levels.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=levels.device)
    if max_level is None or max_level < 0:
        max_level = int(levels.max())
    depth = allowed_depth(weight, max_level, min_depth)
    keep = levels <= depth
    if parents is not None:
        parents = torch.as_tensor(parents, dtype=torch.long, device=levels.device)
        if parents.shape != levels.shape:
            raise ValueError(
                f"parents shape {tuple(parents.shape)} != levels {tuple(levels.shape)}"
            )
        has_parent = (parents >= 0) & (parents < n)
        safe = parents.clamp(0, n - 1)
        # propagate "parent dropped" down the tree; keep only shrinks, so this ends within n rounds
        # even for a malformed (cyclic) parent list
        for _ in range(n):
            new_keep = keep & (~has_parent | keep[safe])
            if torch.equal(new_keep, keep):
                break
            keep = new_keep
    if not bool(keep.any()):
        keep = levels == levels.min()
    return keep


# ---------------------------------------------------------------------------------------------
# boundary-relaxed mask loss
# ---------------------------------------------------------------------------------------------
def _square_max(x: torch.Tensor, r: int) -> torch.Tensor:
    """Max over a (2r+1)×(2r+1) window of N×1×H×W, as two 1-D passes (2k work instead of k²).

    max_pool pads with -inf, so pixels outside the image never count as the opposite label.
    """
    k = 2 * r + 1
    x = F.max_pool2d(x, (1, k), stride=1, padding=(0, r))
    return F.max_pool2d(x, (k, 1), stride=1, padding=(r, 0))


def _band_cpu(masks: np.ndarray, r: int) -> np.ndarray:
    """The boundary band of N×H×W bool masks with OpenCV's uint8 morphology: ~10× faster than
    max-pooling float maps on CPU. OpenCV's default border never counts as the opposite label."""
    kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    band = np.empty(masks.shape, bool)
    for i, m in enumerate(masks.astype(np.uint8)):
        band[i] = cv2.dilate(m, kernel) != cv2.erode(m, kernel)
    return band


def boundary_band_weights(
    masks: torch.Tensor, width: int, min_weight: float, strength: float
) -> torch.Tensor:
    """Per-pixel loss weights that relax a band around each mask boundary.

    A pixel is in the band when a pixel of the opposite label lies within Chebyshev distance
    ``width`` (so ``width=1`` marks the inner and the outer one-pixel ring of a mask). The image
    border is not a boundary: a mask touching it is not relaxed there.

    Args:
        masks: BoolTensor N×H×W.
        width: band half-width in pixels (0 disables).
        min_weight: weight of band pixels at full strength.
        strength: in [0, 1], band weight is ``lerp(1, min_weight, strength)``.
    Returns:
        FloatTensor N×H×W (float32, on ``masks.device``), 1 outside the band.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be N×H×W, got shape {tuple(masks.shape)}")
    weights = torch.ones(masks.shape, dtype=torch.float32, device=masks.device)
    if width <= 0 or strength <= 0 or masks.numel() == 0:
        return weights
    if masks.device.type == "cpu":
        band = torch.from_numpy(_band_cpu(masks.numpy(), int(width)))
    else:
        m = masks.to(torch.float32).unsqueeze(1)
        band = (_square_max(m, int(width)) != -_square_max(-m, int(width))).squeeze(1)
    band_weight = 1.0 + float(strength) * (float(min_weight) - 1.0)
    return torch.where(band, torch.full_like(weights, band_weight), weights)


# ---------------------------------------------------------------------------------------------
# the schedule applied
# ---------------------------------------------------------------------------------------------
def curriculum_keep(
    visa, levels: torch.Tensor, parents: Optional[torch.Tensor], iteration: int
) -> torch.Tensor:
    """BoolTensor N: the targets to train on at ``iteration`` (all True when the curriculum is
    inactive). ``visa``: the :class:`~unsam.modeling.visa.VisaState`."""
    levels = torch.as_tensor(levels, dtype=torch.long)
    w = visa.weights(iteration).curriculum
    if w <= 0:
        return torch.ones(levels.shape, dtype=torch.bool, device=levels.device)
    max_level = visa.max_level if visa.max_level >= 0 else None
    return select_targets_by_level(levels, parents, w, max_level, visa.min_depth)


def boundary_weights(visa, masks: torch.Tensor, iteration: int) -> Optional[torch.Tensor]:
    """N×H×W float weights for the criterion's ``mask_weights`` (``masks``: N×H×W bool), or
    ``None`` when the boundary part is inactive at ``iteration``."""
    w = visa.weights(iteration).boundary
    if w <= 0:
        return None
    return boundary_band_weights(masks, visa.boundary_width, visa.boundary_min_weight, w)


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
def apply_visa_to_instances(instances, visa, iteration: int):
    """Granularity curriculum + boundary weights for one image's training ``Instances``.

    Args:
        instances: detectron2 ``Instances`` with ``gt_masks`` (BitMasks N×H×W) and optionally
            ``gt_levels`` / ``gt_parents`` (LongTensor N, parent = row index or -1), as written by
            :class:`unsam.data.mapper.UnSAMDatasetMapper`.
        visa: the :class:`~unsam.modeling.visa.VisaState`.
        iteration: current training iteration.
    Returns:
        ``instances`` itself when no part is active; else a new ``Instances`` holding the kept
        targets (``gt_parents`` re-indexed into the kept list) and, when the boundary part is
        active, ``gt_mask_weights`` float32 K×H×W (what the criterion takes as ``mask_weights``).
    """
    w = visa.weights(iteration)
    if w.curriculum <= 0 and w.boundary <= 0:
        return instances
    out = instances
    if w.curriculum > 0 and instances.has("gt_levels") and len(instances) > 0:
        parents = instances.gt_parents if instances.has("gt_parents") else None
        keep = curriculum_keep(visa, instances.gt_levels, parents, iteration)
        if not bool(keep.all()):
            out = instances[keep]
            if parents is not None:
                # row indices shift when rows are dropped; a dropped parent becomes -1 (root)
                new_row = torch.full((len(instances),), -1, dtype=torch.long, device=keep.device)
                new_row[keep] = torch.arange(int(keep.sum()), device=keep.device)
                old = parents[keep]
                out.gt_parents = torch.where(old >= 0, new_row[old.clamp(min=0)], old)
    if w.boundary > 0:
        masks = out.gt_masks.tensor if hasattr(out.gt_masks, "tensor") else out.gt_masks
        weights = boundary_weights(visa, masks.bool(), iteration)
        if weights is not None:
            if out is instances:  # never modify the caller's object in place
                out = _copy_instances(instances)
            out.gt_mask_weights = weights
    return out


def _copy_instances(instances):
    """Shallow copy of a detectron2 ``Instances`` (same field tensors, new field dict)."""
    new = type(instances)(instances.image_size)
    for k, v in instances.get_fields().items():
        new.set(k, v)
    return new


def apply_visa(batched_inputs, visa, iteration: int):
    """ViSA pre-processing of a training batch (main process, right before the model forward).

    Args:
        batched_inputs: list of dataset dicts (``instances`` as produced by the mapper).
        visa: the :class:`~unsam.modeling.visa.VisaState`.
        iteration: current training iteration.
    Returns:
        the **same list object** when ViSA's curriculum and boundary parts are inactive at
        ``iteration`` (so a disabled ViSA leaves the batch untouched, bit for bit); otherwise a
        new list of shallow-copied dicts whose ``instances`` went through
        :func:`apply_visa_to_instances`.
    """
    w = visa.weights(iteration)
    if w.curriculum <= 0 and w.boundary <= 0:
        return batched_inputs
    out = []
    for x in batched_inputs:
        if "instances" in x:
            x = dict(x)
            x["instances"] = apply_visa_to_instances(x["instances"], visa, iteration)
        out.append(x)
    return out


class VisaBatchLoader:
    """Iterable over training batches with ViSA's target transforms applied.

    ``apply_visa(batch, visa, self.iteration)`` runs lazily when a batch is drawn (in the
    trainer's ``run_step``, main process), so ``iteration`` must be set before each step
    (:class:`~unsam.engine.hooks.VisaScheduleHook` does). Other attributes (e.g.
    ``ats_sampler``) are those of the wrapped loader.
    """

    def __init__(self, loader, visa):
        self.loader = loader
        self.visa = visa
        self.iteration = 0

    def __iter__(self):
        for batch in self.loader:
            yield apply_visa(batch, self.visa, self.iteration)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        # only reached for attributes not found on the wrapper itself
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)
