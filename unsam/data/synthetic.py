"""A synthetic "shapes" dataset in SA-1B layout, for learning tests, smoke runs and ablations.

Each image holds 2–5 non-overlapping ellipses / polygons of flat colour on a textured background
(noise, gradient and stripes). Some shapes are two-coloured: their annotation (level 0) gets a
child part (level 1, ``parent_id`` = the whole's id), giving the nested hierarchy that the
pseudo-label engine also writes.
"""
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
from PIL import Image

from .sa1b import annotation_from_mask, write_sa1b_json


def _textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 200, 3)
    grad = rng.uniform(-40, 40, 3)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(8, 24)
    stripes = 12 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    img = base + grad * xx[..., None] + stripes[..., None] + rng.normal(0, 10, (size, size, 3))
    return img.clip(0, 255).astype(np.uint8)


def draw_random_shape(rng: np.random.Generator, mask: np.ndarray, cx: float, cy: float, r: float, *,
                      min_aspect: float = 0.5, max_vertices: int = 6, min_radius: float = 0.6) -> None:
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
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1)


def _random_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cx, cy = rng.integers(size // 6, size - size // 6, 2)
    draw_random_shape(rng, mask, cx, cy, int(rng.integers(size // 10, size // 4)))
    return mask.astype(bool)


def render_shapes_image(rng: np.random.Generator, size: int = 256, max_shapes: int = 5,
                        part_prob: float = 0.4) -> Tuple[np.ndarray, List[Dict]]:
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


def make_shapes_dataset(root, num_images: int, size: int = 256, seed: int = 0) -> Path:
    """Write ``num_images`` synthetic images as ``<root>/<name>.jpg`` + SA-1B ``<name>.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        image, objects = render_shapes_image(rng, size)
        name = f"shapes_{seed:03d}_{i:05d}"
        Image.fromarray(image).save(root / f"{name}.png")
        anns = [
            annotation_from_mask(o["mask"], ann_id=k, level=o["level"], parent_id=o["parent"])
            for k, o in enumerate(objects)
        ]
        write_sa1b_json(root / f"{name}.json", {"image_id": seed * 100000 + i, "width": size, "height": size,
                                                "file_name": f"{name}.png"}, anns)
    return root
