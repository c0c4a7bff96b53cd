"""Resolve ``MODEL.WEIGHTS`` before loading: local path, URL, or empty for random init."""
import os
import re

_REMOTE = re.compile(r"^(https?|detectron2|s3|gs)://")


class WeightsNotFoundError(FileNotFoundError):
    """``MODEL.WEIGHTS`` names a local file that does not exist."""


def check_weights_path(path: str) -> str:
    """Return ``path`` unchanged if it is empty, remote, or an existing file; else raise."""
    if not path or _REMOTE.match(path):
        return path
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"MODEL.WEIGHTS file '{path}' not found")
    return path
