"""The `tokenizer.ggml.*` metadata of a GGUF export, made from the bundle's tokenizer.json (and, when the bundle
came from a GGUF, the facts prepare recorded from it).

Byte-level BPE vocabularies (GPT-2 style: SmolLM2, Qwen2, ...) are written as llama.cpp's `gpt2` tokenizer:
tokens by id (padded to the model's vocabulary size with unused `[PADn]` tokens, as llama.cpp's converter
does), their types (added special tokens are CONTROL, other added tokens USER_DEFINED), the merges, the
special token ids, whether BOS/EOS are added, the chat template, and `tokenizer.ggml.pre`: the one the
source GGUF named, else the pre-tokenizer recognised from tokenizer.json. SentencePiece vocabularies are
not written (their scores are not in tokenizer.json). Device side: JSON and the `tokenizers` package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import TOKENIZER_DIR, BundleManifest
from .errors import BundleError

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType
GPT2_REGEX_WITH_DIGITS = "\\p{N}"  # the Split SmolLM2/StarCoder put before ByteLevel: one digit per piece


@dataclass
class GGUFVocab:
    """What a GGUF file says about its tokenizer."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, pad, unk
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for role, token_id in self.special_ids.items():
            getattr(writer, f"add_{role}_token_id")(int(token_id))
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def gguf_vocab(bundle_dir: Path, manifest: dict, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer metadata of the bundle's tokenizer, for a model with `vocab_size` embedding rows."""
    section = BundleManifest.of(manifest).tokenizer
    folder = Path(bundle_dir) / section.get("dir", TOKENIZER_DIR)
    state = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    facts = section.get("source_facts") or {}
    model = state.get("model") or {}
    if model.get("type") != "BPE" or not _has_byte_level(state.get("pre_tokenizer")) or facts.get("tokenizer_model") not in (None, "gpt2"):
        raise BundleError("GGUF export writes byte-level BPE (GPT-2 style) tokenizers only; this bundle's is another kind",
                          hint="use --format merged-onnx or peft (llama.cpp's convert_hf_to_gguf.py converts a PEFT export's merged model)")
    tokens = _tokens_by_id(model["vocab"], state.get("added_tokens") or [], vocab_size)
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model.get("merges") or []]
    specials = _special_ids(manifest, facts)
    add_bos, add_eos = _adds_specials(folder, facts, specials)
    template_file = folder / "chat_template.jinja"
    return GGUFVocab(
        pre=facts.get("pre_tokenizer") or pre_tokenizer_name(state.get("pre_tokenizer")),
        tokens=[text for text, _type in tokens], token_types=[kind for _text, kind in tokens], merges=merges,
        special_ids=specials, add_bos=add_bos, add_eos=add_eos,
        chat_template=template_file.read_text(encoding="utf-8") if template_file.is_file() else None,
    )


def _has_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(item) for item in pre_tokenizer.get("pretokenizers") or [])


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer it can tell: GPT-2's regex alone
    (`gpt-2`), or one digit per piece before it (`smollm`, the same rules as `starcoder`); else `default`."""
    if not pre_tokenizer:
        return "default"
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    items = pre_tokenizer.get("pretokenizers") or []
    if pre_tokenizer.get("type") == "Sequence" and len(items) == 2 and items[1].get("type") == "ByteLevel" and items[1].get("use_regex", True):
        first = items[0]
        single_digits = (first.get("type") == "Digits" and first.get("individual_digits")) or (
            first.get("type") == "Split" and (first.get("pattern") or {}).get("Regex") == GPT2_REGEX_WITH_DIGITS)
        if single_digits:
            return "smollm"
    return "default"


def _tokens_by_id(vocab: dict[str, int], added: list[dict], vocab_size: int) -> list[tuple[str, int]]:
    by_id: dict[int, tuple[str, int]] = {int(token_id): (text, TOKEN_NORMAL) for text, token_id in vocab.items()}
    for token in added:
        by_id[int(token["id"])] = (token["content"], TOKEN_CONTROL if token.get("special") else TOKEN_USER_DEFINED)
    count = max(vocab_size, max(by_id, default=-1) + 1)
    if count > vocab_size:
        raise BundleError(f"the tokenizer has ids up to {count - 1}, beyond the model's {vocab_size} embedding rows",
                          hint="prepare the bundle again")
    return [by_id.get(index, (f"[PAD{index}]", TOKEN_UNUSED)) for index in range(count)]


def _special_ids(manifest: dict, facts: dict) -> dict[str, int]:
    model = BundleManifest.of(manifest).model
    eos_ids = model.get("eos_token_ids") or []
    candidates = {
        "bos": facts.get("bos_token_id", model.get("bos_token_id")),
        "eos": facts.get("eos_token_id") if facts.get("eos_token_id") is not None else (eos_ids[0] if eos_ids else None),
        "pad": facts.get("pad_token_id", model.get("pad_token_id")),
    }
    return {role: int(token_id) for role, token_id in candidates.items() if token_id is not None}


def _adds_specials(folder: Path, facts: dict, specials: dict[str, int]) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS first / EOS last: the source GGUF's flags, else what tokenizer.json does."""
    if "add_bos_token" in facts and "add_eos_token" in facts:
        return bool(facts["add_bos_token"]), bool(facts["add_eos_token"])
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    added = len(full) > len(plain)
    return (added and full[0] == specials.get("bos")), (added and full[-1] == specials.get("eos"))
