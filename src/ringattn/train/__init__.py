"""Training: config, data, trainer, checkpoints, metrics. The ``ringattn train`` command is
:func:`ringattn.train.cli.train_main` (not imported here: launched workers import this
package, and ``python -m ringattn.train.cli`` must not find its module pre-imported)."""

from ringattn.train.config import Config, load_config
from ringattn.train.data import IGNORE, Batch, RetrievalTask, TextData
from ringattn.train.trainer import Trainer

__all__ = [
    "IGNORE",
    "Batch",
    "Config",
    "RetrievalTask",
    "TextData",
    "Trainer",
    "load_config",
]
