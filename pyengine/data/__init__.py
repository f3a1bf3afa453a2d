"""Data: the embedded default corpus, tokenizers, and truncated-BPTT batching."""

from pyengine.data.corpus import batchify, default_corpus, iterate_bptt
from pyengine.data.tokenizers import ByteTokenizer

__all__ = ["ByteTokenizer", "batchify", "default_corpus", "iterate_bptt"]
