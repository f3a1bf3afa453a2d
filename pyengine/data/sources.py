"""Where the commands' data comes from, by name: an embedded corpus ("default", "stdlib"), a
file (plain text, or JSONL with a text field, for language models; CSV/TSV/JSONL/TXT for
classification) or a Hugging Face dataset ("hf:NAME[:CONFIG][:SPLIT]", when `datasets` is
installed). Bad lines are reported as `file:line: reason`, then refused or skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyengine.data.cleaning import clean_text
from pyengine.data.corpus import embedded_corpus
from pyengine.data.labelled import (
    DataFileError,
    LabelledData,
    default_classification_task,
    load_labelled,
)

EMBEDDED_SOURCES = {"default": "embedded default (pydoc_data help topics)",
                    "stdlib": "embedded stdlib (standard-library Python source)"}
HF_PREFIX = "hf:"


def load_hf_dataset(spec: str):
    """`hf:NAME[:CONFIG][:SPLIT]` -> a `datasets.Dataset` (split "train" by default)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data {spec!r} is a Hugging Face dataset, which needs the "
                         "'datasets' package: pip install datasets") from None
    parts = spec[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"a Hugging Face dataset is written hf:NAME[:CONFIG][:SPLIT], got "
                         f"{spec!r}")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001  (datasets raises many types)
        raise ValueError(f"cannot load {spec!r}: {type(exc).__name__}: {exc}") from None


def _hf_column(dataset, field: str, spec: str) -> list:
    if field not in dataset.column_names:
        raise ValueError(f"{spec}: no column {field!r} (columns: {dataset.column_names})")
    return list(dataset[field])


def _file_lines(path: Path, problems: list[str]) -> list[tuple[int, str]]:
    lines = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            problems.append(f"{path}:{number}: invalid UTF-8 at byte {exc.start}")
    return lines


def _jsonl_texts(path: Path, lines, field: str, problems: list[str]) -> list[str]:
    texts = []
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: invalid JSON ({exc.msg})")
            continue
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            problems.append(f"{path}:{number}: no string field {field!r}")
            continue
        texts.append(text)
    return texts


def read_text(source: str | None, *, max_chars: int | None = None, on_error: str = "raise",
              text_field: str = "text", clean: bool = False, lower: bool = False,
              dedupe: bool = False) -> tuple[str, str]:
    """(text, description) of a language-model corpus: an embedded one (None -> "default"),
    a text file, a JSONL file (one document per line in `text_field`) or an hf: dataset's
    `text_field` column (documents joined by newlines); cut to max_chars, cleaned as asked.
    Skipped bad lines are printed; with on_error="raise" they raise DataFileError."""
    name = source or "default"
    if name in EMBEDDED_SOURCES:
        text, description = embedded_corpus(name, max_chars), EMBEDDED_SOURCES[name]
    elif name.startswith(HF_PREFIX):
        dataset = load_hf_dataset(name)
        text = "\n".join(str(t) for t in _hf_column(dataset, text_field, name))
        description = f"Hugging Face dataset {name[len(HF_PREFIX):]}"
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        problems: list[str] = []
        lines = _file_lines(path, problems)
        if path.suffix.lower() in (".jsonl", ".json"):
            text = "\n".join(_jsonl_texts(path, lines, text_field, problems))
        else:
            text = "\n".join(line for _, line in lines)
        if problems and on_error != "skip":
            raise DataFileError(path, problems)
        for problem in problems:
            print(f"skipped {problem}")
        description = str(path)
    if max_chars:
        text = text[:max_chars]
    if clean or lower or dedupe:
        text = clean_text(text, dedupe=dedupe, lower=lower)
    return text, description


def read_labelled(source: str | None, *, text_field: str = "text", label_field: str = "label",
                  labels: list[str] | None = None, on_error: str = "raise",
                  max_examples: int = 2000, seed: int = 0) -> tuple[LabelledData, str]:
    """(examples, description) of a classification task: the embedded one (None or
    "default"), a CSV/TSV/JSONL/TXT file or an hf: dataset's text and label columns."""
    if source in (None, "", "default"):
        return default_classification_task(max_examples, seed=seed), (
            "embedded default task (stdlib code / docstring / help prose)")
    if source.startswith(HF_PREFIX):
        dataset = load_hf_dataset(source)
        texts = [str(t) for t in _hf_column(dataset, text_field, source)]
        raw = _hf_column(dataset, label_field, source)
        feature = dataset.features.get(label_field)
        names = list(getattr(feature, "names", None) or [])
        if names:  # a ClassLabel column: ids with names
            raw = [names[int(y)] for y in raw]
        found = [str(y) for y in raw]
        label_names = list(labels) if labels else sorted(set(found))
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise ValueError(f"{source}: labels {unknown[:10]} are not among {label_names}")
        return LabelledData(texts, [index[y] for y in found], label_names), (
            f"Hugging Face dataset {source[len(HF_PREFIX):]}")
    data = load_labelled(source, text_field, label_field, labels, on_error)
    for problem in data.problems:
        print(f"skipped {problem}")
    return data, str(source)
