"""Training: Trainer, callbacks and schedules, losses, metrics, loggers, checkpoints."""

from pyengine.models.loss_terms import LossTerms
from pyengine.train import metrics
from pyengine.train.callbacks import Callback, EarlyStopping
from pyengine.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)
from pyengine.train.loggers import (
    ConsoleLogger,
    JSONLLogger,
    Logger,
    MLflowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from pyengine.train.losses import make_loss
from pyengine.train.rundir import OutputDirError, claim_output_dir
from pyengine.train.schedules import (
    SCHEDULES,
    make_schedule,
    reduce_on_plateau,
    warmup_constant,
    warmup_cosine,
    warmup_linear,
)
from pyengine.train.trainer import Trainer

__all__ = [
    "Callback", "CheckpointError", "ConsoleLogger", "EarlyStopping", "JSONLLogger", "Logger",
    "LossTerms", "MLflowLogger", "OutputDirError", "SCHEDULES", "TensorBoardLogger", "Trainer",
    "WandbLogger", "claim_output_dir", "load_checkpoint", "load_model", "make_loss",
    "make_schedule", "metrics", "reduce_on_plateau", "save_checkpoint", "save_model",
    "warmup_constant", "warmup_cosine", "warmup_linear",
]
