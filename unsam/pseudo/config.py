"""The pseudo-label engine's settings, declared once: :class:`EngineConfig`.

Every field carries its command-line help in its metadata; :func:`add_config_arguments` makes
``python -m unsam.pseudo``'s options from the fields (``--n-divide`` for ``n_divide``; the
field's ``flag`` metadata where the option has another name), so every setting is reachable
from the command line and a default lives in one place. :func:`given_settings` returns only the
settings given on the command line (the parser's defaults are suppressed), so the CLI can tell
"not given" from "given the default" (``--recipe unsam`` picks its features / divide that way).
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, get_type_hints

from .conquer import DEFAULT_THRESHOLDS

FEATURES = "features"
CLASSICAL = "classical recipe"
UNSAM = "recipe unsam"


def _setting(default, help: str, group: Optional[str] = None, flag: Optional[str] = None,
             choices: Optional[Tuple] = None, nargs: str = "*"):
    """A field with its CLI help, argument group, option name (default: from the field name),
    allowed values and, for a tuple, how many values it takes."""
    return field(default=default, metadata=dict(help=help, group=group, flag=flag, choices=choices,
                                                 nargs=nargs))


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
    resolution: int = _setting(480, "long side (pixels) of the whole-image feature grid's input", FEATURES)
    crop_resolution: int = _setting(320, "long side of a divided region's crop", CLASSICAL)
    n_divide: int = _setting(3, "MaskCut masks per image", CLASSICAL)
    tau: float = _setting(0.15, "MaskCut affinity threshold", CLASSICAL)
    thresholds: Tuple[float, ...] = _setting(DEFAULT_THRESHOLDS, "merge thresholds, visited fine to coarse",
                                             nargs="+")
    min_patches: int = _setting(4, "smallest reported group, in feature-grid cells")
    # = the trainer's per-image instance cap; pass 1000 to measure AR@1000
    max_masks: int = _setting(500, "masks kept per image, best first", CLASSICAL)
    max_area_frac: float = _setting(0.9, "drop masks covering more than this share of the image", CLASSICAL)
    min_refine_iou: float = _setting(0.5, "drop a divided mask whose superpixel-snapped / raw IoU is "
                                     "below this", CLASSICAL)
    min_inside_parent: float = _setting(0.9, "a conquered mask must lie this much inside its divided "
                                        "region; a parent must hold this much of its child")
    dedup_iou: float = _setting(0.8, "drop a mask whose IoU with a better-scored one exceeds this", CLASSICAL)
    band_discount: float = _setting(0.25, "γ of the size-band rank discount of the score (0: none)", CLASSICAL)
    n_superpixels: int = _setting(1800, "superpixels per image (the nodes that are merged)",
                                  flag="--superpixels")
    straddle_superpixels: int = _setting(
        700, "superpixels of the coarse over-segmentation whose straddling by a mask's border "
        "demotes the mask in the selection score (0: no straddling term)", CLASSICAL)
    # more feature settings give more diverse candidates (selective search's
    # "diversification") at a linear cost
    variants: Tuple[Tuple[float, float], ...] = _setting(
        ((0.55, 0.25), (0.4, 0.5), (0.8, 0.1)),
        "classical features: one whole-image hierarchy per BANDWIDTH,POSITION_WEIGHT pair", CLASSICAL)
    colour_bandwidths: Tuple[float, ...] = _setting(
        (0.5,), "RBF bandwidths of the full-resolution colour hierarchies on the superpixels "
        "(small objects), one hierarchy each; none: pass the flag alone", CLASSICAL)
    colour_min_pixels: int = _setting(100, "smallest group of the colour and selective hierarchies, "
                                      "in pixels", CLASSICAL)
    pair_unions: bool = _setting(True, "add the union of every two adjacent groups of each merge "
                                 "snapshot as a candidate", CLASSICAL)
    all_merges: bool = _setting(True, "every merge is a candidate, not only threshold snapshots", CLASSICAL)
    refine_top: int = _setting(1500, "add a colour-snapped variant of this many best masks (0: off)", CLASSICAL)
    polish_edge_scales: Tuple[float, ...] = _setting(
        (0.5, 1.0, 3.0), "polish the kept masks: per mask, the best-scored of itself and one pass of "
        "colour + edge ICM per edge scale (pair weight exp(-edge / scale)); none: pass the flag alone",
        CLASSICAL)
    polish_rounds: int = _setting(2, "polish passes (each from the previous pass's masks)", CLASSICAL)
    polish_weight: float = _setting(0.1, "weight of the colour term of the polish (per pixel) against "
                                    "the edge term (per border pixel)", CLASSICAL)
    selective: Tuple[str, ...] = _setting(
        ("features",), "selective-search-style complete hierarchies (similarity + size + fill) to "
        "add (none: pass the flag alone)", CLASSICAL, choices=("features", "colour"))
    boundary: Tuple[Tuple[float, float], ...] = _setting(
        ((1.0, 0.5), (1.0, 1.0), (3.0, 0.5)), "contour (UCM-style) hierarchies on the superpixel "
        "graph, weakest shared border first: one per SIGMA,SIZE_POWER pair (Gaussian σ of the edge "
        "map, exponent of the size term; none: pass the flag alone)", CLASSICAL)
    seed: int = _setting(0, "seed of the random Fourier features of the colour embedding")
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
        "threshold)", UNSAM)
    conquer_size: int = _setting(256, "each region's crop is resized to this square before the features", UNSAM)
    refine: bool = _setting(False, "snap masks to superpixels (the engine's unsupervised refinement; "
                            "the published CascadePSP was trained with human masks)", UNSAM)


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
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
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
