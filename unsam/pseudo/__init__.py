"""Unsupervised divide-and-conquer pseudo labels (``python -m unsam.pseudo``).

Dense patch features (:mod:`unsam.features`: classical / DINO) → ``divide`` (MaskCut) →
``conquer`` (threshold-hierarchy merging) → ``refine`` (superpixel snapping, boundary score) →
``candidates`` (filter, rank, hierarchy → SA-1B annotations). ``classical`` and ``recipe`` are
the two per-image recipes, ``config`` their settings, ``engine`` the batch runner writing SA-1B
JSON; ``evaluate`` scores the labels against COCO ground truth. Nothing here needs the model or
the trainer.
"""
from ..features import ClassicalFeatures, DenseFeatures, DinoFeatures, FeatureError, build_features  # noqa: F401
from .engine import EngineConfig, PseudoLabeler, run  # noqa: F401
