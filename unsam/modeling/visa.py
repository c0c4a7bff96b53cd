"""ViSA — visual-guided semantic augmentation: its schedule and its semantic guidance loss.

Early in training, pseudo labels are most trustworthy at the level of *semantic regions* (whole
objects, coherent stuff) and least trustworthy at fine parts and exact boundaries. ViSA steers the
model toward regions first and releases it later, with three parts that share one schedule
(:func:`visa_weight`: 1 before ``START_ITER``, decaying to 0 at ``END_ITER``):

1. **Granularity curriculum** and 2. **boundary-relaxed mask loss**: transforms of the training
   targets, in :mod:`unsam.data.visa_transforms` (next to the mapper; they run on the batch in the
   main process).
3. **Semantic guidance loss** (:func:`semantic_guidance_loss`, here): the cosine affinities of the
   pixel decoder's mask features at sampled points are pulled toward the affinities of
   self-supervised guidance features (DINO or the classical backend of ``unsam.pseudo``). The
   training model (:class:`unsam.engine.train_model.UnSAMTrain`) adds it to its losses.

:class:`VisaState` holds the ``UNSAM.VISA.*`` config and gives each part's weight at an
iteration (:meth:`VisaState.weights`). With ``UNSAM.VISA.ENABLED = False`` (or after
``END_ITER``) every weight is 0 and every part is a no-op (the guidance loss is ``None``) — the
caller then runs exactly the plain path.
"""

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "visa_weight",
    "semantic_guidance_loss",
    "VisaWeights",
    "VisaState",
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

    Typical use::

        visa = VisaState.from_config(cfg)
        w = visa.weights(it)                                   # VisaWeights
        lg = visa.guidance_loss(mask_features, guidance, it)   # None or weighted 0-dim loss
        # target side: unsam.data.visa_transforms.curriculum_keep / boundary_weights (visa, ...)

    Every part is a no-op (all-True keep mask, ``None``) when its weight is 0, so a disabled
    ViSA leaves the training path untouched.
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
        """Whether the semantic guidance loss is on at some iteration (the training model then
        needs the iteration, see ``UnSAMTrain.set_visa_iteration``)."""
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
