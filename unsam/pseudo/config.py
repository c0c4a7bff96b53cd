"""The pseudo-label engine's settings, declared once: :class:`EngineConfig`.

Every field carries its command-line help in its metadata; :func:`add_config_arguments` makes
``python -m unsam.pseudo``'s options from the fields (``--n-divide`` for ``n_divide``; the
field's ``flag`` metadata where the option has another name), so every setting is reachable
from the command line and a default lives in one place. :func:`given_settings` returns only the
settings given on the command line (the parser's defaults are suppressed), so the CLI can tell
"not given" from "given the default" (``--recipe unsam`` picks its features / divide that way).

A field's ``valid`` metadata (a :class:`Range`, or one per number of a pair) is checked when an
:class:`EngineConfig` is made, so a value that cannot mean anything (``--max-masks 0``, a NaN, a
negative seed) is refused with a :class:`SettingError` naming the option before any image is
read, not discovered per image as a stream of "failed" lines.
"""
import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, get_type_hints

from .conquer import DEFAULT_THRESHOLDS

FEATURES = "features"
CLASSICAL = "classical recipe"
UNSAM = "recipe unsam"


class SettingError(ValueError):
    """A setting outside its allowed range; the message is one line naming the option and value."""


@dataclass(frozen=True)
class Range:
    """Allowed values of one number: ``lo <= x`` (``lo < x`` if ``lo_open``) and ``x <= hi``;
    never NaN or infinite. ``name``: what the number is, for one of a pair."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    name: str = ""

    def problem(self, x) -> Optional[str]:
        """Why ``x`` is not allowed, or None."""
        what = f"{self.name} " if self.name else ""
        if not math.isfinite(x):
            return f"{what}must be a finite number"
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return f"{what}must be {'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None and x > self.hi:
            return f"{what}must be <= {self.hi}"
        return None


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
SHARE = Range(0, 1)  # a fraction or an IoU
COSINE = Range(-1, 1)
SEED = Range(0, 2 ** 32 - 1)


def _setting(default, help: str, group: Optional[str] = None, flag: Optional[str] = None,
             choices: Optional[Tuple] = None, nargs: str = "*", valid=None):
    """A field with its CLI help, argument group, option name (default: from the field name),
    allowed values (``choices``, or ``valid``: a :class:`Range` for a number or for each number
    of a tuple, a tuple of ranges for each pair of a tuple of pairs) and, for a tuple, how many
    values it takes."""
    return field(default=default, metadata=dict(help=help, group=group, flag=flag, choices=choices,
                                                 nargs=nargs, valid=valid))


@dataclass
class EngineConfig:
    recipe: str = _setting(
        "classical", "classical: the offline engine; unsam: the published UnSAM recipe (CutLER "
        "detector divide, DINO keys on each region's crop)", choices=("classical", "unsam"))
    features: str = _setting(
        "classical", "feature backend (recipe unsam: dino when --dino-weights is given)",
        FEATURES, choices=("classical", "dino"))
    dino_weights: Optional[str] = _setting(None, "DINO checkpoint path or URL (dino backend)", FEATURES)
    dino_arch: str = _setting("vit_base_patch8_224", "vit_base_patch8_224 | vit_small_patch8_224 | "
                              "vit_base_patch16_224", FEATURES)
    device: str = _setting("cpu", "torch device of the dino backend and the divide detector", FEATURES)
    resolution: int = _setting(480, "long side (pixels) of the whole-image feature grid's input", FEATURES,
                               valid=AT_LEAST_1)
    crop_resolution: int = _setting(320, "long side of a divided region's crop", CLASSICAL,
                                    valid=AT_LEAST_1)
    n_divide: int = _setting(3, "MaskCut masks per image", CLASSICAL, valid=AT_LEAST_1)
    tau: float = _setting(0.15, "MaskCut affinity threshold", CLASSICAL, valid=COSINE)
    thresholds: Tuple[float, ...] = _setting(DEFAULT_THRESHOLDS, "merge thresholds, visited fine to coarse",
                                             nargs="+", valid=COSINE)
    min_patches: int = _setting(4, "smallest reported group, in feature-grid cells", valid=AT_LEAST_1)
    # = the trainer's per-image instance cap; pass 1000 to measure AR@1000
    max_masks: int = _setting(500, "masks kept per image, best first", CLASSICAL, valid=AT_LEAST_1)
    max_area_frac: float = _setting(0.9, "drop masks covering more than this share of the image", CLASSICAL,
                                   valid=Range(0, 1, lo_open=True))
    min_refine_iou: float = _setting(0.5, "drop a divided mask whose superpixel-snapped / raw IoU is "
                                     "below this", CLASSICAL, valid=SHARE)
    min_inside_parent: float = _setting(0.9, "a conquered mask must lie this much inside its divided "
                                        "region; a parent must hold this much of its child", valid=SHARE)
    dedup_iou: float = _setting(0.8, "drop a mask whose IoU with a better-scored one exceeds this", CLASSICAL,
                               valid=SHARE)
    band_discount: float = _setting(0.25, "γ of the size-band rank discount of the score (0: none)", CLASSICAL,
                                   valid=NON_NEGATIVE)
    n_superpixels: int = _setting(1800, "superpixels per image (the nodes that are merged)",
                                  flag="--superpixels", valid=AT_LEAST_1)
    straddle_superpixels: int = _setting(
        700, "superpixels of the coarse over-segmentation whose straddling by a mask's border "
        "demotes the mask in the selection score (0: no straddling term)", CLASSICAL, valid=NON_NEGATIVE)
    # more feature settings give more diverse candidates (selective search's
    # "diversification") at a linear cost
    variants: Tuple[Tuple[float, float], ...] = _setting(
        ((0.55, 0.25), (0.4, 0.5), (0.8, 0.1)),
        "classical features: one whole-image hierarchy per BANDWIDTH,POSITION_WEIGHT pair", CLASSICAL,
        valid=(Range(0, lo_open=True, name="BANDWIDTH"), Range(0, name="POSITION_WEIGHT")))
    colour_bandwidths: Tuple[float, ...] = _setting(
        (0.5,), "RBF bandwidths of the full-resolution colour hierarchies on the superpixels "
        "(small objects), one hierarchy each; none: pass the flag alone", CLASSICAL, valid=POSITIVE)
    colour_min_pixels: int = _setting(100, "smallest group of the colour and selective hierarchies, "
                                      "in pixels", CLASSICAL, valid=NON_NEGATIVE)
    pair_unions: bool = _setting(True, "add the union of every two adjacent groups of each merge "
                                 "snapshot as a candidate", CLASSICAL)
    all_merges: bool = _setting(True, "every merge is a candidate, not only threshold snapshots", CLASSICAL)
    refine_top: int = _setting(1500, "add a colour-snapped variant of this many best masks (0: off)", CLASSICAL,
                          valid=NON_NEGATIVE)
    polish_edge_scales: Tuple[float, ...] = _setting(
        (0.5, 1.0, 3.0), "polish the kept masks: per mask, the best-scored of itself and one pass of "
        "colour + edge ICM per edge scale (pair weight exp(-edge / scale)); none: pass the flag alone",
        CLASSICAL, valid=POSITIVE)
    polish_rounds: int = _setting(2, "polish passes (each from the previous pass's masks)", CLASSICAL,
                                valid=NON_NEGATIVE)
    polish_weight: float = _setting(0.1, "weight of the colour term of the polish (per pixel) against "
                                    "the edge term (per border pixel)", CLASSICAL, valid=NON_NEGATIVE)
    selective: Tuple[str, ...] = _setting(
        ("features",), "selective-search-style complete hierarchies (similarity + size + fill) to "
        "add (none: pass the flag alone)", CLASSICAL, choices=("features", "colour"))
    boundary: Tuple[Tuple[float, float], ...] = _setting(
        ((1.0, 0.5), (1.0, 1.0), (3.0, 0.5)), "contour (UCM-style) hierarchies on the superpixel "
        "graph, weakest shared border first: one per SIGMA,SIZE_POWER pair (Gaussian σ of the edge "
        "map, exponent of the size term; none: pass the flag alone)", CLASSICAL,
        valid=(Range(0, lo_open=True, name="SIGMA"), Range(0, name="SIZE_POWER")))
    seed: int = _setting(0, "seed of the random Fourier features of the colour embedding",
                         valid=SEED)
    # recipe "unsam" only
    divide: str = _setting(
        "detector", "detector (default when --divide-weights is given) or MaskCut on the whole image "
        "(not the published divide)", UNSAM, choices=("detector", "maskcut"))
    divide_config: Optional[str] = _setting(
        None, "detectron2 config of the detector (default: configs/divide/cutler_cascade_R50_FPN.yaml)", UNSAM)
    divide_weights: Optional[str] = _setting(
        None, "detector checkpoint PATH or URL (CutLER's cutler_cascade_final.pth)", UNSAM)
    divide_score: float = _setting(
        0.1, "detector instances scoring above this are divided regions (detectron2 keeps score > "
        "threshold)", UNSAM, valid=SHARE)
    conquer_size: int = _setting(256, "each region's crop is resized to this square before the features", UNSAM,
                             valid=AT_LEAST_1)
    refine: bool = _setting(False, "snap masks to superpixels (the engine's unsupervised refinement; "
                            "the published CascadePSP was trained with human masks)", UNSAM)

    def __post_init__(self):
        check_ranges(self)


def option_name(f: dataclasses.Field) -> str:
    """The command-line option of field ``f`` (``--n-divide`` for ``n_divide``)."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _range_problem(value, valid) -> Optional[str]:
    """Why ``value`` (a number, a tuple of numbers or a tuple of pairs) breaks ``valid``."""
    if isinstance(valid, Range):
        items = value if isinstance(value, tuple) else (value,)
        return next((p for p in map(valid.problem, items) if p), None)
    for pair in value:  # a tuple of pairs, one Range per number of a pair
        problem = next((p for p in map(Range.problem, valid, pair) if p), None)
        if problem:
            return problem
    return None


def check_ranges(cfg: "EngineConfig") -> None:
    """:class:`SettingError` naming the first setting outside its ``valid`` range."""
    for f in dataclasses.fields(cfg):
        valid = f.metadata.get("valid")
        value = getattr(cfg, f.name)
        if valid is None or value is None:
            continue
        problem = _range_problem(value, valid)
        if problem:
            raise SettingError(f"{option_name(f)} {_show(value)}: {problem}")


def _float_pair(text: str) -> Tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers A,B (e.g. 0.55,0.25), got '{text}'")
    return a, b


def _argument_kwargs(hint, nargs: str) -> Dict[str, Any]:
    """argparse keywords for a field of type ``hint`` (``nargs``: for a tuple)."""
    if hint is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if hint in (int, float, str):
        return dict(type=hint)
    if hint == Optional[str]:
        return dict(type=str)
    item = hint.__args__[0]  # Tuple[X, ...]
    return dict(nargs=nargs, type=_float_pair if item == Tuple[float, float] else item)


def _show(default) -> str:
    if isinstance(default, tuple):
        return " ".join(",".join(map(str, x)) if isinstance(x, tuple) else str(x) for x in default) or "none"
    return str(default)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`EngineConfig` field, in argument groups; not-given options are
    absent from the parsed namespace (see :func:`given_settings`)."""
    hints = get_type_hints(EngineConfig)
    groups: Dict[Optional[str], Any] = {None: parser}
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        flag = option_name(f)
        kwargs = _argument_kwargs(hints[f.name], meta["nargs"])
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        elif meta["flag"] and "action" not in kwargs:
            kwargs["metavar"] = meta["flag"].lstrip("-").replace("-", "_").upper()
        groups[meta["group"]].add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                           help=f"{meta['help']} (default: {_show(f.default)})", **kwargs)


def given_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The :class:`EngineConfig` fields given on the command line, lists made tuples."""
    out = {}
    for f in dataclasses.fields(EngineConfig):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


# ---------------------------------------------------------------- settings recorded per output
# fields that do not change what is labelled: the same folder may be resumed on another device
RUN_ONLY = ("device",)
# fields naming a file: recorded as an absolute path, so a rerun from another folder matches
PATH_FIELDS = ("dino_weights", "divide_weights", "divide_config")


def _absolute(value: Optional[str]) -> Optional[str]:
    if not value or "://" in value:  # None, or a URL
        return value
    return os.path.abspath(os.path.expanduser(value))


def label_settings(cfg: EngineConfig) -> Dict[str, Any]:
    """The settings that decide an image's labels, JSON-ready (tuples as lists): every
    :class:`EngineConfig` field but ``RUN_ONLY``; what an output folder records."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in RUN_ONLY:
            continue
        value = getattr(cfg, f.name)
        out[f.name] = _absolute(value) if f.name in PATH_FIELDS else value
    return json.loads(json.dumps(out))


def settings_differences(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``--option OLD -> NEW`` for every setting that differs. A setting the record lacks (an
    older engine, before the setting existed) counts as its default."""
    defaults = label_settings(EngineConfig())
    diffs = []
    for f in dataclasses.fields(EngineConfig):
        if f.name not in current:
            continue
        old = recorded.get(f.name, defaults[f.name])
        if old != current[f.name]:
            diffs.append(f"{option_name(f)} {_compact(old)} -> {_compact(current[f.name])}")
    return diffs


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))
