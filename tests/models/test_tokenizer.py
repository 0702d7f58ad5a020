"""Tokenizers built from GGUF metadata (byte-level BPE and SentencePiece) and from tokenizer.json, and chat
templates rendered in Jinja's sandbox."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as Backend

from cumulo.errors import InvalidModel, InvalidRequest
from cumulo.models.chat import GEMMA_TEMPLATE, render_chat
from cumulo.models.tokenizer import from_directory, from_gguf_metadata

TEXTS = [
    "Hello world! The quick brown fox.",
    "안녕하세요, 세계!",
    "你好，世界。",
    "Emoji 🙂🚀 €≠∞",
    "  two  spaces\n\nand\tabs",
]


def _meta(tok: dict, **overrides) -> dict:
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": tok["model"],
        "tokenizer.ggml.pre": tok["pre"],
        "tokenizer.ggml.tokens": tok["tokens"],
        "tokenizer.ggml.token_type": tok["types"],
        "tokenizer.ggml.merges": tok["merges"],
        "tokenizer.ggml.bos_token_id": tok["bos"],
        "tokenizer.ggml.eos_token_id": tok["eos"],
        "tokenizer.ggml.add_bos_token": False,
    }
    meta.update(overrides)
    return meta


def test_byte_level_gguf_tokenizer_encodes_like_the_tokenizer_json_it_came_from(
    tiny_gguf_tokenizer, tiny_tokenizer_dir
):
    reference = Backend.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    tokenizer = from_gguf_metadata(_meta(tiny_gguf_tokenizer))
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text).ids, text
        assert tokenizer.decode(ids) == text


def test_control_tokens_encode_whole_and_are_skipped_on_decode(tiny_gguf_tokenizer):
    tokenizer = from_gguf_metadata(_meta(tiny_gguf_tokenizer))
    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("<|im_start|>user\nHello<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    assert tokenizer.decode(ids) == "user\nHello"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHello<|im_end|>"
    assert end in tokenizer.eos_token_ids and tiny_gguf_tokenizer["eos"] in tokenizer.eos_token_ids
    assert tokenizer.vocab_size == len(tiny_gguf_tokenizer["tokens"])


def test_add_bos_token_prepends_bos_once_and_only_with_special_tokens(tiny_gguf_tokenizer):
    tokenizer = from_gguf_metadata(_meta(tiny_gguf_tokenizer, **{"tokenizer.ggml.add_bos_token": True}))
    bos = tiny_gguf_tokenizer["bos"]
    assert tokenizer.encode("Hello")[0] == bos
    assert tokenizer.encode("<|im_start|>Hello").count(bos) == 1
    assert bos not in tokenizer.encode("Hello", add_special_tokens=False)


def test_smollm_pre_tokenizer_splits_every_digit(tiny_gguf_tokenizer):
    gpt2 = from_gguf_metadata(_meta(tiny_gguf_tokenizer))
    smollm = from_gguf_metadata(_meta(tiny_gguf_tokenizer, **{"tokenizer.ggml.pre": "smollm"}))
    assert len(gpt2.encode("12345")) < 5  # the tiny vocabulary learned multi-digit tokens
    assert [smollm.decode([i]) for i in smollm.encode("12345")] == ["1", "2", "3", "4", "5"]


# -- SentencePiece-style ("llama") vocabularies --------------------------------------------------------------
def _spm_meta(add_space_prefix: bool = True, arch: str = "llama") -> dict:
    pieces = [
        "\u2581",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "hell",
        "hello",
        "\u2581hello",
        "or",
        "\u2581w",
        "\u2581wor",
        "ld",
        "\u2581world",
        "  ",
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    # Later pieces score lower, except the whole words, which score best once reachable.
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 1) + [4]
    return {
        "general.architecture": arch,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def test_sentencepiece_vocabulary_merges_into_whole_words_with_a_leading_space():
    tokenizer = from_gguf_metadata(_spm_meta())
    ids = tokenizer.encode("hello world")
    assert ids == [1, tokenizer.token_to_id("\u2581hello"), tokenizer.token_to_id("\u2581world")]
    assert tokenizer.decode(ids) == "hello world"
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == {2}


def test_sentencepiece_without_space_prefix_does_not_invent_one():
    tokenizer = from_gguf_metadata(_spm_meta(add_space_prefix=False))
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    assert ids == [tokenizer.token_to_id("hello"), tokenizer.token_to_id("\u2581world")]
    assert tokenizer.decode(ids) == "hello world"


def test_sentencepiece_falls_back_to_bytes_for_unknown_characters():
    tokenizer = from_gguf_metadata(_spm_meta())
    ids = tokenizer.encode("hé", add_special_tokens=False)
    assert tokenizer.token_to_id("<0xC3>") in ids and tokenizer.token_to_id("<0xA9>") in ids
    assert tokenizer.decode(ids) == "hé"


def test_gemma_runs_of_spaces_stored_as_spaces_are_reached_by_merges_not_new_ids():
    meta = _spm_meta(add_space_prefix=False, arch="gemma3")
    meta["tokenizer.ggml.tokens"][-1] = "  "  # Gemma files spell multi-space tokens with real spaces
    tokenizer = from_gguf_metadata(meta)
    assert tokenizer.vocab_size == len(meta["tokenizer.ggml.tokens"])
    ids = tokenizer.encode("he  ll", add_special_tokens=False)
    assert len(meta["tokenizer.ggml.tokens"]) - 1 in ids
    assert tokenizer.decode(ids) == "he  ll"


def test_gguf_without_vocabulary_or_with_an_unknown_model_is_invalid():
    with pytest.raises(InvalidModel, match="vocabulary"):
        from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(InvalidModel, match="rwkv"):
        from_gguf_metadata({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})


# -- tokenizer.json directories and chat templates -----------------------------------------------------------
def test_directory_tokenizer_reads_template_and_special_tokens_from_tokenizer_config(tiny_tokenizer_dir):
    tokenizer = from_directory(tiny_tokenizer_dir)
    assert tokenizer.bos_token_id == tokenizer.token_to_id("<|im_start|>")
    assert {
        tokenizer.token_to_id("<|endoftext|>"),
        tokenizer.token_to_id("<|im_end|>"),
    } <= tokenizer.eos_token_ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "안녕"}])
    assert prompt == "<|im_start|>user\n안녕<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids.count(tokenizer.token_to_id("<|im_start|>")) == 2


def test_directory_without_tokenizer_json_is_invalid(tmp_path):
    with pytest.raises(InvalidModel, match="tokenizer.json"):
        from_directory(tmp_path)


def test_template_raise_exception_becomes_an_invalid_request():
    template = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('first message must be from the user') }}{% endif %}"
    )
    with pytest.raises(InvalidRequest, match="first message must be from the user"):
        render_chat(template, [{"role": "assistant", "content": "hi"}])


def test_template_helpers_strftime_now_and_tojson_keep_text_readable():
    out = render_chat(
        "{{ strftime_now('%Y') }} {{ messages[0] | tojson }}", [{"role": "user", "content": "한국"}]
    )
    year, payload = out.split(" ", 1)
    assert year.isdigit() and len(year) == 4
    assert payload == '{"role": "user", "content": "한국"}'


def test_model_without_template_cannot_chat_and_a_broken_template_is_reported():
    with pytest.raises(InvalidRequest, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest, match="does not parse"):
        render_chat("{% for %}", [{"role": "user", "content": "hi"}])


def test_template_cannot_reach_python_internals():
    with pytest.raises(InvalidRequest, match="unsafe"):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])


def test_gemma_fallback_template_writes_gemma_turns():
    out = render_chat(
        GEMMA_TEMPLATE,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        bos_token="<bos>",
    )
    assert out == (
        "<bos><start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_eos_token_in_templates_is_the_files_own_eos_not_an_end_of_turn_token(tiny_gguf_tokenizer):
    meta = _meta(
        tiny_gguf_tokenizer,
        **{"tokenizer.ggml.eos_token_id": tiny_gguf_tokenizer["tokens"].index("<|im_end|>")},
    )
    tokenizer = from_gguf_metadata(meta)
    assert tokenizer.eos_token == "<|im_end|>"  # although <|endoftext|> has the smaller id
    assert tokenizer.token_to_id("<|endoftext|>") in tokenizer.eos_token_ids


def test_llama3_and_qwen2_pre_tokenizers_group_digits_their_own_way(tiny_gguf_tokenizer):
    llama3 = from_gguf_metadata(_meta(tiny_gguf_tokenizer, **{"tokenizer.ggml.pre": "llama-bpe"}))
    qwen2 = from_gguf_metadata(_meta(tiny_gguf_tokenizer, **{"tokenizer.ggml.pre": "qwen2"}))
    text = "1234567 apples"
    llama_pieces = [llama3.decode([i]) for i in llama3.encode(text)]
    assert "".join(llama_pieces) == text
    assert all(len(piece) <= 3 for piece in llama_pieces if piece.isdigit())  # at most three digits per token
    assert [qwen2.decode([i]) for i in qwen2.encode("12345")] == ["1", "2", "3", "4", "5"]
