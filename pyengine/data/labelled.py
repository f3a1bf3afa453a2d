"""Labelled text: classification data from CSV/JSONL files (bad lines reported with their line
numbers, then skipped or refused), and the embedded default classification task.
"""

from __future__ import annotations

import ast
import csv
import functools
import io
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class LabelledData:
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    problems: list[str] = field(default_factory=list)  # "file:line: reason" for skipped lines

    def counts(self) -> list[int]:
        out = [0] * len(self.label_names)
        for y in self.labels:
            out[y] += 1
        return out


class DataFileError(ValueError):
    """A data file with bad lines (and on_error='raise'); `problems` lists them all.

    `describe(hint)` words the advice for the caller: the command line names its flag."""

    def __init__(self, path, problems: list[str], skippable: bool = True) -> None:
        self.path, self.problems, self.skippable = path, problems, skippable
        super().__init__(self.describe("on_error='skip'"))

    def describe(self, hint: str) -> str:
        head = "\n  ".join(self.problems[:20])
        n = len(self.problems)
        more = f"\n  ... and {n - 20} more" if n > 20 else ""
        advice = f"; pass {hint} to skip them" if self.skippable else ""
        return f"{self.path}: {n} bad line(s){advice}:\n  {head}{more}"


def _decoded_lines(path: Path, problems: list[str]) -> list[tuple[int, str]]:
    out = []
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{path}:{number}: invalid UTF-8 at byte {exc.start}")
            continue
        out.append((number, text.rstrip("\r")))
    return out


FORMATS = ("csv", "tsv", "jsonl", "json", "txt")


def _jsonl_rows(path, lines, text_field, label_field, problems):
    rows = []
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: invalid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path}:{number}: expected a JSON object, got "
                            f"{type(record).__name__}")
            continue
        rows.append((number, record.get(text_field), record.get(label_field)))
    return rows


def _txt_rows(path, lines, problems):
    """`label<TAB>text` lines, or fastText's `__label__<label> text`."""
    rows = []
    for number, line in lines:
        if not line.strip():
            continue
        if line.startswith("__label__"):
            label, _, text = line[len("__label__"):].partition(" ")
        elif "\t" in line:
            label, _, text = line.partition("\t")
        else:
            problems.append(f"{path}:{number}: expected 'label<TAB>text' or "
                            "'__label__<label> text'")
            continue
        rows.append((number, text, label))
    return rows


def _csv_rows(path, lines, text_field, label_field, problems, delimiter):
    """Rows of a CSV/TSV file with a header; a row the csv module cannot read (a field over
    its size limit, say) is a bad line like any other."""
    numbers = [n for n, _ in lines]
    reader = csv.reader(io.StringIO("\n".join(t for _, t in lines)), delimiter=delimiter)
    header, rows, consumed = None, [], 0
    while True:
        start = numbers[consumed] if consumed < len(numbers) else (numbers or [0])[-1]
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            consumed = reader.line_num
            kind = "TSV" if delimiter == "\t" else "CSV"
            problems.append(f"{path}:{start}: unreadable {kind} row ({exc})")
            continue
        consumed = reader.line_num
        if header is None:
            header = row
            for name in (text_field, label_field):
                if name not in header:
                    raise DataFileError(path, [f"{path}:{start}: header has no column "
                                               f"{name!r} (columns: {header})"], False)
            ti, li = header.index(text_field), header.index(label_field)
            continue
        if not row:
            continue
        if len(row) != len(header):
            problems.append(f"{path}:{start}: expected {len(header)} fields, got {len(row)}")
            continue
        rows.append((start, row[ti], row[li]))
    return rows


def load_labelled(path: str | os.PathLike, text_field: str = "text", label_field: str = "label",
                  labels: list[str] | None = None, on_error: str = "raise",
                  format: str | None = None) -> LabelledData:
    """Read (text, label) examples from a .csv / .tsv (with a header row), .jsonl or .txt file
(`label<TAB>text` or fastText's `__label__<label> text` per line).

    labels: the known label names (their order gives the class ids); a label outside them is a
    bad line. Without it the classes are the sorted distinct labels found. Bad lines (invalid
    UTF-8, unparsable JSON/CSV row, missing or empty text/label, unknown label) are reported
    as "file:line: reason": on_error="raise" raises DataFileError listing them all,
    on_error="skip" skips them and returns them in `problems`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    fmt = format or path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: format must be one of {FORMATS} (by the file's suffix), "
                         f"got {fmt!r}")
    problems: list[str] = []
    lines = _decoded_lines(path, problems)
    if fmt in ("jsonl", "json"):
        rows = _jsonl_rows(path, lines, text_field, label_field, problems)
    elif fmt == "txt":
        rows = _txt_rows(path, lines, problems)
    else:
        rows = _csv_rows(path, lines, text_field, label_field, problems,
                         "\t" if fmt == "tsv" else ",")
    known = {name: i for i, name in enumerate(labels)} if labels is not None else None
    good: list[tuple[str, str]] = []
    for number, text, label in rows:
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{path}:{number}: missing or empty {text_field!r}")
            continue
        if label is None or (isinstance(label, str) and not label.strip()):
            problems.append(f"{path}:{number}: missing label {label_field!r}")
            continue
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            problems.append(f"{path}:{number}: label must be a string or int, got {label!r}")
            continue
        label = str(label).strip()
        if known is not None and label not in known:
            problems.append(f"{path}:{number}: unknown label {label!r} (known: {labels})")
            continue
        good.append((text, label))
    problems.sort(key=lambda p: int(p.split(":")[-2]) if p.split(":")[-2].isdigit() else 0)
    if problems and on_error == "raise":
        raise DataFileError(path, problems)
    names = list(labels) if labels is not None else sorted({lab for _, lab in good})
    index = {name: i for i, name in enumerate(names)}
    if not good:
        raise DataFileError(path, problems or [f"{path}: no examples"])
    return LabelledData([t for t, _ in good], [index[lab] for _, lab in good], names, problems)


# ------------------------------------------------------------------------------------------
# the embedded default classification task

TASK_LABELS = ["code", "docstring", "docs"]


@functools.lru_cache(maxsize=4)
def _stdlib_pieces(max_files: int, snippet_lines: int) -> tuple[tuple[str, ...], ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())[:max_files]
    code, docstrings = [], []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        doc_lines: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                body = getattr(node, "body", [])
                if body and isinstance(body[0], ast.Expr) and isinstance(
                        getattr(body[0], "value", None), ast.Constant) and isinstance(
                        body[0].value.value, str):
                    expr = body[0]
                    doc_lines.update(range(expr.lineno, (expr.end_lineno or expr.lineno) + 1))
                    text = ast.get_docstring(node)
                    if text and len(text) > 20:
                        docstrings.append(text)
        lines = source.split("\n")
        block: list[str] = []
        for number, line in enumerate(lines, start=1):
            if number in doc_lines or not line.strip() or line.lstrip().startswith("#"):
                if len(block) >= 2:
                    code.append("\n".join(block))
                block = []
                continue
            block.append(line)
            if len(block) == snippet_lines:
                code.append("\n".join(block))
                block = []
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            if len(para.strip()) > 40 and not para.startswith("   "):
                docs.append(para.strip())
    return tuple(code), tuple(docstrings), tuple(docs)


def default_classification_task(max_examples: int = 2000, seed: int = 0, max_files: int = 40,
                                snippet_lines: int = 6, max_chars: int = 400) -> LabelledData:
    """Which kind of text a snippet comes from: "code" (standard-library Python source),
    "docstring" (its docstrings) or "docs" (pydoc_data help-topic prose).

    Read at run time from the Python installation (the first `max_files` top-level stdlib
    modules, sorted by name, and pydoc_data). Each class keeps its natural share of the
    available snippets, so the task is imbalanced (code dominates, prose docs are rarest);
    `max_examples` caps the total, drawn with a seeded generator. Snippets are cut to
    `max_chars` characters.
    """
    pieces = _stdlib_pieces(max_files, snippet_lines)
    total = sum(len(p) for p in pieces)
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for label, group in enumerate(pieces):
        take = min(len(group), max(1, round(max_examples * len(group) / total)))
        for j in torch.randperm(len(group), generator=g)[:take].tolist():
            texts.append(group[j][:max_chars])
            labels.append(label)
    order = torch.randperm(len(texts), generator=g).tolist()
    return LabelledData([texts[i] for i in order], [labels[i] for i in order], list(TASK_LABELS))
