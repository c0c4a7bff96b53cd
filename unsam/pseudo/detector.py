"""Divide with the CutLER detector: UnSAM's published divide stage.

The detector is stock detectron2 — ``GeneralizedRCNN`` with ``CascadeROIHeads``, one class,
class-agnostic box regression, masks on — built from the packaged config
``divide/cutler_cascade_R50_FPN.yaml`` (:func:`unsam.configs.get_config_file`). Its state_dict
has exactly the names and shapes of CutLER's public ``cutler_cascade_final.pth``
(``../shared/reference/cutler_cascade_r50_fpn_state_dict.json``), so that checkpoint loads
unchanged. Every instance scoring above ``score_thresh`` (0.1, as published; detectron2
keeps ``score > threshold``) is a divided region.

Preprocessing is detectron2's ``DefaultPredictor``: shortest edge to ``INPUT.MIN_SIZE_TEST``
(long edge ≤ ``INPUT.MAX_SIZE_TEST``), channels in ``INPUT.FORMAT`` (RGB for CutLER), masks
pasted back at the input size with threshold 0.5.
"""

import logging
import os
from typing import Dict, Optional, Tuple

import unsam.compat  # noqa: F401  (compat before detectron2)

import numpy as np
import torch

from ..configs import get_config_file

logger = logging.getLogger(__name__)

DEFAULT_DIVIDE_CONFIG = get_config_file("divide/cutler_cascade_R50_FPN.yaml")


class DivideError(RuntimeError):
    """The divide stage cannot be built (missing config/weights, wrong keys or shapes)."""


def divide_config(
    config_file: str = DEFAULT_DIVIDE_CONFIG,
    score_thresh: Optional[float] = None,
    device: str = "cpu",
):
    """detectron2 config: ``get_cfg()`` defaults merged with ``config_file``; ``score_thresh``
    overrides ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``. Raises :class:`DivideError` naming the file
    for a missing file or an unknown key."""
    from detectron2.config import get_cfg

    if not os.path.isfile(config_file):
        raise DivideError(f"divide config not found: {config_file}")
    cfg = get_cfg()
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, TypeError) as e:
        raise DivideError(f"{config_file}: {e}") from e
    if score_thresh is not None:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_thresh)
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def build_detector(cfg) -> torch.nn.Module:
    """The (randomly initialised) detector for ``cfg``, in eval mode on ``cfg.MODEL.DEVICE``."""
    from detectron2.modeling import build_model

    return build_model(cfg).eval()


def _skip(name: str) -> bool:
    # BatchNorm's step counter: not a weight, and absent from the reference list
    return name.endswith("num_batches_tracked")


def read_detector_state_dict(path_or_url: str) -> Dict[str, torch.Tensor]:
    """Model weights of a detectron2 checkpoint (``{"model": state_dict, ...}`` or a bare
    state dict; a ``module.`` prefix is dropped). ``path_or_url``: a file or an http(s) URL
    (downloaded once into detectron2's cache). Raises :class:`DivideError` naming the file."""
    from ..checkpoint import WeightsError, read_weights  # detectron2: not for every import

    try:
        ckpt = read_weights(str(path_or_url), what="--divide-weights")
    except WeightsError as e:
        raise DivideError(str(e)) from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not any(torch.is_tensor(v) for v in ckpt.values()):
        raise DivideError(
            f"{path_or_url}: no model weights found (expected a detectron2 checkpoint)"
        )
    return {
        (k[len("module.") :] if k.startswith("module.") else k): v
        for k, v in ckpt.items()
        if torch.is_tensor(v)
    }


def load_detector_weights(
    model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str
) -> None:
    """Load ``state`` into ``model`` after checking that every model tensor is there with its
    shape (BatchNorm ``num_batches_tracked`` aside). Raises :class:`DivideError` listing the
    first problems: a checkpoint of another architecture must not load half-way silently."""
    own = {k: v for k, v in model.state_dict().items() if not _skip(k)}
    missing = [k for k in own if k not in state]
    bad = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or bad:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} tensors "
                f"({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''})"
            )
        if bad:
            parts.append("shape mismatch: " + "; ".join(bad[:3]) + (" …" if len(bad) > 3 else ""))
        raise DivideError(
            f"{source}: not a checkpoint of this divide detector: " + ", ".join(parts)
        )
    unused = sorted(k for k in state if k not in own and not _skip(k))
    if unused:
        logger.warning(
            "%s: %d tensors not used by the detector (%s …)", source, len(unused), unused[0]
        )
    model.load_state_dict({k: state[k] for k in own}, strict=False)
    logger.info("loaded divide detector weights from %s", source)


class CutlerDivider:
    """Whole-image class-agnostic instances: ``__call__(image H×W×3 uint8 RGB) ->
    (masks (N, H, W) bool, scores (N,) float32)``, best score first (detectron2's order)."""

    def __init__(
        self,
        weights: str,
        config_file: str = DEFAULT_DIVIDE_CONFIG,
        score_thresh: float = 0.1,
        device: str = "cpu",
    ):
        from detectron2.data import transforms as T

        self.cfg = divide_config(config_file, score_thresh, device)
        # weights first: a missing file fails before the network is built
        state = read_detector_state_dict(weights)
        self.model = build_detector(self.cfg)
        load_detector_weights(self.model, state, weights)
        self.resize = T.ResizeShortestEdge(
            [self.cfg.INPUT.MIN_SIZE_TEST] * 2, self.cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = self.cfg.INPUT.FORMAT

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        # our images are RGB; a BGR-trained detector wants the channels swapped
        img = image[:, :, ::-1] if self.input_format == "BGR" else image
        img = self.resize.get_transform(img).apply_image(img)
        tensor = torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)).astype("float32"))
        inst = self.model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
        if len(inst) == 0:
            return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
        return inst.pred_masks.numpy().astype(bool), inst.scores.numpy().astype(np.float32)
