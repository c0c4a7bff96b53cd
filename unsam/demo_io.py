"""Input/output helpers shared by the demos: expand inputs, read images, name and check outputs."""
import argparse
import itertools
import glob
import logging
import os
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np

from .utils.files import OutputError, ensure_writable_dir
from .utils.images import UnsupportedImageError
from .utils.images import read_rgb as _read_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DemoInputError(ValueError):
    """Bad demo input (missing/unreadable file, bad prompt); the message is one line."""


def expand_inputs(inputs: List[str]) -> List[Path]:
    """Files, globs and directories → sorted, de-duplicated list of image paths."""
    paths: List[Path] = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(p for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif any(ch in item for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(item)))
            if not matched:
                raise DemoInputError(f"no file matches '{item}'")
            paths += matched
        elif os.path.isfile(item):
            paths.append(Path(item))
        else:
            raise DemoInputError(f"input '{item}' not found")
    if not paths:
        raise DemoInputError("no input image found")
    return list(dict.fromkeys(paths))


def read_rgb(path: Path) -> np.ndarray:
    """H×W×3 uint8 RGB, EXIF orientation applied, 16-bit scaled (:mod:`unsam.utils.images`)."""
    try:
        return _read_rgb(path)
    except (OSError, UnsupportedImageError) as e:
        raise DemoInputError(f"cannot read image '{path}': {e}") from None


def iter_images(paths: List[Path], skipped: List[str]) -> Iterator[Tuple[Path, np.ndarray]]:
    """(path, RGB image) for every readable input; an unreadable one is logged, appended to
    ``skipped`` and passed over, so one bad file in a folder does not stop the demo."""
    for path in paths:
        try:
            yield path, read_rgb(path)
        except DemoInputError as e:
            skipped.append(str(path))
            logger.warning("skipping %s (%d of %d inputs skipped so far)", e, len(skipped), len(paths))


def readable_images(paths: List[Path], skipped: List[str]
                    ) -> Tuple[Tuple[Path, np.ndarray], Iterator[Tuple[Path, np.ndarray]]]:
    """The first readable input, read now (checked before a slow model load), and an iterator
    over every readable input, that one included (:func:`iter_images`). No readable input at all
    is a :class:`DemoInputError`."""
    images = iter_images(paths, skipped)
    first = next(images, None)
    if first is None:
        raise DemoInputError(f"no readable image among the inputs (skipped: {', '.join(skipped[:3])}"
                             f"{' ...' if len(skipped) > 3 else ''})")
    return first, itertools.chain([first], images)


def output_path(output: str, image_path: Path, n_inputs: int, suffix: str = ".png") -> Path:
    """``output`` is a directory (or ends with '/') or, for one input, a file name.

    The folder is created and checked writable (:class:`DemoInputError` if not), so callers can
    check it before loading a model.
    """
    out = Path(output)
    try:
        if n_inputs == 1 and out.suffix and not output.endswith(os.sep):
            ensure_writable_dir(out.parent)
            return out.with_suffix(suffix) if suffix != out.suffix else out
        return ensure_writable_dir(out) / (image_path.stem + suffix)
    except OutputError as e:
        raise DemoInputError(str(e)) from None


def demo_parser(description: str, add_options) -> argparse.ArgumentParser:
    """The demos' shared command line: ``--config-file --input --output [own options] --opts``.

    ``add_options(parser)`` adds the demo's own options; ``--opts`` stays last because it takes
    everything after it (KEY VALUE config overrides, as in the upstream demos).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config (YAML)")
    parser.add_argument("--input", nargs="+", required=True, help="image files, globs or directories")
    parser.add_argument("--output", required=True, help="output directory, or a file name when there is one input")
    add_options(parser)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS x.pth MODEL.DEVICE cpu")
    return parser
