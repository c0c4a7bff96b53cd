#!/usr/bin/env python
"""Promptable segmentation with an UnSAM checkpoint: point / box / mask prompts → overlay image.

  python demo_point_image.py --config-file configs/maskformer2_R50_bs16_50ep.yaml \
      --input img.jpg --output out/ --points "320,240;100,80" --labels 1,0 [--box x0,y0,x1,y1] \
      [--mask-input prev_mask.png] [--multimask] --opts MODEL.WEIGHTS unsam_r50.pth MODEL.DEVICE cpu

Writes ``<name>.png``: the input with the prompts drawn and the best mask, then one panel per
granularity (``--multimask``: all K outputs, left to right in output order, each titled with its
predicted IoU). Without prompts the image centre is clicked. A prompt outside an image, points
and labels of different lengths or a malformed box print one line on stderr and exit 2.
"""
import argparse
import logging
import sys
import time

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

import unsam  # noqa: F401
from unsam.checkpoint import WeightsError
from unsam.data.prompts import PromptError, mask_to_mask_input, parse_box, parse_labels, parse_points, validate_prompts
from unsam.demo_io import DemoInputError, demo_parser, expand_inputs, output_path, read_rgb
from unsam.predictor import PromptPredictor
from unsam.utils.arguments import ConfigError, load_config
from unsam.visualize import draw_masks, draw_prompts

logger = logging.getLogger("unsam.demo")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", help='point prompts "x,y;x,y" in image pixels')
    parser.add_argument("--labels", help="labels of --points, e.g. 1,0 (1 positive, 0 negative; default all 1)")
    parser.add_argument("--box", help="box prompt x0,y0,x1,y1 in image pixels")
    parser.add_argument("--mask-input", metavar="PNG", help="mask prompt: a binary mask image of the input's size")
    parser.add_argument("--multimask", action="store_true", help="show every granularity, not only the best")


def get_parser() -> argparse.ArgumentParser:
    return demo_parser(__doc__, _add_options)


def _read_mask(path: str, hw) -> np.ndarray:
    try:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) > 127
    except (OSError, ValueError) as e:
        raise DemoInputError(f"cannot read mask input '{path}': {e}") from None
    if mask.shape != tuple(hw):
        raise DemoInputError(f"mask input '{path}' is {mask.shape[1]}x{mask.shape[0]}, "
                             f"the image is {hw[1]}x{hw[0]}")
    if not mask.any():
        raise DemoInputError(f"mask input '{path}' is empty")
    return mask


def _panel(image: np.ndarray, mask: np.ndarray, title: str) -> np.ndarray:
    out = draw_masks(image, mask[None])
    scale = max(0.4, min(image.shape[:2]) / 500)
    cv2.putText(out, title, (5, int(20 * scale) + 5), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.6, (255, 255, 255), 2)
    cv2.putText(out, title, (5, int(20 * scale) + 5), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.6, (0, 0, 0), 1)
    return out


def parse_prompt_args(args):
    """Command-line prompt strings → (points, labels, box); raises PromptError."""
    points = parse_points(args.points) if args.points else None
    labels = parse_labels(args.labels) if args.labels else None
    box = parse_box(args.box) if args.box else None
    if labels is not None and points is None:
        raise PromptError("--labels given without --points")
    return points, labels, box


def run(args) -> None:
    points, labels, box = parse_prompt_args(args)  # malformed prompts fail before anything loads
    cfg = load_config(args.config_file, args.opts)
    paths = expand_inputs(args.input)
    images = {p: read_rgb(p) for p in paths[:1]}
    for p, img in images.items():  # bad prompts fail before loading the model
        validate_prompts(points, labels, box, img.shape[:2])
        if args.mask_input:
            _read_mask(args.mask_input, img.shape[:2])
    predictor = PromptPredictor(cfg)
    for path in tqdm(paths, desc="segment", unit="img"):
        image = images.pop(path, None)
        if image is None:
            image = read_rgb(path)
        pts, lbl, bx = validate_prompts(points, labels, box, image.shape[:2])
        mask_input = mask_to_mask_input(_read_mask(args.mask_input, image.shape[:2])) if args.mask_input else None
        if pts is None and bx is None and mask_input is None:
            h, w = image.shape[:2]
            pts, lbl = np.array([[w // 2, h // 2]], np.float32), np.ones(1, np.int64)
        start = time.perf_counter()
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(point_coords=pts, point_labels=lbl, box=bx, mask_input=mask_input,
                                             multimask_output=True)
        best = int(np.argmax(scores))
        order = list(range(len(masks))) if args.multimask else [best]
        panels = [draw_prompts(draw_masks(image, masks[best][None]), pts, lbl, bx)]
        panels += [draw_prompts(_panel(image, masks[i], f"g{i} IoU {scores[i]:.2f}"), pts, lbl, bx) for i in order]
        Image.fromarray(np.concatenate(panels, axis=1)).save(output_path(args.output, path, len(paths), ".png"))
        logger.info("%s: %d mask(s), best IoU %.2f, %.2fs", path, len(order), scores[best],
                    time.perf_counter() - start)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    try:
        run(args)
    except (ConfigError, WeightsError, DemoInputError, PromptError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
