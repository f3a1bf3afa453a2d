"""Data: the embedded corpora, tokenizers, cleaning, datasets and truncated-BPTT batching."""

from pyengine.data.cleaning import clean_text, dedupe_lines, normalize_whitespace
from pyengine.data.corpus import (
    EMBEDDED_CORPORA,
    batchify,
    default_corpus,
    embedded_corpus,
    iterate_bptt,
    python_source_corpus,
)
from pyengine.data.datasets import (
    ClassificationDataset,
    LanguageModelDataset,
    augment_tokens,
    class_weights,
    collate,
    resample,
    train_val_test_split,
)
from pyengine.data.labelled import (
    DataFileError,
    LabelledData,
    default_classification_task,
    load_labelled,
)
from pyengine.data.text_tokenizers import (
    BPETokenizer,
    CharTokenizer,
    HFTokenizer,
    tokenizer_from_dict,
)
from pyengine.data.tokenizers import ByteTokenizer

__all__ = [
    "BPETokenizer", "ByteTokenizer", "CharTokenizer", "ClassificationDataset", "DataFileError",
    "HFTokenizer",
    "LabelledData", "clean_text", "dedupe_lines", "default_classification_task",
    "load_labelled", "normalize_whitespace",
    "LanguageModelDataset", "augment_tokens", "batchify", "class_weights", "collate",
    "default_corpus", "EMBEDDED_CORPORA", "embedded_corpus", "iterate_bptt",
    "python_source_corpus", "resample", "tokenizer_from_dict", "train_val_test_split",
]
