"""Training engine: the detectron2 trainer, the training model and the training hooks."""

from .train_model import UnSAMTrain, build_train_model
from .trainer import Trainer, setup_config

__all__ = ["Trainer", "setup_config", "UnSAMTrain", "build_train_model"]
