"""Unsupervised divide-and-conquer pseudo labels (``python -m unsam.pseudo``).

``features`` (dense patch features: classical / DINO) → ``divide`` (MaskCut) → ``conquer``
(threshold-hierarchy merging) → ``refine`` (superpixel snapping, boundary score) → ``engine``
(per-image pipeline and batch runner writing SA-1B JSON). ``evaluate`` scores the labels against
COCO ground truth. Nothing here needs the model or the trainer.
"""
from .engine import EngineConfig, PseudoLabeler, run  # noqa: F401
from ..features import ClassicalFeatures, DenseFeatures, DinoFeatures, FeatureError, build_features  # noqa: F401
