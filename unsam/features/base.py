"""The dense-feature interface, its error type and the grid arithmetic every backend shares."""

from typing import Optional, Sequence, Tuple

import numpy as np

# smallest vector norm divided by: keeps an all-zero vector at zero instead of NaN
NORM_EPS = 1e-8


class FeatureError(RuntimeError):
    """Features cannot be built (missing/incompatible weights, unknown backend)."""


def grid_size(height: int, width: int, resolution: int, patch_size: int) -> Tuple[int, int]:
    """Patch grid ``(h, w)`` for an image whose long side is resized to ``resolution``."""
    scale = resolution / max(height, width)
    gh = max(1, int(round(height * scale / patch_size)))
    gw = max(1, int(round(width * scale / patch_size)))
    return gh, gw


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x`` divided by its L2 norm along ``axis`` (zero vectors stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), NORM_EPS)


class DenseFeatures:
    """Interface: ``__call__(image HxWx3 uint8 RGB) -> np.ndarray float32 (h, w, C)``, rows
    L2-normalised."""

    name = "base"
    patch_size = 8

    def __init__(self, resolution: int = 480):
        self.resolution = int(resolution)

    def __call__(self, image: np.ndarray, resolution: Optional[int] = None) -> np.ndarray:
        raise NotImplementedError

    def grid_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Raw features of same-size images used at their own size: ``images`` (B, H, W, 3)
        uint8 RGB with H, W multiples of ``patch_size`` → float32 (B, H/p, W/p, C).

        "Raw" means as the backend makes them: DINO keys are not normalised (UnSAM's merge sums
        raw keys); the classical features are L2-normalised by construction."""
        return np.stack([self(img, max(img.shape[:2])) for img in images])
