"""The English text that perplexity is measured on, available offline on every machine that runs Python.

Default source: the reference-manual prose that CPython ships in `pydoc_data/topics.py` (the text behind
`help("if")`, `help("assert")`, ...; part of every CPython install, PSF-licensed). It holds the language
reference's sections as plain text with reStructuredText leftovers: section underlines, indented grammar rules
and code samples. Cleaning keeps prose only, so the score measures English, not Python:

1. topics in sorted key order, each split into paragraphs at blank lines;
2. a paragraph is kept when its first line is not indented (indented blocks are code, grammar or examples),
   it starts with an uppercase letter, ends with "." or ":", has at least 6 words, and holds no `>>>` or `::=`;
   lines of a single repeated punctuation mark (section underlines) are dropped first;
3. a kept paragraph's hard line breaks and runs of spaces become single spaces; paragraphs are joined by
   a blank line ("\\n\\n").

The text depends on the Python version (CPython edits its docs between releases), so a `Corpus` carries the
version and the sha256 of the cleaned text: two perplexities are comparable only when their sources match.
"""

from __future__ import annotations

import hashlib
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from cumulo.errors import InvalidRequest

_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")
_SPACES = re.compile(r"\s+")
_MIN_WORDS = 6


@dataclass(frozen=True, slots=True)
class Corpus:
    text: str
    source: str  # human-readable name, e.g. "CPython 3.11.7 pydoc_data/topics.py (prose)"
    sha256: str  # of `text`, "sha256:<hex>"


def _seal(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_prose(paragraph: str) -> bool:
    first = paragraph.split("\n", 1)[0]
    if not first or first[0].isspace():
        return False
    flat = _SPACES.sub(" ", paragraph).strip()
    if ">>>" in flat or "::=" in flat:
        return False
    return flat[0].isupper() and flat[-1] in ".:" and len(flat.split(" ")) >= _MIN_WORDS


def clean_topics(topics: dict[str, str]) -> str:
    """Prose paragraphs of pydoc topics, by the rules in this module's docstring."""
    kept: list[str] = []
    for key in sorted(topics):
        lines = [line for line in topics[key].splitlines() if not _UNDERLINE.match(line)]
        for paragraph in re.split(r"\n\s*\n", "\n".join(lines)):
            paragraph = paragraph.strip("\n")
            if _is_prose(paragraph):
                kept.append(_SPACES.sub(" ", paragraph).strip())
    return "\n\n".join(kept)


def python_docs() -> Corpus:
    """The default corpus: cleaned prose of this interpreter's `pydoc_data.topics`."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; the user can still bring a text
        raise InvalidRequest("this Python lacks pydoc_data.topics; pass a text file with --text") from None
    text = clean_topics(topics)
    return Corpus(text, f"CPython {platform.python_version()} pydoc_data/topics.py (prose)", _seal(text))


def from_file(path: str | Path) -> Corpus:
    """A user's UTF-8 text file, used as it is."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequest(f"text file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read {file} as UTF-8 text: {exc}") from None
    if not text.strip():
        raise InvalidRequest(f"text file {file} is empty")
    return Corpus(text, str(file), _seal(text))


def calibration_docs() -> Corpus:
    """Calibration text for error-compensating rounding: the second half of `python_docs()`'s paragraphs,
    less any paragraph that also occurs in the first half (the reference manual repeats some verbatim).

    `cumulo eval ppl` scores the first 4096 tokens of `python_docs()` by default (under a fifth of its first
    half), so a format calibrated on this text is never scored on the text it was fitted to.
    """
    paragraphs = python_docs().text.split("\n\n")
    middle = len(paragraphs) // 2
    first_half = set(paragraphs[:middle])
    text = "\n\n".join(p for p in paragraphs[middle:] if p not in first_half)
    return Corpus(
        text, f"CPython {platform.python_version()} pydoc_data/topics.py (prose, 2nd half)", _seal(text)
    )
