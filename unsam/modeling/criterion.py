"""Set criterion: Hungarian matching, then class cross-entropy (with a down-weighted no-object
class) and mask BCE + dice losses on points sampled around each matched prediction's most
uncertain pixels (PointRend-style importance sampling), for the final and every auxiliary
(deep-supervision) prediction.

Per-target ``mask_weights`` (float (N, H, W), same size as ``masks``, 1 = normal weight) scale
the per-point BCE and dice terms; ViSA uses them to relax pseudo-mask boundaries. Targets
without them follow the unweighted code path exactly.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .matcher import point_sample, point_sample_chunked

logger = logging.getLogger(__name__)

__all__ = [
    "SetCriterion",
    "dice_loss",
    "sigmoid_ce_loss",
    "calculate_uncertainty",
    "get_uncertain_point_coords_with_randomness",
]


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float,
              weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """inputs: (M, P) logits; targets, weights: (M, P). Sum over masks of 1 - soft dice, / num_masks."""
    inputs = inputs.sigmoid()
    if weights is None:
        numerator = 2 * (inputs * targets).sum(-1)
        denominator = inputs.sum(-1) + targets.sum(-1)
    else:
        numerator = 2 * (inputs * targets * weights).sum(-1)
        denominator = (inputs * weights).sum(-1) + (targets * weights).sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float,
                    weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """inputs: (M, P) logits; targets, weights: (M, P). Per-mask mean BCE summed, / num_masks."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    if weights is not None:
        loss = loss * weights
    return loss.mean(1).sum() / num_masks


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """(M, 1, P) logits -> (M, 1, P) uncertainty, highest where the logit is closest to 0."""
    return -torch.abs(logits)


def get_uncertain_point_coords_with_randomness(coarse_logits: torch.Tensor,
                                               uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
                                               num_points: int, oversample_ratio: float,
                                               importance_sample_ratio: float) -> torch.Tensor:
    """Pick ``num_points`` points per mask: the most uncertain ``importance_sample_ratio`` share of
    ``oversample_ratio * num_points`` random candidates, plus uniform random points.

    coarse_logits: (M, 1, h, w) -> (M, num_points, 2) normalized (x, y).
    """
    if oversample_ratio < 1:
        raise ValueError("OVERSAMPLE_RATIO must be >= 1")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError("IMPORTANCE_SAMPLE_RATIO must be in [0, 1]")
    m = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(m, num_sampled, 2, device=coarse_logits.device)
    uncertainties = uncertainty_func(point_sample(coarse_logits, coords))
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]
    coords = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(m, num_random, 2, device=coarse_logits.device)], dim=1)
    return coords


class SetCriterion(nn.Module):
    """Mask2Former's loss for UnSAM (class-agnostic: one foreground class + no-object)."""

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float], eos_coef: float,
                 losses: Sequence[str], num_points: int, oversample_ratio: float, importance_sample_ratio: float):
        """
        Args:
            num_classes: foreground classes (the no-object class has index num_classes).
            weight_dict: loss name -> weight (applied by the caller, e.g. the meta-architecture).
            eos_coef: cross-entropy weight of the no-object class.
            losses: subset of ("labels", "masks").
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = list(losses)
        for name in self.losses:
            if name not in ("labels", "masks"):
                raise ValueError(f"unknown loss {name!r}")
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)  # persistent: in the public checkpoints
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    @staticmethod
    def _src_permutation_idx(indices: List[Tuple[torch.Tensor, torch.Tensor]]):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices, num_masks) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"].float()  # (B, Q, K+1)
        b_idx, s_idx = self._src_permutation_idx(indices)
        classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[b_idx.to(logits.device), s_idx.to(logits.device)] = classes_o
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}

    def loss_masks(self, outputs, targets, indices, num_masks) -> Dict[str, torch.Tensor]:
        pred_masks = outputs["pred_masks"]  # (B, Q, h, w)
        b_idx, s_idx = self._src_permutation_idx(indices)
        src = pred_masks[b_idx.to(pred_masks.device), s_idx.to(pred_masks.device)][:, None].float()  # (M,1,h,w)
        if src.shape[0] == 0:
            zero = pred_masks.sum() * 0.0  # keeps the graph connected (DDP needs every param used)
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        use_weights = any(t.get("mask_weights") is not None for t in targets)
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
            labels, weights, start = [], [], 0
            for t, (_, j) in zip(targets, indices):
                n = len(j)
                if n == 0:
                    continue
                c = coords[start:start + n]
                start += n
                jj = j.to(t["masks"].device)
                labels.append(point_sample_chunked(t["masks"][jj], c, src.dtype))
                if use_weights:
                    w = t.get("mask_weights")
                    if w is None:
                        weights.append(torch.ones_like(labels[-1]))
                    else:
                        # border padding: points on the image edge keep their own weight instead of
                        # being blended with an implicit zero outside the image
                        weights.append(point_sample_chunked(w[jj], c, src.dtype, padding_mode="border"))
            point_labels = torch.cat(labels)
            point_weights = torch.cat(weights) if use_weights else None
        point_logits = point_sample(src, coords).squeeze(1)  # (M, P)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks, point_weights),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks, point_weights),
        }

    def get_loss(self, loss, outputs, targets, indices, num_masks):
        return {"labels": self.loss_labels, "masks": self.loss_masks}[loss](outputs, targets, indices, num_masks)

    def _num_masks(self, targets, device) -> float:
        num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            world = dist.get_world_size()
        return torch.clamp(num / world, min=1).item()

    def forward(self, outputs: Dict[str, object], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: decoder output (``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w),
                optional ``aux_outputs``).
            targets: per image ``labels`` (N,) int64, ``masks`` (N, H, W) bool/float, optional
                ``mask_weights`` (N, H, W) float.
        Returns:
            unweighted losses: loss_ce, loss_mask, loss_dice and ``_{i}`` variants per aux output.
        """
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(main, targets)
        num_masks = self._num_masks(targets, outputs["pred_logits"].device)
        losses: Dict[str, torch.Tensor] = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, main, targets, indices, num_masks))
        for i, aux in enumerate(outputs.get("aux_outputs", []) or []):
            aux_indices = self.matcher(aux, targets)
            for loss in self.losses:
                losses.update({f"{k}_{i}": v for k, v in self.get_loss(loss, aux, targets, aux_indices,
                                                                       num_masks).items()})
        return losses

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
                f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
                f"importance_sample_ratio={self.importance_sample_ratio}, weight_dict={self.weight_dict}")
