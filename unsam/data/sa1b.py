"""Register SA-1B style folders as detectron2 datasets (class-agnostic: one category, id 0).

The file format itself (RLE helpers, reading / writing / validating the per-image JSON, finding
the files and the image beside each) is :mod:`unsam.io.sa1b`, which does not import detectron2.
"""

import logging
from typing import Dict, Iterable, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..io.sa1b import (
    DatasetError,
    SA1BFormatError,
    _resolve_image,
    find_sa1b_files,
    read_sa1b_json,
    rle_area,
)

__all__ = ["load_sa1b_dicts", "register_sa1b", "iter_roots_from_config"]

logger = logging.getLogger(__name__)


def _record_annotations(
    annotations: List[Dict], positions: Optional[Iterable[int]] = None
) -> Tuple[List[Dict], int]:
    """A file's (validated) annotations as detectron2 annotation dicts, and how many were dropped
    for an empty mask. ``positions``: only these annotations (indices into ``annotations``, which
    are also the ids of annotations without one); all when None.

    An empty mask trains nothing (the mapper drops it after augmentation anyway) but made an
    image look labelled: a root of empty masks trained to the end with ``loss_mask`` 0. ``area``
    is the mask's pixel count from its RLE (cheap: no decoding), whatever the file says.
    The dataset index's reader (:meth:`unsam.data.index.IndexedDataset.record`) calls this too, so
    both training paths hand the mapper the same dicts.
    """
    out, empty = [], 0
    for i in range(len(annotations)) if positions is None else positions:
        ann = annotations[i]
        area = rle_area(ann["segmentation"])
        if area == 0:
            empty += 1
            continue
        out.append(
            {
                "segmentation": ann["segmentation"],
                "bbox": ann.get("bbox", [0, 0, 0, 0]),
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 0,
                "iscrowd": 0,
                "area": area,
                "id": ann.get("id", i),
                "level": int(ann.get("level", 0)),
                "parent_id": int(ann.get("parent_id", -1)),
                "predicted_iou": float(ann.get("predicted_iou", 1.0)),
            }
        )
    return out, empty


def load_sa1b_dicts(root, skip_empty: bool = False) -> List[Dict]:
    """Load every image of an SA-1B root as detectron2 dataset dicts (class-agnostic).

    Files that are corrupt, whose RLE size disagrees with the image, or whose image is missing
    are logged by name, counted and skipped: a bad file never kills a run silently. Empty masks
    are dropped and counted; an image left without a mask is left out (``skip_empty``) or kept,
    and the log says which, with the count. A root with no usable image raises
    :class:`DatasetError`; whether a *training* set has any mask at all is the trainer's check
    (:func:`unsam.engine.trainer.load_train_dicts`), across all its roots.
    """
    dicts, skipped, unmasked, empty_masks = [], [], 0, 0
    files = find_sa1b_files(root)
    for json_path in files:
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
        annotations, empty = _record_annotations(data["annotations"])
        empty_masks += empty
        if not annotations:
            unmasked += 1
            if skip_empty:
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
    # a warning when files were skipped, so the count is seen next to the names above
    logger.log(
        logging.WARNING if skipped else logging.INFO,
        "SA-1B root %s: %d images loaded, %d files skipped, %d empty masks dropped, "
        "%d images without a mask %s",
        root,
        len(dicts),
        len(skipped),
        empty_masks,
        unmasked,
        "left out (UNSAM.DATA.SKIP_EMPTY)" if skip_empty else "kept",
    )
    if not dicts:
        reason = f"; first skipped: {skipped[0]}" if skipped else ""
        raise DatasetError(
            f"SA-1B root '{root}' has no usable image ({len(files)} JSON files, "
            f"{len(skipped)} skipped, {unmasked} without a non-empty mask{reason})"
        )
    return dicts


def register_sa1b(name: str, root, skip_empty: bool = False, indexed: bool = True) -> None:
    """Register an SA-1B style folder as detectron2 dataset ``name`` (lazy: read on first use).

    ``DatasetCatalog.get(name)`` loads every record (:func:`load_sa1b_dicts`: evaluation, tools).
    ``indexed``: the metadata also names the folder as ``index_root`` (with ``skip_empty``), so
    training reads it through the lazy dataset index instead (:mod:`unsam.data.training`): one
    record per sample, any of the index's formats (JSON folders, SA-1B tars, TSV shards).
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    root = str(root)
    DatasetCatalog.register(name, lambda: load_sa1b_dicts(root, skip_empty=skip_empty))
    extra = {"index_root": root, "skip_empty": bool(skip_empty)} if indexed else {}
    MetadataCatalog.get(name).set(
        thing_classes=["object"], evaluator_type="sa1b", root=root, ignore_label=255, **extra
    )


def iter_roots_from_config(entries: Iterable[str]):
    """Parse ``UNSAM.DATA.SA1B_ROOTS`` entries of the form ``name:path`` (path may hold ':')."""
    for entry in entries:
        name, sep, path = str(entry).partition(":")
        if not sep or not name.strip() or not path.strip():
            # a DatasetError: train_net.py reports it as one "error:" line (a ValueError subclass)
            raise DatasetError(
                f"UNSAM.DATA.SA1B_ROOTS entry '{entry}' must be 'name:path', "
                "e.g. \"('my_pseudo:/data/pseudo_labels',)\""
            )
        yield name, path
