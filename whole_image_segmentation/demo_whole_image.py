#!/usr/bin/env python
"""Segment everything in images with an UnSAM checkpoint and save overlays (and masks).

  python demo_whole_image.py --config-file configs/maskformer2_R50_bs16_50ep.yaml \
      --input img.jpg [more.jpg 'dir/*.jpg' folder/] --output out/ \
      [--save-json] [--confidence-threshold 0.5] --opts MODEL.WEIGHTS unsam_r50.pth MODEL.DEVICE cpu
"""
import argparse
import json
import logging
import sys
import time
from typing import List

from PIL import Image
from tqdm import tqdm

import unsam  # noqa: F401
from unsam.checkpoint import WeightsError
from unsam.data.sa1b import mask_to_rle
from unsam.demo_io import DemoInputError, demo_parser, expand_inputs, output_path, readable_images
from unsam.predictor import WholeImagePredictor
from unsam.utils.arguments import ConfigError, load_config
from unsam.utils.files import atomic_write
from unsam.visualize import draw_masks

logger = logging.getLogger("unsam.demo")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="keep masks scoring at least this (default 0.5, as upstream)")
    parser.add_argument("--save-json", action="store_true",
                        help="also write <name>.json with COCO-RLE masks, scores and boxes")


def get_parser() -> argparse.ArgumentParser:
    return demo_parser(__doc__, _add_options)


def run(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    paths = expand_inputs(args.input)
    # the output folder and a first readable image are checked before the slow model load
    output_path(args.output, paths[0], len(paths))
    skipped: List[str] = []
    _, images = readable_images(paths, skipped)
    predictor = WholeImagePredictor(cfg)
    for path, image in tqdm(images, total=len(paths), desc="segment", unit="img"):
        start = time.perf_counter()
        instances = predictor(image)
        keep = instances.scores >= args.confidence_threshold
        instances = instances[keep]
        masks = instances.pred_masks.numpy()
        with atomic_write(output_path(args.output, path, len(paths), ".png"), "wb") as f:
            Image.fromarray(draw_masks(image, masks)).save(f, format="PNG")
        if args.save_json:
            record = {
                "image": {"file_name": path.name, "height": image.shape[0], "width": image.shape[1]},
                "annotations": [
                    {"segmentation": mask_to_rle(m), "score": float(s), "bbox": [float(v) for v in b],
                     "area": int(m.sum())}
                    for m, s, b in zip(masks, instances.scores.tolist(), instances.pred_boxes.tensor.tolist())
                ],
            }
            with atomic_write(output_path(args.output, path, len(paths), ".json")) as f:
                json.dump(record, f)
        logger.info("%s: %d masks in %.2fs", path, len(instances), time.perf_counter() - start)
    if skipped:
        logger.warning("%d of %d inputs skipped as unreadable: %s", len(skipped), len(paths), ", ".join(skipped))


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    try:
        run(args)
    except (ConfigError, WeightsError, DemoInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
