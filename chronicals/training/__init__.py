"""The training loop and what surrounds it: data to steps, checkpoints, activation offloading, metrics, and the
process-group helpers that keep it ready for torchrun."""

from .build import SetupError
from .dataset import DataError
from .trainer import ChronicalsTrainer, NonFiniteError, TrainResult

__all__ = ["ChronicalsTrainer", "DataError", "NonFiniteError", "SetupError", "TrainResult"]
