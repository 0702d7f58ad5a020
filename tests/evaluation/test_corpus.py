"""The offline evaluation text: which paragraphs the cleaner keeps, and that the default source is stable."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from cumulo.errors import InvalidRequest
from cumulo.evaluation.corpus import _seal, clean_topics, from_file, python_docs

TOPIC = """The "assert" statement
**********************

Assert statements are a convenient way to insert debugging assertions
into a program:

   assert_stmt ::= "assert" expression ["," expression]

The simple form, "assert expression", is equivalent to

   if __debug__:
       if not expression: raise AssertionError

Too short to keep.

>>> assert 1 == 1, "this example line has many words in it."

these equivalences start in lower case, which marks a fragment rather than a sentence.
"""


def test_cleaning_keeps_prose_and_unwraps_its_lines() -> None:
    text = clean_topics({"assert": TOPIC})
    assert text.split("\n\n") == [
        "Assert statements are a convenient way to insert debugging assertions into a program:",
    ]


def test_cleaning_drops_headings_grammar_code_examples_and_fragments() -> None:
    text = clean_topics({"assert": TOPIC})
    for dropped in ("*****", "::=", "__debug__", ">>>", "Too short", "equivalent to", "lower case"):
        assert dropped not in text


def test_cleaning_orders_topics_by_key_and_separates_paragraphs_by_a_blank_line() -> None:
    topics = {
        "zeta": "Zeta comes last in the sorted order of topics.\n",
        "alpha": "Alpha comes first in the sorted order of topics.\n\nA second paragraph of the alpha topic.",
    }
    assert clean_topics(topics) == (
        "Alpha comes first in the sorted order of topics.\n\n"
        "A second paragraph of the alpha topic.\n\n"
        "Zeta comes last in the sorted order of topics."
    )


def test_default_corpus_is_long_english_prose_named_by_python_version_and_hash() -> None:
    corpus = python_docs()
    assert platform.python_version() in corpus.source and "pydoc_data/topics.py" in corpus.source
    assert corpus.sha256 == _seal(corpus.text)
    assert len(corpus.text) > 50_000  # room for the default 4096 tokens several times over
    assert corpus.text.count(" the ") > 1000
    assert ">>>" not in corpus.text and "::=" not in corpus.text


def test_default_corpus_is_the_same_on_every_call() -> None:
    assert python_docs() == python_docs()


def test_a_text_file_is_used_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("  Some text,\n  kept verbatim.\n", encoding="utf-8")
    corpus = from_file(path)
    assert corpus.text == "  Some text,\n  kept verbatim.\n"
    assert corpus.source == str(path)


@pytest.mark.parametrize("content", [None, b"", b"\xff\xfe\xfa not utf-8"])
def test_a_missing_empty_or_undecodable_text_file_is_a_clear_error(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidRequest, match=str(path)):
        from_file(path)
