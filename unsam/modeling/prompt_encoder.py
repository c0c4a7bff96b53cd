"""Prompt path of UnSAM: points / boxes / low-res masks → query groups for the masked-attention
decoder.

Each prompt becomes one *group* of decoder queries::

    [K granularity queries][T prompt tokens][1 mask token, when a mask prompt is given]

- The prompt tokens come from ``segment_anything.modeling.PromptEncoder`` (the dependency, not a
  copy): random-Fourier positional encoding of each point / box corner plus its type embedding
  (positive, negative, padding, box corner). Each token's *content* additionally gets the image's
  mask features read at that point (points) or averaged inside the box (box corners), projected
  to the decoder width, so the decoder starts from "what is under the click".
- A mask prompt (``1×L×L`` logits, ``L = 256``, SAM's frame: the padded square input downsampled
  4×) is embedded by SAM's ``mask_downscaling`` convs; the mask token is the mask-weighted mean of
  that dense embedding plus the mask-weighted mean of the image features, positioned at the
  mask's centroid.
- The K granularity queries (``UNSAM.PROMPT.NUM_GRANULARITIES``) are learned embeddings plus the
  mean of their group's tokens; they are the queries whose masks (and IoU scores) are returned.

Groups only see themselves in self-attention (block-diagonal ``self_attn_allowed``), so many
prompts on one image are decoded at once without influencing each other.

Coordinates are pixels of the padded network input (``padded_hw``); SAM's encoder is built for a
nominal ``input_size`` square and coordinates are rescaled to it, which is the same frame when the
input is the usual ``IMAGE_SIZE`` square.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder as SamPromptEncoder
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["UnSAMPromptEncoder", "MASK_INPUT_SIZE", "block_diagonal_allowed"]

# side of SAM's low-resolution mask frame (mask_input and low_res_logits): 256 = 1024 / 4
MASK_INPUT_SIZE = 256


def block_diagonal_allowed(num_groups: int, group_size: int, device=None) -> torch.Tensor:
    """(G*S, G*S) bool, True inside each group's diagonal block (queries see their own group)."""
    g = torch.arange(num_groups * group_size, device=device) // group_size
    return g[:, None] == g[None, :]


class UnSAMPromptEncoder(nn.Module):
    """Prompts → decoder query groups (see module docstring).

    Args:
        hidden_dim: decoder query width. mask_dim: channels of the pixel decoder's mask features.
        num_granularities: K output queries per prompt. input_size: nominal square input side
            (``INPUT.IMAGE_SIZE``) of SAM's point normalisation. mask_in_chans: hidden channels
            of SAM's mask-downscaling convs.
    """

    def __init__(
        self,
        hidden_dim: int,
        mask_dim: int,
        num_granularities: int,
        input_size: int,
        mask_in_chans: int = 16,
    ):
        super().__init__()
        if num_granularities < 1:
            raise ValueError(
                f"UNSAM.PROMPT.NUM_GRANULARITIES must be >= 1, got {num_granularities}"
            )
        if hidden_dim % 2:
            raise ValueError(f"the prompt encoder needs an even HIDDEN_DIM, got {hidden_dim}")
        self.hidden_dim = hidden_dim
        self.num_granularities = num_granularities
        self.input_size = int(input_size)
        emb = MASK_INPUT_SIZE // 4
        self.sam = SamPromptEncoder(
            embed_dim=hidden_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(self.input_size, self.input_size),
            mask_in_chans=mask_in_chans,
        )
        self.feat_proj = nn.Linear(mask_dim, hidden_dim)
        self.granularity_feat = nn.Embedding(num_granularities, hidden_dim)
        self.granularity_pos = nn.Embedding(num_granularities, hidden_dim)
        self.mask_token = nn.Embedding(1, hidden_dim)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _pool(mask_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """mask_features (C, h, w), weights (P, h, w) ≥ 0 → weighted means (P, C)."""
        num = torch.einsum("phw,chw->pc", weights, mask_features)
        return num / weights.flatten(1).sum(1, keepdim=True).clamp(min=1e-6)

    def _mask_weights_on_grid(
        self, mask_inputs: torch.Tensor, grid_hw: Tuple[int, int], padded_hw: Tuple[int, int]
    ) -> torch.Tensor:
        """(P, 1, L, L) logits over the padded square → (P, h, w) probabilities on the feature
        grid."""
        side = max(padded_hw)
        h, w = grid_hw
        sq = (max(1, round(side * h / padded_hw[0])), max(1, round(side * w / padded_hw[1])))
        prob = F.interpolate(
            mask_inputs.float(), size=sq, mode="bilinear", align_corners=False
        ).sigmoid()
        return prob[:, 0, :h, :w]

    def forward(
        self,
        mask_features: torch.Tensor,
        padded_hw: Tuple[int, int],
        *,
        points: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_inputs: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Query groups of the P prompts of ONE image.

        Args:
            mask_features: (C_mask, h, w) stride-4 features of the padded image.
            padded_hw: (Hp, Wp) of the padded network input the coordinates refer to.
            points: (P, N, 2) float (x, y) pixels; labels: (P, N) int (1 positive, 0 negative,
                -1 ignored). boxes: (P, 4) XYXY pixels. mask_inputs: (P, 1, L, L) logits.
        Returns:
            ``feat``, ``pos``: (P*G, hidden_dim), G = group size (K first in every group);
            ``allowed``: (P*G, P*G) bool self-attention mask; ``group_size``: G (int tensor).
        """
        P = (
            next(t.shape[0] for t in (points, boxes, mask_inputs) if t is not None)
            if any(t is not None for t in (points, boxes, mask_inputs))
            else 0
        )
        if P == 0:
            raise ValueError("a prompt needs points, a box or a mask input")
        dev = mask_features.device
        sx = self.input_size / float(padded_hw[1])
        sy = self.input_size / float(padded_hw[0])
        scale = torch.tensor([sx, sy], device=dev)
        mf = mask_features.float()

        if points is not None and labels is None:
            labels = torch.ones(points.shape[:2], dtype=torch.int64, device=dev)
        sparse, dense = self._sam_embeddings(points, labels, boxes, mask_inputs, scale)
        tok_pos = sparse
        tok_feat = sparse.clone()

        # image content under each prompt token (a zero for SAM's padding point)
        if points is not None:
            n = points.shape[1]
            tok_feat[:, :n] = tok_feat[:, :n] + self._point_content(mf, points, labels, padded_hw)
        if boxes is not None:
            tok_feat[:, -2:] = (
                tok_feat[:, -2:] + self._box_content(mf, boxes.float(), padded_hw)[:, None]
            )
        feats, poses = [tok_feat], [tok_pos]
        if mask_inputs is not None:
            m_feat, m_pos = self._mask_token(mf, mask_inputs, dense, padded_hw, scale)
            feats.append(m_feat[:, None])
            poses.append(m_pos[:, None])
        tok_feat = torch.cat(feats, 1)
        tok_pos = torch.cat(poses, 1)
        k = self.num_granularities
        g_feat = self.granularity_feat.weight[None] + tok_feat.mean(1, keepdim=True)  # (P, K, C)
        g_pos = self.granularity_pos.weight[None] + tok_pos.mean(1, keepdim=True)
        feat = torch.cat([g_feat, tok_feat], 1)
        pos = torch.cat([g_pos, tok_pos], 1)
        group = feat.shape[1]
        return {
            "feat": feat.reshape(P * group, -1),
            "pos": pos.reshape(P * group, -1),
            "allowed": block_diagonal_allowed(P, group, dev),
            "group_size": group,
            "num_granularities": k,
        }

    def _sam_embeddings(
        self,
        points: Optional[torch.Tensor],
        labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor],
        mask_inputs: Optional[torch.Tensor],
        scale: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """segment_anything's PromptEncoder on the prompts, taken from padded-input pixels to
        its ``input_size`` frame by ``scale`` (sx, sy), mask inputs resized to its
        ``mask_input_size``: sparse (P, T, C) and dense (P, C, e, e) embeddings."""
        sam_points = None
        if points is not None:
            sam_points = (points.float() * scale, labels.to(scale.device))
        sam_boxes = boxes.float() * scale.repeat(2) if boxes is not None else None
        sam_masks = None
        if mask_inputs is not None:
            sam_masks = mask_inputs.float()
            if tuple(sam_masks.shape[-2:]) != self.sam.mask_input_size:
                sam_masks = F.interpolate(
                    sam_masks, size=self.sam.mask_input_size, mode="bilinear", align_corners=False
                )
        return self.sam(sam_points, sam_boxes, sam_masks)

    def _point_content(
        self,
        mf: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        padded_hw: Tuple[int, int],
    ) -> torch.Tensor:
        """Image content under each point: ``mf`` (C_mask, h, w) sampled bilinearly at the
        (P, N, 2) pixel centres, projected → (P, N, hidden); zero for ignored points (label -1,
        SAM's padding)."""
        dev = mf.device
        grid = (points.float() + 0.5) / torch.tensor([padded_hw[1], padded_hw[0]], device=dev)
        sampled = F.grid_sample(mf[None], (2 * grid - 1)[None], align_corners=False)[0]  # C×P×N
        sampled = self.feat_proj(sampled.permute(1, 2, 0))  # (P, N, hidden)
        valid = (labels.to(dev) >= 0)[..., None].to(sampled.dtype)
        return sampled * valid

    def _box_content(
        self, mf: torch.Tensor, b: torch.Tensor, padded_hw: Tuple[int, int]
    ) -> torch.Tensor:
        """Image content inside each box: ``mf`` (C_mask, h, w) features pooled over the cells
        whose centres lie in the (P, 4) XYXY pixel boxes ``b`` → (P, hidden)."""
        h, w = mf.shape[-2:]
        dev = mf.device
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * padded_hw[0] / h
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * padded_hw[1] / w
        inside = (
            (xs[None, None, :] >= b[:, 0, None, None])
            & (xs[None, None, :] < b[:, 2, None, None])
            & (ys[None, :, None] >= b[:, 1, None, None])
            & (ys[None, :, None] < b[:, 3, None, None])
        )
        empty = ~inside.flatten(1).any(1)
        if empty.any():  # a box thinner than a feature cell: take the cell under its centre
            cx = ((b[empty, 0] + b[empty, 2]) / 2 * w / padded_hw[1]).long().clamp(0, w - 1)
            cy = ((b[empty, 1] + b[empty, 3]) / 2 * h / padded_hw[0]).long().clamp(0, h - 1)
            idx = empty.nonzero()[:, 0]
            inside[idx, cy, cx] = True
        return self.feat_proj(self._pool(mf, inside.float()))

    def _mask_token(
        self,
        mf: torch.Tensor,
        mask_inputs: torch.Tensor,
        dense: torch.Tensor,
        padded_hw: Tuple[int, int],
        scale: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The mask prompt's token: (feature, position), each (P, hidden). Its feature adds the
        image content and SAM's dense mask embedding under the soft mask to the learned mask
        token; its position encodes the soft mask's centroid."""
        h, w = mf.shape[-2:]
        dev = mf.device
        wts = self._mask_weights_on_grid(mask_inputs, (h, w), padded_hw)  # (P, h, w)
        img_part = self.feat_proj(self._pool(mf, wts))
        dw = F.interpolate(
            wts[:, None], size=dense.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        dense_part = torch.einsum("phw,pchw->pc", dw, dense) / dw.flatten(1).sum(
            1, keepdim=True
        ).clamp(min=1e-6)
        # centroid of the soft mask, in pixels of the padded input
        gy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * padded_hw[0] / h
        gx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * padded_hw[1] / w
        mass = wts.flatten(1).sum(1).clamp(min=1e-6)
        cyx = torch.stack(
            [(wts.sum(1) * gx).sum(1) / mass, (wts.sum(2) * gy).sum(1) / mass], 1
        )  # (P, 2) x,y
        m_pos = self.sam.pe_layer.forward_with_coords(
            (cyx * scale)[:, None], self.sam.input_image_size
        )[:, 0]
        return self.mask_token.weight + img_part + dense_part, self.mask_token.weight + m_pos
