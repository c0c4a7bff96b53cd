"""UnSAM whole-image model. Importing this package fills detectron2's registries:
``META_ARCH_REGISTRY["UnSAM"]``, ``BACKBONE_REGISTRY["D2SwinTransformer"]``,
``SEM_SEG_HEADS_REGISTRY["MaskFormerHead" / "MSDeformAttnPixelDecoder"]`` and
``TRANSFORMER_DECODER_REGISTRY["MultiScaleMaskedTransformerDecoder"]``.

The model here is the inference model; what only training needs is in
:class:`unsam.engine.train_model.UnSAMTrain`. Nothing here imports ``unsam.data`` or
``unsam.engine``."""

import unsam.compat  # noqa: F401  (before detectron2)

from . import backbone  # noqa: F401
from .criterion import SetCriterion
from .head import MaskFormerHead
from .mask_postprocess import masks_to_boxes
from .matcher import HungarianMatcher
from .meta_arch import UnSAM
from .pixel_decoder import (
    MSDeformAttnPixelDecoder,
    fused_deform_attn_available,
    ms_deform_attn_core_pytorch,
)
from .transformer_decoder import TRANSFORMER_DECODER_REGISTRY, MultiScaleMaskedTransformerDecoder

__all__ = [
    "UnSAM",
    "MaskFormerHead",
    "MSDeformAttnPixelDecoder",
    "MultiScaleMaskedTransformerDecoder",
    "TRANSFORMER_DECODER_REGISTRY",
    "SetCriterion",
    "HungarianMatcher",
    "ms_deform_attn_core_pytorch",
    "fused_deform_attn_available",
    "masks_to_boxes",
]
