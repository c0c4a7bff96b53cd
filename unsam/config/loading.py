"""The config loading and CLI conventions shared by ``train_net.py`` and the demos.

Config errors (missing file, misspelt key, wrong value type) become :class:`ConfigError` with
one line that names the file or key; entry points print it and exit with status 2.
"""

import argparse
import os
import re
from typing import Optional, Sequence

import unsam.compat  # noqa: F401

import yaml
from detectron2.engine import default_argument_parser

from ..utils.device import resolve_device
from . import get_unsam_cfg


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


def _unknown_key(err: Exception) -> Optional[str]:
    match = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(err))
    return match.group(1) if match else None


def _yaml_error(config_file: str, err: "yaml.YAMLError") -> str:
    """One line for a YAML syntax error: ``file:line:column: problem`` (the file may be a
    _BASE_)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return f"YAML syntax error in {config_file}: {problem}"
    return f"YAML syntax error in {mark.name}:{mark.line + 1}:{mark.column + 1}: {problem}"


def load_config(config_file: Optional[str] = None, opts: Sequence[str] = (), freeze: bool = True):
    """detectron2 defaults + UnSAM keys, then ``config_file`` (with ``_BASE_``), then ``opts``.

    ``MODEL.DEVICE`` "auto" (the default) becomes the device this machine runs on: "cuda" when
    a GPU is visible, else "cpu" (:func:`unsam.utils.device.resolve_device`), so every consumer
    of the loaded config sees a device torch accepts.
    """
    cfg = get_unsam_cfg()
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file '{config_file}' not found")
        try:
            cfg.merge_from_file(config_file)
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(config_file, e)) from None
        except KeyError as e:
            key = _unknown_key(e)
            raise ConfigError(f"unknown config key '{key or e}' in {config_file}") from None
        except (ValueError, TypeError, AssertionError) as e:
            raise ConfigError(f"invalid value in {config_file}: {e}") from None
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"config overrides must be KEY VALUE pairs, got an odd list: {opts}")
    try:
        cfg.merge_from_list(opts)
    except KeyError as e:
        key = _unknown_key(e)
        raise ConfigError(f"unknown config key '{key or e}' on the command line") from None
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"invalid command-line override: {e}") from None
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    if freeze:
        cfg.freeze()
    return cfg


def train_argument_parser() -> argparse.ArgumentParser:
    """detectron2's parser (``--config-file --resume --eval-only --num-gpus ... opts``)."""
    parser = default_argument_parser(
        epilog=(
            "Examples:\n"
            "  python train_net.py --config-file configs/unsam_only_sa-1b_R50.yaml --num-gpus 4\n"
            "  torchrun --nproc_per_node=4 train_net.py "
            "--config-file configs/unsam_only_sa-1b_R50.yaml\n"
            "  python train_net.py --config-file configs/tiny/unsam_tiny.yaml "
            "--eval-only MODEL.WEIGHTS out/model_final.pth\n"
            "Trailing KEY VALUE pairs override config keys."
        )
    )
    return parser
