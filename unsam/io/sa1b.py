"""The SA-1B file format: one JSON per image with COCO-RLE masks. No detectron2 here.

One JSON per image::

    {"image": {"image_id", "width", "height", "file_name"},
     "annotations": [{"id", "segmentation": {"size": [h, w], "counts": str}, "area",
                      "bbox": [x, y, w, h], "predicted_iou", "stability_score",
                      "point_coords": [[x, y]], "crop_box": [x, y, w, h],
                      "level" (optional), "parent_id" (optional)}]}

A dataset root holds ``<name>.jpg`` + ``<name>.json`` pairs, either directly or inside shard
folders (``sa_000000/``, ...). ``image.file_name`` may instead point at the image (absolute, or
relative to the JSON's folder), which is how the pseudo-label engine refers to images it did not
copy.

This module is what the pseudo-label workers, the merge / self-training tools and the dataset
index need (RLE helpers, validation, read / write, finding files); turning records into detectron2
datasets is :mod:`unsam.data.sa1b`. It imports numpy, pycocotools and the standard library only.
"""

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from ..utils.files import atomic_write
from ..utils.images import IMAGE_EXTENSIONS


class SA1BFormatError(ValueError):
    """A pseudo-label file that cannot be used; the message names the file."""


class DatasetError(ValueError):
    """A dataset with no usable image; the message names it and why its files were skipped."""


# annotation fields the loader turns into numbers, and whether they must be whole numbers
_NUMERIC_FIELDS = {"area": False, "predicted_iou": False, "level": True, "parent_id": True}


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


def rle_box(rle: Dict) -> Tuple[int, int, int, int]:
    """Tight XYWH box of one RLE, from its runs (no decoding); zeros for an empty mask."""
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(counts, str):
        rle = {"size": rle["size"], "counts": counts.encode("ascii")}
    return tuple(int(v) for v in mask_utils.toBbox(rle))


def rle_area(rle: Dict) -> int:
    """Pixel count of one RLE (pycocotools' batched ``area`` overflows past 255 RLEs)."""
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as COCO uses for crowds
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(counts, str):
        rle = {"size": rle["size"], "counts": counts.encode("ascii")}
    return int(mask_utils.area(rle))


def rle_runs(rle: Dict) -> np.ndarray:
    """Run lengths of a COCO RLE (compressed or not): alternating 0s and 1s, starting with 0s,
    over the column-major (Fortran) flattened mask."""
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, np.int64)
    return _run_lengths(counts.encode("ascii") if isinstance(counts, str) else counts)


def _run_lengths(counts: bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string: pycocotools' ``rleFrString``, vectorised.

    Each value is 5-bit little-endian groups (char - 48; bit 0x20: more groups follow, bit 0x10
    of the last group: negative); from the third value on, each is a delta to the value two
    places before.
    """
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return c
    if c.min() < 0 or c.max() > 63:
        raise ValueError("characters outside the RLE alphabet")
    last = np.flatnonzero((c & 0x20) == 0)  # the final character of each value
    if last.size == 0 or last[-1] != c.size - 1:
        raise ValueError("truncated")
    first = np.concatenate([[0], last[:-1] + 1])
    lengths = last - first + 1
    if lengths.max() > 12:  # more than 60 bits: no real mask is that large
        raise ValueError("run length overflows")
    value = np.repeat(np.arange(last.size), lengths)
    shift = 5 * (np.arange(c.size) - first[value])
    x = np.zeros(last.size, np.int64)
    np.add.at(x, value, (c & 0x1F) << shift)
    negative = (c[last] & 0x10) != 0
    x[negative] -= np.int64(1) << (5 * lengths[negative])
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])
    runs[2::2] = np.cumsum(x[2::2])
    return runs


def validate_rle(rle, size=None) -> None:
    """Raise ``ValueError`` (the reason) unless ``rle`` is a COCO RLE that decodes safely.

    pycocotools decodes without checks: runs summing to less than H×W leave uninitialised
    memory in the mask (empty ``counts`` gives a different "mask" in every process), more than
    H×W write past it. ``size``: the expected ``[H, W]``, if known.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("not an RLE (needs 'size' and 'counts')")
    shape = rle["size"]
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ValueError(f"RLE size {shape!r} is not [height, width]")
    if size is not None and list(shape) != [int(s) for s in size]:
        raise ValueError(f"RLE size {list(shape)} differs from image {size[0]}x{size[1]}")
    counts = rle["counts"]
    try:
        if isinstance(counts, list):  # uncompressed, as COCO crowds
            runs = np.asarray(counts, dtype=np.int64)
        else:
            runs = _run_lengths(counts.encode("ascii") if isinstance(counts, str) else counts)
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise ValueError(f"corrupt RLE counts ({e})") from None
    if runs.size == 0 and shape[0] * shape[1]:
        raise ValueError("empty RLE counts")
    if (runs < 0).any() or int(runs.sum()) != shape[0] * shape[1]:
        raise ValueError(
            f"corrupt RLE counts (runs cover {int(runs.sum())} pixels, "
            f"the size {shape[0]}x{shape[1]} has {shape[0] * shape[1]})"
        )


def _annotation_problem(ann, height: int, width: int) -> Optional[str]:
    """Why one SA-1B annotation cannot be used, or None."""
    if not isinstance(ann, dict) or not isinstance(ann.get("segmentation"), dict):
        return "no RLE segmentation"
    try:
        validate_rle(ann["segmentation"], (height, width))
    except ValueError as e:
        return str(e)
    return _numeric_field_problem(ann)


def _numeric_field_problem(ann: dict) -> Optional[str]:
    """Why a numeric field of an annotation (:data:`_NUMERIC_FIELDS`) is unusable, or None."""
    for key, whole in _NUMERIC_FIELDS.items():
        value = ann.get(key, 0)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (whole and value != int(value))
        ):
            return f"{key} {value!r} is not a {'whole' if whole else 'finite'} number"
    return None


def _counts_text_ends(counts: str) -> bool:
    """Whether a compressed RLE string ends a value: its last character has no continuation bit.

    pycocotools parses a string whose last value continues past its end by reading beyond the
    buffer (and writing past its run array); every other corruption only gives wrong numbers."""
    return bool(counts) and ((ord(counts[-1]) - 48) & 0x20) == 0


def annotation_shape_problem(ann, height: int, width: int) -> Optional[str]:
    """Why one SA-1B annotation cannot be used, from the checks that decode no run lengths; None
    when it passes them.

    The training reader checks every annotation of a record this way (~1 µs each) and leaves the
    run-length check (~0.15 ms each at SA-1B size, most of the cost of a 500-mask record) to the
    masks the mapper decodes, which computes the runs anyway and raises ``ValueError`` for runs
    that do not cover the image. What passes here is safe for pycocotools' ``area`` / ``toBbox``.
    A failure gets the message of the full check (:func:`_annotation_problem`).
    """
    seg = ann.get("segmentation") if isinstance(ann, dict) else None
    size = seg.get("size") if isinstance(seg, dict) else None
    counts = seg.get("counts") if isinstance(seg, dict) else None
    fine = (
        type(size) in (list, tuple)
        and len(size) == 2
        and type(size[0]) is int
        and type(size[1]) is int
        and size[0] == height
        and size[1] == width
    )
    if fine and isinstance(counts, str):
        fine = _counts_text_ends(counts)
    elif fine:  # uncompressed (list) counts, rare: the full check
        return _annotation_problem(ann, height, width)
    if fine and _numeric_field_problem(ann) is None:
        return None
    return (
        _annotation_problem(ann, height, width) or "corrupt RLE counts (the last value is cut off)"
    )


def annotation_from_mask(
    mask: np.ndarray,
    ann_id: int,
    box: Optional[Tuple[int, ...]] = None,
    image_size: Optional[Tuple[int, int]] = None,
    *,
    predicted_iou: float = 1.0,
    stability_score: float = 1.0,
    feature_coherence: Optional[float] = None,
    crop_box: Optional[Tuple[int, ...]] = None,
    **extra,
) -> Dict:
    """One SA-1B annotation record; every writer of pseudo labels builds its records here.

    ``mask``: an H×W bool mask of the whole image, or — given ``box`` = (x0, y0, x1, y1) and
    ``image_size`` = (H, W) — the mask local to that pixel box (x1 / y1 exclusive; only the box
    is looked at). The record holds, in this order: ``id``, ``segmentation`` (COCO RLE of the
    whole image), ``area``, ``bbox`` (tight XYWH; zeros for an empty mask), ``predicted_iou``,
    ``stability_score``, ``feature_coherence`` (only when given), ``point_coords`` (one point
    well inside the mask: the maximum of its distance transform, the first in row-major order
    on a tie — as SA-1B's point lies on its mask, which a centroid need not; [[0, 0]] for an
    empty mask), ``crop_box`` (XYWH of ``crop_box`` given as (x0, y0, x1, y1); default: the
    whole image), then the ``extra`` fields (``level``, ``parent_id`` …) in the order given.
    Numbers are stored as given (rounding is the caller's).
    """
    import cv2

    mask = np.asarray(mask, bool)
    if box is None:
        (H, W), (x0, y0) = mask.shape, (0, 0)
        rle = mask_to_rle(mask)
    else:
        (H, W), (x0, y0, x1, y1) = image_size, box
        full = np.zeros((H, W), np.uint8, order="F")  # pycocotools wants Fortran order
        full[y0:y1, x0:x1] = mask
        rle = {"size": [H, W], "counts": mask_utils.encode(full)["counts"].decode("ascii")}
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows):
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        bbox = [x0 + c0, y0 + r0, c1 - c0, r1 - r0]
        # on the tight box with one pixel of margin, the image border counts as outside: the
        # same point as on any larger box around the mask
        tight = np.pad(mask[r0:r1, c0:c1], 1).astype(np.uint8)
        dist = cv2.distanceTransform(tight, cv2.DIST_L2, 3)
        py, px = np.unravel_index(int(np.argmax(dist)), dist.shape)
        point = [[float(x0 + c0 + px - 1), float(y0 + r0 + py - 1)]]
    else:
        bbox, point = [0, 0, 0, 0], [[0.0, 0.0]]
    cx0, cy0, cx1, cy1 = crop_box if crop_box is not None else (0, 0, W, H)
    ann = {
        "id": int(ann_id),
        "segmentation": rle,
        "area": int(np.count_nonzero(mask)),
        "bbox": bbox,
        "predicted_iou": predicted_iou,
        "stability_score": stability_score,
    }
    if feature_coherence is not None:
        ann["feature_coherence"] = feature_coherence
    ann["point_coords"] = point
    ann["crop_box"] = [int(cx0), int(cy0), int(cx1 - cx0), int(cy1 - cy0)]
    ann.update(extra)
    return ann


def write_sa1b_json(path, image_info: Dict, annotations: List[Dict]) -> None:
    """Write one SA-1B JSON atomically (see :func:`unsam.utils.files.atomic_write`)."""
    for key in ("image_id", "width", "height", "file_name"):
        if key not in image_info:
            raise SA1BFormatError(f"{path}: image record lacks '{key}'")
    with atomic_write(path) as f:
        json.dump({"image": image_info, "annotations": annotations}, f)


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
    if not isinstance(data["annotations"], list):
        raise SA1BFormatError(f"{path}: 'annotations' is not a list")
    for i, ann in enumerate(data["annotations"]):
        problem = _annotation_problem(ann, height, width)
        if problem:
            raise SA1BFormatError(f"{path}: annotation {i}: {problem}")
    return data


def find_sa1b_files(root) -> List[Path]:
    """All ``*.json`` pseudo-label files under ``root`` (directly or one shard level down),
    sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"SA-1B root '{root}' is not a directory")
    files = sorted(p for p in root.glob("*.json") if not p.name.startswith("."))
    for shard in sorted(p for p in root.iterdir() if p.is_dir()):
        files.extend(sorted(p for p in shard.glob("*.json") if not p.name.startswith(".")))
    return files


def _resolve_image(json_path: Path, file_name: str) -> Optional[Path]:
    """The image of one SA-1B JSON: its ``file_name`` (absolute, or relative to the JSON's
    folder), else a file beside the JSON with the same stem and an image extension; None if
    neither exists."""
    candidates = [Path(file_name)] if os.path.isabs(file_name) else [json_path.parent / file_name]
    candidates += [json_path.with_suffix(ext) for ext in IMAGE_EXTENSIONS]
    for c in candidates:
        if c.is_file():
            return c
    return None
