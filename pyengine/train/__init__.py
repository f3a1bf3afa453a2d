"""Training: Trainer, callbacks and schedules, losses, metrics, loggers, checkpoints."""

from pyengine.train import metrics
from pyengine.train.callbacks import Callback, EarlyStopping, reduce_on_plateau, warmup_cosine
from pyengine.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyengine.train.losses import make_loss
from pyengine.train.trainer import Trainer, load_model, save_model

__all__ = [
    "Callback", "CheckpointError", "EarlyStopping", "Trainer", "load_checkpoint", "load_model",
    "make_loss", "metrics", "reduce_on_plateau", "save_checkpoint", "save_model",
    "warmup_cosine",
]
