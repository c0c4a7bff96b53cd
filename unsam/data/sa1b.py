"""Read and write SA-1B style per-image JSON, and register such folders as detectron2 datasets.

One JSON per image::

    {"image": {"image_id", "width", "height", "file_name"},
     "annotations": [{"id", "segmentation": {"size": [h, w], "counts": str}, "area",
                      "bbox": [x, y, w, h], "predicted_iou", "stability_score",
                      "point_coords": [[x, y]], "crop_box": [x, y, w, h],
                      "level" (optional), "parent_id" (optional)}]}

A dataset root holds ``<name>.jpg`` + ``<name>.json`` pairs, either directly or inside shard
folders (``sa_000000/``, ...). ``image.file_name`` may instead point at the image (absolute, or
relative to the JSON's folder), which is how the pseudo-label engine refers to images it did not
copy. Everything is class-agnostic: one category, id 0.
"""
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
from pycocotools import mask as mask_utils

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class SA1BFormatError(ValueError):
    """A pseudo-label file that cannot be used; the message names the file."""


def mask_to_rle(mask: np.ndarray) -> Dict:
    """H×W bool mask → COCO RLE ``{"size": [H, W], "counts": str}`` (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def rle_to_mask(rle: Dict) -> np.ndarray:
    """COCO RLE (counts as str or bytes) → H×W bool mask."""
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as COCO uses for crowds
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(counts, str):
        rle = {"size": rle["size"], "counts": counts.encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def rle_area(rle: Dict) -> int:
    """Pixel count of one RLE (pycocotools' batched ``area`` overflows past 255 RLEs)."""
    counts = rle["counts"]
    if isinstance(counts, str):
        rle = {"size": rle["size"], "counts": counts.encode("ascii")}
    return int(mask_utils.area(rle))


def annotation_from_mask(mask: np.ndarray, ann_id: int, **extra) -> Dict:
    """Build one SA-1B annotation (RLE, area, XYWH bbox) from an H×W bool mask."""
    rle = mask_to_rle(mask)
    ys, xs = np.nonzero(mask)
    if len(xs):
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    else:
        bbox = [0, 0, 0, 0]
    h, w = mask.shape
    ann = {
        "id": int(ann_id),
        "segmentation": rle,
        "area": int(mask.sum()),
        "bbox": bbox,
        "predicted_iou": 1.0,
        "stability_score": 1.0,
        "point_coords": [[float(xs.mean()), float(ys.mean())]] if len(xs) else [[0.0, 0.0]],
        "crop_box": [0, 0, int(w), int(h)],
    }
    ann.update(extra)
    return ann


def write_sa1b_json(path, image_info: Dict, annotations: List[Dict]) -> None:
    """Write one SA-1B JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for key in ("image_id", "width", "height", "file_name"):
        if key not in image_info:
            raise SA1BFormatError(f"{path}: image record lacks '{key}'")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"image": image_info, "annotations": annotations}, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_sa1b_json(path) -> Dict:
    """Read and validate one SA-1B JSON. Raises :class:`SA1BFormatError` naming the file."""
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SA1BFormatError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
        raise SA1BFormatError(f"{path}: expected keys 'image' and 'annotations'")
    image = data["image"]
    try:
        height, width = int(image["height"]), int(image["width"])
    except (KeyError, TypeError, ValueError) as e:
        raise SA1BFormatError(f"{path}: image record needs integer 'height' and 'width'") from e
    for i, ann in enumerate(data["annotations"]):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise SA1BFormatError(f"{path}: annotation {i} has no RLE segmentation")
        if [int(s) for s in seg["size"]] != [height, width]:
            raise SA1BFormatError(
                f"{path}: annotation {i} RLE size {seg['size']} differs from image {height}x{width}"
            )
        try:
            rle_area(seg)
        except Exception as e:  # pycocotools raises bare exceptions on corrupt counts
            raise SA1BFormatError(f"{path}: annotation {i} has corrupt RLE counts ({e})") from e
    return data


def find_sa1b_files(root) -> List[Path]:
    """All ``*.json`` pseudo-label files under ``root`` (directly or one shard level down), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"SA-1B root '{root}' is not a directory")
    files = sorted(p for p in root.glob("*.json") if not p.name.startswith("."))
    for shard in sorted(p for p in root.iterdir() if p.is_dir()):
        files.extend(sorted(p for p in shard.glob("*.json") if not p.name.startswith(".")))
    return files


def _resolve_image(json_path: Path, file_name: str) -> Optional[Path]:
    candidates = [Path(file_name)] if os.path.isabs(file_name) else [json_path.parent / file_name]
    candidates += [json_path.with_suffix(ext) for ext in IMAGE_EXTENSIONS]
    for c in candidates:
        if c.is_file():
            return c
    return None


def load_sa1b_dicts(root, skip_empty: bool = False) -> List[Dict]:
    """Load every image of an SA-1B root as detectron2 dataset dicts (class-agnostic).

    Files that are corrupt, whose RLE size disagrees with the image, or whose image is missing
    are logged by name, counted and skipped: a bad file never kills a run silently.
    """
    dicts, skipped = [], []
    for json_path in find_sa1b_files(root):
        try:
            data = read_sa1b_json(json_path)
        except SA1BFormatError as e:
            skipped.append(str(e))
            continue
        image = data["image"]
        img_path = _resolve_image(json_path, str(image.get("file_name", "")))
        if img_path is None:
            skipped.append(f"{json_path}: image '{image.get('file_name')}' not found")
            continue
        annotations = [
            {
                "segmentation": ann["segmentation"],
                "bbox": ann.get("bbox", [0, 0, 0, 0]),
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 0,
                "iscrowd": 0,
                "area": ann.get("area", 0),
                "id": ann.get("id", i),
                "level": int(ann.get("level", 0)),
                "parent_id": int(ann.get("parent_id", -1)),
                "predicted_iou": float(ann.get("predicted_iou", 1.0)),
            }
            for i, ann in enumerate(data["annotations"])
        ]
        if skip_empty and not annotations:
            continue
        dicts.append(
            {
                "file_name": str(img_path),
                "image_id": image.get("image_id", json_path.stem),
                "height": int(image["height"]),
                "width": int(image["width"]),
                "annotations": annotations,
            }
        )
    for msg in skipped:
        logger.warning("skipped pseudo-label file: %s", msg)
    logger.info("SA-1B root %s: %d images loaded, %d files skipped", root, len(dicts), len(skipped))
    return dicts


def register_sa1b(name: str, root, skip_empty: bool = False) -> None:
    """Register an SA-1B style folder as detectron2 dataset ``name`` (lazy: read on first use)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    root = str(root)
    DatasetCatalog.register(name, lambda: load_sa1b_dicts(root, skip_empty=skip_empty))
    MetadataCatalog.get(name).set(
        thing_classes=["object"], evaluator_type="sa1b", root=root, ignore_label=255
    )


def iter_roots_from_config(entries: Iterable[str]):
    """Parse ``UNSAM.DATA.SA1B_ROOTS`` entries of the form ``name:path`` (path may hold ':')."""
    for entry in entries:
        name, sep, path = entry.partition(":")
        if not sep or not name or not path:
            raise ValueError(f"UNSAM.DATA.SA1B_ROOTS entry '{entry}' must be 'name:path'")
        yield name, path
