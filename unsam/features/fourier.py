"""Random Fourier features of an RBF kernel (Rahimi & Recht, 2007).

For ``φ(x) = cos(x W / σ + b)`` with ``W ~ N(0, 1)`` and ``b ~ U(0, 2π)``, the cosine similarity
of ``φ(x)`` and ``φ(y)`` approximates ``exp(−|x − y|² / 2σ²)``: 1 for identical inputs, ~0 for
unrelated ones — the similarity range DINO keys have. The mean of a group's mapped vectors is
the group's kernel mean embedding, so two groups compare by their whole distributions (texture,
colour histograms), not only by their means. Used by the classical features (patch statistics)
and by the pseudo-label refiner's full-resolution colour embedding.
"""

import numpy as np

from .base import l2_normalize


def random_fourier_features(
    x: np.ndarray, bandwidth: float, n_features: int, seed: int, dtype=np.float64
) -> np.ndarray:
    """``x``: (N, D) inputs → (N, n_features) L2-normalised features of ``dtype``.

    The map depends only on (D, ``n_features``, ``seed``), so calls with equal arguments (other
    images, other crops) share one kernel; ``bandwidth`` is σ in the inputs' units."""
    rng = np.random.default_rng(seed)
    proj = rng.normal(0.0, 1.0, (x.shape[1], n_features)).astype(dtype)
    phase = rng.uniform(0.0, 2 * np.pi, n_features).astype(dtype)
    return l2_normalize(np.cos(x @ (proj / bandwidth) + phase))
