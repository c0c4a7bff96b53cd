"""Divide: MaskCut — repeated normalised cuts on the patch-affinity graph.

For patch features ``F`` (N×C, L2-normalised) the affinity is ``W = [F Fᵀ > τ]`` with ``ε`` in
place of the zeros (τ = 0.15, ε = 1e-5 as in MaskCut). The normalised cut is relaxed to the
generalised eigenproblem ``(D − W) x = λ D x``; its second-smallest eigenvector is obtained as the
second-*largest* eigenvector of ``D^{-1/2} W D^{-1/2}`` with ``scipy.sparse.linalg.eigsh`` on a
matrix-free operator (``W = (1−ε)B + ε·11ᵀ`` is applied as a sparse ``B`` plus a rank-one term,
so no dense N×N eigendecomposition is needed). The vector is split at its mean; the foreground
side is the one holding the entry of largest magnitude, flipped when it covers two or more
image corners (a background-like region); the foreground is then reduced to the connected
component holding that entry. Found patches are removed from the graph (their features zeroed,
as MaskCut does) and the cut repeats, giving up to ``n_masks`` regions.
"""

import logging
from typing import List, Tuple

import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.sparse.linalg import LinearOperator, eigsh

logger = logging.getLogger(__name__)


def ncut_vector(
    feats: np.ndarray, tau: float = 0.15, eps: float = 1e-5, active: np.ndarray = None
) -> np.ndarray:
    """Second-smallest generalised eigenvector of the binarised cosine-affinity graph.

    ``feats``: (N, C) L2-normalised; ``active``: optional (N,) bool — inactive nodes get zero
    features (connected to everything only by ε). Returns (N,) float64.
    """
    f = np.asarray(feats, dtype=np.float32)
    if active is not None:
        f = f * active[:, None]
    n = f.shape[0]
    sim = f @ f.T
    dense = (sim > tau).astype(np.float32)
    del sim
    # B is kept sparse unless it is dense enough that a dense mat-vec is faster
    binary = sp.csr_matrix(dense) if dense.mean() < 0.1 else dense
    # W = (1-ε)·B + ε·11ᵀ ; degree d = (1-ε)·B1 + ε·n
    d = (1.0 - eps) * np.asarray(dense.sum(1), np.float64).ravel() + eps * n
    del dense
    dinv = 1.0 / np.sqrt(d)

    def matvec(v):
        v = np.asarray(v).ravel()
        u = dinv * v
        return dinv * (
            (1.0 - eps) * np.asarray(binary @ u.astype(np.float32), np.float64).ravel()
            + eps * u.sum()
        )

    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    if n <= 3:
        dense = op @ np.eye(n)
        vals, vecs = np.linalg.eigh(dense)
    else:
        # deterministic start vector: eigsh's default is random
        v0 = np.sqrt(d) + 0.01 * np.cos(np.arange(n))
        vals, vecs = eigsh(op, k=2, which="LA", v0=v0, tol=1e-6, maxiter=max(1000, 20 * n))
    order = np.argsort(vals)
    second = vecs[:, order[-2]]
    return dinv * second


def bipartition(vec: np.ndarray, shape: Tuple[int, int], active: np.ndarray = None) -> np.ndarray:
    """Split an eigenvector into a foreground (h, w) bool mask following MaskCut's rules."""
    h, w = shape
    vals = vec if active is None else np.where(active, vec, np.nan)
    mean = np.nanmean(vals)
    part = vec > mean
    seed = int(np.nanargmax(np.abs(vals - mean)))
    if not part[seed]:
        part = ~part
    if active is not None:
        part &= active
    grid = part.reshape(h, w)
    corners = sum(bool(grid[y, x]) for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)))
    if corners >= 2:
        # the seed side looks like background: take the other side, seeded at its extreme entry
        part = ~part if active is None else (~part & active)
        grid = part.reshape(h, w)
        cand = np.where(part, np.abs(vec - mean), -np.inf)
        seed = int(np.argmax(cand))
    if not grid.any():
        return grid
    labels, _ = ndimage.label(grid)
    lab = labels.ravel()[seed]
    if lab == 0:
        lab = np.bincount(labels.ravel())[1:].argmax() + 1
    return labels == lab


def maskcut(
    feats: np.ndarray, n_masks: int = 3, tau: float = 0.15, eps: float = 1e-5, min_patches: int = 4
) -> List[np.ndarray]:
    """``feats``: (h, w, C) L2-normalised → list of ≤ n_masks (h, w) bool masks (disjoint)."""
    h, w, c = feats.shape
    flat = feats.reshape(-1, c)
    active = np.ones(h * w, bool)
    masks = []
    for _ in range(n_masks):
        if active.sum() < 2 * min_patches:
            break
        vec = ncut_vector(flat, tau, eps, active)
        mask = bipartition(vec, (h, w), active)
        if mask.sum() < min_patches:
            break
        masks.append(mask)
        active &= ~mask.ravel()
    return masks
