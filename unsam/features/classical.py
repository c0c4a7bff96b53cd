"""Training-free colour + texture + position patch features (the offline default backend)."""

import zlib
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

from .base import DenseFeatures, grid_size
from .fourier import random_fourier_features

# Gaussian σ (pixels of the resized image) of the derivative / LoG texture filters: structure
# of 1/8, 1/4 and 1/2 of an 8-px patch
TEXTURE_SCALES = (1.0, 2.0, 4.0)
# σ of the window over which local contrast (luminance standard deviation) is measured
CONTRAST_SIGMA = 2.0
# texture is a statistic over a neighbourhood: responses are pooled with σ = this × patch size,
# a little wider than one patch
TEXTURE_POOL = 0.75
# gain before log1p: filter energies are heavy-tailed (luminance in [0, 1]); the log keeps
# strong edges from drowning the differences between weak textures
TEXTURE_GAIN = 20.0
# the "context" colour is the Lab mean over σ = this × patch size: the surroundings of a patch
CONTEXT_SIGMA = 2.0
# added to the per-image channel std before z-scoring: a flat channel (uniform image) stays ~0
# instead of amplifying noise
STD_EPS = 1e-3


class ClassicalFeatures(DenseFeatures):
    """Colour + texture + weak position features on an 8-pixel patch grid (no training).

    ``*_weight``: each z-scored group's share of the input to the random Fourier map;
    ``bandwidth``: the RBF kernel's σ on that input."""

    name = "classical"

    def __init__(
        self,
        resolution: int = 480,
        patch_size: int = 8,
        color_weight: float = 1.0,
        context_weight: float = 0.5,
        texture_weight: float = 0.6,
        position_weight: float = 0.25,
        bandwidth: float = 0.55,
        n_random_features: int = 256,
        seed: int = 0,
    ):
        super().__init__(resolution)
        self.patch_size = int(patch_size)
        self.weights = dict(
            color=color_weight,
            context=context_weight,
            texture=texture_weight,
            position=position_weight,
        )
        self.bandwidth = float(bandwidth)
        self.n_random_features = int(n_random_features)
        self.seed = int(seed)
        self._cache = None

    def __call__(
        self,
        image: np.ndarray,
        resolution: Optional[int] = None,
        bandwidth: Optional[float] = None,
        position_weight: Optional[float] = None,
    ) -> np.ndarray:
        """``image``: H×W×3 uint8 RGB → float32 ``(h, w, C)`` L2-normalised, C = n_random_features.

        ``bandwidth`` / ``position_weight`` override the defaults for this call (the engine uses
        a few settings to diversify its hierarchies).
        """
        bandwidth = float(bandwidth or self.bandwidth)
        weights = dict(self.weights)
        if position_weight is not None:
            weights["position"] = float(position_weight)
        res = int(resolution or self.resolution)
        standardized, (gh, gw) = self._standardized(image, res)
        groups = [g * (weights[name] / np.sqrt(g.shape[1])) for name, g in standardized.items()]
        g = np.concatenate(groups, 1).astype(np.float32)  # (h*w, 18), z-scored and weighted
        # cosine similarity of the mapped vectors approximates the RBF kernel, so it falls from
        # 1 (identical) to ~0 (unrelated) like DINO keys do, and a group's mean vector embeds
        # its whole feature distribution (good for texture)
        feats = random_fourier_features(g, bandwidth, self.n_random_features, self.seed, np.float32)
        return feats.reshape(gh, gw, -1)

    def _standardized(
        self, image: np.ndarray, res: int
    ) -> Tuple[Dict[str, np.ndarray], Tuple[int, int]]:
        """Per-group z-scored patch statistics {group: (h*w, c)} and the grid size; the last
        result is cached so feature variants of one image share the filtering work."""
        key = (image.shape, res, zlib.crc32(np.ascontiguousarray(image).data))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        p = self.patch_size
        gh, gw = grid_size(image.shape[0], image.shape[1], res, p)
        img = cv2.resize(image, (gw * p, gh * p), interpolation=cv2.INTER_AREA)
        lab = cv2.cvtColor(img.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
        tex = _texture(lab[..., 0] / 100.0, p)

        def pool(x):
            return cv2.resize(x, (gw, gh), interpolation=cv2.INTER_AREA).reshape(gh, gw, -1)

        ys, xs = np.meshgrid(np.linspace(0, 1, gh), np.linspace(0, 1, gw), indexing="ij")
        groups = (
            ("color", pool(lab)),
            ("context", pool(cv2.GaussianBlur(lab, (0, 0), CONTEXT_SIGMA * p))),
            ("texture", pool(tex)),
            ("position", np.stack([xs, ys], -1).astype(np.float32)),
        )
        out = {}
        for name, g in groups:
            g = g.reshape(-1, g.shape[-1])
            out[name] = (g - g.mean(0)) / (g.std(0) + STD_EPS)
        self._cache = (key, (out, (gh, gw)))
        return out, (gh, gw)


def _texture(lum: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W) luminance in [0, 1] → (H, W, 10) texture energies: |∂x|, |∂y|, |LoG| per scale of
    :data:`TEXTURE_SCALES` and the local contrast, pooled and log-compressed."""
    tex = []
    for sigma in TEXTURE_SCALES:
        blurred = cv2.GaussianBlur(lum, (0, 0), sigma)
        gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3)
        tex += [np.abs(gx), np.abs(gy), np.abs(cv2.Laplacian(blurred, cv2.CV_32F, ksize=3))]
    mean = cv2.GaussianBlur(lum, (0, 0), CONTRAST_SIGMA)
    tex.append(
        np.sqrt(np.maximum(cv2.GaussianBlur(lum * lum, (0, 0), CONTRAST_SIGMA) - mean * mean, 0))
    )
    tex = cv2.GaussianBlur(np.stack(tex, -1), (0, 0), patch_size * TEXTURE_POOL)
    return np.log1p(TEXTURE_GAIN * tex)
