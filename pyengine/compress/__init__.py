"""Model compression: int8 quantization (pyengine.quantize), structured pruning (pyengine.prune),
and model fusion (checkpoint averaging, logit ensembles). The distillation loss is
pyengine.nn.LinearDistillationLoss (pyengine.ops.linear_distillation_loss)."""

from pyengine.compress.average import average_checkpoints, average_weights
from pyengine.compress.prune import PruneSchedule, prune
from pyengine.compress.quantize import quantize
from pyengine.models.ensemble import LogitEnsemble

__all__ = ["LogitEnsemble", "PruneSchedule", "average_checkpoints", "average_weights", "prune",
           "quantize"]
