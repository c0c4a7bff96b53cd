"""Input/output helpers shared by the demos: expand inputs, read images, name and check outputs.

Everything a demo will write is decided by :func:`plan_outputs` before the model loads, so a
run that would overwrite an input or write two results to one file stops at once, not midway.
"""

import argparse
import glob
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image

from .utils.files import OutputError, atomic_write, ensure_writable_dir
from .utils.images import IMAGE_EXTENSIONS, UnsupportedImageError
from .utils.images import read_rgb as _read_rgb

logger = logging.getLogger(__name__)


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
            logger.warning(
                "skipping %s (%d of %d inputs skipped so far)", e, len(skipped), len(paths)
            )


def readable_images(
    paths: List[Path], skipped: List[str]
) -> Tuple[Tuple[Path, np.ndarray], Iterator[Tuple[Path, np.ndarray]]]:
    """The first readable input, read now (checked before a slow model load), and an iterator
    over every readable input, that one included (:func:`iter_images`). No readable input at all
    is a :class:`DemoInputError`."""
    images = iter_images(paths, skipped)
    first = next(images, None)
    if first is None:
        raise DemoInputError(
            f"no readable image among the inputs (skipped: {', '.join(skipped[:3])}"
            f"{' ...' if len(skipped) > 3 else ''})"
        )
    return first, itertools.chain([first], images)


def is_image_file_name(output: str) -> bool:
    """Whether ``--output`` names one image file (``out.jpg``) rather than a folder.

    An image extension decides, as a user expects from ``--output image_out.jpg``; a trailing
    separator or an existing folder keeps it a folder (``results.png/`` is a folder name too).
    """
    return (
        Path(output).suffix.lower() in IMAGE_EXTENSIONS
        and not output.endswith(("/", os.sep))
        and not os.path.isdir(output)
    )


@dataclass(frozen=True)
class DemoOutputs:
    """Where a demo writes each input's results, decided and checked before any model loads.

    One output file (``file``, the image written in the format its extension names, a JSON
    beside it with the same stem) or a folder (``folder/<input stem>.png`` and ``.json``).
    """

    file: Optional[Path] = None
    folder: Optional[Path] = None

    def image(self, input_path: Path) -> Path:
        return self.file if self.file is not None else self.folder / (input_path.stem + ".png")

    def json(self, input_path: Path) -> Path:
        return self.image(input_path).with_suffix(".json")


def _check_no_input_overwritten(outputs: DemoOutputs, paths: List[Path]) -> None:
    """An input is the user's: a result may never be written over one
    (``--input x.png --output x.png``, or a folder given as both input and output)."""
    inputs = {p.resolve(): p for p in paths}
    for path in paths:
        for target in (outputs.image(path), outputs.json(path)):
            victim = inputs.get(target.resolve())
            if victim is not None:
                raise DemoInputError(
                    f"output '{target}' would overwrite input '{victim}'; choose another --output"
                )


def _check_distinct_stems(paths: List[Path], folder: Path) -> None:
    """Two inputs of one name (``a/x.jpg``, ``b/x.png``) would both write ``folder/x.png``:
    the second would silently replace the first, so the run is refused (as the pseudo engine
    does)."""
    seen = {}
    for path in paths:
        if path.stem in seen:
            raise DemoInputError(
                f"inputs '{seen[path.stem]}' and '{path}' would both write "
                f"'{folder / (path.stem + '.png')}'; rename one or run them separately"
            )
        seen[path.stem] = path


def plan_outputs(output: str, paths: List[Path]) -> DemoOutputs:
    """``--output`` and the expanded inputs → :class:`DemoOutputs`, or :class:`DemoInputError`.

    An image file name takes exactly one input; a folder is created and proved writable. Two
    inputs that would write the same file, or a result that would replace an input, are refused.
    """
    try:
        if is_image_file_name(output):
            if len(paths) != 1:
                raise DemoInputError(
                    f"--output '{output}' is one image file but there are {len(paths)} inputs; "
                    "give a folder"
                )
            ensure_writable_dir(Path(output).parent)
            outputs = DemoOutputs(file=Path(output))
        else:
            outputs = DemoOutputs(folder=ensure_writable_dir(output))
            _check_distinct_stems(paths, outputs.folder)
    except OutputError as e:
        raise DemoInputError(str(e)) from None
    _check_no_input_overwritten(outputs, paths)
    return outputs


def write_image(path: Path, image: np.ndarray) -> None:
    """Write H×W×3 uint8 RGB ``image`` atomically, in the format ``path``'s extension names.

    An encoder's refusal (e.g. a JPEG side over 65535 px) is a :class:`DemoInputError` naming
    the file, and leaves no partial file behind.
    """
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    try:
        with atomic_write(path, "wb") as f:
            Image.fromarray(image).save(f, format=fmt)
    except (OSError, ValueError) as e:
        raise DemoInputError(f"cannot write '{path}' as {fmt}: {e}") from None


def check_unit_interval(value: float, option: str) -> float:
    """``value`` if it lies in [0, 1], else :class:`DemoInputError` naming ``option``."""
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise DemoInputError(f"{option} {value:g} must be between 0 and 1")
    return value


def demo_parser(description: str, add_options) -> argparse.ArgumentParser:
    """The demos' shared command line: ``--config-file --input --output [own options] --opts``.

    ``add_options(parser)`` adds the demo's own options; ``--opts`` stays last because it takes
    everything after it (KEY VALUE config overrides, as in the upstream demos).
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config (YAML)")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, globs or directories"
    )
    parser.add_argument(
        "--output",
        required=True,
        help="output folder, or for one input an image file name (out.jpg: written there, as JPEG)",
    )
    add_options(parser)
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS x.pth MODEL.DEVICE cpu",
    )
    return parser
