"""Text cleaning and normalisation: Unicode NFKC, control characters, whitespace, duplicate
lines, optional lower-casing."""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


def remove_control_chars(text: str, keep: str = "\n\t") -> str:
    """Drop Unicode control/format characters (category C*) except those in `keep`."""
    return "".join(ch for ch in text if ch in keep or not unicodedata.category(ch).startswith("C"))


def normalize_whitespace(text: str) -> str:
    """Runs of spaces/tabs -> one space, trailing spaces stripped, >2 blank lines -> 1 blank."""
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip("\n")


def dedupe_lines(text: str, keep_blank: bool = True) -> str:
    """Keep the first occurrence of every line (blank lines kept unless keep_blank=False)."""
    seen: set[str] = set()
    out = []
    for line in text.split("\n"):
        if not line.strip():
            if keep_blank:
                out.append(line)
            continue
        if line not in seen:
            seen.add(line)
            out.append(line)
    return "\n".join(out)


def clean_text(text: str, nfkc: bool = True, control: bool = True, whitespace: bool = True,
               dedupe: bool = False, lower: bool = False) -> str:
    """The cleaning pipeline in a fixed order: NFKC, control characters, whitespace, lower-case,
    duplicate lines (each step optional)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    if control:
        text = remove_control_chars(text)
    if whitespace:
        text = normalize_whitespace(text)
    if lower:
        text = text.lower()
    if dedupe:
        text = dedupe_lines(text)
    return text
