"""Set criterion: Hungarian matching, then class cross-entropy (with a down-weighted no-object
class) and mask BCE + dice losses on points sampled around each matched prediction's most
uncertain pixels (PointRend-style importance sampling), for the final and every auxiliary
(deep-supervision) prediction.

:class:`PromptCriterion` is the loss of the prompt path (K outputs per prompt, nested targets,
IoU head).

Per-target ``mask_weights`` (float (N, H, W), same size as ``masks``, 1 = normal weight) scale
the per-point BCE and dice terms; ViSA uses them to relax pseudo-mask boundaries. Targets
without them follow the unweighted code path exactly.

Drop-loss (``SOLVER.USE_DROP_LOSSES``, published with UnSAM after CutLER): pseudo masks are
incomplete, so a prediction that overlaps its matched target hardly at all is more likely a real
segment the labels miss than a mistake; its mask and dice losses are dropped when the soft IoU of
the two on the sampled points is at most ``SOLVER.DROPLOSS_IOU_THRESH``. The class loss and the
normaliser (number of target masks) are unchanged, as published.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .matcher import batch_mask_cost, hungarian_match, point_sample, point_sample_chunked

logger = logging.getLogger(__name__)

__all__ = [
    "SetCriterion",
    "PromptCriterion",
    "dice_loss",
    "sigmoid_ce_loss",
    "calculate_uncertainty",
    "get_uncertain_point_coords_with_randomness",
    "drop_loss_keep",
]


def dice_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    weights: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """inputs: (M, P) logits; targets, weights: (M, P); keep: (M,) 0/1 per mask (drop-loss).
    Sum over masks of 1 - soft dice, / num_masks."""
    inputs = inputs.sigmoid()
    if weights is None:
        numerator = 2 * (inputs * targets).sum(-1)
        denominator = inputs.sum(-1) + targets.sum(-1)
    else:
        numerator = 2 * (inputs * targets * weights).sum(-1)
        denominator = (inputs * weights).sum(-1) + (targets * weights).sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    if keep is not None:
        loss = loss * keep
    return loss.sum() / num_masks


def sigmoid_ce_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    weights: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """inputs: (M, P) logits; targets, weights: (M, P); keep: (M,) 0/1 per mask (drop-loss).
    Per-mask mean BCE summed, / num_masks."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    if weights is not None:
        loss = loss * weights
    loss = loss.mean(1)
    if keep is not None:
        loss = loss * keep
    return loss.sum() / num_masks


@torch.no_grad()
def drop_loss_keep(
    point_logits: torch.Tensor, point_labels: torch.Tensor, iou_thresh: float
) -> torch.Tensor:
    """(M,) 1.0 for the matched pairs whose losses count, 0.0 for those drop-loss leaves out.

    The published rule: soft IoU of ``sigmoid(point_logits)`` with ``point_labels`` over the
    sampled points (intersection / (sum of both - intersection)); a pair is left out when that IoU
    is at most ``iou_thresh`` — so an undefined IoU (0/0: every probability underflowed to 0 on an
    empty target) keeps its loss, as published. Computed without gradient: the choice is not
    trained.
    """
    probs = point_logits.sigmoid()
    inter = (probs * point_labels).sum(-1)
    iou = inter / (probs.sum(-1) + point_labels.sum(-1) - inter)
    return (~(iou <= iou_thresh)).to(point_logits.dtype)


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """(M, 1, P) logits -> (M, 1, P) uncertainty, highest where the logit is closest to 0."""
    return -torch.abs(logits)


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
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
        coords = torch.cat(
            [coords, torch.rand(m, num_random, 2, device=coarse_logits.device)], dim=1
        )
    return coords


class SetCriterion(nn.Module):
    """Mask2Former's loss for UnSAM (class-agnostic: one foreground class + no-object)."""

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        use_drop_losses: bool = False,
        droploss_iou_thresh: float = 0.01,
    ):
        """
        Args:
            num_classes: foreground classes (the no-object class has index num_classes).
            weight_dict: loss name -> weight (applied by the caller, e.g. the meta-architecture).
            eos_coef: cross-entropy weight of the no-object class.
            losses: subset of ("labels", "masks").
            use_drop_losses, droploss_iou_thresh: drop-loss (module docstring), off by default.
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
        self.use_drop_losses = bool(use_drop_losses)
        self.droploss_iou_thresh = float(droploss_iou_thresh)

    @staticmethod
    def _src_permutation_idx(indices: List[Tuple[torch.Tensor, torch.Tensor]]):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices, num_masks) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"].float()  # (B, Q, K+1)
        b_idx, s_idx = self._src_permutation_idx(indices)
        classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(
            logits.device
        )
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[b_idx.to(logits.device), s_idx.to(logits.device)] = classes_o
        return {
            "loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        }

    def loss_masks(self, outputs, targets, indices, num_masks) -> Dict[str, torch.Tensor]:
        pred_masks = outputs["pred_masks"]  # (B, Q, h, w)
        b_idx, s_idx = self._src_permutation_idx(indices)
        src = pred_masks[b_idx.to(pred_masks.device), s_idx.to(pred_masks.device)][
            :, None
        ].float()  # (M,1,h,w)
        if src.shape[0] == 0:
            zero = pred_masks.sum() * 0.0  # keeps the graph connected (DDP needs every param used)
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        use_weights = any(t.get("mask_weights") is not None for t in targets)
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            labels, weights, start = [], [], 0
            for t, (_, j) in zip(targets, indices):
                n = len(j)
                if n == 0:
                    continue
                c = coords[start : start + n]
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
                        weights.append(
                            point_sample_chunked(w[jj], c, src.dtype, padding_mode="border")
                        )
            point_labels = torch.cat(labels)
            point_weights = torch.cat(weights) if use_weights else None
        point_logits = point_sample(src, coords).squeeze(1)  # (M, P)
        keep = (
            drop_loss_keep(point_logits, point_labels, self.droploss_iou_thresh)
            if self.use_drop_losses
            else None
        )
        return {
            "loss_mask": sigmoid_ce_loss(
                point_logits, point_labels, num_masks, point_weights, keep
            ),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks, point_weights, keep),
        }

    def get_loss(self, loss, outputs, targets, indices, num_masks):
        return {"labels": self.loss_labels, "masks": self.loss_masks}[loss](
            outputs, targets, indices, num_masks
        )

    def _num_masks(self, targets, device) -> float:
        num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            world = dist.get_world_size()
        return torch.clamp(num / world, min=1).item()

    def forward(
        self,
        outputs: Dict[str, object],
        targets: List[Dict[str, torch.Tensor]],
        num_masks: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: decoder output (``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w),
                optional ``aux_outputs``).
            targets: per image ``labels`` (N,) int64, ``masks`` (N, H, W) bool/float, optional
                ``mask_weights`` (N, H, W) float.
            num_masks: the loss normaliser (target masks per rank); None: counted here and
                averaged over ranks with an all_reduce (every rank must then call forward).
        Returns:
            unweighted losses: loss_ce, loss_mask, loss_dice and ``_{i}`` variants per aux output.
        """
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(main, targets)
        if num_masks is None:
            num_masks = self._num_masks(targets, outputs["pred_logits"].device)
        losses: Dict[str, torch.Tensor] = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, main, targets, indices, num_masks))
        for i, aux in enumerate(outputs.get("aux_outputs", []) or []):
            aux_indices = self.matcher(aux, targets)
            for loss in self.losses:
                losses.update(
                    {
                        f"{k}_{i}": v
                        for k, v in self.get_loss(
                            loss, aux, targets, aux_indices, num_masks
                        ).items()
                    }
                )
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"weight_dict={self.weight_dict}"
            + (f", drop_loss_iou_thresh={self.droploss_iou_thresh}" if self.use_drop_losses else "")
        )


class PromptCriterion(nn.Module):
    """Loss of the prompt path: each prompt's K outputs are matched one-to-one to its (nested)
    targets by minimum cost (BCE + dice on shared random points, Hungarian), the matched outputs
    get the point-sampled BCE + dice of :class:`SetCriterion`, and every output's IoU prediction
    is regressed (MSE) onto the IoU of its mask with its matched target (unmatched outputs: the
    best IoU with any of the prompt's targets: "how good a mask of something the user may mean").

    Losses (unweighted): ``loss_prompt_mask``, ``loss_prompt_dice``, ``loss_prompt_iou`` and
    ``_{i}`` variants of the two mask losses for every auxiliary (deep-supervision) layer.
    """

    def __init__(
        self,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        weight_dict: Dict[str, float],
        num_aux: int = 0,
    ):
        super().__init__()
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.weight_dict = dict(weight_dict)
        self.num_aux = num_aux

    def loss_names(self) -> List[str]:
        names = ["loss_prompt_mask", "loss_prompt_dice", "loss_prompt_iou"]
        for i in range(self.num_aux):
            names += [f"loss_prompt_mask_{i}", f"loss_prompt_dice_{i}"]
        return names

    @torch.no_grad()
    def match(
        self, pred: torch.Tensor, targets: List[torch.Tensor]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """pred (N, K, h, w) logits; targets: N tensors (T_i, H, W) → per prompt (output idx,
        target idx)."""
        out = []
        coords = torch.rand(1, max(64, self.num_points // 4), 2, device=pred.device)
        for i, tgt in enumerate(targets):
            if tgt.shape[0] == 0:
                e = torch.empty(0, dtype=torch.int64)
                out.append((e, e.clone()))
                continue
            with torch.autocast(
                pred.device.type, enabled=False
            ):  # float16 costs overflow (matcher.py)
                p = point_sample(
                    pred[i][:, None].float(), coords.expand(pred.shape[1], -1, -1)
                ).squeeze(1)  # (K, P)
                t = point_sample_chunked(tgt, coords, p.dtype)  # (T, P)
                cost = batch_mask_cost(p, t)
            out.append(hungarian_match(cost))
        return out

    def _mask_losses(
        self, pred: torch.Tensor, targets: List[torch.Tensor], indices, num_masks: float
    ):
        """point-sampled BCE + dice of the matched (output, target) pairs."""
        srcs, tgts = [], []
        for i, (r, c) in enumerate(indices):
            if len(r):
                srcs.append(pred[i, r.to(pred.device)])
                tgts.append(targets[i][c.to(targets[i].device)])
        if not srcs:
            zero = pred.sum() * 0.0
            return zero, zero.clone()
        src = torch.cat(srcs)[:, None].float()  # (M, 1, h, w)
        tgt = torch.cat(tgts)
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            labels = point_sample_chunked(tgt, coords, src.dtype)
        logits = point_sample(src, coords).squeeze(1)
        return sigmoid_ce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    @staticmethod
    @torch.no_grad()
    def iou_targets(pred: torch.Tensor, targets: List[torch.Tensor], indices) -> torch.Tensor:
        """(N, K) IoU of each binarised output (logit > 0, at the logits' resolution) with its
        matched target, or its best target when unmatched; 0 for prompts without targets."""
        n, k, h, w = pred.shape
        out = torch.zeros(n, k, device=pred.device)
        for i, tgt in enumerate(targets):
            if tgt.shape[0] == 0:
                continue
            hp, wp = tgt.shape[-2:]
            # targets cover the padded input; logits its stride-4 grid
            small = (
                F.interpolate(tgt[None].float(), size=(h, w), mode="area")[0] >= 0.5
            )  # (T, h, w)
            pm = (pred[i] > 0).flatten(1).float()  # (K, hw)
            tm = small.flatten(1).float()
            inter = pm @ tm.t()
            union = pm.sum(1)[:, None] + tm.sum(1)[None] - inter
            iou = torch.where(
                union > 0, inter / union.clamp(min=1), torch.ones_like(inter)
            )  # (K, T)
            best = iou.max(1).values
            r, c = indices[i]
            best[r.to(best.device)] = iou[r.to(best.device), c.to(best.device)]
            out[i] = best
        return out

    def forward(
        self,
        outputs: Dict[str, object],
        targets: List[torch.Tensor],
        num_prompts: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: ``pred_masks`` (N, K, h, w) logits, ``pred_iou`` (N, K) in [0, 1], optional
                ``aux_masks`` list of (N, K, h, w).
            targets: N bool tensors (T_i, Hp, Wp), the masks each prompt may mean.
            num_prompts: normaliser of the IoU loss (prompts with a target, per rank); None:
                counted here and averaged over ranks with an all_reduce.
        """
        pred = outputs["pred_masks"]
        if num_prompts is None:
            num = float(max(1, sum(1 for t in targets if t.shape[0] > 0)))
            if dist.is_available() and dist.is_initialized():
                t = torch.tensor([num], device=pred.device)
                dist.all_reduce(t)
                num = max(1.0, t.item() / dist.get_world_size())
        else:
            num = float(num_prompts)
        indices = self.match(pred, targets)
        # every matched target counts: normalise by targets, not prompts
        num_masks = float(max(1, sum(len(r) for r, _ in indices)))
        losses = {}
        losses["loss_prompt_mask"], losses["loss_prompt_dice"] = self._mask_losses(
            pred, targets, indices, num_masks
        )
        iou_t = self.iou_targets(pred.detach(), targets, indices)
        has = torch.tensor([t.shape[0] > 0 for t in targets], device=pred.device)
        pred_iou = outputs["pred_iou"].float()
        err = F.mse_loss(pred_iou, iou_t, reduction="none").mean(1)
        losses["loss_prompt_iou"] = (err * has).sum() / num
        for j, aux in enumerate(outputs.get("aux_masks", []) or []):
            aux_idx = self.match(aux, targets)
            m, d = self._mask_losses(aux, targets, aux_idx, num_masks)
            losses[f"loss_prompt_mask_{j}"], losses[f"loss_prompt_dice_{j}"] = m, d
        return losses
