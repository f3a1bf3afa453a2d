"""The running-example models."""

from pyengine.models.language_model import LSTMLanguageModel

__all__ = ["LSTMLanguageModel"]
