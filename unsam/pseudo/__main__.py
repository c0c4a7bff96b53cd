"""``python -m unsam.pseudo --input DIR|GLOB --output DIR [options]`` — see :mod:`unsam.pseudo.engine`.

Bad input is refused with one line ``error: <what, naming the option / file>`` on stderr and exit
status 2 (argparse's own errors included); SIGTERM / SIGINT stop the run with one ``stopped``
line and status 128 + the signal number.
"""
import argparse
import logging
import sys
from typing import Optional

import unsam  # noqa: F401  (compat before detectron2)

from ..utils.cli import OneLineArgumentParser
from ..features import FeatureError, build_features
from .config import EngineConfig, SettingError, add_config_arguments, given_settings
from .detector import DivideError
from .engine import OutputWriteError, Stopped, build_labeler, check_run_options, run

logger = logging.getLogger("unsam.pseudo")


def _error(message) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _shard(text: str):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/n (e.g. 0/4), got '{text}'")
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    """The run options (input, output, sharding, workers) plus one option per
    :class:`EngineConfig` field (:func:`add_config_arguments`)."""
    ap = OneLineArgumentParser(prog="python -m unsam.pseudo",
                                 description="Unsupervised divide-and-conquer pseudo labels (SA-1B JSON per image).")
    ap.add_argument("--input", required=True, help="image folder or glob pattern")
    ap.add_argument("--output", required=True, help="output folder (<stem>.json per image)")
    ap.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/n")
    ap.add_argument("--start-id", type=int, default=0, help="first index into the sorted image list")
    ap.add_argument("--end-id", type=int, default=None, help="one past the last index")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--visualize", action="store_true", help="write overlays to <output>/vis/")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(ap)
    return ap


def _unsam_backends(settings: dict) -> Optional[str]:
    """Recipe unsam: the features / divide not given follow the weights that are (warning when
    that is not the published recipe). Returns an error message, or None."""
    if "features" not in settings:
        settings["features"] = "dino" if settings.get("dino_weights") else "classical"
        if settings["features"] == "classical":
            logger.warning("recipe unsam without --dino-weights: conquering on classical "
                           "features, not the published DINO keys")
    if "divide" not in settings:
        settings["divide"] = "detector" if settings.get("divide_weights") else "maskcut"
        if settings["divide"] == "maskcut":
            logger.warning("recipe unsam without --divide-weights: dividing with MaskCut on "
                           "the whole image, not the published CutLER detector")
    elif settings["divide"] == "detector" and not settings.get("divide_weights"):
        return "--divide detector needs --divide-weights PATH|URL"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = given_settings(args)
    if settings.get("recipe") == "unsam":
        problem = _unsam_backends(settings)
        if problem:
            return _error(problem)
    try:
        check_run_options(args.shard, args.start_id, args.end_id, args.workers)
        cfg = EngineConfig(**settings)
    except SettingError as e:
        return _error(e)
    labeler = None
    if cfg.recipe == "unsam":
        # fail fast on bad weights / config before any image or worker starts; reused below
        try:
            labeler = build_labeler(cfg)
        except (FeatureError, DivideError, ValueError) as e:
            return _error(e)
    elif cfg.features == "dino":
        # fail fast on bad weights before any worker starts
        try:
            build_features("dino", cfg.resolution, cfg.device, cfg.dino_weights, cfg.dino_arch)
        except FeatureError as e:
            return _error(e)
    try:
        s = run(args.input, args.output, cfg, shard=args.shard, start_id=args.start_id,
                end_id=args.end_id, workers=args.workers, visualize=args.visualize,
                progress=not args.quiet, labeler=labeler)
    except (FileNotFoundError, ValueError, FeatureError, OutputWriteError) as e:
        return _error(e)
    except Stopped as stop:
        print(stop.message, file=sys.stderr)
        return stop.exit_status
    print(s.line())
    if s.earlier_failures:
        logger.info("%d failures of earlier runs still listed in %s", s.earlier_failures, s.failures_file)
    return s.exit_status


if __name__ == "__main__":
    sys.exit(main())
