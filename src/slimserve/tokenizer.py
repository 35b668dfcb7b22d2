"""Text <-> token ids through HF `tokenizers`, built from a GGUF file or an HF folder, plus chat templates.

Chat templates come with checkpoints, i.e. from strangers: they render in Jinja's immutable sandbox,
with transformers' settings (trim_blocks, lstrip_blocks, raise_exception, tojson) so output matches.
"""

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from slimserve.errors import CheckpointError
from slimserve.models.gguf import GGUFFile

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split llama.cpp's llama-vocab.cpp applies before byte-level BPE
_PRE_TOKENIZER_REGEX = {
    "default": [_GPT2_REGEX],
    "gpt-2": [_GPT2_REGEX],
    "smollm": [r"\p{N}", _GPT2_REGEX],  # every digit alone, then GPT-2's split
    "qwen2": [_QWEN2_REGEX],
    "llama-bpe": [_LLAMA3_REGEX],
}
_ADD_BOS_BY_PRE = {"llama-bpe"}  # llama.cpp's default for files without tokenizer.ggml.add_bos_token
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get only complete UTF-8 text back."""

    def __init__(self, backend: tokenizers.Tokenizer, skip_special_tokens: bool):
        self._backend = backend
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """The text this token completes; "" while it ends inside a multi-byte character."""
        return self._stream.step(self._backend, token_id) or ""


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        chat_template: str | None,
    ):
        """eos_token_ids[0] is the model's own EOS (the template's `eos_token`); others also end generation."""
        self._backend = backend
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids: set[int] = set(eos_token_ids)
        self.bos_token = None if bos_token_id is None else backend.id_to_token(bos_token_id)
        self.eos_token = backend.id_to_token(eos_token_ids[0]) if eos_token_ids else None
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> "Tokenizer":
        meta, path = gguf_file.tokenizer_metadata, gguf_file.path
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            supported = "'gpt2' (byte-level BPE)"
            raise CheckpointError(f"{path}: tokenizer model {model!r} is not supported; supported: {supported}")
        pre = meta.get("tokenizer.ggml.pre", "default")  # llama.cpp reads a missing value as "default"
        if pre not in _PRE_TOKENIZER_REGEX:
            supported = ", ".join(_PRE_TOKENIZER_REGEX)
            raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: {supported}")
        tokens, token_types, merges = _gguf_vocabulary(meta, path)
        backend = _byte_level_bpe(tokens, token_types, merges, pre)

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is not None and not (type(value) is int and 0 <= value < len(tokens)):
                raise CheckpointError(f"{path}: tokenizer.ggml.{key} = {value!r} is outside the vocabulary")
            return value

        bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
        bos_added = bos_id if meta.get("tokenizer.ggml.add_bos_token", pre in _ADD_BOS_BY_PRE) else None
        eos_added = eos_id if meta.get("tokenizer.ggml.add_eos_token", False) else None
        backend.post_processor = _special_tokens_template(backend, bos_added, eos_added)
        eos_ids = [i for i in (eos_id, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
        return cls(backend, len(tokens), bos_id, list(dict.fromkeys(eos_ids)), meta.get("tokenizer.chat_template"))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Tokenizer":
        """An HF tokenizer folder: tokenizer.json, tokenizer_config.json, optional generation_config.json."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")

        def token_id(key: str) -> int | None:
            token = config.get(key)
            token = token["content"] if isinstance(token, dict) else token  # older files: a serialized AddedToken
            if token is not None and backend.token_to_id(token) is None:
                raise CheckpointError(f"{folder}: tokenizer_config.json {key} {token!r} is not in the vocabulary")
            return None if token is None else backend.token_to_id(token)

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        if "add_bos_token" in config or "add_eos_token" in config:
            bos_added = bos_id if config.get("add_bos_token") else None
            eos_added = eos_id if config.get("add_eos_token") else None
            backend.post_processor = _special_tokens_template(backend, bos_added, eos_added)
        generation_eos = _read_json(folder / "generation_config.json").get("eos_token_id", [])
        eos_ids = [eos_id] if eos_id is not None else []
        eos_ids += generation_eos if isinstance(generation_eos, list) else [generation_eos]
        if not all(type(i) is int and backend.id_to_token(i) is not None for i in eos_ids):
            raise CheckpointError(f"{folder}: generation_config.json eos_token_id {generation_eos!r} is not a token id")
        template_file = folder / "chat_template.jinja"
        chat_template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if isinstance(chat_template, list):  # older files: a list of named templates
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        return cls(backend, vocab_size, bos_id, list(dict.fromkeys(eos_ids)), chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special-token text such as "<|im_start|>" maps to its id; BOS is added only if the model asks for it."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_corpus(self, text: str) -> list[int]:
        """A long text's token ids, without special tokens, encoded in pieces cut after blank lines.

        The tokenizers library encodes the pieces on every core, and one call over a whole corpus
        is slow besides: the 9.6 MB sotu-calib text takes 9.7 s as one call on 2 cores, 3.7 s in
        pieces. The ids differ from one call's only where a token would span a cut; they decode to
        the same text.
        """
        pieces = re.split(r"(?<=\n\n)", text)
        return [i for e in self._backend.encode_batch(pieces, add_special_tokens=False) for i in e.ids]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self._backend, skip_special_tokens)

    @cached_property
    def _template(self) -> jinja2.Template:
        return _jinja_env().from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt (completions) instead")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:  # raise_exception() in the template, or a template that does not parse
            raise ValueError(f"chat template failed on these messages: {e}") from e


def _gguf_vocabulary(meta: dict, path: Path) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """(tokens, token types, merge pairs) from tokenizer.ggml.*, checked to be consistent."""
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise CheckpointError(f"{path} lacks tokenizer metadata key {key!r}")
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    token_types = meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    well_formed = (
        all(isinstance(v, list) for v in (tokens, merges, token_types))
        and len(token_types) == len(tokens)
        and all(isinstance(t, str) for t in tokens)
        and all(isinstance(m, str) and " " in m[1:] for m in merges)
    )
    if not well_formed:
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens/token_type/merges are malformed")
    # llama.cpp splits a merge at the first space after its first character
    pairs = [(m[: m.find(" ", 1)], m[m.find(" ", 1) + 1 :]) for m in merges]
    known = set(tokens)
    if not all(a in known and b in known and a + b in known for a, b in pairs):
        raise CheckpointError(f"{path}: tokenizer.ggml.merges names tokens that are not in the vocabulary")
    return tokens, token_types, pairs


def _byte_level_bpe(
    tokens: list[str], token_types: list[int], pairs: list[tuple[str, str]], pre: str
) -> tokenizers.Tokenizer:
    """llama.cpp's "gpt2" tokenizer model: BPE over GPT-2's byte alphabet, after a regex split."""
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(BPE(vocab, pairs, ignore_merges=pre == "llama-bpe"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_TOKENIZER_REGEX[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>) and user-defined ones (<think>) are matched whole in the text
    typed = list(zip(tokens, token_types))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == _USER_DEFINED])
    return backend


def _special_tokens_template(backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None):
    """Post-processor adding BOS in front and EOS behind when the model asks for them."""
    bos = [] if bos_id is None else [(backend.id_to_token(bos_id), bos_id)]
    eos = [] if eos_id is None else [(backend.id_to_token(eos_id), eos_id)]
    single = [t for t, _ in bos] + ["$A"] + [t for t, _ in eos]
    pair = single + ["$B:1"] + [t for t, _ in eos]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=bos + eos)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which transformers' does not
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
