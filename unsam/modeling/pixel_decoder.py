"""Multi-scale deformable-attention pixel decoder (``MSDeformAttnPixelDecoder``).

Backbone features res3..res5 are projected to ``CONVS_DIM`` channels and refined jointly by a
deformable-attention transformer encoder (``TRANSFORMER_ENC_LAYERS`` layers); an FPN step adds
res2 and a 1×1 conv gives the stride-4 ``mask_features`` the query decoder dots its queries with.

Deformable attention (``MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL``: ``auto`` | ``pytorch`` |
``fused``): the pure-PyTorch path (``grid_sample``) works everywhere and is the only one that
trains on CPU. Under ``auto``, CUDA inputs use Deformable-DETR's compiled
``MultiScaleDeformableAttention`` extension when it is importable, and CPU inputs that need no
gradient use the project's compiled CPU kernel (:mod:`unsam.ops`: ``grid_sample``'s arithmetic,
so the same outputs bit for bit, ~4x faster on 2 threads) when it was built. State-dict names follow
Mask2Former so public checkpoints load unchanged.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..ops import cpu_kernels

logger = logging.getLogger(__name__)

__all__ = [
    "PositionEmbeddingSine",
    "ms_deform_attn_core_pytorch",
    "MSDeformAttn",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnPixelDecoder",
    "build_pixel_decoder",
    "fused_deform_attn_available",
]

try:  # Deformable-DETR / Mask2Former compiled op; absent on CPU-only installs
    import MultiScaleDeformableAttention as _MSDA  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _MSDA = None


def fused_deform_attn_available() -> bool:
    """True when the compiled multi-scale deformable attention op can be imported."""
    return _MSDA is not None


class PositionEmbeddingSine(nn.Module):
    """DETR-style 2-D sine/cosine encoding: (B, C, H, W) -> (B, 2*num_pos_feats, H, W).

    Parameter-free (adds nothing to the state_dict); depends only on the spatial size.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: int = 10000,
        normalize: bool = False,
        scale: Optional[float] = None,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if mask is None:
            not_mask = torch.ones((1, h, w), device=x.device, dtype=torch.float32)
        else:
            not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack(
            (pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4
        ).flatten(3)
        pos_y = torch.stack(
            (pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4
        ).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)
        if mask is None:
            pos = pos.expand(b, -1, -1, -1)
        return pos


# --------------------------------------------------------------------------------------------
# multi-scale deformable attention
# --------------------------------------------------------------------------------------------
def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    spatial_shapes: Union[torch.Tensor, List[Tuple[int, int]]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention.

    Args:
        value: (N, S, M, D) values of all levels concatenated, S = sum_l H_l*W_l, M heads.
        spatial_shapes: L pairs (H_l, W_l) (tensor (L, 2) or list).
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y) in [0, 1]; 0/1 are the outer
            pixel edges (``align_corners=False``); samples outside read zeros.
        attention_weights: (N, Lq, M, L, P), normalized over L*P per head.

    Returns:
        (N, Lq, M*D).
    """
    n, _, m, d = value.shape
    _, lq, _, nl, p, _ = sampling_locations.shape
    shapes = [
        (int(h), int(w))
        for h, w in (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes)
    ]
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    out = None
    # accumulate level by level so only one level's samples (N*M, D, Lq, P) are alive at a time
    for lid, (h, w) in enumerate(shapes):
        v = values[lid].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        s = F.grid_sample(
            v, g, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (N*M, D, Lq, P)
        a = attention_weights[:, :, :, lid].transpose(1, 2).reshape(n * m, 1, lq, p)
        contrib = (s * a).sum(-1)
        out = contrib if out is None else out + contrib
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


class _FusedMSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled op (only reachable when it imported)."""

    @staticmethod
    def forward(
        ctx, value, shapes, level_start_index, sampling_locations, attention_weights, im2col_step
    ):
        ctx.im2col_step = im2col_step
        out = _MSDA.ms_deform_attn_forward(
            value, shapes, level_start_index, sampling_locations, attention_weights, im2col_step
        )
        ctx.save_for_backward(
            value, shapes, level_start_index, sampling_locations, attention_weights
        )
        return out

    @staticmethod
    def backward(ctx, grad_output):
        value, shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        gv, gs, ga = _MSDA.ms_deform_attn_backward(
            value,
            shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output.contiguous(),
            ctx.im2col_step,
        )
        return gv, None, None, gs, ga, None


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR, Zhu et al. 2021).

    Each query attends to ``n_points`` learned offsets around its reference point on each of
    ``n_levels`` feature maps, per head.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if impl not in ("auto", "pytorch", "fused"):
            raise ValueError(
                "MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL must be auto|pytorch|fused, "
                f"got {impl!r}"
            )
        if impl == "fused" and _MSDA is None:
            raise ImportError(
                "DEFORMABLE_ATTENTION_IMPL='fused' but MultiScaleDeformableAttention is not "
                "importable"
            )
        self.impl = impl
        self.im2col_step = 128
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # initial offsets: head h looks in direction 2*pi*h/M, point k at distance k+1
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C); reference_points: (N, Lq, L, 2) normalized (x, y).
            input_flatten: (N, S, C); input_spatial_shapes: (L, 2) long (H, W);
            input_level_start_index: (L,); input_padding_mask: (N, S) bool, True = padding.
        Returns:
            (N, Lq, C).
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            n, lq, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            n, lq, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] != 2:
            raise ValueError(
                f"reference_points must end in 2 (x, y), got {tuple(reference_points.shape)}"
            )
        normalizer = torch.stack(
            [input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1
        ).to(offsets.dtype)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
        use_fused = _MSDA is not None and value.is_cuda and self.impl in ("auto", "fused")
        cpu_op = self._cpu_kernel(value, offsets, weights)
        # sampling in fp32 even under AMP: half-precision locations lose sub-pixel accuracy
        with torch.autocast(device_type=value.device.type, enabled=False):
            value, locations, weights = value.float(), locations.float(), weights.float()
            if use_fused:
                out = _FusedMSDeformAttnFunction.apply(
                    value,
                    input_spatial_shapes,
                    input_level_start_index,
                    locations,
                    weights,
                    self.im2col_step,
                )
            elif cpu_op is not None:
                out = cpu_op(
                    value, input_spatial_shapes, input_level_start_index, locations, weights
                )
            else:
                out = ms_deform_attn_core_pytorch(value, input_spatial_shapes, locations, weights)
        return self.output_proj(out)

    def _cpu_kernel(self, value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor):
        """The compiled CPU op when it applies (CPU, ``auto``, no gradient needed), else None."""
        if value.device.type != "cpu" or self.impl != "auto":
            return None
        if torch.is_grad_enabled() and (
            value.requires_grad or offsets.requires_grad or weights.requires_grad
        ):
            return None  # the kernel has no backward: training uses the PyTorch path
        ops = cpu_kernels()
        return None if ops is None else ops.ms_deform_attn_forward


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention + FFN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU(inplace=True)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None
    ):
        src2 = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class MSDeformAttnTransformerEncoder(nn.Module):
    def __init__(self, layers: List[MSDeformAttnTransformerEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def get_reference_points(
        spatial_shapes: List[Tuple[int, int]], device: torch.device
    ) -> torch.Tensor:
        """Pixel-centre coordinates of every level, normalized to [0, 1]: (1, S, 2) as (x, y)."""
        refs = []
        for h, w in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h,
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w,
                indexing="ij",
            )
            refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        return torch.cat(refs, 0)[None]

    def forward(self, src, spatial_shapes, level_start_index, pos, padding_mask=None):
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        # no padding masks (as in Mask2Former): every level's valid ratio is 1, so the reference
        # point of a query is the same normalized location on every level
        reference_points = self.get_reference_points(shapes, src.device)
        reference_points = reference_points[:, :, None].expand(src.shape[0], -1, len(shapes), -1)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return out


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Deformable-DETR encoder over L flattened levels with a learned per-level embedding."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.encoder = MSDeformAttnTransformerEncoder(
            [
                MSDeformAttnTransformerEncoderLayer(
                    d_model,
                    dim_feedforward,
                    dropout,
                    num_feature_levels,
                    nhead,
                    enc_n_points,
                    impl=impl,
                )
                for _ in range(num_encoder_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.Tensor(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[torch.Tensor], pos_embeds: List[torch.Tensor]):
        """srcs/pos_embeds: L tensors (B, C, H_l, W_l).

        Returns:
            memory (B, S, C), spatial_shapes (L, 2) long, level_start_index (L,) long.
        """
        src_flat, pos_flat, shapes = [], [], []
        for lvl, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flat = torch.cat(src_flat, 1)
        pos_flat = torch.cat(pos_flat, 1)
        spatial_shapes = torch.as_tensor(
            [tuple(s) for s in shapes], dtype=torch.long, device=src_flat.device
        )
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        memory = self.encoder(src_flat, spatial_shapes, level_start_index, pos_flat)
        return memory, spatial_shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder: deformable encoder over res3..res5 + FPN step to stride ``COMMON_STRIDE``."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]],
        transformer_in_features: List[str],
        common_stride: int,
        n_points: int = 4,
        deform_attn_impl: str = "auto",
    ):
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]
        self.feature_strides = [v.stride for _, v in shapes]
        self.feature_channels = [v.channels for _, v in shapes]
        t_shapes = sorted(
            ((k, v) for k, v in input_shape.items() if k in transformer_in_features),
            key=lambda kv: kv[1].stride,
        )
        self.transformer_in_features = [k for k, _ in t_shapes]
        t_channels = [v.channels for _, v in t_shapes]
        self.transformer_feature_strides = [v.stride for _, v in t_shapes]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        # input_proj[0] handles the coarsest level (res5): the encoder sees levels coarse -> fine
        self.input_proj = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(ch, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
                for ch in t_channels[::-1]
            ]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=n_points,
            impl=deform_attn_impl,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)
        # the query decoder attends to (at most) three levels
        self.maskformer_num_feature_levels = 3
        self.common_stride = common_stride
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = int(math.log2(stride) - math.log2(self.common_stride))
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, ch in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral = Conv2d(
                ch, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim)
            )
            output = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # kept as plain lists (not ModuleLists) so the state_dict only has adapter_i / layer_i
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            # Mask2Former hard-codes 1024; an optional key lets tiny configs shrink it
            "transformer_dim_feedforward": head.TRANSFORMER_DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": head.COMMON_STRIDE,
            "n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "deform_attn_impl": head.get("DEFORMABLE_ATTENTION_IMPL", "auto"),
        }

    def forward_features(self, features: Dict[str, torch.Tensor]):
        """
        Args:
            features: backbone outputs {"res2": (B, C2, H/4, W/4), ...,
                "res5": (B, C5, H/32, W/32)}.
        Returns:
            mask_features (B, mask_dim, H/4, W/4); encoder output of the coarsest level
            (B, conv_dim, H/32, W/32); multi_scale_features: 3 maps (B, conv_dim, ·, ·) from
            coarse (stride 32) to fine (stride 8).
        """
        srcs, pos = [], []
        for idx, f in enumerate(self.transformer_in_features[::-1]):
            x = features[f].float()  # the deformable op runs in fp32
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        y, spatial_shapes, _ = self.transformer(srcs, pos)
        bs = y.shape[0]
        sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
        out = [
            z.transpose(1, 2).reshape(bs, -1, int(h), int(w))
            for z, (h, w) in zip(y.split(sizes, dim=1), spatial_shapes.tolist())
        ]
        for idx, f in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            x = features[f].float()
            cur = self.lateral_convs[idx](x)
            y = cur + F.interpolate(
                out[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False
            )
            out.append(self.output_convs[idx](y))
        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` from ``SEM_SEG_HEADS_REGISTRY``."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(f"pixel decoder {name} has no forward_features(features)")
    return model
