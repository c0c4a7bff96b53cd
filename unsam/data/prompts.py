"""Point / box / mask prompts: derived from a GT mask (training, evaluation) or parsed from user
input.

Conventions (those of ``segment_anything.SamPredictor``):

- a point is ``(x, y)`` in pixel coordinates of the original image (column, row); a click on
  pixel ``mask[y, x]`` is passed as the integers ``(x, y)`` (SAM shifts to the pixel centre itself);
  labels are ``1`` (positive, foreground) and ``0`` (negative, background);
- a box is ``XYXY`` with exclusive right/bottom ends: the tight box of a mask whose pixels span
  columns ``x0..x1-1`` is ``(x0, y0, x1, y1)``, like a COCO ``XYWH`` box converted to XYXY;
- a mask prompt is ``1×L×L`` float logits (``L = 256``): the mask resized so that its longest side
  is ``L`` and zero-padded at the bottom/right, i.e. the frame of SAM's 1024² padded input
  downsampled 4×; positive logits are foreground.

User-input and evaluation helpers take numpy arrays or torch tensors and return numpy. The
training-time samplers (:func:`sample_points`, :func:`sample_boxes`, :func:`sample_mask_prompts`,
:func:`nested_targets`) are torch, batched over prompts, and run on the masks' device with the
``torch.Generator`` they are given (on that device): the training model samples its prompts
without copying masks to the host and without the global RNG.
"""

import logging
import math
from typing import List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Log-odds of the soft masks used as mask prompts are clipped to ±LOGIT_CLIP: a hard 0/1 mask has
# no finite logit, and SAM's own low-res logits live in a range of this order.
_EPS = 1e-3
LOGIT_CLIP = float(math.log((1 - _EPS) / _EPS))


class PromptError(ValueError):
    """A user prompt that cannot be used (malformed or outside the image); the message is one
    line."""


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
    """The pixel ``(x, y)`` of a non-empty H×W mask farthest from its boundary (and the image
    border).

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
# mask prompts (shared by user input and training)


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


# ----------------------------------------------------------------------------------------------
# training-time samplers: torch, batched over prompts, on the masks' device
#
# The rules are those of SAM's training prompts: a point uniform over a mask's pixels, the
# mask's tight box with Gaussian corner noise, a degraded low-res copy of the mask. Every random
# number comes from the ``generator`` argument, which must live on the masks' device.


def sample_points(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One point per mask, uniform over its pixels.

    Args:
        masks: n×H×W bool, none of them empty.
    Returns:
        n×2 float32 ``(x, y)``: integer pixel coordinates (the pixel ``mask[y, x]``).
    """
    n, h, w = masks.shape
    # uniform weights over the mask's pixels: no host round trip to list them
    flat = torch.multinomial(masks.reshape(n, h * w).float(), 1, generator=generator)[:, 0]
    return torch.stack([flat % w, torch.div(flat, w, rounding_mode="floor")], 1).float()


def nested_targets(
    points: torch.Tensor,
    masks: torch.Tensor,
    levels: Optional[torch.Tensor] = None,
    max_targets: Optional[int] = None,
) -> List[torch.Tensor]:
    """For each point, the indices of the masks containing it, sorted coarse → fine.

    Args:
        points: n×2 ``(x, y)`` pixel coordinates (floored to the pixel they fall in).
        masks: N×H×W bool.
        levels: N hierarchy levels (smaller = coarser, as the pseudo-label hierarchy numbers
            them) or ``None`` (all equal).
        max_targets: keep at most this many (the coarsest), or ``None`` for all.
    Returns:
        n int64 index tensors on ``masks.device``, ordered by level, then by decreasing area,
        then by index; empty for a point outside the image. One host sync (the n counts).
    """
    n_masks, h, w = masks.shape
    if levels is not None and len(levels) != n_masks:
        raise ValueError(f"{len(levels)} levels for {n_masks} masks")
    x, y = points[:, 0].floor().long(), points[:, 1].floor().long()
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    contains = masks[:, y.clamp(0, h - 1), x.clamp(0, w - 1)].T & inside[:, None]  # n×N
    # two stable sorts give the (level, -area, index) order: area (descending) first, then level
    by_area = torch.sort(masks.flatten(1).sum(1), descending=True, stable=True).indices
    lv = (
        levels.to(masks.device, torch.float64)
        if levels is not None
        else torch.zeros(n_masks, dtype=torch.float64, device=masks.device)
    )
    key = torch.where(contains[:, by_area], lv[by_area][None], torch.inf)
    order = by_area[torch.sort(key, dim=1, stable=True).indices]
    counts = contains.sum(1)
    if max_targets is not None:
        counts = counts.clamp(max=max_targets)
    return [order[i, :c] for i, c in enumerate(counts.tolist())]


def sample_boxes(
    masks: torch.Tensor,
    generator: torch.Generator,
    jitter: float = 0.1,
    max_noise: Optional[float] = 20.0,
) -> torch.Tensor:
    """A noisy ``XYXY`` box around each non-empty mask (n×H×W bool) → n×4 float32.

    Each coordinate of the tight box (exclusive ends, :func:`mask_to_box`) moves by Gaussian
    noise whose std is ``jitter`` times the box width (x) or height (y), capped at ``max_noise``
    pixels (SAM's recipe: 10 %, at most 20 px); the result is clipped to the image and never
    collapses below one pixel per side (that axis keeps its tight extent).
    """
    n, h, w = masks.shape
    cols, rows = masks.any(1), masks.any(2)  # n×W, n×H
    # argmax returns the first maximal index: the first / (flipped) last occupied column or row
    x0, x1 = cols.byte().argmax(1), w - cols.flip(1).byte().argmax(1)
    y0, y1 = rows.byte().argmax(1), h - rows.flip(1).byte().argmax(1)
    tight = torch.stack([x0, y0, x1, y1], 1).double()
    bw, bh = tight[:, 2] - tight[:, 0], tight[:, 3] - tight[:, 1]
    std = jitter * torch.stack([bw, bh, bw, bh], 1)
    if max_noise is not None:
        std = std.clamp(max=max_noise)
    noise = torch.randn((n, 4), generator=generator, dtype=torch.float64, device=masks.device)
    box = tight + noise * std
    box[:, 0::2] = box[:, 0::2].clamp(0, w)
    box[:, 1::2] = box[:, 1::2].clamp(0, h)
    # noise larger than the box can swap/collapse its sides: keep the tight extent on that axis
    narrow_x = (box[:, 2] - box[:, 0] < 1)[:, None]
    narrow_y = (box[:, 3] - box[:, 1] < 1)[:, None]
    box[:, 0::2] = torch.where(narrow_x, tight[:, 0::2], box[:, 0::2])
    box[:, 1::2] = torch.where(narrow_y, tight[:, 1::2], box[:, 1::2])
    return box.float()


def _resize_matrix(src: int, dst: int, area: bool, device) -> torch.Tensor:
    """dst×src float32 weights of OpenCV's ``INTER_AREA`` resize along one axis.

    ``area``: OpenCV's true area averaging, used when neither axis is enlarged; otherwise its
    area-flavoured linear interpolation (enlarging by an integer factor repeats pixels).
    """
    scale = src / dst
    m = np.zeros((dst, src), np.float64)
    for d in range(dst):
        if area:
            lo, hi = d * scale, min(d * scale + scale, src)
            cell = min(scale, src - d * scale)
            for s in range(int(math.floor(lo)), int(math.ceil(hi))):
                m[d, s] = (min(hi, s + 1) - max(lo, s)) / cell
        else:
            s = int(math.floor(d * scale))
            f = (d + 1) - (s + 1) / scale
            f = 0.0 if f <= 0 else f - math.floor(f)
            if s >= src - 1:
                s, f = src - 1, 0.0
            m[d, s] += 1 - f
            m[d, min(s + 1, src - 1)] += f
    return torch.from_numpy(m).to(device, torch.float32)


def _ellipse(radius: int, device) -> torch.Tensor:
    """OpenCV's ``MORPH_ELLIPSE`` structuring element of size (2r+1)², float32 0/1."""
    k = 2 * radius + 1
    out = torch.zeros((k, k), dtype=torch.float32)
    for i in range(k):
        dy = i - radius
        dx = int(round(radius * math.sqrt((radius * radius - dy * dy) / (radius * radius))))
        out[i, max(radius - dx, 0) : min(radius + dx + 1, k)] = 1
    return out.to(device)


def _gaussian_kernels(sigma: torch.Tensor, half: int) -> torch.Tensor:
    """n×(2·half+1) Gaussian kernels (OpenCV's ``GaussianBlur`` for float images with
    ``ksize=(0, 0)``: size ``round(8σ + 1) | 1``, normalised), zero outside each own size."""
    x = torch.arange(-half, half + 1, dtype=torch.float64, device=sigma.device)
    size = torch.round(sigma * 8 + 1).long() | 1
    k = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = torch.where(x[None].abs() <= (size[:, None] - 1) // 2, k, torch.zeros_like(k))
    return (k / k.sum(1, keepdim=True)).float()


def mask_prompts_from(
    masks: torch.Tensor,
    op: torch.Tensor,
    radius: torch.Tensor,
    sigma: torch.Tensor,
    low_res: int = 256,
    max_radius: int = 3,
    max_sigma: float = 2.0,
) -> torch.Tensor:
    """The mask prompts of :func:`sample_mask_prompts` for given draws (deterministic).

    Args:
        masks: n×H×W bool.
        op: n int64, 0 keep, 1 erode, 2 dilate; radius: n int64 in 1..``max_radius`` (that
            morphology's radius); sigma: n float64 in (0, ``max_sigma``], std of the confidence
            blur in low-res pixels. (The bounds size the kernels without reading the draws
            back to the host.)
    Returns:
        n×1×L×L float32 logits.
    """
    n, h, w = masks.shape
    dev = masks.device
    if n == 0:
        return torch.zeros((0, 1, low_res, low_res), dtype=torch.float32, device=dev)
    # float32 even inside the training step's AMP region: half-precision resize weights and
    # blur would move soft values across the 0.5 threshold and change the prompt's rule
    with torch.autocast(dev.type, enabled=False):
        return _mask_prompts(masks, op, radius, sigma, low_res, max_radius, max_sigma)


def _mask_prompts(masks, op, radius, sigma, low_res, max_radius, max_sigma) -> torch.Tensor:
    n, h, w = masks.shape
    dev = masks.device
    nh, nw = _low_res_shape(h, w, low_res)
    area = nh <= h and nw <= w
    ry, rx = _resize_matrix(h, nh, area, dev), _resize_matrix(w, nw, area, dev)
    soft = torch.zeros((n, low_res, low_res), dtype=torch.float32, device=dev)
    soft[:, :nh, :nw] = torch.einsum("ah,nhw,bw->nab", ry, masks.float(), rx)
    # hard low-res mask; an object thinner than a low-res pixel keeps its strongest pixels
    peak = soft.flatten(1).max(1).values[:, None, None]
    binary = soft > 0.5
    weak = ~binary.flatten(1).any(1)[:, None, None] & (peak > 0)
    binary = torch.where(weak, soft >= 0.5 * peak, binary)
    x = binary.float()[:, None]
    morphed = binary.clone()
    for r in range(1, max_radius + 1):
        kernel = _ellipse(r, dev)[None, None]
        dilated = F.conv2d(x, kernel, padding=r)[:, 0] > 0.5
        # outside the image counts as foreground for erosion (OpenCV's default border)
        eroded = ~(F.conv2d(1 - x, kernel, padding=r)[:, 0] > 0.5)
        pick = (radius == r)[:, None, None]
        morphed = torch.where(pick & (op == 1)[:, None, None], eroded, morphed)
        morphed = torch.where(pick & (op == 2)[:, None, None], dilated, morphed)
    # eroding a thin object can wipe it out; a prompt of nothing would teach nothing
    wiped = (~morphed.flatten(1).any(1) & binary.flatten(1).any(1))[:, None, None]
    binary = torch.where(wiped, binary, morphed)
    half = (int(round(max_sigma * 8 + 1)) | 1) // 2
    kernels = _gaussian_kernels(sigma.to(dev, torch.float64), half)  # n×K
    blurred = binary.float()[None]  # 1×n×L×L: one group per prompt
    blurred = F.conv2d(
        F.pad(blurred, (half, half, 0, 0), mode="reflect"), kernels[:, None, None], groups=n
    )
    blurred = F.conv2d(
        F.pad(blurred, (0, 0, half, half), mode="reflect"), kernels[:, None, :, None], groups=n
    )[0]
    p = blurred.clamp(_EPS, 1 - _EPS)
    magnitude = torch.log(p / (1 - p)).abs().clamp(min=0.1)
    logits = torch.where(binary, magnitude, -magnitude)
    logits[:, nh:, :] = -LOGIT_CLIP
    logits[:, :, nw:] = -LOGIT_CLIP
    return logits[:, None]


def sample_mask_prompts(
    masks: torch.Tensor, generator: torch.Generator, low_res: int = 256, max_radius: int = 3
) -> torch.Tensor:
    """A noisy low-res mask prompt per GT mask: n×H×W bool → n×1×L×L float32 logits.

    The mask is area-resized so its longest side is ``L`` (bottom/right padding), then at low
    resolution eroded, dilated or left as is (each 1/3; radius 1..``max_radius`` px), then its
    confidence is blurred (sigma uniform in 0.5..2 px): soft near the edges, saturated inside,
    imitating the imperfect previous prediction a mask prompt usually is. Padding outside the
    image stays confidently background.
    """
    n, dev = masks.shape[0], masks.device
    op = torch.randint(0, 3, (n,), generator=generator, device=dev)
    if max_radius <= 0:
        op = torch.zeros_like(op)
    radius = 1 + torch.randint(0, max(1, max_radius), (n,), generator=generator, device=dev)
    sigma = 0.5 + 1.5 * torch.rand((n,), generator=generator, dtype=torch.float64, device=dev)
    return mask_prompts_from(masks, op, radius, sigma, low_res, max(1, max_radius))


# ----------------------------------------------------------------------------------------------
# user input (demo command line)


def _parse_numbers(text: str, what: str, count: Optional[int] = None, cast=float) -> List:
    parts = [p.strip() for p in str(text).split(",")]
    if count is not None and len(parts) != count:
        raise PromptError(f"{what} '{text}' must have {count} comma-separated numbers")
    try:
        values = [cast(p) for p in parts]
    except ValueError:
        raise PromptError(
            f"{what} '{text}' is not a list of {'integers' if cast is int else 'numbers'}"
        ) from None
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
        raise PromptError('empty label list (expected e.g. "1,0")')
    return np.array(_parse_numbers(text, "labels", cast=int), dtype=np.int64)


def parse_box(text: str) -> np.ndarray:
    """``"x0,y0,x1,y1"`` → float32 array of 4 (XYXY)."""
    return np.array(_parse_numbers(text, "box", 4), dtype=np.float32)


def validate_prompts(points, labels, box, image_hw: Tuple[int, int]):
    """Check user prompts against an image of size ``image_hw = (H, W)``; raise
    :class:`PromptError`.

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
    clipped = np.array(
        [min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)],
        dtype=np.float32,
    )
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise PromptError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {w}x{h} image")
    if not np.array_equal(clipped, box):
        logger.info(
            "box (%g, %g, %g, %g) reaches outside the %dx%d image: clipped to (%g, %g, %g, %g)",
            x0,
            y0,
            x1,
            y1,
            w,
            h,
            *clipped.tolist(),
        )
    return clipped


def mask_from_values(values) -> np.ndarray:
    """A user's mask image as an H×W array of any range → H×W bool, foreground above half its
    maximum.

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
