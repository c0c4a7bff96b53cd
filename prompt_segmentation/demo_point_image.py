#!/usr/bin/env python
"""Promptable segmentation with an UnSAM checkpoint: point / box / mask prompts → overlay image.

  python demo_point_image.py --config-file configs/maskformer2_R50_bs16_50ep.yaml \
      --input img.jpg --output out/ --points "320,240;100,80" --labels 1,0 [--box x0,y0,x1,y1] \
      [--mask-input prev_mask.png] [--multimask] --opts MODEL.WEIGHTS unsam_r50.pth MODEL.DEVICE cpu

Writes ``<name>.png``: the input with the prompts drawn and the best mask, then one panel per
granularity (``--multimask``: every output, left to right in output order, each titled with its
score). Without prompts the image centre is clicked. A whole-image checkpoint (such as the public
UnSAM ones) is prompted by selection among its queries (``UNSAM.PROMPT.MODE auto``, logged).
A prompt outside the (first) image, points and labels of different lengths, a malformed box, an
empty mask, a device this machine lacks or weights of another model print one line on stderr and
exit 2; a box reaching past the border is clipped to the image (as SAM does; logged). In a folder,
later images that are unreadable or that a prompt misses are skipped with a warning. ``--output``
is a folder or, for one input, an image file name written exactly there in its extension's format.
"""

import argparse
import logging
import sys
import time
from typing import List

import unsam.compat  # noqa: F401

import numpy as np
from PIL import Image
from tqdm import tqdm

from unsam.checkpoint import WeightsError
from unsam.config.loading import ConfigError, load_config
from unsam.data.prompts import (
    PromptError,
    mask_from_values,
    mask_to_mask_input,
    parse_box,
    parse_labels,
    parse_points,
    validate_prompts,
)
from unsam.demo_io import (
    DemoInputError,
    demo_parser,
    expand_inputs,
    plan_outputs,
    readable_images,
    write_image,
)
from unsam.predictor import PromptPredictor
from unsam.utils.device import DeviceError, check_device
from unsam.visualize import draw_masks, draw_prompts, draw_title

logger = logging.getLogger("unsam.demo")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", help='point prompts "x,y;x,y" in image pixels')
    parser.add_argument(
        "--labels", help="labels of --points, e.g. 1,0 (1 positive, 0 negative; default all 1)"
    )
    parser.add_argument("--box", help="box prompt x0,y0,x1,y1 in image pixels")
    parser.add_argument(
        "--mask-input", metavar="PNG", help="mask prompt: a binary mask image of the input's size"
    )
    parser.add_argument(
        "--multimask", action="store_true", help="show every granularity, not only the best"
    )


def get_parser() -> argparse.ArgumentParser:
    return demo_parser(__doc__, _add_options)


# Pillow modes read as they are (values of any range); others (RGB, palette) go through greyscale
_ONE_CHANNEL_MODES = ("1", "L", "I", "F", "I;16", "I;16L", "I;16B")


def _read_mask(path: str, hw) -> np.ndarray:
    """``--mask-input`` file → H×W bool (:func:`unsam.data.prompts.mask_from_values`: a 0/1 label
    map, a 0/255 or a 16-bit mask all work); one :class:`DemoInputError` line naming the file."""
    try:
        with Image.open(path) as img:
            values = np.asarray(img if img.mode in _ONE_CHANNEL_MODES else img.convert("L"))
        mask = mask_from_values(values)
    except (OSError, ValueError) as e:  # PromptError is a ValueError
        raise DemoInputError(f"mask input '{path}': {e}") from None
    if mask.shape != tuple(hw):
        raise DemoInputError(
            f"mask input '{path}' is {mask.shape[1]}x{mask.shape[0]}, the image is {hw[1]}x{hw[0]}"
        )
    return mask


def _panel(image: np.ndarray, mask: np.ndarray, title: str) -> np.ndarray:
    return draw_title(draw_masks(image, mask[None]), title)


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
    check_device(cfg.MODEL.DEVICE)
    paths = expand_inputs(args.input)
    outputs = plan_outputs(args.output, paths)  # an unwritable output fails before the model loads
    skipped: List[str] = []
    (_, first), images = readable_images(paths, skipped)
    validate_prompts(
        points, labels, box, first.shape[:2]
    )  # so do prompts that miss the first image
    if args.mask_input:
        _read_mask(args.mask_input, first.shape[:2])
    predictor = PromptPredictor.from_config(cfg)
    for path, image in tqdm(images, total=len(paths), desc="segment", unit="img"):
        try:
            pts, lbl, bx = validate_prompts(points, labels, box, image.shape[:2])
            mask_input = (
                mask_to_mask_input(_read_mask(args.mask_input, image.shape[:2]))
                if args.mask_input
                else None
            )
        except (PromptError, DemoInputError) as e:  # another image of a folder, of another size
            skipped.append(str(path))
            logger.warning("skipping %s: %s", path, e)
            continue
        if pts is None and bx is None and mask_input is None:
            h, w = image.shape[:2]
            pts, lbl = np.array([[w // 2, h // 2]], np.float32), np.ones(1, np.int64)
        start = time.perf_counter()
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(
            point_coords=pts, point_labels=lbl, box=bx, mask_input=mask_input, multimask_output=True
        )
        best = int(np.argmax(scores))
        order = list(range(len(masks))) if args.multimask else [best]
        panels = [draw_prompts(draw_masks(image, masks[best][None]), pts, lbl, bx)]
        panels += [
            draw_prompts(_panel(image, masks[i], f"g{i} IoU {scores[i]:.2f}"), pts, lbl, bx)
            for i in order
        ]
        write_image(outputs.image(path), np.concatenate(panels, axis=1))
        logger.info(
            "%s: %d mask(s), best score %.2f (%s mode), %.2fs",
            path,
            len(order),
            scores[best],
            predictor.mode,
            time.perf_counter() - start,
        )
    if skipped:
        logger.warning("%d of %d inputs skipped: %s", len(skipped), len(paths), ", ".join(skipped))


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    try:
        run(args)
    except (ConfigError, WeightsError, DemoInputError, PromptError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
