"""Training engine: the detectron2 trainer and its hooks."""
from .trainer import Trainer, setup_config

__all__ = ["Trainer", "setup_config"]
