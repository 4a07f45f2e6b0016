"""The training engine: run configs, the Trainer (one loop for all methods), losses and checkpoints."""

from mola.engine.config import OptimConfig, RunConfig, TrainConfig, load_config
from mola.engine.evaluate import evaluate, format_table
from mola.engine.run import LoadedRun, load_run
from mola.engine.selection import NonFiniteError, NonFiniteMetricError
from mola.engine.single_task import fit_single_task
from mola.engine.trainer import NonFiniteLossError, Trainer

__all__ = ["LoadedRun", "NonFiniteError", "NonFiniteLossError", "NonFiniteMetricError", "OptimConfig", "RunConfig",
           "TrainConfig", "Trainer", "evaluate", "fit_single_task", "format_table", "load_config", "load_run"]
