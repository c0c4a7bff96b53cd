"""Masked-attention query decoder (``MultiScaleMaskedTransformerDecoder``, Mask2Former).

Learned queries attend, layer by layer and round-robin over three pixel-decoder levels, only to
the pixels inside their current mask prediction (masked cross-attention), then to each other
(self-attention), then an FFN. Every layer's prediction (class logits + mask logits from a dot
product with the stride-4 mask features) is returned for deep supervision.

Callers may append extra queries (e.g. prompt embeddings) to — or use them instead of — the
learned ones; see :meth:`MultiScaleMaskedTransformerDecoder.forward`.

Memory: attention is computed with ``scaled_dot_product_attention`` on the weights of the
``nn.MultiheadAttention`` modules (kept for their state-dict names), in query chunks, with one
attention mask shared by all heads. When an intermediate layer's full-resolution masks are not
needed (inference, or no deep supervision) its attention mask is computed directly at the
attention resolution: bilinear resizing is linear, so resizing the mask features first gives
the same logits as resizing the dot product, at a fraction of the cost.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from torch import nn

from .pixel_decoder import PositionEmbeddingSine

logger = logging.getLogger(__name__)

TRANSFORMER_DECODER_REGISTRY = Registry("UNSAM_TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = (
    "Query decoders: (multi-scale features, mask features) -> predictions."
)

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "MultiScaleMaskedTransformerDecoder",
    "build_transformer_decoder",
    "multi_head_attention",
    "MLP",
]

# upper bound on (batch * heads * query-chunk * keys) attention scores held at once
_ATTN_SCORE_BUDGET = 1 << 25


def multi_head_attention(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same result as ``mha(query, key, value, attn_mask=~allowed)``, with bounded memory.

    Args:
        mha: the module whose ``in_proj_*`` / ``out_proj`` weights and dropout are used.
        query: (Lq, B, C); key, value: (Lk, B, C) (sequence-first, as nn.MultiheadAttention).
        allowed: (B, Lq, Lk) or (B, H, Lq, Lk) bool, True where a query may attend; None = all.
    Returns:
        (Lq, B, C).
    """
    lq, b, c = query.shape
    lk = key.shape[0]
    h = mha.num_heads
    d = c // h
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    bq = bk = bv = None
    if bias is not None:
        bq, bk, bv = bias[:c], bias[c : 2 * c], bias[2 * c :]
    q = F.linear(query, w[:c], bq).view(lq, b, h, d).permute(1, 2, 0, 3)
    k = F.linear(key, w[c : 2 * c], bk).view(lk, b, h, d).permute(1, 2, 0, 3)
    v = F.linear(value, w[2 * c :], bv).view(lk, b, h, d).permute(1, 2, 0, 3)
    if allowed is not None and allowed.dim() == 3:
        allowed = allowed[:, None]  # one mask broadcast over heads instead of H copies
    dropout_p = mha.dropout if mha.training else 0.0
    chunk = max(1, _ATTN_SCORE_BUDGET // max(1, b * h * lk))
    outs = []
    for s in range(0, lq, chunk):
        m = None if allowed is None else allowed[:, :, s : s + chunk]
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, s : s + chunk], k, v, attn_mask=m, dropout_p=dropout_p
            )
        )
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    out = out.permute(2, 0, 1, 3).reshape(lq, b, c)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


def _xavier_init(module: nn.Module) -> None:
    """Xavier-uniform init of every weight matrix of ``module`` (Mask2Former's layer init)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(
        self,
        tgt: torch.Tensor,
        allowed: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tgt, query_pos: (Q, B, C); allowed: (B, Q, Q) bool or None."""
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        tgt = tgt + self.dropout(multi_head_attention(self.self_attn, q, k, x, allowed))
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        allowed: Optional[torch.Tensor] = None,
        pos: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tgt/query_pos: (Q, B, C); memory/pos: (HW, B, C); allowed: (B, Q, HW) bool or None."""
        x = self.norm(tgt) if self.normalize_before else tgt
        out = multi_head_attention(
            self.multihead_attn, _with_pos(x, query_pos), _with_pos(memory, pos), memory, allowed
        )
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (the mask-embedding head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        deep_supervision: bool = True,
        dropout: float = 0.0,
    ):
        """
        Args:
            in_channels: channels of the multi-scale features. num_classes: foreground classes
            (1 for UnSAM); class logits have num_classes + 1 entries (last = no object).
            dec_layers: number of decoder layers (cfg DEC_LAYERS - 1, as in Mask2Former).
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("UnSAM's decoder always predicts classes (mask_classification=True)")
        self.mask_classification = mask_classification
        self.deep_supervision = deep_supervision
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions
        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Sequential())  # identity without state-dict entries
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_classification: bool = True):
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # one prediction comes from the queries before the first layer (Mask2Former counts it)
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "dropout": mf.DROPOUT,
        }

    def forward(
        self,
        x: List[torch.Tensor],
        mask_features: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        *,
        extra_queries: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        use_learned_queries: bool = True,
        self_attn_allowed: Optional[torch.Tensor] = None,
        return_aux: Optional[bool] = None,
        final_masks: bool = True,
    ) -> Dict[str, object]:
        """
        Args:
            x: 3 maps (B, C_in, H_l, W_l), coarse to fine (pixel decoder's multi_scale_features).
            mask_features: (B, mask_dim, H/4, W/4).
            mask: unused (padding masks are not used, as in Mask2Former).
            extra_queries: optional (feat, pos), each (B, M, hidden_dim), appended after the
                learned queries (or used alone with ``use_learned_queries=False``).
            self_attn_allowed: optional (B, Q_total, Q_total) bool, True where query i may attend
                to query j in self-attention (e.g. to keep prompt groups apart).
            return_aux: deep-supervision outputs; default = training and deep_supervision.
            final_masks: compute the last layer's ``pred_masks``. Inference passes False and
                computes masks only for the queries it keeps, from ``pred_mask_embeds``.
        Returns:
            dict with ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, H/4, W/4) (unless
            ``final_masks`` is False), ``pred_mask_embeds`` (B, Q, mask_dim) (mask logits =
            einsum("bqc,bchw->bqhw", pred_mask_embeds, mask_features)), ``pred_embeddings``
            (B, Q, hidden_dim) (normed last-layer query states) and, when
            requested, ``aux_outputs``: list of num_layers dicts (pred_logits, pred_masks) of the
            earlier predictions.
        """
        del mask
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        if return_aux is None:
            return_aux = self.training and self.deep_supervision
        src, pos, size_list = self._memory(x)
        output, query_pos = self._initial_queries(mask_features, extra_queries, use_learned_queries)

        # resized mask features per attention size, for layers whose full masks are not needed
        resized_cache: Dict[Tuple[int, int], torch.Tensor] = {}

        def heads(out, layer_idx):
            full = return_aux or (layer_idx == self.num_layers and final_masks)
            target = (
                None
                if layer_idx == self.num_layers
                else size_list[layer_idx % self.num_feature_levels]
            )
            return self._prediction_heads(out, mask_features, target, full, resized_cache)

        predictions_class, predictions_mask = [], []
        cls, msk, allowed, mask_embed = heads(output, 0)
        predictions_class.append(cls)
        predictions_mask.append(msk)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            # a query whose mask is empty at this level would attend to nothing: let it see all
            allowed = allowed | ~allowed.any(-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](
                output, src[level], allowed, pos=pos[level], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](
                output, self_attn_allowed, query_pos=query_pos
            )
            output = self.transformer_ffn_layers[i](output)
            cls, msk, allowed, mask_embed = heads(output, i + 1)
            predictions_class.append(cls)
            predictions_mask.append(msk)
        out = {
            "pred_logits": predictions_class[-1],
            "pred_mask_embeds": mask_embed,
            "pred_embeddings": self.decoder_norm(output).transpose(0, 1),
        }
        if predictions_mask[-1] is not None:
            out["pred_masks"] = predictions_mask[-1]
        if return_aux:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_masks": b}
                for a, b in zip(predictions_class[:-1], predictions_mask[:-1])
            ]
        return out

    def _memory(self, x: List[torch.Tensor]):
        """The cross-attention memory of each level: projected features + level embedding and
        their sine positions, both (H_l·W_l, B, C), and the level sizes (H_l, W_l)."""
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(tuple(x[i].shape[-2:]))
            pos.append(self.pe_layer(x[i]).flatten(2).permute(2, 0, 1))  # (HW, B, C)
            s = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))
        return src, pos, size_list

    def _initial_queries(
        self, mask_features: torch.Tensor, extra_queries, use_learned_queries: bool
    ):
        """The learned queries and/or ``extra_queries``, in that order: (features, positions),
        each (Q, B, hidden_dim)."""
        bs = mask_features.shape[0]
        feats, poses = [], []
        if use_learned_queries:
            feats.append(self.query_feat.weight.unsqueeze(1).expand(-1, bs, -1))
            poses.append(self.query_embed.weight.unsqueeze(1).expand(-1, bs, -1))
        if extra_queries is not None:
            ef, ep = extra_queries
            feats.append(ef.transpose(0, 1).to(mask_features.dtype))
            poses.append(ep.transpose(0, 1).to(mask_features.dtype))
        if not feats:
            raise ValueError("no queries: use_learned_queries=False and no extra_queries")
        output = torch.cat(feats, 0) if len(feats) > 1 else feats[0]
        query_pos = torch.cat(poses, 0) if len(poses) > 1 else poses[0]
        return output, query_pos

    def _prediction_heads(
        self,
        output: torch.Tensor,
        mask_features: torch.Tensor,
        attn_size: Optional[Tuple[int, int]],
        full: bool,
        cache: Dict[Tuple[int, int], torch.Tensor],
    ):
        """output: (Q, B, C). Returns class logits (B, Q, K+1), full masks (B, Q, H/4, W/4) or None,
        the cross-attention mask (B, Q, h*w) bool (True = may attend) at ``attn_size`` or None,
        and the mask embeddings (B, Q, mask_dim)."""
        dec = self.decoder_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(dec)
        mask_embed = self.mask_embed(dec)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features) if full else None
        allowed = None
        if attn_size is not None:
            with torch.no_grad():
                if outputs_mask is not None:
                    small = F.interpolate(
                        outputs_mask.detach(), size=attn_size, mode="bilinear", align_corners=False
                    )
                else:
                    if attn_size not in cache:
                        cache[attn_size] = F.interpolate(
                            mask_features.detach(),
                            size=attn_size,
                            mode="bilinear",
                            align_corners=False,
                        )
                    small = torch.einsum("bqc,bchw->bqhw", mask_embed.detach(), cache[attn_size])
                # sigmoid(logit) >= 0.5  <=>  logit >= 0: attend inside the predicted mask
                allowed = (small >= 0).flatten(2)
        return outputs_class, outputs_mask, allowed, mask_embed


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    """Build ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME`` from the registry."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)
