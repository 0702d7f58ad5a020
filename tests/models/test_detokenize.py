"""Streaming detokenization: deltas never carry broken UTF-8 and add up to the full decode."""

from __future__ import annotations

from cumulo.models.detokenize import IncrementalDetokenizer
from cumulo.models.tokenizer import from_directory, from_gguf_metadata

MIXED = [
    "한국어 문장을 토큰으로 나눕니다.",
    "中文句子也要分词。你好，世界！",
    "Emoji 🙂🚀 and €≠∞ symbols",
    "mixed 안녕 你好 🙂 end",
]


def _stream(tokenizer, ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detok.push([i]) for i in ids]
    deltas.append(detok.flush())
    return deltas


def test_cjk_hangul_and_emoji_stream_token_by_token_without_broken_characters(tiny_tokenizer_dir):
    tokenizer = from_directory(tiny_tokenizer_dir)
    for text in MIXED:
        ids = tokenizer.encode(text, add_special_tokens=False)
        # The tiny vocabulary cuts characters into bytes, so some tokens alone are not valid UTF-8.
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids), text
        deltas = _stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in delta for delta in deltas)


def test_special_tokens_are_skipped_or_kept_as_asked(tiny_tokenizer_dir):
    tokenizer = from_directory(tiny_tokenizer_dir)
    ids = tokenizer.encode("안녕<|im_end|>", add_special_tokens=False)
    assert "".join(_stream(tokenizer, ids)) == "안녕"
    assert "".join(_stream(tokenizer, ids, skip_special_tokens=False)) == "안녕<|im_end|>"


def test_sentencepiece_spaces_and_byte_fallback_stream_like_the_full_decode():
    pieces = ["\u2581", "h", "i", "hi", "\u2581hi"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": True,
    }
    tokenizer = from_gguf_metadata(meta)
    text = "hi hi 안녕 🙂 hi"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.token_to_id("<0xF0>") in ids  # the emoji comes as four byte tokens
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert deltas[1] == " hi"  # the second word keeps its space although decoded alone it would lose it


def test_pushing_several_ids_at_once_gives_the_same_text(tiny_tokenizer_dir):
    tokenizer = from_directory(tiny_tokenizer_dir)
    ids = tokenizer.encode(MIXED[3], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(ids[i : i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert text == MIXED[3] == detok.text


def test_an_unfinished_character_is_held_back_until_flush(tiny_tokenizer_dir):
    tokenizer = from_directory(tiny_tokenizer_dir)
    emoji_bytes = [tokenizer.token_to_id(t) for t in ("ð", "Ł")]  # first two bytes of a 4-byte emoji
    assert None not in emoji_bytes
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(tokenizer.encode("ok ", add_special_tokens=False)) == "ok "
    assert detok.push(emoji_bytes) == ""
    assert detok.flush() == "\ufffd"
