"""Model compression: int8 quantization (pyengine.quantize), structured pruning (pyengine.prune)."""

from pyengine.compress.prune import PruneSchedule, prune
from pyengine.compress.quantize import quantize

__all__ = ["PruneSchedule", "prune", "quantize"]
