"""Command-line conventions shared by the lightweight entry points (no detectron2 import here)."""

import argparse
import sys


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is the project's one ``error:`` line (exit status 2), not the
    usage text plus ``prog: error:``."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
