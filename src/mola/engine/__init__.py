"""The training engine: run configs, the Trainer (one loop for all methods), losses and checkpoints."""

from mola.engine.config import OptimConfig, RunConfig, TrainConfig, load_config
from mola.engine.single_task import fit_single_task
from mola.engine.trainer import NonFiniteLossError, Trainer, format_table

__all__ = ["NonFiniteLossError", "OptimConfig", "RunConfig", "TrainConfig", "Trainer", "fit_single_task",
           "format_table", "load_config"]
