"""Inference wrappers in segment-anything's pattern: a predictor takes a built model.

``WholeImagePredictor(model, cfg)(image)`` segments everything in one H×W×3 uint8 RGB image and
returns detectron2 ``Instances`` (``pred_masks`` bool N×H×W, ``scores`` N, ``pred_boxes`` N×4)
sorted by score. ``PromptPredictor(model, cfg)`` answers point / box / mask prompts with the
interface of ``segment_anything.SamPredictor`` (``set_image`` once, then ``predict`` /
``predict_batch``). One model may serve both (the browser demo does).

``from_config(cfg)`` on either class builds the model of ``cfg`` and loads ``cfg.MODEL.WEIGHTS``
(local path or URL; empty = random init), as ``sam_model_registry[...](checkpoint)`` +
``SamPredictor(sam)`` do; :func:`build_inference_model` and :func:`build_prompt_model` are the
builders, for code that shares one network between predictors.
"""

import logging
from typing import Dict, Optional, Tuple

import unsam.compat  # noqa: F401

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from segment_anything.utils.transforms import ResizeLongestSide

from .checkpoint import load_weights, read_weights, require_parts
from .config.loading import ConfigError
from .modeling.mask_postprocess import valid_extent
from .modeling.prompt_encoder import MASK_INPUT_SIZE
from .query_selection import QuerySelector
from .utils.device import check_device

logger = logging.getLogger(__name__)

PROMPT_MODES = ("auto", "learned", "select")
# top-level modules of the state_dict that each use of the weights needs
WHOLE_IMAGE_PARTS = ("backbone", "sem_seg_head")
PROMPT_PARTS = ("prompt_encoder", "iou_head")
# logits of the empty outputs that pad a select-mode batch to K granularities
_EMPTY_LOGIT = -100.0


def build_inference_model(
    cfg,
    checkpoint: Optional[Dict] = None,
    what: str = "whole-image segmentation",
    optional_parts: Tuple[str, ...] = (),
) -> torch.nn.Module:
    """Build the model of ``cfg`` in eval mode and load ``MODEL.WEIGHTS`` into it.

    ``checkpoint``: the weights already read (:func:`unsam.checkpoint.read_weights`), else read
    here. Weights without any tensor of the whole-image parts raise
    :class:`~unsam.checkpoint.WeightsError`; missing tensors of those or of ``optional_parts``
    give one warning.
    """
    import unsam.modeling  # noqa: F401  (fills detectron2's registries)

    check_device(
        cfg.MODEL.DEVICE
    )  # a missing GPU: one DeviceError line, not a traceback from deep in torch
    model = build_model(cfg)
    model.eval()
    if checkpoint is None and cfg.MODEL.WEIGHTS:
        checkpoint = read_weights(cfg.MODEL.WEIGHTS)
    if checkpoint is None:
        logger.warning("MODEL.WEIGHTS is empty: the model has random weights")
        return model
    report = load_weights(model, checkpoint, cfg.MODEL.WEIGHTS)
    require_parts(report, WHOLE_IMAGE_PARTS, what, optional_parts)
    return model


def resolve_prompt_mode(cfg, checkpoint: Optional[Dict]) -> Tuple[str, str]:
    """``UNSAM.PROMPT.MODE`` → ("learned" | "select", the reason, for the log).

    ``auto`` is ``learned`` when the checkpoint holds tensors of the prompt path, ``select``
    otherwise; with no weights at all, the config decides (``UNSAM.PROMPT.ENABLED``).
    """
    mode = cfg.UNSAM.PROMPT.MODE
    if mode not in PROMPT_MODES:
        raise ConfigError(f"UNSAM.PROMPT.MODE must be one of {PROMPT_MODES}, got {mode!r}")
    if mode != "auto":
        return mode, "UNSAM.PROMPT.MODE"
    if checkpoint is None:
        if cfg.UNSAM.PROMPT.ENABLED:
            return "learned", "no MODEL.WEIGHTS and UNSAM.PROMPT.ENABLED: the (random) prompt head"
        return (
            "select",
            "no MODEL.WEIGHTS and UNSAM.PROMPT.ENABLED is False: selection from the whole-image "
            "queries",
        )
    names = list(checkpoint.get("model", {}))
    prompt = [n for n in names if n.split(".", 1)[0] in PROMPT_PARTS]
    if prompt:
        return "learned", f"MODEL.WEIGHTS holds the prompt path ({len(prompt)} tensors)"
    return "select", (
        f"MODEL.WEIGHTS has no prompt-encoder weights ({len(names)} tensors, none of "
        f"{'/'.join(p + '.*' for p in PROMPT_PARTS)}): prompting by selection from the "
        "whole-image queries"
    )


def build_prompt_model(cfg, checkpoint: Optional[Dict] = None):
    """The model :class:`PromptPredictor` needs, and ``cfg`` with its prompt mode resolved.

    Reads ``MODEL.WEIGHTS`` unless ``checkpoint`` (:func:`unsam.checkpoint.read_weights`) is
    given, resolves ``UNSAM.PROMPT.MODE`` (:func:`resolve_prompt_mode`, logged) and builds the
    model with the prompt path only in ``learned`` mode. Returns ``(model, cfg)``: a model in
    eval mode and a frozen copy of ``cfg`` whose ``UNSAM.PROMPT.MODE`` is ``learned`` or
    ``select`` and ``UNSAM.PROMPT.ENABLED`` says whether the model has the prompt path. The
    model's whole-image outputs are those of :func:`build_inference_model`'s (the prompt path
    takes no part in them), so a :class:`WholeImagePredictor` may share it.
    """
    if checkpoint is None and cfg.MODEL.WEIGHTS:
        checkpoint = read_weights(cfg.MODEL.WEIGHTS)
    mode, reason = resolve_prompt_mode(cfg, checkpoint)
    logger.info("prompt mode '%s': %s", mode, reason)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.UNSAM.PROMPT.ENABLED = mode == "learned"
    cfg.UNSAM.PROMPT.MODE = mode
    cfg.freeze()
    learned = mode == "learned"
    what = "prompting by learned prompt head" if learned else "prompting by query selection"
    model = build_inference_model(cfg, checkpoint, what, PROMPT_PARTS if learned else ())
    return model, cfg


def model_prompt_mode(model: torch.nn.Module, mode: str) -> str:
    """``mode`` (``UNSAM.PROMPT.MODE``) for ``model`` → "learned" | "select".

    ``auto`` is ``learned`` when the model has the prompt path, ``select`` otherwise; ``learned``
    on a model without it is a ValueError.
    """
    if mode not in PROMPT_MODES:
        raise ConfigError(f"UNSAM.PROMPT.MODE must be one of {PROMPT_MODES}, got {mode!r}")
    enabled = bool(getattr(model, "prompt_enabled", False))
    if mode == "auto":
        return "learned" if enabled else "select"
    if mode == "learned" and not enabled:
        raise ValueError(
            "prompt mode 'learned' needs a model with the prompt path (built with "
            "UNSAM.PROMPT.ENABLED True); use mode 'select' for a whole-image model"
        )
    return mode


def check_rgb_image(image: np.ndarray) -> None:
    """An H×W×3 uint8 array with pixels, else ValueError naming what was given."""
    if (
        not isinstance(image, np.ndarray)
        or image.ndim != 3
        or image.shape[2] != 3
        or image.dtype != np.uint8
    ):
        raise ValueError(
            "image must be an H×W×3 uint8 RGB array, got "
            + (
                f"{image.dtype} {image.shape}"
                if isinstance(image, np.ndarray)
                else type(image).__name__
            )
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]} pixels (H×W×3 shape {image.shape}): "
            "nothing to segment"
        )


def _at_least_one(h: float, w: float) -> Tuple[int, int]:
    """Rounded resize target with no side below 1 px: a 20000×20 strip scaled to a 256 px longest
    side would otherwise get a 0 px side, which no resize accepts."""
    return max(1, int(h + 0.5)), max(1, int(w + 0.5))


class _ResizeLongestSide(ResizeLongestSide):
    """SAM's resize (image, points and boxes alike), keeping every side at least 1 px."""

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        scale = long_side_length / max(oldh, oldw)
        return _at_least_one(oldh * scale, oldw * scale)


class WholeImagePredictor:
    """Segment everything in an image: ``instances = predictor(image)``.

    ``model``: an UnSAM model in eval mode (:func:`build_inference_model`, or the model of a
    :class:`PromptPredictor`: the whole-image outputs do not depend on the prompt path);
    ``cfg``: its config, for the test-time resize (``INPUT.MIN_SIZE_TEST`` /
    ``INPUT.MAX_SIZE_TEST``) and ``INPUT.FORMAT``. The number of masks and their scoring are the
    model's own (``TEST.DETECTIONS_PER_IMAGE`` of the config it was built with).
    """

    def __init__(self, model: torch.nn.Module, cfg):
        self.model = model
        self.cfg = cfg.clone()
        self.resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    @classmethod
    def from_config(cls, cfg) -> "WholeImagePredictor":
        """Build the model of ``cfg`` and load ``cfg.MODEL.WEIGHTS`` (empty: random weights)."""
        return cls(build_inference_model(cfg), cfg)

    def prepare(self, image: np.ndarray) -> Dict[str, object]:
        """``image`` (H×W×3 uint8 RGB) → the model's input dict: ``image`` 3×h×w uint8 tensor
        resized and in ``INPUT.FORMAT``, ``height`` H and ``width`` W (the output size)."""
        check_rgb_image(image)
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        h, w = image.shape[:2]
        resized = self._resize(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": h, "width": w}

    @torch.no_grad()
    def __call__(self, image: np.ndarray):
        """``image``: H×W×3 uint8 RGB. Returns ``Instances`` at the original image size."""
        return self.model([self.prepare(image)])[0]["instances"].to("cpu")

    def _resize(self, image: np.ndarray) -> T.Transform:
        """detectron2's test-time resize with no side below 1 px (:func:`_at_least_one`); the
        model returns masks at the original size whatever the resized one."""
        tfm = self.resize.get_transform(image)
        if isinstance(tfm, T.ResizeTransform) and min(tfm.new_h, tfm.new_w) < 1:
            tfm = T.ResizeTransform(tfm.h, tfm.w, max(1, tfm.new_h), max(1, tfm.new_w), tfm.interp)
        return tfm


class PromptPredictor:
    """Promptable segmentation with the ``segment_anything.SamPredictor`` interface::

        predictor = PromptPredictor.from_config(cfg)   # builds, loads cfg.MODEL.WEIGHTS
        # or PromptPredictor(model, cfg) for a model already built (build_prompt_model)
        predictor.set_image(image)         # H×W×3 uint8 RGB: the image is encoded once
        masks, iou_predictions, low_res_logits = predictor.predict(point_coords=...,
                                                                   point_labels=...)

    Frames and conventions are SAM's: the image is resized so that its longest side is
    ``INPUT.IMAGE_SIZE`` (``segment_anything``'s ``ResizeLongestSide``) and zero-padded
    (bottom/right) to a square; prompts are in pixels of the original image (points (x, y), boxes
    XYXY); ``mask_input`` / ``low_res_logits`` are 256×256 logits over the padded square.

    Two modes (``UNSAM.PROMPT.MODE`` of ``cfg``, resolved once in ``__init__``, logged, kept
    in ``mode``):

    * ``learned``: the prompt encoder's K granularity queries run through the decoder;
      ``set_image`` runs backbone + pixel decoder. ``multimask_output=True`` returns the K
      (``UNSAM.PROMPT.NUM_GRANULARITIES``, default 6) outputs in the order of the granularity
      queries; ``False`` the one with the highest predicted IoU.
    * ``select``: training-free, for whole-image checkpoints (:mod:`unsam.query_selection`);
      ``set_image`` also runs the whole-image decoder once. ``multimask_output=True`` returns up
      to K distinct masks that satisfy the prompt, smallest first; ``False`` the best-scored one.
      ``iou_predictions`` is the selection score (0 for an output that does not satisfy the
      prompt, given only when no query does). :meth:`predict_batch` pads to K with empty masks
      of score 0.
    * ``auto`` (default): :meth:`from_config` resolves it by the checkpoint, ``learned`` when
      ``MODEL.WEIGHTS`` holds prompt-path tensors, else ``select`` (:func:`resolve_prompt_mode`);
      for a model handed in, ``learned`` when it has the prompt path, else ``select``.

    Differences from SAM: K outputs instead of SAM's 3; SAM has a dedicated single-mask token.
    """

    def __init__(self, model: torch.nn.Module, cfg):
        """``model``: an UnSAM model in eval mode (:func:`build_prompt_model`); ``cfg``: its
        config (``INPUT.IMAGE_SIZE``, ``INPUT.FORMAT``, ``UNSAM.PROMPT.MODE`` /
        ``NUM_GRANULARITIES``). The model is used, never changed: other predictors may share it."""
        self.model = model
        self.mode = model_prompt_mode(model, cfg.UNSAM.PROMPT.MODE)
        if cfg.UNSAM.PROMPT.MODE == "auto":
            logger.info(
                "prompt mode '%s': the model %s the prompt path",
                self.mode,
                "has" if self.mode == "learned" else "does not have",
            )
        cfg = cfg.clone()
        cfg.defrost()
        cfg.UNSAM.PROMPT.ENABLED = bool(getattr(model, "prompt_enabled", False))
        cfg.UNSAM.PROMPT.MODE = self.mode
        cfg.freeze()
        self.cfg = cfg
        self.image_size = int(cfg.INPUT.IMAGE_SIZE)
        self.num_granularities = int(cfg.UNSAM.PROMPT.NUM_GRANULARITIES)
        self.transform = _ResizeLongestSide(self.image_size)
        self.input_format = cfg.INPUT.FORMAT
        self.mask_threshold = 0.0
        self.reset_image()

    @classmethod
    def from_config(cls, cfg) -> "PromptPredictor":
        """Read ``cfg.MODEL.WEIGHTS``, resolve the prompt mode by it and build the model that
        mode needs (:func:`build_prompt_model`)."""
        return cls(*build_prompt_model(cfg))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.selector = None
        self._warned_miss = False
        self.original_size = None
        self.input_size = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode ``image`` (H×W×3 uint8, ``image_format`` RGB or BGR) once for any number of
        prompts."""
        check_rgb_image(image)
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format != self.input_format:
            image = image[:, :, ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        tensor = torch.as_tensor(
            np.ascontiguousarray(resized.transpose(2, 0, 1)), device=self.device
        ).float()
        tensor = (tensor - self.model.pixel_mean) / self.model.pixel_std
        h, w = tensor.shape[-2:]
        padded = tensor.new_zeros((1, 3, self.image_size, self.image_size))
        padded[0, :, :h, :w] = tensor
        self.reset_image()
        features = self.model.extract_features(padded)
        features.pop("backbone", None)  # only the pixel decoder's outputs are decoded
        if self.mode == "select":
            out = self.model.decode(features, final_masks=False)
            mask_features = features["mask_features"][0]
            square = (self.image_size, self.image_size)
            valid = valid_extent(mask_features.shape[-2:], (h, w), square)
            self.selector = QuerySelector(
                out["pred_logits"][0],
                out["pred_mask_embeds"][0],
                mask_features,
                valid,
                chunk=self.model.upsample_chunk,
            )
        else:
            self.features = features
        self.original_size = tuple(image.shape[:2])
        self.input_size = (int(h), int(w))
        self.is_image_set = True

    # ------------------------------------------------------------------------------------------
    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt (SamPredictor.predict's signature and conventions).

        Args:
            point_coords: N×2 (x, y) pixels of the original image; point_labels: N (1 fg, 0 bg).
            box: 4 XYXY pixels. mask_input: 1×256×256 logits (e.g. a previous ``low_res_logits``).
        Returns:
            masks C×H×W bool (float logits with ``return_logits``), iou_predictions C float32,
            low_res_logits C×256×256 float32; C = K with ``multimask_output`` else 1 (``select``:
            1 ≤ C ≤ K, the distinct masks found).
        """
        if point_coords is not None and point_labels is None:
            raise ValueError("point_labels must be supplied with point_coords")
        pts = (
            None
            if point_coords is None
            else torch.as_tensor(np.asarray(point_coords, np.float32))[None]
        )
        lbl = (
            None
            if point_labels is None
            else torch.as_tensor(np.asarray(point_labels, np.int64))[None]
        )
        bx = None if box is None else torch.as_tensor(np.asarray(box, np.float32)).reshape(1, 4)
        mi = None if mask_input is None else torch.as_tensor(np.asarray(mask_input, np.float32))
        if mi is not None and tuple(mi.shape) != (1, MASK_INPUT_SIZE, MASK_INPUT_SIZE):
            raise ValueError(
                f"mask_input must be 1×{MASK_INPUT_SIZE}×{MASK_INPUT_SIZE} low-res logits over the "
                f"padded square (a previous low_res_logits[i:i+1], or unsam.data.prompts."
                f"mask_to_mask_input(mask)), got shape {tuple(mi.shape)}"
            )
        mi = None if mi is None else mi[None]
        masks, iou, low, counts = self._predict(pts, lbl, bx, mi, multimask_output, return_logits)
        c = int(counts[0])
        return masks[0, :c].cpu().numpy(), iou[0, :c].cpu().numpy(), low[0, :c].cpu().numpy()

    def predict_batch(
        self,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B prompts of the same kind at once (``learned``: one decoder pass, prompts kept apart).

        Args (torch or numpy, ORIGINAL image pixels, unlike SamPredictor.predict_torch which takes
        transformed coordinates): point_coords B×N×2, point_labels B×N, boxes B×4,
        mask_input B×1×256×256.
        Returns (torch): masks B×C×H×W bool (logits with ``return_logits``), iou_predictions B×C,
        low_res_logits B×C×256×256; C = K, or 1 without ``multimask_output``.
        """
        return self._predict(
            point_coords, point_labels, boxes, mask_input, multimask_output, return_logits
        )[:3]

    @torch.no_grad()
    def _predict(
        self,
        point_coords,
        point_labels,
        boxes,
        mask_input,
        multimask_output: bool,
        return_logits: bool,
    ):
        """:meth:`predict_batch` plus the number of real (not padding) outputs per prompt (B,)."""
        if not self.is_image_set:
            raise RuntimeError("an image must be set with set_image(...) before mask prediction")
        prompts = self._transform_prompts(point_coords, point_labels, boxes, mask_input)
        if self.mode == "select":
            logits, iou, counts = self._select(prompts, multimask_output)
        else:
            logits, iou = self._decode_learned(prompts, multimask_output)
            counts = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.int64)
        low_res = logits
        if tuple(low_res.shape[-2:]) != (256, 256):
            low_res = F.interpolate(low_res, size=(256, 256), mode="bilinear", align_corners=False)
        masks = self._postprocess(logits)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, iou, low_res, counts

    def _transform_prompts(
        self, point_coords, point_labels, boxes, mask_input
    ) -> Dict[str, torch.Tensor]:
        """Original-image prompts → the padded input's frame (``points`` B×N×2, ``labels`` B×N,
        ``boxes`` B×4, ``mask_inputs`` B×1×256×256) plus ``pixels`` B×N×2 (row, col) clicked."""
        dev = self.device
        prompts = {}
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied with point_coords")
            pc = torch.as_tensor(
                np.asarray(point_coords, np.float32)
                if not isinstance(point_coords, torch.Tensor)
                else point_coords,
                dtype=torch.float32,
            )
            pl = torch.as_tensor(point_labels).to(torch.int64)
            if pc.dim() != 3 or pc.shape[-1] != 2 or pl.shape != pc.shape[:2]:
                raise ValueError(
                    f"point_coords must be B×N×2 and point_labels B×N, got {tuple(pc.shape)} "
                    f"and {tuple(pl.shape)}"
                )
            prompts["points"] = torch.as_tensor(
                self.transform.apply_coords_torch(pc, self.original_size)
            ).to(dev)
            prompts["labels"] = pl.to(dev)
            prompts["pixels"] = pc
        if boxes is not None:
            bx = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            prompts["boxes"] = self.transform.apply_boxes_torch(bx, self.original_size).to(dev)
        if mask_input is not None:
            mi = torch.as_tensor(mask_input, dtype=torch.float32)
            if mi.dim() != 4 or tuple(mi.shape[1:]) != (1, MASK_INPUT_SIZE, MASK_INPUT_SIZE):
                # the model would resize any size silently, misreading a mask of the image's own
                # frame
                raise ValueError(
                    f"mask_input must be B×1×{MASK_INPUT_SIZE}×{MASK_INPUT_SIZE} low-res logits, "
                    f"got shape {tuple(mi.shape)}"
                )
            prompts["mask_inputs"] = mi.to(dev)
        if not prompts:
            raise ValueError("give point_coords/point_labels, boxes and/or mask_input")
        counts = {v.shape[0] for k, v in prompts.items() if k not in ("labels", "pixels")}
        if len(counts) != 1:
            raise ValueError(f"prompt batch sizes differ: {sorted(counts)}")
        return prompts

    def _decode_learned(self, prompts: Dict[str, torch.Tensor], multimask_output: bool):
        """B×C×s×s logits (s = IMAGE_SIZE / 4) and B×C predicted IoUs from the prompt head."""
        inputs = {k: v for k, v in prompts.items() if k != "pixels"}
        out = self.model.decode_prompts(
            self.features,
            [inputs],
            (self.image_size, self.image_size),
            return_aux=False,
            final_masks=False,
        )
        logits = out["pred_masks"][0].float()  # B×K×s×s
        iou = out["pred_iou"][0].float()
        if not multimask_output:
            best = iou.argmax(1)
            ar = torch.arange(len(best), device=best.device)
            logits, iou = logits[ar, best][:, None], iou[ar, best][:, None]
        return logits, iou

    def _select(self, prompts: Dict[str, torch.Tensor], multimask_output: bool):
        """Per prompt, whole-image queries chosen by :class:`QuerySelector`: B×C×s×s logits,
        B×C scores, B counts of real outputs (the rest is empty padding)."""
        sel = self.selector
        c = self.num_granularities if multimask_output else 1
        b = next(v.shape[0] for k, v in prompts.items() if k not in ("labels", "pixels"))
        s = sel.features.shape[-1]
        logits = torch.full((b, c, s, s), _EMPTY_LOGIT, device=self.device)
        scores = torch.zeros((b, c), device=self.device)
        counts = torch.zeros(b, dtype=torch.int64)
        for i in range(b):
            points = labels = accept = None
            if "points" in prompts:
                # pixel centres, in the padded input's frame
                # pixels stay on the CPU (the click check reads them there); the selector's on the
                # device
                points = self.transform.apply_coords_torch(
                    prompts["pixels"][i] + 0.5, self.original_size
                )
                points = points.to(self.device)
                labels = prompts["labels"][i]
                accept = self._click_check(prompts["pixels"][i], labels)
            order, score, ok = sel.rank(
                points,
                labels,
                prompts["boxes"][i] if "boxes" in prompts else None,
                prompts["mask_inputs"][i, 0] if "mask_inputs" in prompts else None,
            )
            kept = sel.select(order, c, accept) if bool(ok[order[0]]) else []
            if not kept:
                if not self._warned_miss:  # once per image: evaluations send thousands of prompts
                    logger.warning(
                        "select mode: no whole-image query satisfies a prompt; answering with the "
                        "nearest miss, score 0"
                    )
                    self._warned_miss = True
                kept, kept_scores = [int(order[0])], torch.zeros(1, device=self.device)
            else:
                kept_scores = score[kept]
            if multimask_output:  # granularities from the smallest mask to the largest
                by_area = sel.area[kept].argsort(stable=True).tolist()
                kept, kept_scores = [kept[j] for j in by_area], kept_scores[by_area]
            idx = torch.as_tensor(kept, device=self.device)
            logits[i, : len(kept)] = sel.logits(idx)
            scores[i, : len(kept)] = kept_scores
            counts[i] = len(kept)
        return logits, scores, counts

    def _click_check(self, pixels: torch.Tensor, labels: torch.Tensor):
        """accept(idx) for :meth:`QuerySelector.select`: the final masks of queries ``idx`` hold
        every positive click's pixel and no negative one's."""
        h, w = self.original_size
        cols = pixels[:, 0].floor().long().clamp(0, w - 1)
        rows = pixels[:, 1].floor().long().clamp(0, h - 1)
        keep = labels.cpu() >= 0
        rows, cols, want = rows[keep], cols[keep], labels.cpu()[keep] > 0

        def accept(idx: torch.Tensor) -> torch.Tensor:
            final = (
                self._postprocess(self.selector.logits(idx)[None])[0] > self.mask_threshold
            )  # n×H×W
            return (final[:, rows, cols].cpu() == want[None]).all(1)

        return accept

    def _postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """B×C×s×s logits over the padded square → B×C×H×W at the original size (SAM's
        postprocess_masks: upsample to the padded input, crop the padding, resize)."""
        up = F.interpolate(
            logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        up = up[..., : self.input_size[0], : self.input_size[1]]
        return F.interpolate(up, size=self.original_size, mode="bilinear", align_corners=False)
