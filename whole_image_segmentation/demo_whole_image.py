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

import numpy as np
from PIL import Image
from tqdm import tqdm

import unsam  # noqa: F401
from unsam.checkpoint import WeightsNotFoundError
from unsam.data.sa1b import mask_to_rle
from unsam.demo_io import DemoInputError, demo_parser, expand_inputs, output_path, read_rgb
from unsam.predictor import WholeImagePredictor
from unsam.utils.arguments import ConfigError, load_config
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
    images = {p: read_rgb(p) for p in paths[:1]}  # fail on a bad first image before loading the model
    predictor = WholeImagePredictor(cfg)
    for path in tqdm(paths, desc="segment", unit="img"):
        image = images.pop(path, None)
        if image is None:
            image = read_rgb(path)
        start = time.perf_counter()
        instances = predictor(image)
        keep = instances.scores >= args.confidence_threshold
        instances = instances[keep]
        masks = instances.pred_masks.numpy()
        Image.fromarray(draw_masks(image, masks)).save(output_path(args.output, path, len(paths), ".png"))
        if args.save_json:
            record = {
                "image": {"file_name": path.name, "height": image.shape[0], "width": image.shape[1]},
                "annotations": [
                    {"segmentation": mask_to_rle(m), "score": float(s), "bbox": [float(v) for v in b],
                     "area": int(m.sum())}
                    for m, s, b in zip(masks, instances.scores.tolist(), instances.pred_boxes.tensor.tolist())
                ],
            }
            with open(output_path(args.output, path, len(paths), ".json"), "w") as f:
                json.dump(record, f)
        logger.info("%s: %d masks in %.2fs", path, len(instances), time.perf_counter() - start)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    try:
        run(args)
    except (ConfigError, WeightsNotFoundError, DemoInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
