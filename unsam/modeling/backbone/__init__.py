"""Backbones registered in detectron2's ``BACKBONE_REGISTRY``.

ResNets come from detectron2 itself (``build_resnet_backbone``); importing this package adds
``D2SwinTransformer``.
"""

from .swin import D2SwinTransformer, SwinTransformer

__all__ = ["D2SwinTransformer", "SwinTransformer"]
