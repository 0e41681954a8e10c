"""The tokenizer of a GGUF model, with the special tokens and BOS/EOS behaviour the GGUF itself names.

transformers' GGUF tokenizer converter (4.57) gets a GGUF's tokenizer wrong around its edges: it makes
`tokens[bos_token_id]` the EOS token as well as the BOS token, and for a GPT-2 style (byte-level BPE)
vocabulary in a llama-architecture GGUF (SmolLM2) it builds a SentencePiece-style decoder (ByteFallback,
Fuse, Replace "▁" before ByteLevel) and a post-processor that prepends BOS to every text, whatever the
GGUF says. Its vocabulary, merges and special-token list are right, so they are kept, and the rest is
taken from the GGUF's own `tokenizer.ggml.*` fields:

- special tokens: `bos_token_id`, `eos_token_id`, `padding_token_id`, `unknown_token_id`;
- `add_bos_token` / `add_eos_token`: a post-processor that adds exactly those (llama.cpp's defaults when
  a field is absent: BOS for SentencePiece `llama` vocabularies and Llama-3 style `gpt2` ones, else none);
- `tokenizer.ggml.model` `gpt2` (byte-level BPE): a plain ByteLevel decoder, no normalizer, no byte
  fallback; `tokenizer.ggml.pre` of the GPT-2-regex-with-single-digits family (smollm, starcoder, ...)
  also splits digits one by one, as llama.cpp does. Other `pre` values keep transformers' pre-tokenizer.
  `llama` (SentencePiece) keeps transformers' decoder, which is already the SentencePiece one;
- `tokenizer.chat_template`.

`load_gguf_tokenizer(path, converted)` returns the corrected tokenizer (a `PreTrainedTokenizerFast`);
`tokenizer_source_facts(source, tokenizer)` is what the manifest records as `tokenizer.source_facts`
(with `"facts_from": "gguf"`, the mark of a bundle made since this fix), and what `ortft validate`
compares the bundle's tokenizer with.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

FACTS_FROM_GGUF = "gguf"
FACTS_FROM_TOKENIZER_FILES = "tokenizer files"

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED ones are added tokens.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# `tokenizer.ggml.pre` values whose llama.cpp pre-tokenizer is "\p{N}" (one digit per piece) followed
# by GPT-2's regex (llama-vocab.cpp); transformers' converter omits the digit split.
SINGLE_DIGIT_GPT2_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"})
# `gpt2` vocabularies to which llama.cpp adds BOS when the GGUF has no add_bos_token field.
BOS_BY_DEFAULT_PRE = frozenset({"llama3", "llama-v3", "llama-bpe"})


@dataclass(frozen=True)
class GGUFTokenizerFacts:
    """The `tokenizer.ggml.*` fields of one GGUF file that decide special tokens and BOS/EOS behaviour."""

    model: str
    pre: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    defaulted: tuple[str, ...]  # flags the GGUF leaves out (llama.cpp's defaults apply)

    def token(self, token_id: int | None) -> str | None:
        return self.tokens[token_id] if token_id is not None and 0 <= token_id < len(self.tokens) else None

    def manifest_section(self) -> dict:
        """What the manifest records as `tokenizer.source_facts` for a GGUF source."""
        return {
            "facts_from": FACTS_FROM_GGUF,
            "tokenizer_model": self.model,
            "pre_tokenizer": self.pre,
            "bos_token_id": self.bos_token_id,
            "bos_token": self.token(self.bos_token_id),
            "eos_token_id": self.eos_token_id,
            "eos_token": self.token(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "defaulted": list(self.defaulted),
        }


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _token_id(value, count: int, key: str, path: Path) -> int | None:
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < count:
        raise ModelError(f"{path}: {key} = {value} is outside the vocabulary of {count} tokens",
                         hint="the GGUF file is damaged or was converted wrongly; convert it again")
    return value


@functools.lru_cache(maxsize=4)
def _read_facts(path: str, _size: int, _mtime_ns: int) -> GGUFTokenizerFacts:
    import gguf

    where = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where}: cannot read the GGUF header: {exc}", hint="check that the file is a complete GGUF") from exc
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not isinstance(model, str) or not tokens:
        raise ModelError(f"{where} holds no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)",
                         hint="use a GGUF converted with its tokenizer (llama.cpp's convert_hf_to_gguf.py writes one)")
    pre = _field(reader, "tokenizer.ggml.pre")
    count = len(tokens)
    ids = {role: _token_id(_field(reader, f"tokenizer.ggml.{key}"), count, f"tokenizer.ggml.{key}", where)
           for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                             ("unk", "unknown_token_id"))}
    add_bos, add_eos = _field(reader, "tokenizer.ggml.add_bos_token"), _field(reader, "tokenizer.ggml.add_eos_token")
    defaulted = tuple(name for name, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)) if value is None)
    if add_bos is None:
        add_bos = model == "llama" or (model == "gpt2" and pre in BOS_BY_DEFAULT_PRE)
    template = _field(reader, "tokenizer.chat_template")
    return GGUFTokenizerFacts(
        model=model, pre=pre if isinstance(pre, str) else None, tokens=tuple(tokens),
        token_types=tuple(int(t) for t in (_field(reader, "tokenizer.ggml.token_type") or ())),
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], unk_token_id=ids["unk"],
        add_bos_token=bool(add_bos), add_eos_token=bool(add_eos), chat_template=template if isinstance(template, str) else None,
        defaulted=defaulted,
    )


def read_facts(path: Path | str) -> GGUFTokenizerFacts:
    """The tokenizer facts of a GGUF file (read once per file version; the header parse takes ~2 s for SmolLM2)."""
    path = Path(path)
    stat = path.stat()
    return _read_facts(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _template_processor(facts: GGUFTokenizerFacts):
    """A post-processor adding the BOS/EOS the GGUF asks for, or None when it asks for neither."""
    from tokenizers import processors

    bos = facts.token(facts.bos_token_id) if facts.add_bos_token else None
    eos = facts.token(facts.eos_token_id) if facts.add_eos_token else None
    if bos is None and eos is None:
        return None
    first = [f"{bos}:0"] if bos else []
    last = [f"{eos}:0"] if eos else []
    second = [f"{bos}:1"] if bos else []
    last_b = [f"{eos}:1"] if eos else []
    specials = [(token, token_id) for token, token_id in ((bos, facts.bos_token_id), (eos, facts.eos_token_id)) if token]
    return processors.TemplateProcessing(
        single=" ".join([*first, "$A:0", *last]),
        pair=" ".join([*first, "$A:0", *last, *second, "$B:1", *last_b]),
        special_tokens=list(dict.fromkeys(specials)),
    )


def _backend(converted_backend, facts: GGUFTokenizerFacts):
    """transformers' tokenizers.Tokenizer with the GGUF's decoder, post-processor and added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors

    state = json.loads(converted_backend.to_str())
    if facts.model == "gpt2":
        # Byte-level BPE covers every byte: no unknown token, no byte fallback, no SentencePiece normalizer.
        state["model"].update(unk_token=None, fuse_unk=False, byte_fallback=False)
        state["normalizer"] = None
    state["post_processor"] = None
    backend = Tokenizer.from_str(json.dumps(state))
    if facts.model == "gpt2":
        if facts.pre in SINGLE_DIGIT_GPT2_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ])
        backend.decoder = decoders.ByteLevel()
    processor = _template_processor(facts)
    if processor is not None:
        backend.post_processor = processor
    elif facts.model == "gpt2":
        backend.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only, as GPT-2's own
    special = [AddedToken(token, normalized=False, special=True)
               for token, kind in zip(facts.tokens, facts.token_types) if kind == TOKEN_TYPE_CONTROL]
    for token_id in (facts.bos_token_id, facts.eos_token_id, facts.pad_token_id):
        if facts.token(token_id) is not None:
            special.append(AddedToken(facts.token(token_id), normalized=False, special=True))
    backend.add_special_tokens(special)  # already-known tokens keep their ids
    backend.add_tokens([AddedToken(token, normalized=False, special=False)
                        for token, kind in zip(facts.tokens, facts.token_types) if kind == TOKEN_TYPE_USER_DEFINED])
    return backend


def load_gguf_tokenizer(path: Path | str, converted):
    """A `PreTrainedTokenizerFast` built from `converted` (transformers' tokenizer of the GGUF at `path`)
    and the GGUF's own tokenizer facts; saved, it is what the bundle's tokenizer folder holds."""
    from transformers import PreTrainedTokenizerFast

    facts = read_facts(path)
    backend = _backend(converted.backend_tokenizer, facts)
    for role, token_id in (("bos", facts.bos_token_id), ("eos", facts.eos_token_id), ("pad", facts.pad_token_id)):
        if token_id is not None and backend.token_to_id(facts.tokens[token_id]) != token_id:
            raise ModelError(
                f"{path}: the {role} token {facts.tokens[token_id]!r} (id {token_id}) has another id in the converted vocabulary",
                hint="the GGUF's token list has duplicates; convert the model to GGUF again",
            )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=facts.token(facts.bos_token_id),
        eos_token=facts.token(facts.eos_token_id),
        pad_token=facts.token(facts.pad_token_id),
        unk_token=facts.token(facts.unk_token_id),
        add_bos_token=facts.add_bos_token,
        add_eos_token=facts.add_eos_token,
        clean_up_tokenization_spaces=False,  # decode gives back exactly the text that was encoded
        chat_template=facts.chat_template or getattr(converted, "chat_template", None),
        model_max_length=converted.model_max_length,
    )
    tokenizer.add_bos_token = facts.add_bos_token
    tokenizer.add_eos_token = facts.add_eos_token
    return tokenizer


def _adds(backend, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    with_specials = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    edge = 0 if first else -1
    return len(with_specials) > len(plain) and with_specials[edge] == token_id


def tokenizer_source_facts(source, tokenizer) -> dict:
    """The manifest's `tokenizer.source_facts`: the GGUF's own fields for a GGUF source, else the ids and
    BOS/EOS behaviour of the Hugging Face folder's tokenizer files (which the bundle keeps as they are)."""
    if source.gguf_file:
        return read_facts(Path(source.folder) / source.gguf_file).manifest_section()
    backend = tokenizer.backend_tokenizer
    return {
        "facts_from": FACTS_FROM_TOKENIZER_FILES,
        "bos_token_id": tokenizer.bos_token_id,
        "bos_token": tokenizer.bos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "eos_token": tokenizer.eos_token,
        "pad_token_id": tokenizer.pad_token_id,
        "add_bos_token": _adds(backend, tokenizer.bos_token_id, first=True),
        "add_eos_token": _adds(backend, tokenizer.eos_token_id, first=False),
    }
