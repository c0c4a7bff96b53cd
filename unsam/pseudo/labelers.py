"""The pseudo-label recipes: what a labeler is (:class:`Labeler`) and which recipes
``python -m unsam.pseudo --recipe NAME`` knows (:data:`RECIPES`).

A recipe is a settings dataclass (a :class:`~unsam.pseudo.config.Settings`, its fields made with
:func:`~unsam.pseudo.config.setting`: they become the recipe's command-line options and its
output folders' settings record) and a labeler made from those settings: one image in, its
SA-1B annotations out (built with :func:`unsam.io.sa1b.annotation_from_mask`). A new recipe is
one module holding both, and one line here::

    register_recipe(Recipe("grid", GridSettings, GridLabeler, "squares of a grid"))

(``docs/labelers.md`` shows one that runs). The runner (:func:`unsam.pseudo.runner.run`:
sharding, resume, ``failed.txt``, worker processes, the settings record) and the CLI take any
recipe from here; neither names one.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Type

import numpy as np

from .classical import ClassicalLabeler, ClassicalSettings
from .config import SettingError, Settings, foreign_settings, label_settings
from .recipe import UnsamLabeler, UnsamSettings, complete_settings

__all__ = [
    "Labeler",
    "RECIPES",
    "Recipe",
    "build_labeler",
    "get_recipe",
    "make_settings",
    "recipe_of",
    "register_recipe",
    "settings_classes",
]


class Labeler(Protocol):
    """One image → its pseudo labels. The runner calls ``labeler(image)`` with an H×W×3 uint8
    RGB image and writes the list of SA-1B annotation dicts it returns (ids 0..K-1; see
    :func:`unsam.io.sa1b.annotation_from_mask`). A labeler that needs to know which image it
    labels may have ``label_task(image, task)`` as well, which the runner then calls instead
    (``task``: :class:`unsam.pseudo.runner.Task`). Exceptions fail that image only (listed in
    ``failed.txt``); a labeler is built once per process, so expensive state (weights) lives
    on it."""

    def __call__(self, image: np.ndarray) -> List[Dict[str, Any]]: ...


@dataclass(frozen=True)
class Recipe:
    """One pseudo-label recipe.

    ``name``: its ``--recipe`` value; ``settings``: its settings dataclass (every field with a
    default; ``settings()`` are the defaults); ``labeler``: ``labeler(settings)`` builds its
    :class:`Labeler` — a class or a module-level function, as worker processes get it pickled;
    it raises ``ValueError`` / ``RuntimeError`` for settings or weights it cannot work with
    (one ``error:`` line before any image is read); ``help``: one line for ``--help``;
    ``complete``: fills in, in place, the settings that follow from those given on the command
    line (:func:`unsam.pseudo.config.given_settings`) and raises
    :class:`~unsam.pseudo.config.SettingError` for combinations that cannot work;
    ``flat_record``: the settings record also lists the settings of the built-in recipes it
    lacks, at fixed values (:data:`unsam.pseudo.config.FLAT_RECORD`) — only the built-in
    recipes, so their records stay as they were before each recipe had its own settings."""

    name: str
    settings: Type[Settings]
    labeler: Callable[[Any], Labeler]
    help: str = ""
    complete: Optional[Callable[[Dict[str, Any]], None]] = None
    flat_record: bool = False

    def record(self, settings) -> Dict[str, Any]:
        """The settings record of an output folder labelled with ``settings``."""
        return label_settings(self.name, settings, self.flat_record)


RECIPES: Dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to :data:`RECIPES` (``ValueError`` when its name or its settings class is
    taken by another recipe)."""
    for other in RECIPES.values():
        if other.name == recipe.name or other.settings is recipe.settings:
            raise ValueError(
                f"recipe {recipe.name}: name or settings class taken by recipe {other.name}"
            )
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name`` (``ValueError`` naming the known ones)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe '{name}' ({' | '.join(RECIPES)})")
    return RECIPES[name]


def recipe_of(settings) -> Recipe:
    """The registered recipe whose settings class ``settings`` is an instance of."""
    for recipe in RECIPES.values():
        if type(settings) is recipe.settings:
            return recipe
    raise ValueError(f"{type(settings).__name__} is the settings class of no registered recipe")


def settings_classes() -> Mapping[str, Type[Settings]]:
    """Recipe name → settings class, of every registered recipe (for the CLI)."""
    return {name: recipe.settings for name, recipe in RECIPES.items()}


def make_settings(recipe: Recipe, given: Dict[str, Any]):
    """``recipe``'s settings from the options ``given`` on the command line: an option of
    other recipes only is refused, then :attr:`Recipe.complete` fills in what follows from the
    given ones. Raises :class:`~unsam.pseudo.config.SettingError` (one line naming the option)."""
    problem = foreign_settings(given, recipe.name, settings_classes())
    if problem:
        raise SettingError(problem)
    given = dict(given)
    if recipe.complete is not None:
        recipe.complete(given)
    return recipe.settings(**given)


def build_labeler(settings) -> Labeler:
    """The labeler of the recipe whose settings these are."""
    return recipe_of(settings).labeler(settings)


# ---------------------------------------------------------------- the recipes, one line each
register_recipe(
    Recipe(
        "classical",
        ClassicalSettings,
        ClassicalLabeler,
        "the offline engine (default)",
        flat_record=True,
    )
)
register_recipe(
    Recipe(
        "unsam",
        UnsamSettings,
        UnsamLabeler,
        "the published UnSAM recipe (CutLER detector divide, DINO keys on each region's crop)",
        complete=complete_settings,
        flat_record=True,
    )
)
