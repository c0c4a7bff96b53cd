#!/usr/bin/env python
"""Segment everything in images with an UnSAM checkpoint and save overlays (and masks).

  python demo_whole_image.py --config-file configs/maskformer2_R50_bs16_50ep.yaml \
      --input img.jpg [more.jpg 'dir/*.jpg' folder/] --output out/ \
      [--save-json] [--confidence-threshold 0.5] --opts MODEL.WEIGHTS unsam_r50.pth MODEL.DEVICE cpu

``--output`` is a folder (``<folder>/<input name>.png`` and ``.json``) or, for one input, an image
file name written exactly there in the format its extension names (``out.jpg``: JPEG; the JSON
goes beside it as ``out.json``). Inputs that would write the same output file, a result that
would replace an input, a threshold outside [0, 1] or a device this machine lacks print one
line on stderr and exit 2 before the model loads.
"""

import argparse
import json
import logging
import sys
import time
from typing import List

import unsam.compat  # noqa: F401

from tqdm import tqdm

from unsam.checkpoint import WeightsError
from unsam.config.loading import ConfigError, load_config
from unsam.demo_io import (
    DemoInputError,
    check_unit_interval,
    demo_parser,
    expand_inputs,
    plan_outputs,
    readable_images,
    write_image,
)
from unsam.io.sa1b import mask_to_rle
from unsam.predictor import WholeImagePredictor
from unsam.utils.device import DeviceError, check_device
from unsam.utils.files import atomic_write
from unsam.visualize import draw_masks

logger = logging.getLogger("unsam.demo")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="keep masks scoring at least this (default 0.5, as upstream)",
    )
    parser.add_argument(
        "--save-json",
        action="store_true",
        help="also write <name>.json with COCO-RLE masks, scores and boxes",
    )


def get_parser() -> argparse.ArgumentParser:
    return demo_parser(__doc__, _add_options)


def run(args) -> None:
    check_unit_interval(args.confidence_threshold, "--confidence-threshold")
    cfg = load_config(args.config_file, args.opts)
    check_device(cfg.MODEL.DEVICE)
    paths = expand_inputs(args.input)
    # the outputs and a first readable image are checked before the slow model load
    outputs = plan_outputs(args.output, paths)
    skipped: List[str] = []
    _, images = readable_images(paths, skipped)
    predictor = WholeImagePredictor.from_config(cfg)
    for path, image in tqdm(images, total=len(paths), desc="segment", unit="img"):
        start = time.perf_counter()
        instances = predictor(image)
        keep = instances.scores >= args.confidence_threshold
        instances = instances[keep]
        masks = instances.pred_masks.numpy()
        write_image(outputs.image(path), draw_masks(image, masks))
        if args.save_json:
            record = {
                "image": {
                    "file_name": path.name,
                    "height": image.shape[0],
                    "width": image.shape[1],
                },
                "annotations": [
                    {
                        "segmentation": mask_to_rle(m),
                        "score": float(s),
                        "bbox": [float(v) for v in b],
                        "area": int(m.sum()),
                    }
                    for m, s, b in zip(
                        masks, instances.scores.tolist(), instances.pred_boxes.tensor.tolist()
                    )
                ],
            }
            with atomic_write(outputs.json(path)) as f:
                json.dump(record, f)
        logger.info("%s: %d masks in %.2fs", path, len(instances), time.perf_counter() - start)
    if skipped:
        logger.warning(
            "%d of %d inputs skipped as unreadable: %s",
            len(skipped),
            len(paths),
            ", ".join(skipped),
        )


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    try:
        run(args)
    except (ConfigError, WeightsError, DemoInputError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
