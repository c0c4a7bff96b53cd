"""Synthetic datasets in SA-1B layout, for learning tests, smoke runs and ablations.

* **Shapes** (:func:`make_shapes_dataset`): each image holds 2–5 non-overlapping ellipses /
  polygons of flat colour on a textured background (noise, gradient and stripes). Some shapes are
  two-coloured: their annotation (level 0) gets a child part (level 1, ``parent_id`` = the whole's
  id), giving the nested hierarchy that the pseudo-label engine also writes.
* **Nested scenes** (:func:`make_nested_scenes_dataset`): 2–4 objects (level 0), most of them cut
  into 2–3 parts (level 1), some parts holding a sub-part (level 2), every region filled with a
  two-colour texture (stripes, checks, blotches, or flat). Unannotated textured patches lie on
  the background. Colour edges and object boundaries disagree: stripes and patches make edges
  that bound no mask, and a whole's outline is only partly a colour edge. This is the data the
  training aids (ViSA's curriculum, boundary relaxation and semantic guidance) have something to
  act on.
"""

from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
from PIL import Image

from ..io.sa1b import annotation_from_mask, write_sa1b_json


def _textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 200, 3)
    grad = rng.uniform(-40, 40, 3)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(8, 24)
    stripes = 12 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    img = base + grad * xx[..., None] + stripes[..., None] + rng.normal(0, 10, (size, size, 3))
    return img.clip(0, 255).astype(np.uint8)


def draw_random_shape(
    rng: np.random.Generator,
    mask: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    *,
    min_aspect: float = 0.5,
    max_vertices: int = 6,
    min_radius: float = 0.6,
) -> None:
    """Fill one random shape of radius ~``r`` centred at (cx, cy) into the uint8 ``mask``: half the
    time an ellipse (minor/major axis ≥ ``min_aspect``), else a star-shaped polygon of 3 to
    ``max_vertices`` vertices at ``min_radius``·r to r."""
    if rng.random() < 0.5:
        axes = (int(r), int(max(r * rng.uniform(min_aspect, 1.0), 1)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        k = int(rng.integers(3, max_vertices + 1))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = r * rng.uniform(min_radius, 1.0, k)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(
            np.int32
        )
        cv2.fillPoly(mask, [pts], 1)


def _random_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cx, cy = rng.integers(size // 6, size - size // 6, 2)
    draw_random_shape(rng, mask, cx, cy, int(rng.integers(size // 10, size // 4)))
    return mask.astype(bool)


def render_shapes_image(
    rng: np.random.Generator, size: int = 256, max_shapes: int = 5, part_prob: float = 0.4
) -> Tuple[np.ndarray, List[Dict]]:
    """One image and its annotations: ``[{"mask", "level", "parent"}]`` (parent = list index)."""
    image = _textured_background(rng, size)
    occupied = np.zeros((size, size), bool)
    objects: List[Dict] = []
    for _ in range(int(rng.integers(2, max_shapes + 1))):
        for _attempt in range(20):
            mask = _random_shape(rng, size)
            grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if mask.sum() > 0.005 * size * size and not (grown & occupied).any():
                break
        else:
            continue
        occupied |= mask
        color = rng.integers(0, 256, 3)
        image[mask] = (0.85 * color + 0.15 * image[mask]).astype(np.uint8)
        parent_index = len(objects)
        objects.append({"mask": mask, "level": 0, "parent": -1})
        if rng.random() < part_prob:
            ys, xs = np.nonzero(mask)
            if rng.random() < 0.5:  # split the shape at its median column, else its median row
                part = mask & (np.arange(size)[None, :] < np.median(xs))
            else:
                part = mask & (np.arange(size)[:, None] < np.median(ys))
            if part.sum() > 0.2 * mask.sum():
                color2 = (color + rng.integers(80, 176, 3)) % 256
                image[part] = (0.85 * color2 + 0.15 * image[part]).astype(np.uint8)
                objects.append({"mask": part, "level": 1, "parent": parent_index})
    return image, objects


def _write_dataset(root, prefix: str, num_images: int, size: int, seed: int, render) -> Path:
    """Write ``num_images`` images ``render(rng, size)`` as ``<root>/<prefix>_<seed>_<i>.png``
    + SA-1B JSON."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        image, objects = render(rng, size)
        name = f"{prefix}_{seed:03d}_{i:05d}"
        Image.fromarray(image).save(root / f"{name}.png")
        anns = [
            annotation_from_mask(o["mask"], ann_id=k, level=o["level"], parent_id=o["parent"])
            for k, o in enumerate(objects)
        ]
        write_sa1b_json(
            root / f"{name}.json",
            {
                "image_id": seed * 100000 + i,
                "width": size,
                "height": size,
                "file_name": f"{name}.png",
            },
            anns,
        )
    return root


def make_shapes_dataset(root, num_images: int, size: int = 256, seed: int = 0) -> Path:
    """Write ``num_images`` synthetic images as ``<root>/<name>.png`` + SA-1B ``<name>.json``."""
    return _write_dataset(root, "shapes", num_images, size, seed, render_shapes_image)


# ----------------------------------------------------------------------------------------------
# nested scenes


def _texture(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """The N×3 colours of the ``mask`` pixels under a random two-colour texture: flat (a quarter of
    the time), stripes, checks or blotches, plus mild noise."""
    c1 = rng.uniform(0, 255, 3)
    c2 = (c1 + rng.uniform(70, 185, 3)) % 256
    y, x = yy[mask], xx[mask]
    kind = int(rng.integers(4))
    if kind == 0:
        pattern = np.zeros(y.shape, bool)
    elif kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
        pattern = (np.cos(angle) * x + np.sin(angle) * y) % period < period / 2
    elif kind == 2:
        cell = int(rng.integers(4, 9))
        pattern = ((x // cell + y // cell) % 2).astype(bool)
    else:
        coarse = rng.normal(size=(max(2, yy.shape[0] // 12),) * 2).astype(np.float32)
        pattern = cv2.resize(coarse, yy.shape[::-1], interpolation=cv2.INTER_CUBIC)[mask] > 0
    fill = np.where(pattern[:, None], c2, c1) + rng.normal(0, 6, (len(y), 3))
    return fill.clip(0, 255).astype(np.uint8)


def _split_into_parts(rng: np.random.Generator, mask: np.ndarray, yy, xx) -> List[np.ndarray]:
    """Cut ``mask`` into 2–3 bands of equal area across a random direction ([] if one is tiny)."""
    k = int(rng.integers(2, 4))
    angle = rng.uniform(0, np.pi)
    proj = np.cos(angle) * xx + np.sin(angle) * yy
    cuts = np.quantile(proj[mask], np.arange(1, k) / k)
    band = np.digitize(proj, cuts)
    parts = [mask & (band == j) for j in range(k)]
    return parts if min(int(p.sum()) for p in parts) >= 0.15 * mask.sum() else []


def _subpart(rng: np.random.Generator, part: np.ndarray) -> np.ndarray:
    """A small shape inside ``part`` (kept off its boundary), or an empty mask when none fits."""
    inner = cv2.erode(part.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    ys, xs = np.nonzero(inner)
    if len(xs) < 12:
        return np.zeros_like(part)
    j = int(rng.integers(len(xs)))
    shape = np.zeros(part.shape, np.uint8)
    radius = max(2.0, np.sqrt(part.sum() / np.pi) * rng.uniform(0.35, 0.6))
    draw_random_shape(rng, shape, xs[j], ys[j], radius)
    sub = shape.astype(bool) & inner
    return sub if 0.08 * part.sum() <= sub.sum() <= 0.7 * part.sum() else np.zeros_like(part)


def _place_whole(rng: np.random.Generator, size: int, occupied: np.ndarray) -> np.ndarray:
    """A random shape that keeps a 2-px gap to ``occupied``, or an empty mask after 20 tries."""
    for _attempt in range(20):
        mask = np.zeros((size, size), np.uint8)
        cx, cy = rng.integers(size // 6, size - size // 6, 2)
        draw_random_shape(rng, mask, cx, cy, int(rng.integers(size // 7, int(size / 3.5) + 1)))
        mask = mask.astype(bool)
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        if mask.sum() > 0.01 * size * size and not (grown & occupied).any():
            return mask
    return np.zeros((size, size), bool)


def render_nested_scene(
    rng: np.random.Generator,
    size: int = 128,
    max_objects: int = 4,
    part_prob: float = 0.8,
    subpart_prob: float = 0.5,
) -> Tuple[np.ndarray, List[Dict]]:
    """One nested scene and its annotations ``[{"mask", "level", "parent"}]`` (parent = list index).

    Every level-1 part lies inside its level-0 whole and the parts of a whole cover it; every
    level-2 sub-part lies inside its level-1 part. Regions are painted coarse to fine, so each
    pixel shows the texture of the finest region holding it.
    """
    image = _textured_background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):  # unannotated textured patches on the background
        patch = np.zeros((size, size), np.uint8)
        draw_random_shape(
            rng, patch, *rng.integers(0, size, 2), int(rng.integers(size // 8, size // 4 + 1))
        )
        patch = patch.astype(bool)
        image[patch] = _texture(rng, yy, xx, patch)
    occupied = np.zeros((size, size), bool)
    objects: List[Dict] = []

    def add(mask: np.ndarray, level: int, parent: int) -> int:
        image[mask] = _texture(rng, yy, xx, mask)
        objects.append({"mask": mask, "level": level, "parent": parent})
        return len(objects) - 1

    for _ in range(int(rng.integers(2, max_objects + 1))):
        whole = _place_whole(rng, size, occupied)
        if not whole.any():
            continue
        occupied |= whole
        whole_index = add(whole, 0, -1)
        for part in _split_into_parts(rng, whole, yy, xx) if rng.random() < part_prob else []:
            part_index = add(part, 1, whole_index)
            sub = _subpart(rng, part) if rng.random() < subpart_prob else None
            if sub is not None and sub.any():
                add(sub, 2, part_index)
    return image, objects


def make_nested_scenes_dataset(root, num_images: int, size: int = 128, seed: int = 0) -> Path:
    """Write ``num_images`` nested scenes (:func:`render_nested_scene`) as ``<root>/<name>.png`` +
    SA-1B ``<name>.json`` with ``level`` 0/1/2 and ``parent_id``; the same ``seed`` writes the
    same files."""
    return _write_dataset(root, "nested", num_images, size, seed, render_nested_scene)
