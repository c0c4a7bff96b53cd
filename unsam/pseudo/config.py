"""Settings of the pseudo-label recipes, declared as dataclass fields; the options and the
settings record of ``python -m unsam.pseudo`` are made from them.

Each recipe owns a settings dataclass (:class:`~unsam.pseudo.classical.ClassicalSettings`,
:class:`~unsam.pseudo.recipe.UnsamSettings`, see :mod:`unsam.pseudo.labelers`); the settings
several recipes have are declared once, in the bases here (:class:`FeatureSettings`,
:class:`DivideConquerSettings`), and shared by inheritance. A field made by :func:`setting`
carries its command-line help; :func:`add_settings_arguments` makes one option per field
(``--n-divide`` for ``n_divide``; the field's ``flag`` metadata where the option has another
name), so every setting is reachable from the command line and a default lives in one place.
:func:`given_settings` returns only the settings given on the command line (the parser's
defaults are suppressed), so the CLI can tell "not given" from "given the default" (``--recipe
unsam`` picks its features / divide that way).

A field's ``valid`` metadata (a :class:`Range`, or one per number of a pair) is checked when a
:class:`Settings` is made, so a value that cannot mean anything (``--max-masks 0``, a NaN, a
negative seed) is refused with a :class:`SettingError` naming the option before any image is
read, not discovered per image as a stream of "failed" lines.

:func:`label_settings` is what an output folder records (``pseudo_settings.txt``, see
:func:`unsam.pseudo.runner.check_settings`) and :func:`settings_differences` compares a record
with a run's settings.
"""

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, get_type_hints

from .conquer import DEFAULT_THRESHOLDS

FEATURES = "features"


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
SEED = Range(0, 2**32 - 1)


def setting(
    default,
    help: str,
    group: Optional[str] = None,
    flag: Optional[str] = None,
    choices: Optional[Tuple] = None,
    nargs: str = "*",
    valid=None,
):
    """A settings field with its CLI help, argument group (default: the recipes that have it),
    option name (default: from the field name), allowed values (``choices``, or ``valid``: a
    :class:`Range` for a number or for each number of a tuple, a tuple of ranges for each pair
    of a tuple of pairs) and, for a tuple, how many values it takes."""
    return field(
        default=default,
        metadata=dict(help=help, group=group, flag=flag, choices=choices, nargs=nargs, valid=valid),
    )


@dataclass
class Settings:
    """Base of a recipe's settings: the ``valid`` ranges of its fields are checked when one is
    made (:class:`SettingError`). Fields are made with :func:`setting`; types ``int``,
    ``float``, ``str``, ``bool``, ``Optional[str]``, ``Tuple[X, ...]`` (X: a number, ``str``
    or ``Tuple[float, float]``)."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class FeatureSettings(Settings):
    """The dense-feature backend (:func:`unsam.features.build_features`)."""

    features: str = setting(
        "classical",
        "feature backend (recipe unsam: dino when --dino-weights is given)",
        FEATURES,
        choices=("classical", "dino"),
    )
    dino_weights: Optional[str] = setting(
        None, "DINO checkpoint path or URL (dino backend)", FEATURES
    )
    dino_arch: str = setting(
        "vit_base_patch8_224",
        "vit_base_patch8_224 | vit_small_patch8_224 | vit_base_patch16_224",
        FEATURES,
    )
    device: str = setting(
        "cpu", "torch device of the dino backend and the divide detector", FEATURES
    )
    resolution: int = setting(
        480,
        "long side (pixels) of the whole-image feature grid's input",
        FEATURES,
        valid=AT_LEAST_1,
    )


@dataclass
class DivideConquerSettings(FeatureSettings):
    """What the two divide-and-conquer recipes of this package share: the MaskCut divide, the
    merge thresholds of the conquer, the superpixels."""

    n_divide: int = setting(3, "MaskCut masks per image", valid=AT_LEAST_1)
    tau: float = setting(0.15, "MaskCut affinity threshold", valid=COSINE)
    thresholds: Tuple[float, ...] = setting(
        DEFAULT_THRESHOLDS, "merge thresholds, visited fine to coarse", nargs="+", valid=COSINE
    )
    min_patches: int = setting(
        4, "smallest reported group, in feature-grid cells", valid=AT_LEAST_1
    )
    min_inside_parent: float = setting(
        0.9,
        "a conquered mask must lie this much inside its "
        "divided region; a parent must hold this much of its child",
        valid=SHARE,
    )
    n_superpixels: int = setting(
        1800,
        "superpixels per image (the nodes that are merged)",
        flag="--superpixels",
        valid=AT_LEAST_1,
    )


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


def check_ranges(settings: Settings) -> None:
    """:class:`SettingError` naming the first setting outside its ``valid`` range."""
    for f in dataclasses.fields(settings):
        valid = f.metadata.get("valid")
        value = getattr(settings, f.name)
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
        return (
            " ".join(",".join(map(str, x)) if isinstance(x, tuple) else str(x) for x in default)
            or "none"
        )
    return str(default)


def _options(recipes: Mapping[str, Type[Settings]]):
    """``{field name: (field, type hint, [recipe names])}`` over the settings of ``recipes``
    (recipe name → settings class). Two recipes may share a setting only with one definition
    (by inheritance, or an equal one): a ``ValueError`` names the other."""
    out: Dict[str, Tuple[dataclasses.Field, Any, List[str]]] = {}
    flags: Dict[str, str] = {}  # option -> field name
    for name, settings in recipes.items():
        hints = get_type_hints(settings)
        for f in dataclasses.fields(settings):
            flag = option_name(f)
            if f.name == RECIPE:
                raise ValueError(f"recipe {name}: a setting may not be called '{RECIPE}'")
            seen = out.get(flags.get(flag, f.name))
            if seen is not None:
                same = (seen[0].name, seen[1], seen[0].default, dict(seen[0].metadata)) == (
                    f.name,
                    hints[f.name],
                    f.default,
                    dict(f.metadata),
                )
                if not same:
                    raise ValueError(
                        f"setting {flag} of recipe {name} differs from the one of "
                        f"recipe {seen[2][0]}: share the field or rename the option"
                    )
                seen[2].append(name)
                continue
            out[f.name] = (f, hints[f.name], [name])
            flags[flag] = f.name
    return out


def add_settings_arguments(
    parser: argparse.ArgumentParser, recipes: Mapping[str, Type[Settings]]
) -> None:
    """One option per setting of the ``recipes`` (recipe name → settings class), in argument
    groups: the field's ``group``, else the recipes that have the setting. Options not given
    are absent from the parsed namespace (see :func:`given_settings`)."""
    groups: Dict[str, Any] = {}
    for f, hint, owners in _options(recipes).values():
        meta = f.metadata
        title = meta["group"] or ("recipe " if len(owners) == 1 else "recipes ") + ", ".join(owners)
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        kwargs = _argument_kwargs(hint, meta["nargs"])
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        elif meta["flag"] and "action" not in kwargs:
            kwargs["metavar"] = meta["flag"].lstrip("-").replace("-", "_").upper()
        groups[title].add_argument(
            option_name(f),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f"{meta['help']} (default: {_show(f.default)})",
            **kwargs,
        )


def given_settings(
    args: argparse.Namespace, recipes: Mapping[str, Type[Settings]]
) -> Dict[str, Any]:
    """The settings of the ``recipes`` given on the command line, lists made tuples."""
    out = {}
    for name in _options(recipes):
        if hasattr(args, name):
            value = getattr(args, name)
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def foreign_settings(
    given: Mapping[str, Any], recipe: str, recipes: Mapping[str, Type[Settings]]
) -> Optional[str]:
    """Why ``given`` (:func:`given_settings`) does not fit recipe ``recipe``: the first option
    it has that is a setting of other recipes only; None when all fit."""
    options = _options(recipes)
    for name in given:
        f, _, owners = options[name]
        if recipe not in owners:
            return (
                f"{option_name(f)} is a setting of recipe {', '.join(owners)}, not of "
                f"--recipe {recipe}"
            )
    return None


# ---------------------------------------------------------------- settings recorded per output
# fields that do not change what is labelled: the same folder may be resumed on another device
RUN_ONLY = ("device",)
# fields naming a file: recorded as an absolute path, so a rerun from another folder matches
PATH_FIELDS = ("dino_weights", "divide_weights", "divide_config")
# what the record of every recipe holds besides its settings
RECIPE = "recipe"
DEFAULT_RECIPE = "classical"  # of a record from before the recipe was recorded
# Before the recipes had settings of their own, one flat settings class held the settings of
# both built-in recipes and the record listed all of them. The records of the built-in
# recipes still list, at these values (the flat class's defaults), the settings the recipe
# does not have, so a record stays byte-identical across that change: folders labelled
# before it resume, and older engines resume newer folders. Never compared (they do not
# decide the labels); frozen here, not taken from the other recipe's defaults, so that a
# changed default there does not change this recipe's records.
FLAT_RECORD: Dict[str, Any] = {
    "all_merges": True,
    "band_discount": 0.25,
    "boundary": [[1.0, 0.5], [1.0, 1.0], [3.0, 0.5]],
    "colour_bandwidths": [0.5],
    "colour_min_pixels": 100,
    "conquer_size": 256,
    "crop_resolution": 320,
    "dedup_iou": 0.8,
    "dino_arch": "vit_base_patch8_224",
    "dino_weights": None,
    "divide": "detector",
    "divide_config": None,
    "divide_score": 0.1,
    "divide_weights": None,
    "features": "classical",
    "max_area_frac": 0.9,
    "max_masks": 500,
    "min_inside_parent": 0.9,
    "min_patches": 4,
    "min_refine_iou": 0.5,
    "n_divide": 3,
    "n_superpixels": 1800,
    "pair_unions": True,
    "polish_edge_scales": [0.5, 1.0, 3.0],
    "polish_rounds": 2,
    "polish_weight": 0.1,
    "refine": False,
    "refine_top": 1500,
    "resolution": 480,
    "seed": 0,
    "selective": ["features"],
    "straddle_superpixels": 700,
    "tau": 0.15,
    "thresholds": [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
    "variants": [[0.55, 0.25], [0.4, 0.5], [0.8, 0.1]],
}


def _absolute(value: Optional[str]) -> Optional[str]:
    if not value or "://" in value:  # None, or a URL
        return value
    return os.path.abspath(os.path.expanduser(value))


def _own_settings(settings: Settings) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(settings):
        if f.name in RUN_ONLY:
            continue
        value = getattr(settings, f.name)
        out[f.name] = _absolute(value) if f.name in PATH_FIELDS else value
    return out


def label_settings(recipe: str, settings: Settings, flat_record: bool = False) -> Dict[str, Any]:
    """What an output folder records, JSON-ready (tuples as lists): ``recipe`` and every field
    of ``settings`` but ``RUN_ONLY``; ``flat_record``: also the :data:`FLAT_RECORD` entries
    the settings lack (the built-in recipes)."""
    out = {**FLAT_RECORD} if flat_record else {}
    out.update({RECIPE: recipe, **_own_settings(settings)})
    return json.loads(json.dumps(out))


def settings_differences(
    recorded: Dict[str, Any], current: Dict[str, Any], settings: Type[Settings]
) -> List[str]:
    """``--option OLD -> NEW`` for ``--recipe`` and every setting of the class ``settings``
    that differs between the record ``recorded`` and the :func:`label_settings` ``current``.
    A setting the record lacks (an older engine, before the setting existed) counts as its
    default; entries of the record that are no settings of ``settings`` are not compared."""
    defaults = json.loads(json.dumps(_own_settings(settings())))
    diffs = []
    old = recorded.get(RECIPE, DEFAULT_RECIPE)
    if old != current[RECIPE]:
        diffs.append(f"--recipe {_compact(old)} -> {_compact(current[RECIPE])}")
    for f in dataclasses.fields(settings):
        if f.name not in current:
            continue
        old = recorded.get(f.name, defaults[f.name])
        if old != current[f.name]:
            diffs.append(f"{option_name(f)} {_compact(old)} -> {_compact(current[f.name])}")
    return diffs


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))
