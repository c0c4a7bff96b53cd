"""Dense patch features, shared by the pseudo-label engine (:mod:`unsam.pseudo`) and the data
pipeline (ViSA's guidance targets in :mod:`unsam.data.mapper`); depends on neither.

Every backend maps an RGB image (``H×W×3`` uint8) to L2-normalised patch features of shape
``h×w×C`` on a regular grid (one vector per ``patch_size×patch_size`` cell of the image resized
so that its long side is ``resolution`` pixels, rounded to a multiple of the patch size).

Backends
--------
``classical`` (:class:`ClassicalFeatures`, the offline default; ``classical.py``)
    Training-free: Lab colour (patch mean and a wider context mean), texture (Gaussian-derivative
    and Laplacian-of-Gaussian energies at three scales plus local contrast, pooled over a window
    a little wider than a patch) and a weak (x, y) position term. Channels are z-scored per image
    and each group is weighted, then mapped by random Fourier features (``fourier.py``) and
    L2-normalised, so cosine similarity is centred near 0 for unrelated patches and near 1 for
    look-alikes — the same range in which the MaskCut / UnSAM thresholds (τ = 0.15, merge
    thresholds 0.6 … 0.1) were tuned for DINO keys.
``dino`` (:class:`DinoFeatures`; ``dino.py``)
    A DINO ViT built with timm (``vit_small_patch8_224``, ``vit_base_patch8_224`` (default),
    ``vit_base_patch16_224``; dynamic image size) whose last-block attention **keys** (all heads
    concatenated) are the features, as in MaskCut and UnSAM. Weights come from a local file or
    URL in the official DINO checkpoint format; see :func:`load_dino_state_dict`. Position
    embeddings are interpolated the way the official DINO code does it
    (:func:`dino_pos_embed`), so keys match the official model at any input size.

:meth:`DenseFeatures.grid_features` gives the raw (un-normalised) features of images used at
their own size — what UnSAM's conquer step merges.
"""

from typing import Optional

from .base import DenseFeatures, FeatureError, grid_size, l2_normalize
from .classical import ClassicalFeatures
from .dino import DEFAULT_DINO_ARCH, DINO_ARCHS, DinoFeatures, dino_pos_embed, load_dino_state_dict
from .fourier import random_fourier_features

__all__ = [
    "DenseFeatures",
    "FeatureError",
    "grid_size",
    "l2_normalize",
    "ClassicalFeatures",
    "DinoFeatures",
    "DINO_ARCHS",
    "DEFAULT_DINO_ARCH",
    "dino_pos_embed",
    "load_dino_state_dict",
    "random_fourier_features",
    "build_features",
]


def build_features(
    name: str,
    resolution: int = 480,
    device: str = "cpu",
    dino_weights: Optional[str] = None,
    dino_arch: str = DEFAULT_DINO_ARCH,
) -> DenseFeatures:
    """The backend ``name`` in {"classical", "dino"}; :class:`FeatureError` for another name."""
    if name == "classical":
        return ClassicalFeatures(resolution=resolution)
    if name == "dino":
        return DinoFeatures(dino_weights, arch=dino_arch, resolution=resolution, device=device)
    raise FeatureError(f"unknown feature backend '{name}' (choose classical or dino)")
