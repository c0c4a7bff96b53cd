"""Classical pseudo-label engine (issue 18): thread-independent outputs, superpixels without
pinholes, the contour hierarchy."""

import os
import subprocess
import sys
from pathlib import Path

import unsam.compat  # noqa: F401

import cv2
import numpy as np

from unsam.io.sa1b import rle_to_mask
from unsam.pseudo.classical import ClassicalLabeler, ClassicalSettings
from unsam.pseudo.conquer import merge_boundary
from unsam.pseudo.refine import MIN_SEGMENT_PIXELS, SuperpixelGraph, superpixels
from unsam.pseudo.runner import read_image
from unsam.pseudo.threads import single_threaded, thread_settings

ROOT = Path(__file__).resolve().parents[1]
# a small real photo labels in about a second at these settings
SMALL = dict(resolution=160, crop_resolution=128)


def _small_photo(tiny_val, size=(160, 120)) -> np.ndarray:
    """The first shared val photo, shrunk (small images are where the pinholes were)."""
    path = sorted((tiny_val / "images").glob("*.jpg"))[0]
    return cv2.resize(read_image(path), size, interpolation=cv2.INTER_AREA)


def test_single_threaded_pins_and_restores():
    before = thread_settings()
    with single_threaded():
        inside = thread_settings()
    assert inside["torch"] == 1 and inside["cv2"] == 1
    assert inside["openblas"] and set(inside["openblas"]) == {1}  # numpy's copy at least
    assert thread_settings() == before


_CHILD = r"""
import hashlib, json, sys
import numpy as np
sys.path.insert(0, {root!r})
import unsam
from unsam.pseudo.classical import ClassicalLabeler, ClassicalSettings
image = np.load({image!r})
anns = ClassicalLabeler(ClassicalSettings(**{cfg!r}))(image)
print(len(anns), hashlib.sha256(json.dumps(anns).encode()).hexdigest())
"""


def test_outputs_identical_at_one_and_two_threads(tiny_val, tmp_path):
    """The same photo labelled in fresh processes started with 1 and with 2 threads
    (OMP / OpenBLAS / OpenCV environment) gives byte-identical annotations."""
    np.save(tmp_path / "photo.npy", _small_photo(tiny_val, (240, 180)))
    code = _CHILD.format(root=str(ROOT), image=str(tmp_path / "photo.npy"), cfg=SMALL)
    out = []
    for n in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, OPENCV_FOR_THREADS_NUM=n)
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out.append(proc.stdout.strip().splitlines()[-1])
    assert int(out[0].split()[0]) > 50
    assert out[0] == out[1]


def test_superpixels_connected_and_not_tiny(tiny_val):
    """Every superpixel is one 4-connected piece of at least MIN_SEGMENT_PIXELS pixels (the
    watershed's line pixels used to go to one lump label: 1-px fragments all over the image)."""
    for size in ((160, 120), (320, 240)):
        labels = superpixels(_small_photo(tiny_val, size), 1800)
        sizes = np.bincount(labels.ravel())
        assert sizes.min() >= MIN_SEGMENT_PIXELS
        for k in range(len(sizes)):
            n, _ = cv2.connectedComponents((labels == k).astype(np.uint8), connectivity=4)
            assert n == 2, f"superpixel {k} in {n - 1} pieces at {size}"


def test_no_pinholes_in_masks(tiny_val):
    """No mask of a small photo has an enclosed hole of a few pixels."""
    anns = ClassicalLabeler(ClassicalSettings(**SMALL))(_small_photo(tiny_val))
    assert len(anns) > 50
    for a in anns:
        m = rle_to_mask(a["segmentation"]).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(1 - m, connectivity=4)
        h, w = m.shape
        for x, y, bw, bh, area in stats[1:]:
            enclosed = x > 0 and y > 0 and x + bw < w and y + bh < h
            assert not (enclosed and area <= 4), f"mask {a['id']}: a {area}-px hole at ({x}, {y})"


def test_merge_boundary_follows_contours():
    """Two halves of a 6×6 grid of nodes with the same colour but a strong contour between them:
    the contour hierarchy joins each half before crossing the contour, whatever the features."""
    h, w = 6, 6
    idx = np.arange(h * w).reshape(h, w)
    pairs = np.concatenate(
        [
            np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1),
            np.stack([idx[:-1].ravel(), idx[1:].ravel()], 1),
        ]
    )
    left = (idx % w) < 3
    crossing = left.ravel()[pairs[:, 0]] != left.ravel()[pairs[:, 1]]
    length = np.ones(len(pairs))
    edge = np.where(crossing, 5.0, 0.2) + 0.01 * (np.arange(len(pairs)) % 3)  # weak texture inside
    segs = merge_boundary(pairs, length, edge, np.ones(h * w), min_weight=2.0)
    assert segs[0].mask.all() and segs[0].parent == -1  # the whole graph, coarsest first
    halves = [s.mask for s in segs if s.parent == 0]
    assert len(halves) == 2
    assert {tuple(m) for m in halves} == {tuple(left.ravel()), tuple(~left.ravel())}
    for s in segs[1:]:  # nested: every segment lies inside its parent
        assert (s.mask <= segs[s.parent].mask).all()


def test_border_edges_at_the_default_sigma_are_the_graphs(tiny_val):
    graph = SuperpixelGraph(_small_photo(tiny_val), 900)
    assert graph.border_edges(1.0) is graph.border_edge
    wide = graph.border_edges(3.0)
    assert wide.shape == graph.border_edge.shape and np.isfinite(wide).all()
    assert not np.allclose(wide, graph.border_edge)
