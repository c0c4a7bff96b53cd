"""UnSAM: Segment Anything without supervision."""

from . import compat  # noqa: F401  (must run before detectron2 is imported anywhere)

__version__ = "0.1.0"
