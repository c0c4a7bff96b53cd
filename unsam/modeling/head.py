"""``MaskFormerHead``: pixel decoder + query decoder under the ``sem_seg_head.`` prefix."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from .pixel_decoder import build_pixel_decoder
from .transformer_decoder import build_transformer_decoder

__all__ = ["MaskFormerHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Runs the pixel decoder once (:meth:`encode`) and the query decoder on its output
    (:meth:`decode`); ``forward`` does both."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
    ):
        super().__init__()
        self.in_features = [k for k, _ in sorted(input_shape.items(), key=lambda kv: kv[1].stride)]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        if in_feature != "multi_scale_pixel_decoder":
            raise ValueError(
                "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE must be 'multi_scale_pixel_decoder' "
                f"(the masked-attention decoder needs multi-scale features), got {in_feature!r}"
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "ignore_value": head.IGNORE_VALUE,
            "num_classes": head.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "loss_weight": head.LOSS_WEIGHT,
            "transformer_in_feature": in_feature,
            "transformer_predictor": build_transformer_decoder(
                cfg, head.CONVS_DIM, mask_classification=True
            ),
        }

    def encode(self, features: Dict[str, torch.Tensor]) -> Dict[str, object]:
        """Backbone features -> {"mask_features": (B, mask_dim, H/4, W/4), "multi_scale_features":
        3 maps (B, conv_dim, ·, ·) coarse to fine, "encoder_features": (B, conv_dim, H/32,
        W/32)}."""
        mask_features, enc, multi_scale = self.pixel_decoder.forward_features(features)
        return {
            "mask_features": mask_features,
            "multi_scale_features": multi_scale,
            "encoder_features": enc,
        }

    def decode(
        self, encoded: Dict[str, object], mask: Optional[torch.Tensor] = None, **kwargs
    ) -> Dict[str, object]:
        """Query decoder on :meth:`encode`'s output; kwargs go to the decoder's forward."""
        return self.predictor(
            encoded["multi_scale_features"], encoded["mask_features"], mask, **kwargs
        )

    def forward(
        self, features: Dict[str, torch.Tensor], mask: Optional[torch.Tensor] = None, **kwargs
    ):
        return self.decode(self.encode(features), mask, **kwargs)
