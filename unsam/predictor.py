"""Inference wrappers built like detectron2's ``DefaultPredictor``.

``WholeImagePredictor(cfg)(image)`` segments everything in one H×W×3 uint8 RGB image and returns
detectron2 ``Instances`` (``pred_masks`` bool N×H×W, ``scores`` N, ``pred_boxes`` N×4) sorted by
score. Weights come from ``cfg.MODEL.WEIGHTS`` (local path or URL; empty = random init).
"""
import logging

import numpy as np
import torch

import unsam.compat  # noqa: F401
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from .checkpoint import check_weights_path

logger = logging.getLogger(__name__)


def build_inference_model(cfg) -> torch.nn.Module:
    """Build the model of ``cfg``, load ``MODEL.WEIGHTS`` (checked first) and set eval mode."""
    import unsam.modeling  # noqa: F401  (fills detectron2's registries)

    model = build_model(cfg)
    model.eval()
    weights = check_weights_path(cfg.MODEL.WEIGHTS)
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        logger.warning("MODEL.WEIGHTS is empty: the model has random weights")
    return model


def check_rgb_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("image must be an H×W×3 uint8 RGB array")


class WholeImagePredictor:
    """Segment everything in an image: ``instances = predictor(image)``."""

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_inference_model(self.cfg)
        self.resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    @torch.no_grad()
    def __call__(self, image: np.ndarray):
        """``image``: H×W×3 uint8 RGB. Returns ``Instances`` at the original image size."""
        check_rgb_image(image)
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        h, w = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return self.model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
