"""ViSA — visual-guided semantic augmentation.

Early in training, pseudo labels are most trustworthy at the level of *semantic regions* (whole
objects, coherent stuff) and least trustworthy at fine parts and exact boundaries. ViSA steers the
model toward regions first and releases it later, with three parts that share one schedule
(:func:`visa_weight`: 1 before ``START_ITER``, decaying to 0 at ``END_ITER``):

1. **Granularity curriculum** (:func:`allowed_depth`, :func:`select_targets_by_level`): only the
   coarse levels of the pseudo-label hierarchy are used as targets early on (a part only when its
   parent is also kept); the allowed depth grows as the weight decays.
2. **Boundary-relaxed mask loss** (:func:`boundary_band_weights`): pixels in a thin band around a
   pseudo-mask boundary get a reduced weight in the mask BCE/dice terms. The criterion takes them
   as the optional per-target ``mask_weights`` (N×H×W).
3. **Semantic guidance loss** (:func:`semantic_guidance_loss`): the cosine affinities of the
   pixel decoder's mask features at sampled points are pulled toward the affinities of
   self-supervised guidance features (DINO or the classical backend of ``unsam.pseudo``).

:class:`VisaState` turns the ``UNSAM.VISA.*`` config into these pieces for a given iteration.
With ``UNSAM.VISA.ENABLED = False`` (or after ``END_ITER``) every weight is 0, the curriculum
keeps every target, :meth:`VisaState.mask_weights` returns ``None`` and
:meth:`VisaState.guidance_loss` returns ``None`` — the caller then runs exactly the plain path.

Hierarchy convention (as written by the pseudo-label engine into SA-1B JSON): ``level`` 0 is the
coarsest granularity and a part's level is larger than its parent's; ``parent_id`` is the
annotation id of the enclosing region, -1 for a root. :func:`parent_indices` maps ids to row
indices of the target list.
"""
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "visa_weight",
    "allowed_depth",
    "parent_indices",
    "select_targets_by_level",
    "boundary_band_weights",
    "semantic_guidance_loss",
    "VisaWeights",
    "VisaState",
    "apply_visa",
    "apply_visa_to_instances",
    "guidance_loss_from_outputs",
]


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------
def visa_weight(iteration: int, start: int, end: int, decay: str = "linear") -> float:
    """The ViSA schedule: 1 before ``start``, decaying to 0 at ``end``, 0 from ``end`` on.

    Args:
        iteration: current training iteration (0-based).
        start, end: decay window ``[start, end)``. ``end <= start`` gives a step (1 then 0).
        decay: ``"linear"`` (1 - t) or ``"cosine"`` ((1 + cos(pi t)) / 2), t = progress in [0, 1).
    Returns:
        weight in [0, 1].
    """
    if decay not in ("linear", "cosine"):
        raise ValueError(f"UNSAM.VISA.DECAY must be 'linear' or 'cosine', got {decay!r}")
    if iteration < start:
        return 1.0
    if iteration >= end:
        return 0.0
    t = (iteration - start) / float(end - start)
    if decay == "linear":
        return 1.0 - t
    return 0.5 * (1.0 + math.cos(math.pi * t))


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
    return torch.tensor([row.get(int(p), -1) if int(p) >= 0 else -1 for p in parent_ids],
                        dtype=torch.long)


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
# semantic guidance loss
# ---------------------------------------------------------------------------------------------
def _sample_points(
    batch: int,
    num_points: int,
    valid: Optional[torch.Tensor],
    device: torch.device,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """B×P×2 point coordinates (x, y) in [0, 1], uniform over the map or over ``valid`` pixels."""
    gen_device = generator.device if generator is not None else device
    if valid is None:
        return torch.rand(batch, num_points, 2, generator=generator, device=gen_device).to(device)
    b, h, w = valid.shape
    probs = valid.reshape(b, h * w).to(torch.float32).to(gen_device)
    empty = probs.sum(dim=1) == 0
    probs[empty] = 1.0  # an image with no valid pixel falls back to the whole map
    flat = torch.multinomial(probs, num_points, replacement=True, generator=generator)
    jitter = torch.rand(b, num_points, 2, generator=generator, device=gen_device)
    x = ((flat % w).to(torch.float32) + jitter[..., 0]) / w
    y = ((flat // w).to(torch.float32) + jitter[..., 1]) / h
    return torch.stack([x, y], dim=-1).to(device)


def _point_features(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear features B×C×H×W at points B×P×2 in [0, 1] → L2-normalised B×P×C."""
    grid = (2.0 * points - 1.0).unsqueeze(2).to(features.dtype)  # B×P×1×2, align_corners=False
    sampled = F.grid_sample(features, grid, mode="bilinear", align_corners=False)  # B×C×P×1
    return F.normalize(sampled.squeeze(-1).transpose(1, 2), dim=-1, eps=1e-6)


def semantic_guidance_loss(
    mask_features: torch.Tensor,
    guidance: torch.Tensor,
    num_points: int,
    generator: Optional[torch.Generator] = None,
    loss: str = "kl",
    temperature: float = 0.1,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Affinity-matching loss between mask features and self-supervised guidance features.

    ``num_points`` points per image are sampled (same points in both maps, which must cover the
    same field of view at any resolution); at those points the P×P cosine-affinity matrix of the
    mask features is compared with that of the guidance features (guidance is not back-propagated).

    * ``loss="kl"``: KL(softmax(A_g / T) || softmax(A_f / T)) per row, self-affinity excluded.
      Invariant to a constant shift of a row, which matters because self-supervised features have
      a positive baseline similarity that the mask features need not copy.
    * ``loss="mse"``: mean squared difference of the two affinity matrices.

    Args:
        mask_features: B×C×h×w (pixel decoder output).
        guidance: B×D×h'×w' (e.g. DINO patch features or the classical features).
        num_points: P, points per image (>= 2).
        generator: optional torch.Generator for the point sampling (on the features' device).
        loss: ``"kl"`` or ``"mse"``.
        temperature: softmax temperature for ``"kl"``.
        valid: optional BoolTensor B×h×w of mask_features pixels to sample from (e.g. excluding
            batch padding); ``None``: the whole map.
    Returns:
        0-dim tensor, mean over images; exactly 0 when mask_features equals guidance.
    """
    if mask_features.dim() != 4 or guidance.dim() != 4:
        raise ValueError("mask_features and guidance must be B×C×H×W tensors")
    if mask_features.shape[0] != guidance.shape[0]:
        raise ValueError(f"batch sizes differ: {mask_features.shape[0]} vs {guidance.shape[0]}")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    if loss not in ("kl", "mse"):
        raise ValueError(f"UNSAM.VISA.GUIDANCE.LOSS must be 'kl' or 'mse', got {loss!r}")
    b = mask_features.shape[0]
    points = _sample_points(b, num_points, valid, mask_features.device, generator)
    feat = _point_features(mask_features, points)  # B×P×C
    with torch.no_grad():
        guide = _point_features(guidance.to(mask_features.device, mask_features.dtype), points)
    aff_f = feat @ feat.transpose(1, 2)  # B×P×P, cosine affinities
    aff_g = guide @ guide.transpose(1, 2)
    if loss == "mse":
        return ((aff_f - aff_g) ** 2).mean()
    eye = torch.eye(num_points, dtype=torch.bool, device=aff_f.device)
    # the diagonal is 1 in both; leaving it in would let it dominate every row's softmax
    logits_f = (aff_f / temperature).masked_fill(eye, float("-inf"))
    logits_g = (aff_g / temperature).masked_fill(eye, float("-inf"))
    log_p_f = F.log_softmax(logits_f, dim=-1)
    log_p_g = F.log_softmax(logits_g, dim=-1)
    p_g = log_p_g.exp()
    # masked entries have p_g = 0; zero them explicitly to avoid 0 * (-inf - -inf) = nan
    kl = torch.where(eye, torch.zeros_like(p_g), p_g * (log_p_g - log_p_f))
    return kl.sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# config → per-iteration helper
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisaWeights:
    """Strength of each ViSA part at one iteration (all 0 when ViSA is off)."""

    curriculum: float
    boundary: float
    guidance: float  # already multiplied by UNSAM.VISA.GUIDANCE.WEIGHT

    @property
    def active(self) -> bool:
        return self.curriculum > 0 or self.boundary > 0 or self.guidance > 0


class VisaState:
    """The ``UNSAM.VISA.*`` config as per-iteration operations.

    Typical use (model / hook side)::

        visa = VisaState.from_config(cfg)
        w = visa.weights(it)                                   # VisaWeights
        keep = visa.target_keep(levels, parents, it)           # BoolTensor N, filter targets
        mw = visa.mask_weights(gt_masks, it)                   # None or N×H×W → criterion
        lg = visa.guidance_loss(mask_features, guidance, it)   # None or weighted 0-dim loss

    Every method is a no-op (all-True keep mask, ``None``) when the corresponding weight is 0,
    so a disabled ViSA leaves the training path untouched.
    """

    def __init__(
        self,
        enabled: bool = False,
        start_iter: int = 0,
        end_iter: int = 1000,
        decay: str = "linear",
        curriculum_enabled: bool = True,
        min_depth: int = 0,
        max_level: int = -1,
        boundary_enabled: bool = True,
        boundary_width: int = 3,
        boundary_min_weight: float = 0.2,
        guidance_enabled: bool = True,
        guidance_weight: float = 1.0,
        guidance_num_points: int = 256,
        guidance_loss: str = "kl",
        guidance_temperature: float = 0.1,
    ):
        visa_weight(0, start_iter, end_iter, decay)  # validates `decay` early
        if guidance_loss not in ("kl", "mse"):
            raise ValueError(
                f"UNSAM.VISA.GUIDANCE.LOSS must be 'kl' or 'mse', got {guidance_loss!r}"
            )
        self.enabled = bool(enabled)
        self.start_iter = int(start_iter)
        self.end_iter = int(end_iter)
        self.decay = decay
        self.curriculum_enabled = bool(curriculum_enabled)
        self.min_depth = int(min_depth)
        self.max_level = int(max_level)
        self.boundary_enabled = bool(boundary_enabled)
        self.boundary_width = int(boundary_width)
        self.boundary_min_weight = float(boundary_min_weight)
        self.guidance_enabled = bool(guidance_enabled)
        self.guidance_weight = float(guidance_weight)
        self.guidance_num_points = int(guidance_num_points)
        self.guidance_loss_type = guidance_loss
        self.guidance_temperature = float(guidance_temperature)

    @classmethod
    def from_config(cls, cfg) -> "VisaState":
        v = cfg.UNSAM.VISA
        return cls(
            enabled=v.ENABLED,
            start_iter=v.START_ITER,
            end_iter=v.END_ITER,
            decay=v.DECAY,
            curriculum_enabled=v.CURRICULUM.ENABLED,
            min_depth=v.CURRICULUM.MIN_DEPTH,
            max_level=v.CURRICULUM.MAX_LEVEL,
            boundary_enabled=v.BOUNDARY.ENABLED,
            boundary_width=v.BOUNDARY.WIDTH,
            boundary_min_weight=v.BOUNDARY.MIN_WEIGHT,
            guidance_enabled=v.GUIDANCE.ENABLED,
            guidance_weight=v.GUIDANCE.WEIGHT,
            guidance_num_points=v.GUIDANCE.NUM_POINTS,
            guidance_loss=v.GUIDANCE.LOSS,
            guidance_temperature=v.GUIDANCE.TEMPERATURE,
        )

    @property
    def uses_guidance(self) -> bool:
        """Whether the semantic guidance loss is on at some iteration (the model then needs
        the training iteration, see ``UnSAM.set_visa_iteration``)."""
        return self.enabled and self.guidance_enabled and self.guidance_weight > 0

    def schedule(self, iteration: int) -> float:
        """Raw schedule value (0 when ViSA is disabled)."""
        if not self.enabled:
            return 0.0
        return visa_weight(iteration, self.start_iter, self.end_iter, self.decay)

    def weights(self, iteration: int) -> VisaWeights:
        s = self.schedule(iteration)
        return VisaWeights(
            curriculum=s if self.curriculum_enabled else 0.0,
            boundary=s if (self.boundary_enabled and self.boundary_width > 0) else 0.0,
            guidance=s * self.guidance_weight if self.guidance_enabled else 0.0,
        )

    def target_keep(
        self, levels: torch.Tensor, parents: Optional[torch.Tensor], iteration: int
    ) -> torch.Tensor:
        """BoolTensor N: targets to train on at ``iteration`` (all True when inactive)."""
        levels = torch.as_tensor(levels, dtype=torch.long)
        w = self.weights(iteration).curriculum
        if w <= 0:
            return torch.ones(levels.shape, dtype=torch.bool, device=levels.device)
        max_level = self.max_level if self.max_level >= 0 else None
        return select_targets_by_level(levels, parents, w, max_level, self.min_depth)

    def mask_weights(self, masks: torch.Tensor, iteration: int) -> Optional[torch.Tensor]:
        """N×H×W float weights for the criterion's ``mask_weights``, or ``None`` when inactive."""
        w = self.weights(iteration).boundary
        if w <= 0:
            return None
        return boundary_band_weights(masks, self.boundary_width, self.boundary_min_weight, w)

    def guidance_loss(
        self,
        mask_features: torch.Tensor,
        guidance: torch.Tensor,
        iteration: int,
        generator: Optional[torch.Generator] = None,
        valid: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """Schedule-weighted semantic guidance loss (0-dim), or ``None`` when inactive."""
        w = self.weights(iteration).guidance
        if w <= 0:
            return None
        loss = semantic_guidance_loss(
            mask_features,
            guidance,
            self.guidance_num_points,
            generator=generator,
            loss=self.guidance_loss_type,
            temperature=self.guidance_temperature,
            valid=valid,
        )
        return loss * w


# ---------------------------------------------------------------------------------------------
# integration: batch pre-processing (trainer side) and the guidance loss (model side)
# ---------------------------------------------------------------------------------------------
def apply_visa_to_instances(instances, visa_state: "VisaState", iteration: int):
    """Granularity curriculum + boundary weights for one image's training ``Instances``.

    Args:
        instances: detectron2 ``Instances`` with ``gt_masks`` (BitMasks N×H×W) and optionally
            ``gt_levels`` / ``gt_parents`` (LongTensor N, parent = row index or -1), as written by
            :class:`unsam.data.mapper.UnSAMDatasetMapper`.
        visa_state: the :class:`VisaState`.
        iteration: current training iteration.
    Returns:
        ``instances`` itself when no part is active; else a new ``Instances`` holding the kept
        targets (``gt_parents`` re-indexed into the kept list) and, when the boundary part is
        active, ``gt_mask_weights`` float32 K×H×W (what the criterion takes as ``mask_weights``).
    """
    w = visa_state.weights(iteration)
    if w.curriculum <= 0 and w.boundary <= 0:
        return instances
    out = instances
    if w.curriculum > 0 and instances.has("gt_levels") and len(instances) > 0:
        parents = instances.gt_parents if instances.has("gt_parents") else None
        keep = visa_state.target_keep(instances.gt_levels, parents, iteration)
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
        weights = visa_state.mask_weights(masks.bool(), iteration)
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


def apply_visa(batched_inputs, visa_state: "VisaState", iteration: int):
    """ViSA pre-processing of a training batch (main process, right before the model forward).

    Args:
        batched_inputs: list of dataset dicts (``instances`` as produced by the mapper).
        visa_state: the :class:`VisaState`.
        iteration: current training iteration.
    Returns:
        the **same list object** when ViSA's curriculum and boundary parts are inactive at
        ``iteration`` (so a disabled ViSA leaves the batch untouched, bit for bit); otherwise a
        new list of shallow-copied dicts whose ``instances`` went through
        :func:`apply_visa_to_instances`.
    """
    w = visa_state.weights(iteration)
    if w.curriculum <= 0 and w.boundary <= 0:
        return batched_inputs
    out = []
    for x in batched_inputs:
        if "instances" in x:
            x = dict(x)
            x["instances"] = apply_visa_to_instances(x["instances"], visa_state, iteration)
        out.append(x)
    return out


def guidance_loss_from_outputs(
    mask_features: torch.Tensor,
    batched_inputs,
    visa_state: Optional["VisaState"],
    iteration: int,
    images=None,
) -> Optional[torch.Tensor]:
    """ViSA semantic guidance loss for a training batch, or ``None`` when it does not apply.

    Args:
        mask_features: B×C×h×w pixel-decoder mask features of the *padded* batch.
        batched_inputs: the B input dicts; each needs ``visa_guidance`` (float D×h'×w' features
            of its augmented, unpadded image, see ``unsam.data.mapper``). Images without it are
            skipped.
        visa_state: the :class:`VisaState` (``None``: ViSA off).
        iteration: current training iteration (sets the schedule weight and seeds the point
            sampling, so the loss never consumes the global RNG and a resumed run samples the
            same points).
        images: the model's ``ImageList`` (padded B×3×Hp×Wp tensor + ``image_sizes``); the
            padding is cropped from ``mask_features`` so both maps cover the same field of view.
            ``None``: the batch has no padding.
    Returns:
        schedule-weighted 0-dim loss (mean over the images that carry guidance), or ``None``
        when ViSA or its guidance part is inactive at ``iteration`` or no image has guidance.
    """
    if visa_state is None or visa_state.weights(iteration).guidance <= 0:
        return None
    fh, fw = mask_features.shape[-2:]
    if images is not None:
        pad_h, pad_w = images.tensor.shape[-2:]
    losses = []
    generator = torch.Generator(device=mask_features.device)
    generator.manual_seed(1_000_003 + int(iteration))
    for i, x in enumerate(batched_inputs):
        guide = x.get("visa_guidance") if isinstance(x, dict) else None
        if guide is None:
            continue
        feat = mask_features[i : i + 1]
        if images is not None:
            h, w = (int(v) for v in images.image_sizes[i])
            # the features sit at a fixed stride of the padded tensor: keep the unpadded part
            vh = min(fh, max(1, -(-h * fh // int(pad_h))))
            vw = min(fw, max(1, -(-w * fw // int(pad_w))))
            feat = feat[..., :vh, :vw]
        guide = torch.as_tensor(guide).to(device=feat.device, dtype=feat.dtype).unsqueeze(0)
        loss = visa_state.guidance_loss(feat, guide, iteration, generator=generator)
        if loss is not None:
            losses.append(loss)
    if not losses:
        return None
    return torch.stack(losses).mean()
