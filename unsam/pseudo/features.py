"""The pseudo-label engine's feature backends; they live in :mod:`unsam.features` (shared with the
data pipeline) and keep this import path."""

from ..features import (  # noqa: F401
    DEFAULT_DINO_ARCH,
    DINO_ARCHS,
    ClassicalFeatures,
    DenseFeatures,
    DinoFeatures,
    FeatureError,
    build_features,
    dino_pos_embed,
    grid_size,
    l2_normalize,
    load_dino_state_dict,
)
