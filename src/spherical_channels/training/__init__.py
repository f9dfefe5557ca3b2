"""Training: configuration, loss, schedule, EMA, checkpoints, distributed runs, the loop."""

from .config import ConfigError, DataSource, OptimConfig, RunConfig, TrainConfig, load_config
from .trainer import Trainer, TrainingDiverged

__all__ = ["ConfigError", "DataSource", "OptimConfig", "RunConfig", "TrainConfig", "Trainer", "TrainingDiverged", "load_config"]
