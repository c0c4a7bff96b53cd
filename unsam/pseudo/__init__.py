"""Unsupervised divide-and-conquer pseudo labels (``python -m unsam.pseudo``).

Dense patch features (:mod:`unsam.features`: classical / DINO) → ``divide`` (MaskCut) →
``conquer`` (threshold-hierarchy merging) → ``refine`` (the superpixel graph: snapping, boundary
score) → ``candidates`` (filter, rank, hierarchy → SA-1B annotations). ``classical`` and
``recipe`` are the two recipes (each a labeler and its settings), ``labelers`` their registry,
``config`` the settings machinery, ``runner`` the batch runner writing SA-1B JSON; ``evaluate``
scores the labels against COCO ground truth. Nothing here needs the model or the trainer.
"""

from ..features import (  # noqa: F401
    ClassicalFeatures,
    DenseFeatures,
    DinoFeatures,
    FeatureError,
    build_features,
)
from .classical import ClassicalLabeler, ClassicalSettings  # noqa: F401
from .labelers import RECIPES, Labeler, Recipe, build_labeler, register_recipe  # noqa: F401
from .recipe import UnsamLabeler, UnsamSettings  # noqa: F401
from .runner import run  # noqa: F401
