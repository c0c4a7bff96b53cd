"""File formats UnSAM reads and writes, without detectron2 (safe to import in worker processes).

* :mod:`.sa1b` — SA-1B style per-image JSON with COCO RLE masks: encode / decode / validate
  RLEs, read / write the JSON, build an annotation from a mask, find files and their images.
"""

from .sa1b import (  # noqa: F401
    DatasetError,
    SA1BFormatError,
    annotation_from_mask,
    annotation_shape_problem,
    find_sa1b_files,
    mask_to_rle,
    read_sa1b_json,
    rle_area,
    rle_box,
    rle_runs,
    rle_to_mask,
    validate_rle,
    write_sa1b_json,
)
