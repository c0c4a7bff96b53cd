"""Overlay drawing for the demos, the web app and the reports.

:func:`draw_masks` keeps the photo readable however many masks overlap: every pixel is blended
with the image *once*, in the colour of the smallest mask that covers it (so parts stay visible
on top of wholes, and nested hierarchies do not pile up into an opaque fill), then each mask's
outline is drawn, largest first.
"""

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np


def distinct_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` well-separated RGB colours (golden-ratio hue walk), uint8 n×3."""
    hues = (np.arange(n) * 0.618033988749895 + np.random.default_rng(seed).random()) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 200), np.full(n, 230)], axis=1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def line_width(shape: Sequence[int]) -> int:
    """Outline thickness in pixels for an image of ``shape`` (1 px up to ~600 px, then thicker)."""
    return max(1, int(round(min(shape[:2]) / 600)))


def draw_outline(
    image: np.ndarray, mask: np.ndarray, color: Sequence[int], thickness: int = 1
) -> np.ndarray:
    """Draw the outer contours of H×W ``mask`` on ``image`` in place; returns ``image``."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    cv2.drawContours(image, contours, -1, tuple(int(c) for c in color), thickness)
    return image


def draw_masks(
    image: np.ndarray,
    masks: np.ndarray,
    alpha: float = 0.5,
    outline: bool = True,
    colors: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Blend N×H×W bool ``masks`` over H×W×3 uint8 RGB ``image``; returns a new image.

    Each pixel is blended once (weight ``alpha``) with the colour of the smallest mask covering
    it; with ``outline`` every mask's border is then drawn in a darker shade of its colour,
    largest mask first. ``colors``: N×3 RGB, one per mask (default: :func:`distinct_colors`).
    """
    if len(masks) == 0:
        return image.copy()
    masks = np.asarray(masks).astype(bool, copy=False)
    colors = (
        distinct_colors(len(masks))
        if colors is None
        else np.asarray(colors, np.uint8).reshape(-1, 3)
    )
    order = np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable")  # largest first
    owner = np.full(image.shape[:2], -1, np.int32)
    for i in order:  # smaller masks overwrite larger ones: a pixel belongs to its smallest mask
        owner[masks[i]] = i
    covered = owner >= 0
    out = image.astype(np.float32)
    out[covered] = (1 - alpha) * out[covered] + alpha * colors[owner[covered]]
    out = out.round().clip(0, 255).astype(np.uint8)
    if outline:
        width = line_width(image.shape)
        for i in order:
            draw_outline(out, masks[i], colors[i] // 2, width)
    return out


def draw_title(image: np.ndarray, text: str) -> np.ndarray:
    """A copy of ``image`` with ``text`` in white on a black band at its top-left corner."""
    out = image.copy()
    scale = max(0.4, min(image.shape[:2]) / 800)
    thickness = max(1, int(round(scale * 1.5)))
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(3, h // 3)
    cv2.rectangle(out, (0, 0), (w + 2 * pad, h + base + 2 * pad), (0, 0, 0), -1)
    cv2.putText(
        out,
        text,
        (pad, pad + h),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (255, 255, 255),
        thickness,
        cv2.LINE_AA,
    )
    return out


def draw_prompts(
    image: np.ndarray,
    points: Optional[np.ndarray] = None,
    labels: Optional[Sequence[int]] = None,
    box: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """Draw point prompts (green = positive, red = negative) and an XYXY box on RGB ``image``."""
    out = image.copy()
    radius = max(3, min(image.shape[:2]) // 100)
    if points is not None:
        for (x, y), label in zip(
            np.asarray(points), labels if labels is not None else [1] * len(points)
        ):
            color: Tuple[int, int, int] = (0, 220, 0) if label else (230, 0, 0)
            cv2.circle(out, (int(round(x)), int(round(y))), radius, color, -1)
            cv2.circle(out, (int(round(x)), int(round(y))), radius, (255, 255, 255), 1)
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), (0, 120, 255), 2)
    return out
