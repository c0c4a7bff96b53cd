"""Point / box / mask prompts: derived from a GT mask (training, evaluation) or parsed from user input.

Conventions (those of ``segment_anything.SamPredictor``):

- a point is ``(x, y)`` in pixel coordinates of the original image (column, row); a click on
  pixel ``mask[y, x]`` is passed as the integers ``(x, y)`` (SAM shifts to the pixel centre itself);
  labels are ``1`` (positive, foreground) and ``0`` (negative, background);
- a box is ``XYXY`` with exclusive right/bottom ends: the tight box of a mask whose pixels span
  columns ``x0..x1-1`` is ``(x0, y0, x1, y1)``, like a COCO ``XYWH`` box converted to XYXY;
- a mask prompt is ``1×L×L`` float logits (``L = 256``): the mask resized so that its longest side
  is ``L`` and zero-padded at the bottom/right, i.e. the frame of SAM's 1024² padded input
  downsampled 4×; positive logits are foreground.

Random samplers take a ``numpy.random.Generator`` or a ``torch.Generator`` (or an int seed) so that
training data loaders stay reproducible whichever library seeds them. Masks may be numpy arrays or
torch tensors; everything returned is numpy.
"""
import logging
import math
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

logger = logging.getLogger(__name__)

RngLike = Union[np.random.Generator, torch.Generator, int, None]

# Log-odds of the soft masks used as mask prompts are clipped to ±LOGIT_CLIP: a hard 0/1 mask has
# no finite logit, and SAM's own low-res logits live in a range of this order.
_EPS = 1e-3
LOGIT_CLIP = float(math.log((1 - _EPS) / _EPS))


# The training tasks, named once for the model, the ATS sampler and the trainer: "whole" is
# whole-image segmentation, the others train the prompt path with that prompt type.
WHOLE_TASK = "whole"
PROMPT_TASKS = ("point", "box", "mask")


class PromptError(ValueError):
    """A user prompt that cannot be used (malformed or outside the image); the message is one line."""


# ----------------------------------------------------------------------------------------------
# helpers


def _as_bool_mask(mask) -> np.ndarray:
    """np/torch H×W mask → H×W bool numpy array."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an H×W mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _as_rng(rng: RngLike):
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, (np.random.Generator, torch.Generator)):
        return rng
    raise TypeError(f"rng must be a numpy Generator, a torch Generator or an int seed, got {type(rng)}")


def _randint(rng, high: int) -> int:
    """One integer uniform in [0, high)."""
    if isinstance(rng, torch.Generator):
        return int(torch.randint(high, (1,), generator=rng).item())
    return int(rng.integers(0, high))


def _uniform(rng, n: int) -> np.ndarray:
    """``n`` floats uniform in [0, 1)."""
    if isinstance(rng, torch.Generator):
        return torch.rand(n, generator=rng, dtype=torch.float64).numpy()
    return rng.random(n)


def _normal(rng, n: int) -> np.ndarray:
    """``n`` standard normal floats."""
    if isinstance(rng, torch.Generator):
        return torch.randn(n, generator=rng, dtype=torch.float64).numpy()
    return rng.standard_normal(n)


def _distance_to_boundary(mask: np.ndarray) -> np.ndarray:
    """H×W float32: Euclidean distance of each mask pixel to the nearest non-mask pixel.

    The mask is padded with a background border first, so the image border counts as boundary
    (a click on the image edge is as uninformative as one on the object edge).
    """
    padded = np.pad(mask.astype(np.uint8), 1, mode="constant")
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def mask_to_box(mask) -> np.ndarray:
    """Tight ``XYXY`` box (float32, shape 4, exclusive ends) of a non-empty H×W mask."""
    mask = _as_bool_mask(mask)
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("cannot take the box of an empty mask")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# evaluation clicks


def farthest_interior_point(mask) -> Tuple[int, int]:
    """The pixel ``(x, y)`` of a non-empty H×W mask farthest from its boundary (and the image border).

    Among equally distant pixels (a rectangle has a whole ridge of them) the one closest to the
    centroid of that set is taken, then the first in raster order, so the result is deterministic
    and central.
    """
    mask = _as_bool_mask(mask)
    if not mask.any():
        raise ValueError("cannot place a click in an empty mask")
    dist = _distance_to_boundary(mask)
    ys, xs = np.nonzero(dist >= dist.max() - 1e-4)  # raster order
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))  # argmin returns the first of ties
    return int(xs[k]), int(ys[k])


def next_click(pred, gt) -> Optional[Tuple[Tuple[int, int], int]]:
    """The next click of the standard k-click protocol, or ``None`` when ``pred`` equals ``gt``.

    ``pred``, ``gt``: H×W masks. The error regions are the connected components (8-connectivity)
    of the false negatives (``gt & ~pred``) and false positives (``pred & ~gt``); the largest one
    (false negatives first on equal area) gets a click at its farthest-from-boundary pixel:
    label 1 in a false negative, 0 in a false positive. Returns ``((x, y), label)``.
    """
    pred, gt = _as_bool_mask(pred), _as_bool_mask(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    best = None  # (area, region mask, label)
    for error, label in ((gt & ~pred, 1), (pred & ~gt, 0)):
        if not error.any():
            continue
        n, comp, stats, _ = cv2.connectedComponentsWithStats(error.astype(np.uint8), connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]
        i = int(np.argmax(areas))
        if best is None or areas[i] > best[0]:
            best = (int(areas[i]), comp == i + 1, label)
    if best is None:
        return None
    return farthest_interior_point(best[1]), best[2]


# ----------------------------------------------------------------------------------------------
# training-time samplers


def sample_point(mask, rng: RngLike = None) -> np.ndarray:
    """A point ``[x, y]`` (float32, shape 2) drawn uniformly from the pixels of a non-empty mask."""
    mask = _as_bool_mask(mask)
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("cannot sample a point in an empty mask")
    k = _randint(_as_rng(rng), xs.size)
    return np.array([xs[k], ys[k]], dtype=np.float32)


def sample_box(mask, rng: RngLike = None, jitter: float = 0.1, max_noise: Optional[float] = 20.0) -> np.ndarray:
    """A noisy ``XYXY`` box (float32, shape 4) around a non-empty H×W mask.

    Each coordinate of the tight box moves by Gaussian noise whose std is ``jitter`` times the box
    width (x) or height (y), capped at ``max_noise`` pixels (SAM's recipe: 10 %, at most 20 px);
    the result is clipped to the image and never collapses below one pixel per side.
    """
    mask = _as_bool_mask(mask)
    h, w = mask.shape
    tight = mask_to_box(mask).astype(np.float64)
    bw, bh = tight[2] - tight[0], tight[3] - tight[1]
    std = jitter * np.array([bw, bh, bw, bh])
    if max_noise is not None:
        std = np.minimum(std, max_noise)
    box = tight + _normal(_as_rng(rng), 4) * std
    box[[0, 2]] = np.clip(box[[0, 2]], 0, w)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, h)
    # noise larger than the box can swap/collapse its sides: keep the tight extent on that axis
    if box[2] - box[0] < 1:
        box[[0, 2]] = tight[[0, 2]]
    if box[3] - box[1] < 1:
        box[[1, 3]] = tight[[1, 3]]
    return box.astype(np.float32)


def _low_res_shape(h: int, w: int, low_res: int) -> Tuple[int, int]:
    """Size of an h×w image resized so its longest side is ``low_res`` (SAM's rounding)."""
    scale = low_res / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def _soft_low_res(mask: np.ndarray, low_res: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """H×W bool → L×L float32 in [0, 1] (area-resized, bottom/right zero padding), valid (h, w)."""
    nh, nw = _low_res_shape(*mask.shape, low_res)
    soft = np.zeros((low_res, low_res), np.float32)
    soft[:nh, :nw] = cv2.resize(mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
    return soft, (nh, nw)


def _low_res_binary(soft: np.ndarray) -> np.ndarray:
    """Hard low-res mask; an object thinner than a low-res pixel keeps its strongest pixels."""
    binary = soft > 0.5
    if not binary.any() and soft.max() > 0:
        binary = soft >= 0.5 * soft.max()
    return binary


def _signed_logits(binary: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Logits whose sign is ``binary`` and whose magnitude is the confidence of ``prob``.

    The sign comes from the hard mask so that softening (area resizing, blur) never flips a
    decision: a thin object would otherwise fall below 0.5 everywhere and vanish from the prompt.
    """
    p = np.clip(prob, _EPS, 1 - _EPS)
    magnitude = np.maximum(np.abs(np.log(p / (1 - p))), 0.1)
    return np.where(binary, magnitude, -magnitude).astype(np.float32)


def mask_to_mask_input(mask, low_res: int = 256) -> np.ndarray:
    """An H×W mask as a SAM ``mask_input``: 1×L×L float32 logits (positive = foreground).

    Deterministic (for user-given masks, e.g. the demo's ``--mask-input PNG``).
    """
    soft, _ = _soft_low_res(_as_bool_mask(mask), low_res)
    return _signed_logits(_low_res_binary(soft), soft)[None]


def sample_mask_prompt(mask, rng: RngLike = None, low_res: int = 256, max_radius: int = 3) -> np.ndarray:
    """A noisy low-res mask prompt (1×L×L float32 logits) made from a GT H×W mask.

    At low resolution the mask is eroded, dilated or left as is (radius 1..``max_radius`` px), then
    its confidence is blurred (sigma 0.5..2 px): soft near the edges, saturated inside, imitating
    the imperfect previous prediction a mask prompt usually is. Padding outside the image stays
    confidently background.
    """
    mask = _as_bool_mask(mask)
    rng = _as_rng(rng)
    soft, (nh, nw) = _soft_low_res(mask, low_res)
    binary = _low_res_binary(soft).astype(np.uint8)
    op, radius = _randint(rng, 3), 1 + _randint(rng, max(1, max_radius))
    if op and max_radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        morphed = (cv2.erode if op == 1 else cv2.dilate)(binary, kernel)
        # eroding a thin object can wipe it out; a prompt of nothing would teach nothing
        if morphed.any() or not binary.any():
            binary = morphed
    sigma = 0.5 + 1.5 * float(_uniform(rng, 1)[0])
    blurred = cv2.GaussianBlur(binary.astype(np.float32), (0, 0), sigma)
    logits = _signed_logits(binary.astype(bool), blurred)
    logits[nh:, :] = -LOGIT_CLIP
    logits[:, nw:] = -LOGIT_CLIP
    return logits[None]


def nested_targets(point, masks, levels: Optional[Sequence[float]] = None) -> List[int]:
    """Indices of the masks that contain ``point``, sorted coarse → fine.

    ``point``: ``(x, y)``; ``masks``: N×H×W (np/torch) or a sequence of H×W masks; ``levels``:
    N hierarchy levels (smaller = coarser, as the pseudo-label hierarchy numbers them) or ``None``.
    Order: by level, then by decreasing area, then by index. A point outside the image → ``[]``.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    n = len(masks)
    if levels is not None and len(levels) != n:
        raise ValueError(f"{len(levels)} levels for {n} masks")
    if n == 0:
        return []
    x, y = int(math.floor(float(point[0]))), int(math.floor(float(point[1])))
    h, w = np.asarray(masks[0]).shape[-2:]
    if not (0 <= x < w and 0 <= y < h):
        return []
    keys = []
    for i in range(n):
        m = _as_bool_mask(masks[i])
        if m[y, x]:
            level = float(levels[i]) if levels is not None else 0.0
            keys.append((level, -int(m.sum()), i))
    return [i for _, _, i in sorted(keys)]


# ----------------------------------------------------------------------------------------------
# user input (demo command line)


def _parse_numbers(text: str, what: str, count: Optional[int] = None, cast=float) -> List:
    parts = [p.strip() for p in str(text).split(",")]
    if count is not None and len(parts) != count:
        raise PromptError(f"{what} '{text}' must have {count} comma-separated numbers")
    try:
        values = [cast(p) for p in parts]
    except ValueError:
        raise PromptError(f"{what} '{text}' is not a list of {'integers' if cast is int else 'numbers'}") from None
    if cast is float and not all(math.isfinite(v) for v in values):
        raise PromptError(f"{what} '{text}' contains a non-finite number")
    return values


def parse_points(text: str) -> np.ndarray:
    """``"x,y;x,y"`` → N×2 float32 array of ``(x, y)``."""
    items = [s for s in str(text).split(";") if s.strip()]
    if not items:
        raise PromptError(f"no point in '{text}' (expected \"x,y;x,y\")")
    return np.array([_parse_numbers(s, "point", 2) for s in items], dtype=np.float32).reshape(-1, 2)


def parse_labels(text: str) -> np.ndarray:
    """``"1,0"`` → int64 array (values checked by :func:`validate_prompts`)."""
    if not str(text).strip():
        raise PromptError("empty label list (expected e.g. \"1,0\")")
    return np.array(_parse_numbers(text, "labels", cast=int), dtype=np.int64)


def parse_box(text: str) -> np.ndarray:
    """``"x0,y0,x1,y1"`` → float32 array of 4 (XYXY)."""
    return np.array(_parse_numbers(text, "box", 4), dtype=np.float32)


def validate_prompts(points, labels, box, image_hw: Tuple[int, int]):
    """Check user prompts against an image of size ``image_hw = (H, W)``; raise :class:`PromptError`.

    ``points``: N×2 ``(x, y)`` or None; ``labels``: N in {0, 1} or None (then every point is
    positive); ``box``: XYXY or None. Points must lie on a pixel (``0 <= x < W``, ``0 <= y < H``);
    the box needs ``x0 < x1`` and ``y0 < y1`` and is clipped to the image (:func:`_clip_box`).
    Returns ``(points N×2 float32 | None, labels N int64 | None, box 4 float32 | None)``.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    if points is not None:
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != 2:
            raise PromptError(f"points must be N×2 (x, y), got shape {points.shape}")
        if not np.isfinite(points).all():
            raise PromptError("points contain a non-finite coordinate")
        for i, (x, y) in enumerate(points):
            if not (0 <= x < w and 0 <= y < h):
                raise PromptError(f"point {i + 1} ({x:g}, {y:g}) is outside the {w}x{h} image")
        if labels is None:
            labels = np.ones(len(points), dtype=np.int64)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if points is None:
            raise PromptError("labels given without points")
        if len(labels) != len(points):
            raise PromptError(f"{len(points)} points but {len(labels)} labels")
        if not np.isin(labels, (0, 1)).all():
            raise PromptError(f"labels must be 0 (negative) or 1 (positive), got {labels.tolist()}")
        labels = labels.astype(np.int64)
    if box is not None:
        box = _clip_box(box, h, w)
    return points, labels, box


def _clip_box(box, h: int, w: int) -> np.ndarray:
    """A user's XYXY box clipped to the h×w image (float32, 4), as SAM clips its boxes.

    A box partly outside the image is a normal drag past the border: it is clipped and logged at
    INFO. One malformed (x1 <= x0 or y1 <= y0) or with nothing inside the image raises PromptError.
    """
    box = np.asarray(box, dtype=np.float32).reshape(-1)
    if box.size != 4 or not np.isfinite(box).all():
        raise PromptError(f"box must be 4 finite numbers x0,y0,x1,y1, got {box.tolist()}")
    x0, y0, x1, y1 = box.tolist()
    if x1 <= x0 or y1 <= y0:
        raise PromptError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) needs x1 > x0 and y1 > y0")
    clipped = np.array([min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)],
                       dtype=np.float32)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise PromptError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {w}x{h} image")
    if not np.array_equal(clipped, box):
        logger.info("box (%g, %g, %g, %g) reaches outside the %dx%d image: clipped to (%g, %g, %g, %g)",
                    x0, y0, x1, y1, w, h, *clipped.tolist())
    return clipped


def mask_from_values(values) -> np.ndarray:
    """A user's mask image as an H×W array of any range → H×W bool, foreground above half its maximum.

    Mask files come as 0/1 (label maps), 0/255 (most editors), 0/65535 (16-bit) or soft masks;
    splitting at half the maximum reads all of them as drawn. An all-zero (or non-positive, or
    non-finite) mask raises :class:`PromptError`: it prompts for nothing.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise PromptError(f"a mask must be one channel (H×W), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise PromptError("mask contains non-finite values")
    peak = values.max() if values.size else 0.0
    if not peak > 0:
        raise PromptError("mask is empty (no nonzero pixel)")
    return values > peak / 2
