"""The running-example models."""

from pyengine.models.classifier import LSTMClassifier
from pyengine.models.distillation import Distillation
from pyengine.models.ensemble import LogitEnsemble
from pyengine.models.language_model import LSTMLanguageModel

__all__ = ["Distillation", "LSTMClassifier", "LSTMLanguageModel", "LogitEnsemble"]
