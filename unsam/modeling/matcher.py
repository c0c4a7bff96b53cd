"""Hungarian matching between predicted and target masks, with costs estimated on sampled points.

Also hosts what the other matchers of the package share: :func:`point_sample` (the bilinear
point reader of the criterion), the pairwise mask costs (:func:`batch_sigmoid_ce_cost`,
:func:`batch_dice_cost`, :func:`batch_mask_cost`) and the assignment itself
(:func:`hungarian_match`) — used by the prompt criterion and the ATS difficulty hook too.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

__all__ = [
    "point_sample",
    "point_sample_chunked",
    "batch_sigmoid_ce_cost",
    "batch_dice_cost",
    "batch_mask_cost",
    "hungarian_match",
    "HungarianMatcher",
]


def point_sample(inputs: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Read ``inputs`` (N, C, H, W) at normalized points (N, P, 2) as (x, y) in [0, 1] -> (N, C, P).

    0 and 1 are the outer edges of the border pixels (``align_corners=False``); kwargs go to
    ``F.grid_sample`` (e.g. ``padding_mode``).
    """
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    out = F.grid_sample(inputs, 2.0 * point_coords - 1.0, align_corners=False, **kwargs)
    return out.squeeze(3) if add_dim else out


def point_sample_chunked(
    masks: torch.Tensor, point_coords: torch.Tensor, dtype: torch.dtype, chunk: int = 64, **kwargs
) -> torch.Tensor:
    """``point_sample`` of (N, H, W) masks of any dtype (bool/uint8/float) -> (N, P) in ``dtype``.

    Converts at most ``chunk`` masks to float at a time: hundreds of full-resolution target
    masks would otherwise need gigabytes as float. point_coords: (N, P, 2) or (1, P, 2) shared.
    """
    n = masks.shape[0]
    outs = []
    for s in range(0, n, chunk):
        m = masks[s : s + chunk].to(dtype)[:, None]
        pc = point_coords if point_coords.shape[0] == 1 else point_coords[s : s + chunk]
        if pc.shape[0] != m.shape[0]:
            pc = pc.expand(m.shape[0], -1, -1)
        outs.append(point_sample(m, pc, **kwargs).squeeze(1))
    if not outs:
        return masks.new_zeros((0, point_coords.shape[1]), dtype=dtype)
    return torch.cat(outs, 0)


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs: (Q, P) logits; targets: (N, P) in [0, 1] -> (Q, N) dice cost."""
    inputs = inputs.sigmoid()
    numerator = 2 * inputs @ targets.t()
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs: (Q, P) logits; targets: (N, P) -> (Q, N) mean binary cross-entropy."""
    p = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.t() + neg @ (1 - targets).t()) / p


def batch_mask_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs: (Q, P) logits; targets: (N, P) in [0, 1] -> (Q, N) BCE + dice, unweighted.

    The mask part of the matching cost where both terms weigh 1 (prompt matching, ATS)."""
    return batch_sigmoid_ce_cost(inputs, targets) + batch_dice_cost(inputs, targets)


def hungarian_match(cost: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of a (Q, N) cost matrix.

    Returns (row indices, column indices), int64 on CPU, each of length min(Q, N). Non-finite
    costs are replaced by +-1e6 first: ``linear_sum_assignment`` raises on NaN/inf, and a
    non-finite loss guard reports the cause better than a traceback from scipy here.
    """
    cost = cost.detach().cpu()
    if not torch.isfinite(cost).all():
        cost = torch.nan_to_num(cost, nan=1e6, posinf=1e6, neginf=-1e6)
    i, j = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising
    ``cost_class * (-p(class)) + cost_mask * BCE + cost_dice * dice``, the mask costs evaluated on
    ``num_points`` random points shared by all pairs of an image."""

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 0,
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w).
            targets: per image ``labels`` (N,) int64 and ``masks`` (N, H, W) (any dtype).
        Returns:
            per image (prediction indices, target indices), int64, each of length min(Q, N).
        """
        bs, nq = outputs["pred_logits"].shape[:2]
        indices = []
        for b in range(bs):
            tgt_ids = targets[b]["labels"]
            tgt_mask = targets[b]["masks"]
            if tgt_ids.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            prob = outputs["pred_logits"][b].float().softmax(-1)
            cost_class = -prob[:, tgt_ids]
            out_mask = outputs["pred_masks"][b].float()[:, None]
            coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
            # float32 even under AMP: the BCE cost sums over num_points and overflows float16
            with torch.autocast(out_mask.device.type, enabled=False):
                tgt_pts = point_sample_chunked(tgt_mask, coords, out_mask.dtype)
                out_pts = point_sample(out_mask, coords.expand(out_mask.shape[0], -1, -1)).squeeze(
                    1
                )
                cost = (
                    self.cost_mask * batch_sigmoid_ce_cost(out_pts, tgt_pts)
                    + self.cost_class * cost_class
                    + self.cost_dice * batch_dice_cost(out_pts, tgt_pts)
                )
            indices.append(hungarian_match(cost.reshape(nq, -1)))
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
