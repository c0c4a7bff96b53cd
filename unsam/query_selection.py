"""Training-free prompting: answer point / box / mask prompts by choosing among the whole-image
model's queries (``UNSAM.PROMPT.MODE select``).

A whole-image checkpoint (such as the public UnSAM ones) has no prompt encoder, but its ~2000
queries already segment the image at many granularities. :class:`QuerySelector` is built once per
image from the decoder's outputs and ranks the queries for each prompt:

* points: queries whose mask contains every positive point and no negative point, by the
  whole-image score (class probability × mean mask probability over the mask, as in
  whole-image inference);
* box: queries whose mask lies mostly inside the box (≥ :data:`BOX_INSIDE_FRACTION` of its
  area), by the IoU of the mask with the box region;
* mask: by IoU with the input mask.

Given together, the constraints of every prompt apply and the scores multiply. Near-duplicates
(mask IoU > :data:`DUPLICATE_IOU` at stride 4) are dropped; up to K queries are kept.

Memory: kept per image are the class scores (Q), mask embeddings (Q×C), the stride-4 mask
features (C×h×w) and a coarse occupancy map per query (Q×g×g, g ≤ :data:`COARSE_SIDE`, float16)
for box and mask ranking — never Q full-resolution masks.
"""

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .modeling.mask_postprocess import foreground_scores

# a box prompt selects masks with more than half of their area inside the box; ranking by the
# IoU with the box region does the rest (held-out shapes, box mIoU: share 0.9 → 0.688,
# 0.8 → 0.707, 0.6 → 0.709, none → 0.716; 0.5 keeps the "mostly inside" meaning)
BOX_INSIDE_FRACTION = 0.5
# outputs overlapping an already kept one by more than this IoU are near-duplicates
DUPLICATE_IOU = 0.9
# side of the coarse occupancy grid used to rank queries against boxes and mask inputs
COARSE_SIDE = 64
# candidates whose exact masks are checked per round (points) and de-duplicated
_ROUND = 16


class QuerySelector:
    """Ranks one image's whole-image queries against prompts.

    Args:
        pred_logits: Q×(K+1) class logits (last = no object).
        mask_embeds: Q×C mask embeddings; ``mask_features``: C×h×w stride-4 features of the padded
            input, so that a query's mask logits are ``mask_embeds[q] @ mask_features``.
        valid_hw: (vh, vw) part of the h×w grid covering the image (the rest is padding).
        chunk: queries whose stride-4 logits are materialised at once.
    """

    def __init__(
        self,
        pred_logits: torch.Tensor,
        mask_embeds: torch.Tensor,
        mask_features: torch.Tensor,
        valid_hw: Tuple[int, int],
        chunk: int = 64,
    ):
        self.embeds = mask_embeds.float()
        self.features = mask_features.float()
        self.valid_hw = valid_hw
        h, w = self.features.shape[-2:]
        factor = max(1, math.ceil(max(h, w) / COARSE_SIDE))
        self.coarse_hw = (math.ceil(h / factor), math.ceil(w / factor))
        num_classes = pred_logits.shape[-1] - 1
        cls_prob = F.softmax(pred_logits.float(), dim=-1)[:, :num_classes].max(-1).values  # (Q,)
        q = self.embeds.shape[0]
        mask_prob = torch.empty(q, device=self.embeds.device)
        area = torch.empty(q, device=self.embeds.device)
        coarse = torch.empty((q, *self.coarse_hw), dtype=torch.float16, device=self.embeds.device)
        vh, vw = valid_hw
        for s in range(0, q, chunk):
            logits = self.logits(torch.arange(s, min(q, s + chunk), device=self.embeds.device))
            prob, fg_area = foreground_scores(logits[:, :vh, :vw])
            mask_prob[s : s + chunk], area[s : s + chunk] = prob, fg_area.float()
            coarse[s : s + chunk] = _occupancy(logits > 0, self.coarse_hw).half()
        # the whole-image score of each query (UnSAM.instance_inference's, at stride 4)
        self.scores = cls_prob * mask_prob
        self.area = area
        self.coarse = coarse

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """len(idx)×h×w stride-4 mask logits of queries ``idx``."""
        return torch.einsum("qc,chw->qhw", self.embeds[idx], self.features)

    # -------------------------------------------------------------------------------------------
    def rank(
        self,
        points: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        box: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score every query against one prompt.

        Args (frames of the padded network input): ``points`` N×2 (x, y) continuous coordinates
            (a pixel's centre is x + 0.5), ``labels`` N (1 positive, 0 negative, -1 ignored),
            ``box`` 4 XYXY pixels, ``mask_input`` 256×256 logits over the padded square.
        Returns:
            ``order`` (queries meeting every constraint, best first, then — when none does — the
            one closest to meeting the point constraints), ``scores`` Q selection scores in [0, 1],
            ``ok`` Q bool (constraints met).
        """
        score = torch.ones_like(self.scores)
        ok = self.area > 0
        margin = None
        if points is not None and labels is not None and (labels >= 0).any():
            margin = self._point_margin(points, labels)
            ok &= margin > 0
            score = score * self.scores
        if box is not None:
            inside, iou = self._box_overlap(box)
            ok &= inside >= BOX_INSIDE_FRACTION
            score = score * iou
        if mask_input is not None:
            score = score * self._mask_iou(mask_input)
        if ok.any():
            idx = torch.nonzero(ok).flatten()
            order = idx[score[idx].argsort(descending=True, stable=True)]
        else:  # nothing satisfies the prompt: the nearest miss, flagged by ok = False
            closeness = margin if margin is not None else score
            order = closeness.argmax().reshape(1)
        return order, score.clamp(0, 1), ok

    def _point_margin(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Q values: min over positive points of the mask logit there and over negative points of
        its negation (> 0: every constraint met), logits sampled bilinearly at stride 4."""
        h, w = self.features.shape[-2:]
        keep = labels >= 0
        pts, lbl = points[keep].float(), labels[keep]
        # continuous input coordinates → grid_sample's normalised ones (align_corners=False: -1 is
        # the left edge of the first stride-4 cell), the sampling of the masks' bilinear upsampling
        grid = torch.stack([pts[:, 0] / (4 * w), pts[:, 1] / (4 * h)], -1) * 2 - 1
        # border padding: F.interpolate replicates the edge values when upsampling
        feats = F.grid_sample(
            self.features[None],
            grid[None, None],
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )[0, :, 0]  # C×N
        values = self.embeds @ feats  # Q×N
        sign = torch.where(lbl > 0, 1.0, -1.0).to(values)
        return (values * sign).min(1).values

    def _box_overlap(self, box: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per query: share of its (coarse) mask inside ``box`` and IoU with the box region."""
        h, w = self.features.shape[-2:]
        ch, cw = self.coarse_hw
        # fraction of every coarse cell covered by the box (cells are (4h/ch)×(4w/cw) pixels)
        ys = _coverage(float(box[1]), float(box[3]), ch, 4.0 * h / ch, self.coarse.device)
        xs = _coverage(float(box[0]), float(box[2]), cw, 4.0 * w / cw, self.coarse.device)
        region = ys[:, None] * xs[None]
        occ = self.coarse.float().flatten(1)
        inter = occ @ region.flatten()
        m_area = occ.sum(1)
        union = m_area + region.sum() - inter
        return inter / m_area.clamp(min=1e-6), inter / union.clamp(min=1e-6)

    def _mask_iou(self, mask_input: torch.Tensor) -> torch.Tensor:
        """Q soft IoUs of the coarse masks with ``mask_input`` (256×256 logits, padded square)."""
        h, w = self.features.shape[-2:]
        side = max(h, w)
        # the 256×256 frame covers the padded square; the grid covers its h×w (top-left) part
        target = F.interpolate(
            (mask_input > 0).float()[None, None], size=(side, side), mode="area"
        )[0, 0, :h, :w]
        target = _occupancy(target[None] >= 0.5, self.coarse_hw)[0].flatten()
        occ = self.coarse.float().flatten(1)
        inter = occ @ target
        return inter / (occ.sum(1) + target.sum() - inter).clamp(min=1e-6)

    # -------------------------------------------------------------------------------------------
    def select(
        self,
        order: torch.Tensor,
        k: int,
        accept: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> List[int]:
        """Up to ``k`` queries from ``order`` (best first), skipping near-duplicates of kept ones
        (stride-4 IoU > :data:`DUPLICATE_IOU`) and those ``accept`` rejects.

        ``accept(idx)`` → bool per query of ``idx`` (e.g. "its final mask contains the clicks").
        """
        kept: List[int] = []
        kept_masks: List[torch.Tensor] = []
        for s in range(0, len(order), _ROUND):
            idx = order[s : s + _ROUND]
            fine = (self.logits(idx) > 0).flatten(1).float()
            good = accept(idx) if accept is not None else torch.ones(len(idx), dtype=torch.bool)
            for j in range(len(idx)):
                if not bool(good[j]):
                    continue
                m = fine[j]
                if kept_masks:
                    prev = torch.stack(kept_masks)
                    inter = prev @ m
                    iou = inter / (prev.sum(1) + m.sum() - inter).clamp(min=1)
                    if bool((iou > DUPLICATE_IOU).any()):
                        continue
                kept.append(int(idx[j]))
                kept_masks.append(m)
                if len(kept) == k:
                    return kept
        return kept


def _occupancy(binary: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """n×H×W bool → n×h×w share of each coarse cell that is foreground (grid padded with 0)."""
    n, hh, ww = binary.shape
    fy, fx = math.ceil(hh / size[0]), math.ceil(ww / size[1])
    padded = F.pad(binary.float(), (0, size[1] * fx - ww, 0, size[0] * fy - hh))
    return F.avg_pool2d(padded[:, None], (fy, fx))[:, 0]


def _coverage(lo: float, hi: float, n: int, cell: float, device) -> torch.Tensor:
    """Share of each of ``n`` cells of size ``cell`` (pixels) covered by the interval [lo, hi)."""
    starts = torch.arange(n, device=device, dtype=torch.float32) * cell
    covered = torch.minimum(starts + cell, torch.full_like(starts, hi)) - torch.maximum(
        starts, torch.full_like(starts, lo)
    )
    return covered.clamp(min=0) / cell
