"""Tokenizer from GGUF metadata and from HF folders, checked against transformers' tokenizers."""

import json

import gguf
import pytest
from tiny_gguf import random_state_dict, tiny_vocab, write_gguf

from slimserve import assets
from slimserve.errors import CheckpointError
from slimserve.models.gguf import read_gguf
from slimserve.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "  multiple   spaces\t\ttabs\n\n\nnewlines ",
    "12345 + 67.89 = 1e10, 3.14159",
    "héllo wörld — naïve café, Ünïcödé",
    "日本語のテキストと한국어",
    "emoji 😀👍🏽🇫🇷 and a family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # comment\n\tif x != 0: pass",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_end|>b<|endoftext|>c<repo_name>d",
    "don't I'll we've THEY'RE",
    "",
    " ",
    "\u00a0non-breaking\u2003em space",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and émoji 😀?"},
    ],
]
MULTIBYTE = "naïve 😀👍🏽 日本語 café ü 👨‍👩‍👧"


@pytest.fixture(scope="module")
def smollm_path():
    return assets.fetch("smollm2-135m")


@pytest.fixture(scope="module")
def ours(smollm_path):
    return Tokenizer.from_gguf(read_gguf(smollm_path))


@pytest.fixture(scope="module")
def reference(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


def assert_same_as_reference(ours: Tokenizer, reference) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text).input_ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text
    for messages in CONVERSATIONS:
        for generate in (True, False):
            expected = reference.apply_chat_template(messages, add_generation_prompt=generate, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=generate) == expected


@pytest.mark.real_model
def test_smollm2_gguf_tokenizer_matches_transformers(ours, reference):
    assert_same_as_reference(ours, reference)
    assert ours.decode(ours.encode("<|im_start|>hi"), skip_special_tokens=True) == "hi"
    assert (ours.bos_token_id, ours.eos_token_ids) == (reference.bos_token_id, {reference.eos_token_id})
    assert ours.vocab_size == 49152
    assert ours.encode("hello")[0] != ours.bos_token_id  # SmolLM2's GGUF says add_bos_token = false


@pytest.mark.real_model
def test_encode_corpus_encodes_blank_line_pieces(ours):
    pieces = ["Mr. Speaker,\n\n", "\n", "The state of our Union is strong. 1990\n\n", MULTIBYTE]
    ids = ours.encode_corpus("".join(pieces))
    assert ids == [i for piece in pieces for i in ours.encode(piece, add_special_tokens=False)]
    assert ours.decode(ids) == "".join(pieces)
    assert ids != ours.encode("".join(pieces), add_special_tokens=False)  # one call merges across the cuts


@pytest.mark.real_model
def test_decode_stream_concatenates_to_decode(ours):
    ids = ours.encode(MULTIBYTE + "<|im_end|>")
    stream = ours.decode_stream()
    pieces = [stream.step(token_id) for token_id in ids]
    assert "".join(pieces) == ours.decode(ids) == MULTIBYTE
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some ids end inside a character and must wait for the next


@pytest.mark.real_model
def test_from_pretrained_folder_saved_by_transformers(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = Tokenizer.from_pretrained(tmp_path)
    assert_same_as_reference(ours, reference)
    assert ours.eos_token_ids == {2, 0} and ours.bos_token_id == 1 and ours.vocab_size == 49152

    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    with_bos = Tokenizer.from_pretrained(tmp_path)
    assert with_bos.encode("hi") == [1] + ours.encode("hi")
    assert with_bos.encode("hi", add_special_tokens=False) == ours.encode("hi")


@pytest.mark.parametrize("pre", ["default", "gpt-2", "qwen2", "llama-bpe"])
def test_tiny_gguf_matches_transformers(tmp_path, pre):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "t.gguf", "llama", random_state_dict("llama"), pre=pre)
    ours = Tokenizer.from_gguf(read_gguf(path))
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + ["the world 12345 1212 the theorem"]:
        ids = reference(text).input_ids
        assert ours.encode(text) == ids, (pre, text)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_smollm_splits_every_digit(tmp_path):
    """llama.cpp's "smollm" pre-tokenizer isolates digits, so the merge "1 2" never applies.

    transformers' GGUF converter uses GPT-2's split here; on SmolLM2's vocabulary, which has no
    digit merges, both agree (the real-model test checks that)."""
    tokens = tiny_vocab()[0]
    tokenizers = {}
    for pre in ("smollm", "default"):
        path = write_gguf(tmp_path / f"{pre}.gguf", "llama", random_state_dict("llama"), pre=pre)
        tokenizers[pre] = Tokenizer.from_gguf(read_gguf(path))
    assert tokenizers["smollm"].encode("12") == [tokens.index("1"), tokens.index("2")]
    assert tokenizers["default"].encode("12") == [tokens.index("12")]


@pytest.mark.parametrize(
    "add_bos, pre, expected",
    [(True, "smollm", True), (False, "llama-bpe", False), (None, "llama-bpe", True), (None, "smollm", False)],
)
def test_bos_follows_the_file(tmp_path, add_bos, pre, expected):
    path = write_gguf(tmp_path / "t.gguf", "llama", random_state_dict("llama"), pre=pre, add_bos=add_bos)
    tokenizer = Tokenizer.from_gguf(read_gguf(path))
    assert (tokenizer.encode("the")[0] == tokenizer.bos_token_id) is expected
    assert tokenizer.encode("the", add_special_tokens=False)[0] != tokenizer.bos_token_id


def test_stream_waits_for_complete_characters(tmp_path):
    # the tiny vocabulary spells most non-ASCII text byte by byte
    path = write_gguf(tmp_path / "t.gguf", "llama", random_state_dict("llama"))
    tokenizer = Tokenizer.from_gguf(read_gguf(path))
    ids = tokenizer.encode("a😀b")
    stream = tokenizer.decode_stream()
    assert [stream.step(i) for i in ids] == ["a", "", "", "", "😀", "b"]


def test_chat_template_errors(tmp_path):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ bos_token }}{{ messages[0]['content'] | tojson }}"
    )
    path = write_gguf(tmp_path / "t.gguf", "llama", random_state_dict("llama"), chat_template=template)
    tokenizer = Tokenizer.from_gguf(read_gguf(path))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "é<b>"}]) == '<|im_start|>"é<b>"'
    with pytest.raises(ValueError, match="first message must be from the user"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}])
    # the sandbox refuses to reach Python internals through the messages
    with pytest.raises(ValueError, match="unsafe"):
        Tokenizer.from_gguf(read_gguf(write_gguf(tmp_path / "evil.gguf", "llama", random_state_dict("llama"),
            chat_template="{{ messages.__class__.__mro__ }}"))).apply_chat_template([])  # fmt: skip

    path = write_gguf(tmp_path / "none.gguf", "llama", random_state_dict("llama"), chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_gguf(read_gguf(path)).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("tokenizer.ggml.model", "llama", "tokenizer model 'llama' is not supported"),
        ("tokenizer.ggml.pre", "deepseek-llm", "pre-tokenizer 'deepseek-llm' is not supported"),
    ],
)
def test_unsupported_tokenizers_raise(tmp_path, key, value, match):
    path = write_gguf(tmp_path / "t.gguf", "llama", random_state_dict("llama"))
    gguf_file = read_gguf(path)
    gguf_file.tokenizer_metadata[key] = value
    with pytest.raises(CheckpointError, match=match):
        Tokenizer.from_gguf(gguf_file)


def test_corrupt_merges_raise(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", "llama", random_state_dict("llama"))
    gguf_file = read_gguf(path)
    gguf_file.tokenizer_metadata["tokenizer.ggml.merges"][2] = "Ġt hé"  # "Ġthé" is not a token
    with pytest.raises(CheckpointError, match="merges") as error:
        Tokenizer.from_gguf(gguf_file)
    assert str(path) in str(error.value)


def test_missing_tokens_raise(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", "llama", random_state_dict("llama"))
    gguf_file = read_gguf(path)
    del gguf_file.tokenizer_metadata["tokenizer.ggml.tokens"]
    with pytest.raises(CheckpointError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf(gguf_file)


def test_gguf_value_types_are_plain_python(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", "llama", random_state_dict("llama"))
    meta = read_gguf(path).tokenizer_metadata
    assert type(meta["tokenizer.ggml.bos_token_id"]) is int and type(meta["tokenizer.ggml.tokens"][0]) is str
    assert meta["tokenizer.ggml.token_type"][:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL]
