"""Overlay drawing for the demos: distinct colours, outlines, large masks under small ones."""
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np


def distinct_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` well-separated RGB colours (golden-ratio hue walk), uint8 n×3."""
    hues = (np.arange(n) * 0.618033988749895 + np.random.default_rng(seed).random()) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 200), np.full(n, 230)], axis=1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def draw_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5, outline: bool = True) -> np.ndarray:
    """Blend N×H×W bool ``masks`` over H×W×3 uint8 RGB ``image``.

    Masks are painted from largest to smallest so that parts stay visible on top of wholes.
    """
    out = image.astype(np.float32).copy()
    if len(masks) == 0:
        return image.copy()
    order = np.argsort([-int(m.sum()) for m in masks])
    colors = distinct_colors(len(masks))
    for rank, i in enumerate(order):
        m = masks[i].astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * colors[rank]
    out = out.clip(0, 255).astype(np.uint8)
    if outline:
        for rank, i in enumerate(order):
            contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colors[rank] // 2), 1)
    return out


def draw_prompts(image: np.ndarray, points: Optional[np.ndarray] = None, labels: Optional[Sequence[int]] = None,
                 box: Optional[Sequence[float]] = None) -> np.ndarray:
    """Draw point prompts (green = positive, red = negative) and an XYXY box on RGB ``image``."""
    out = image.copy()
    radius = max(3, min(image.shape[:2]) // 100)
    if points is not None:
        for (x, y), label in zip(np.asarray(points), labels if labels is not None else [1] * len(points)):
            color: Tuple[int, int, int] = (0, 220, 0) if label else (230, 0, 0)
            cv2.circle(out, (int(round(x)), int(round(y))), radius, color, -1)
            cv2.circle(out, (int(round(x)), int(round(y))), radius, (255, 255, 255), 1)
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), (0, 120, 255), 2)
    return out
