"""Training: configuration, loss, schedule, EMA, checkpoints, distributed runs, the loop.

:class:`Trainer` builds a run and runs its loop; the loop's parts are the run directory
(:class:`RunDirectory`), the train state (:class:`TrainState`), batches with their graphs
(:mod:`.data`) and callbacks (:class:`Callback`: logging, checkpoints, time budget, stop
signals, plots; pass your own with ``Trainer(config, callbacks=[...])``).
"""

from .callbacks import Callback, StepResult, StopRequest
from .config import ConfigError, DataSource, OptimConfig, RunConfig, TrainConfig, load_config
from .data import TrainingBatch
from .errors import TrainingDiverged, TrainingInterrupted
from .run import RunDirectory, RunDirectoryError
from .state import TrainState
from .trainer import Trainer

__all__ = [
    "Callback",
    "ConfigError",
    "DataSource",
    "OptimConfig",
    "RunConfig",
    "RunDirectory",
    "RunDirectoryError",
    "StepResult",
    "StopRequest",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingBatch",
    "TrainingDiverged",
    "TrainingInterrupted",
    "load_config",
]
