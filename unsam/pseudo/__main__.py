"""``python -m unsam.pseudo --input DIR|GLOB --output DIR [--recipe NAME] [options]`` — see
:mod:`unsam.pseudo.runner` (the run) and :mod:`unsam.pseudo.labelers` (the recipes).

Bad input is refused with one line ``error: <what, naming the option / file>`` on stderr and exit
status 2 (argparse's own errors included); SIGTERM / SIGINT stop the run with one ``stopped``
line and status 128 + the signal number.
"""

import argparse
import logging
import sys

import unsam.compat  # noqa: F401  (compat before detectron2)

from ..features import FeatureError
from ..utils.cli import OneLineArgumentParser
from .config import SettingError, add_settings_arguments, given_settings
from .detector import DivideError
from .labelers import RECIPES, get_recipe, make_settings, settings_classes
from .runner import OutputWriteError, Stopped, check_run_options, run

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
    """The run options (input, output, sharding, workers), ``--recipe`` and one option per
    setting of every registered recipe (:func:`~unsam.pseudo.config.add_settings_arguments`)."""
    ap = OneLineArgumentParser(
        prog="python -m unsam.pseudo",
        description="Unsupervised divide-and-conquer pseudo labels (SA-1B JSON per image).",
    )
    ap.add_argument("--input", required=True, help="image folder or glob pattern")
    ap.add_argument("--output", required=True, help="output folder (<stem>.json per image)")
    ap.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/n")
    ap.add_argument(
        "--start-id", type=int, default=0, help="first index into the sorted image list"
    )
    ap.add_argument("--end-id", type=int, default=None, help="one past the last index")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--visualize", action="store_true", help="write overlays to <output>/vis/")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument(
        "--recipe",
        default="classical",
        choices=list(RECIPES),
        help="; ".join(f"{r.name}: {r.help}" for r in RECIPES.values()) + " (default: classical)",
    )
    add_settings_arguments(ap, settings_classes())
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = get_recipe(args.recipe)
    try:
        check_run_options(args.shard, args.start_id, args.end_id, args.workers)
        settings = make_settings(recipe, given_settings(args, settings_classes()))
    except SettingError as e:
        return _error(e)
    # fail fast on bad weights / config before any image or worker starts; reused by the run
    try:
        labeler = recipe.labeler(settings)
    except (FeatureError, DivideError, ValueError) as e:
        return _error(e)
    try:
        s = run(
            args.input,
            args.output,
            settings,
            shard=args.shard,
            start_id=args.start_id,
            end_id=args.end_id,
            workers=args.workers,
            visualize=args.visualize,
            progress=not args.quiet,
            labeler=labeler,
        )
    except (FileNotFoundError, ValueError, FeatureError, OutputWriteError) as e:
        return _error(e)
    except Stopped as stop:
        print(stop.message, file=sys.stderr)
        return stop.exit_status
    print(s.line())
    if s.earlier_failures:
        logger.info(
            "%d failures of earlier runs still listed in %s", s.earlier_failures, s.failures_file
        )
    return s.exit_status


if __name__ == "__main__":
    sys.exit(main())
