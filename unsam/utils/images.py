"""The one image reader of the pseudo-label engine, the training mapper and the demos.

Images are 8 bits per channel everywhere in UnSAM, with EXIF orientation applied (as detectron2
reads them). 16-bit images are scaled, not clipped: Pillow already keeps the high byte of 16-bit
RGB(A) PNGs, but converts 16-bit greyscale (mode ``I;16``) to RGB by clipping at 255, which
turns most of a typical 16-bit image white. Here 16-bit greyscale keeps its high byte too
(0..65535 → 0..255), so a 16-bit file gives the same picture as its 8-bit export. 32-bit integer
and floating-point images (mode ``I`` / ``F``, e.g. some TIFFs) have no agreed range and are
refused with :class:`UnsupportedImageError`.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# The image files every UnSAM path reads (engine input, SA-1B image beside its JSON, SA-1B tars,
# demos, the app): one list, so a file the engine labels is one the loader can find.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# shift from 16 to 8 bits: keep the high byte, as Pillow does for 16-bit RGB
_SHIFT_16_TO_8 = 8


class UnsupportedImageError(ValueError):
    """An image file that opens but cannot be turned into 8 bits per channel faithfully."""


def open_image(path) -> Image.Image:
    """Open ``path`` as a Pillow image with 8 bits per channel, EXIF orientation applied.

    Raises ``OSError`` (missing, truncated, not an image) or :class:`UnsupportedImageError`.
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # a loaded copy, valid after the file is closed
    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im) >> _SHIFT_16_TO_8).astype(np.uint8))
    if im.mode in ("I", "F"):
        kind = "integer" if im.mode == "I" else "floating-point"
        raise UnsupportedImageError(
            f"{Path(path)}: 32-bit {kind} images are not supported "
            "(save it with 8 or 16 bits per channel)"
        )
    return im


def read_rgb(path) -> np.ndarray:
    """``path`` → H×W×3 uint8 RGB (see :func:`open_image`)."""
    return np.asarray(open_image(path).convert("RGB"))
