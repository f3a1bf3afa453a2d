"""Model compression: int8 quantization (pyengine.quantize)."""

from pyengine.compress.quantize import quantize

__all__ = ["quantize"]
