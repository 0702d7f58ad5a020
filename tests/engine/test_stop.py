"""StopChecker: stop strings across pieces, held-back prefixes, include/exclude, release on finish."""

from __future__ import annotations

from cumulo.engine.stop import StopChecker


def stream(checker: StopChecker, pieces: list[str]) -> tuple[list[str], str | None]:
    """Feed pieces until a stop; returns what was emitted per piece and the stop found."""
    emitted = []
    for piece in pieces:
        out, hit = checker.feed(piece)
        emitted.append(out)
        if hit:
            return emitted, hit
    return emitted, None


def test_no_stop_strings_passes_text_straight_through():
    checker = StopChecker([])
    assert stream(checker, ["Hel", "lo"]) == (["Hel", "lo"], None)
    assert checker.flush() == ""
    assert checker.text == "Hello"


def test_stop_string_inside_one_piece_trims_it_and_what_follows():
    checker = StopChecker(["END"])
    emitted, hit = stream(checker, ["one ", "two END three"])
    assert hit == "END"
    assert "".join(emitted) == "one two " == checker.text


def test_stop_string_spanning_pieces_is_found_and_never_partly_emitted():
    checker = StopChecker(["</answer>"])
    emitted, hit = stream(checker, ["42 <", "/ans", "wer>", " more"])
    assert hit == "</answer>"
    assert emitted == ["42 ", "", ""]
    assert checker.text == "42 "


def test_held_prefix_is_released_once_it_can_no_longer_be_a_stop():
    checker = StopChecker(["</answer>"])
    assert checker.feed("a </an") == ("a ", None)
    assert checker.feed("d b") == ("</and b", None)
    assert checker.text == "a </and b"


def test_held_prefix_is_released_on_finish():
    checker = StopChecker(["STOP"])
    emitted, hit = stream(checker, ["go ", "ST"])
    assert hit is None and emitted == ["go ", ""]
    assert checker.flush() == "ST"
    assert checker.text == "go ST"


def test_include_stop_str_in_output_keeps_the_stop_and_nothing_after():
    checker = StopChecker(["\n\n"], include_stop_str_in_output=True)
    emitted, hit = stream(checker, ["para\n", "\nnext"])
    assert hit == "\n\n"
    assert "".join(emitted) == "para\n\n" == checker.text


def test_the_earliest_of_several_stops_wins():
    checker = StopChecker(["world", "lo w", "xyz"])
    emitted, hit = stream(checker, ["hel", "lo world"])
    assert hit == "lo w"
    assert "".join(emitted) == "hel"


def test_a_stop_that_extends_a_held_prefix_of_another_stop_is_found():
    # "ab" is held as a possible start of "abc"; "bd" then completes inside the held text plus new text.
    checker = StopChecker(["abc", "bd"])
    emitted, hit = stream(checker, ["xab", "d"])
    assert hit == "bd"
    assert "".join(emitted) == "xa"


def test_nothing_is_emitted_after_a_stop_even_on_flush():
    checker = StopChecker(["."])
    checker.feed("done. extra")
    assert checker.feed("more") == ("", ".")
    assert checker.flush() == ""
    assert checker.text == "done"


def test_empty_stop_strings_are_ignored():
    checker = StopChecker([""])
    assert checker.feed("text") == ("text", None)


def test_character_by_character_streaming_matches_whole_text():
    text = "The answer is 7.\nUser: thanks"
    checker = StopChecker(["\nUser:", "Assistant:"])
    emitted, hit = stream(checker, list(text))
    assert hit == "\nUser:"
    assert "".join(emitted) == "The answer is 7."
    # No emitted piece ever ends with part of the stop string that followed.
    assert all("\n" not in piece for piece in emitted)
