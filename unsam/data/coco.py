"""Register COCO-format instance sets class-agnostically (every instance is one "object").

Built-in names (registered by :func:`register_builtin_datasets`):

* ``coco_2017_val_agnostic`` – ``$DETECTRON2_DATASETS/coco/val2017`` with
  ``coco/annotations/instances_val2017.json`` (``DETECTRON2_DATASETS`` defaults to ``./datasets``).
* ``coco_tiny_val_agnostic`` / ``coco_tiny_train_agnostic`` – the shared sample subsets in
  ``$UNSAM_SHARED/data``, registered when ``UNSAM_SHARED`` names a folder that holds them (the
  library looks nowhere else; ``make``, the scripts and the tests default it to ``../shared``
  beside the checkout).
* ``sa1b_pseudo_train`` – SA-1B style pseudo labels at ``$DETECTRON2_DATASETS/sa1b_pseudo``.
"""

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

from ..io.sa1b import DatasetError
from .sa1b import register_sa1b

logger = logging.getLogger(__name__)


def load_coco_agnostic(json_file, image_root) -> List[Dict]:
    """COCO instances JSON → detectron2 dicts with every ``category_id`` set to 0.

    Crowd annotations keep ``iscrowd=1`` so that evaluation ignores them and training skips them.
    A missing file, or one without images, raises :class:`~unsam.io.sa1b.DatasetError`.
    """
    json_file, image_root = Path(json_file), Path(image_root)
    if not json_file.is_file():
        raise DatasetError(f"COCO annotation file '{json_file}' not found")
    coco = COCO(str(json_file))
    dicts = []
    for img_id in sorted(coco.getImgIds()):
        img = coco.loadImgs(img_id)[0]
        anns = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            anns.append(
                {
                    "segmentation": ann["segmentation"],
                    "bbox": ann["bbox"],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": 0,
                    "iscrowd": int(ann.get("iscrowd", 0)),
                    "area": ann.get("area", 0),
                    "id": ann["id"],
                }
            )
        dicts.append(
            {
                "file_name": str(image_root / img["file_name"]),
                "image_id": img_id,
                "height": img["height"],
                "width": img["width"],
                "annotations": anns,
            }
        )
    if not dicts:
        raise DatasetError(f"COCO annotation file '{json_file}' lists no image")
    return dicts


def register_coco_agnostic(name: str, json_file, image_root) -> None:
    """Register a COCO-format set as class-agnostic dataset ``name`` (lazy)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    json_file, image_root = str(json_file), str(image_root)
    DatasetCatalog.register(name, lambda: load_coco_agnostic(json_file, image_root))
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        thing_classes=["object"],
        evaluator_type="coco_agnostic",
    )


def shared_data_dir(shared=None) -> Optional[Path]:
    """The shared sample data folder ``<shared>/data``; ``shared`` defaults to ``$UNSAM_SHARED``.

    None when neither is given or the folder does not exist: the library never guesses a path
    outside the package (scripts and tests pass ``../shared`` beside the checkout themselves).
    """
    if shared is None:
        shared = os.environ.get("UNSAM_SHARED") or None
    if shared is None:
        return None
    folder = Path(shared) / "data"
    return folder if folder.is_dir() else None


def register_builtin_datasets() -> None:
    """Register the built-in names listed in the module docstring (idempotent)."""
    root = Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    register_coco_agnostic(
        "coco_2017_val_agnostic",
        root / "coco" / "annotations" / "instances_val2017.json",
        root / "coco" / "val2017",
    )
    register_sa1b("sa1b_pseudo_train", root / "sa1b_pseudo")
    shared = shared_data_dir()
    if shared is not None:
        for split in ("val", "train"):
            folder = shared / f"coco_tiny_{split}2017"
            register_coco_agnostic(
                f"coco_tiny_{split}_agnostic", folder / "instances.json", folder / "images"
            )
