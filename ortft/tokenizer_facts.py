"""Does a bundle's tokenizer keep its source model's special tokens? Checks for `validate`, notes for `train`/`generate`.

`ortft prepare` records where the tokenizer's facts come from in `manifest["tokenizer"]["source_facts"]`:
`"facts_from": "gguf"` with the GGUF's own bos/eos/pad ids and add_bos/add_eos flags, or `"tokenizer
files"` for a Hugging Face folder (whose files the bundle keeps as they are). Bundles prepared from a
GGUF before that (no `source_facts`) carry transformers' converted tokenizer, which names the BOS token
as EOS and, for GPT-2 style vocabularies, adds it as BOS to every text: `tokenizer_notes` says how to
fix such a bundle, `tokenizer_checks` fails it. Device side: reads JSON and tokenizer files only.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from .bundle import MANIFEST_NAME
from .errors import UserError

FACTS_FROM_GGUF = "gguf"

# Round-trip texts: spaces (leading, double, tab, newline), accents, emoji (one a ZWJ sequence), CJK, digits.
ROUND_TRIP_TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  two leading spaces,  double spaces,\ta tab and\na newline",
    "café, naïve, Zürich, São Paulo, Ærøskøbing, ñandú",
    "emoji 🙂🚀 and 👩\u200d💻, 中文, русский",
    "digits 0123456789, 3.14159, -42, 1e10 and 2024-12-05",
)

SPECIAL_TOKENS_CHECK = "tokenizer special tokens match the source"
ROUND_TRIP_CHECK = "tokenizer round trip"


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _bundle_manifest(folder: Path, manifest: dict) -> dict | None:
    """The manifest of the bundle behind `folder`: its own, or (for an export) the bundle's it names."""
    if manifest.get("format") == "ortft-bundle":
        return manifest
    bundle = (manifest.get("source") or {}).get("bundle")
    if isinstance(bundle, str):
        found = _read_json(Path(bundle) / MANIFEST_NAME)
        if found and found.get("format") == "ortft-bundle":
            return found
    return None


def made_before_gguf_facts(folder: Path | str, manifest: dict) -> bool:
    """True for a bundle (or an export of one) prepared from a GGUF before tokenizer facts were recorded."""
    section = manifest.get("tokenizer") or {}
    if not isinstance(section, dict) or section.get("source_facts"):
        return False
    bundle_manifest = _bundle_manifest(Path(folder), manifest)
    if bundle_manifest is not None:
        bundle_section = bundle_manifest.get("tokenizer") or {}
        return bool((bundle_manifest.get("source") or {}).get("gguf_file")) and not bundle_section.get("source_facts")
    # An export whose bundle is not here: transformers' GGUF converter always names one token as both BOS
    # and EOS and adds it to every text (a Hugging Face tokenizer with bos == eos, like GPT-2's, adds none).
    bos, eos = section.get("bos_token"), section.get("eos_token")
    return bos is not None and bos == eos and bool(section.get("add_bos_token"))


def prepare_command(folder: Path | str, manifest: dict) -> str:
    """The `ortft prepare` command that makes the bundle behind `folder` again, in place (--force).

    It is the command the manifest recorded, with its options, but with the source model's absolute path
    and the bundle's present folder (a bundle may have been moved or copied since).
    """
    bundle_manifest = _bundle_manifest(Path(folder), manifest)
    if bundle_manifest is None:
        return "ortft prepare MODEL.gguf --out BUNDLE --force"
    source = bundle_manifest.get("source") or {}
    out = str(folder) if manifest is bundle_manifest else str((manifest.get("source") or {}).get("bundle") or "BUNDLE")
    prepare = bundle_manifest.get("prepare") or {}
    recorded = str(prepare.get("command") or "")
    try:
        words = shlex.split(recorded)
    except ValueError:
        words = recorded.split()
    program = Path(words[0]) if words else Path()
    if not (len(words) >= 2 and words[1] == "prepare" and (program.name == "ortft" or program.parent.name == "ortft")):
        words = ["ortft", "prepare", "MODEL", "--out", out]
        model_word = "MODEL"
    else:
        words = ["ortft", *words[1:]]
        model_word = str((prepare.get("config") or {}).get("model") or "")
    model = Path(source["path"]) if source.get("path") else None
    for index, word in enumerate(words):
        if index >= 2 and word == model_word and model is not None:
            gguf = source.get("gguf_file")
            words[index] = str(model / gguf) if gguf and (word.endswith(".gguf") or model_word == "MODEL") else str(model)
            model = None  # the first match only
        elif index >= 1 and words[index - 1] == "--out":
            words[index] = out
        elif word.startswith("--out="):
            words[index] = f"--out={out}"
    if "--force" not in words:
        words.append("--force")
    return shlex.join(words)


def tokenizer_notes(folder: Path | str, manifest: dict | None = None) -> list[str]:
    """One-line notes for `train`/`generate` about a bundle's (or export's) tokenizer; empty when all is well."""
    folder = Path(folder)
    if manifest is None:
        manifest = _read_json(folder / MANIFEST_NAME) or {}
    if not made_before_gguf_facts(folder, manifest):
        return []
    section = manifest.get("tokenizer") or {}
    eos = section.get("eos_token")
    model_eos = (manifest.get("model") or {}).get("eos_token_ids") or []
    what = "bundle" if manifest.get("format") == "ortft-bundle" else "model's bundle"
    then = "" if manifest.get("format") == "ortft-bundle" else ", then train and export again"
    adds_bos = ", and adds it as BOS to every text" if section.get("add_bos_token") else ""
    note = (f"this {what} was prepared from a GGUF before ortft took its tokenizer's special tokens from the GGUF: "
            f"it ends texts with {eos!r}, not the model's EOS (id {', '.join(map(str, model_eos)) or '?'}){adds_bos}; "
            f"fix: `{prepare_command(folder, manifest)}`{then}")
    return [note]


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether encoding with special tokens puts `token_id` first (BOS) or last (EOS) around a text."""
    if token_id is None:
        return False
    with_specials = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    return len(with_specials) > len(plain) and with_specials[0 if first else -1] == token_id


def _token(tokenizer, token_id: int | None) -> str:
    if token_id is None:
        return "none"
    return f"{token_id} {tokenizer.decode([token_id], skip_special_tokens=False)!r}"


def _special_tokens_check(folder: Path, manifest: dict, tokenizer) -> tuple[str, bool, str]:
    section = manifest.get("tokenizer") or {}
    facts = section.get("source_facts")
    actual = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "add_bos_token": _adds(tokenizer, tokenizer.bos_token_id, first=True),
        "add_eos_token": _adds(tokenizer, tokenizer.eos_token_id, first=False),
    }
    described = (f"eos {_token(tokenizer, actual['eos_token_id'])}, bos {_token(tokenizer, actual['bos_token_id'])} "
                 f"{'added' if actual['add_bos_token'] else 'not added'} to texts")
    if not isinstance(facts, dict):
        notes = tokenizer_notes(folder, manifest)
        if notes:
            return SPECIAL_TOKENS_CHECK, False, f"{described}; {notes[0]}"
        return SPECIAL_TOKENS_CHECK, True, f"{described} (the Hugging Face folder's tokenizer files)"
    differences = [f"{key} {actual[key]} but the source says {facts[key]}" for key in actual
                   if key in facts and facts[key] != actual[key]]
    model_eos = (manifest.get("model") or {}).get("eos_token_ids") or []
    if facts.get("facts_from") == FACTS_FROM_GGUF and model_eos and facts.get("eos_token_id") not in model_eos:
        differences.append(f"the model's eos ids {model_eos} lack the GGUF's eos {facts.get('eos_token_id')}")
    if differences:
        return SPECIAL_TOKENS_CHECK, False, "; ".join(differences) + "; prepare the bundle again"
    return SPECIAL_TOKENS_CHECK, True, f"{described} (from the {facts.get('facts_from')})"


def _round_trip_check(tokenizer) -> tuple[str, bool, str]:
    for text in ROUND_TRIP_TEXTS:
        plain = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=False)
        skipped = tokenizer.decode(tokenizer.encode(text, add_special_tokens=True), skip_special_tokens=True)
        for decoded in (plain, skipped):
            if decoded != text:
                return ROUND_TRIP_CHECK, False, f"{text!r} decodes to {decoded!r}"
    return ROUND_TRIP_CHECK, True, f"decode(encode(text)) == text for {len(ROUND_TRIP_TEXTS)} texts (spaces, accents, emoji, digits)"


def tokenizer_checks(bundle: Path | str, manifest: dict) -> list[tuple[str, bool, str]]:
    """`validate`'s tokenizer checks: (name, ok, detail) for the special tokens and (causal LM) the round trip."""
    from .tokenizer import load_tokenizer

    bundle = Path(bundle)
    section = manifest.get("tokenizer") or {}
    try:
        tokenizer = load_tokenizer(bundle / section.get("dir", "tokenizer"))
    except UserError as exc:
        return [("tokenizer loads", False, exc.message)]
    checks = [_special_tokens_check(bundle, manifest, tokenizer)]
    if manifest.get("task") == "causal-lm":  # a classifier never decodes (and uncased tokenizers cannot round-trip)
        checks.append(_round_trip_check(tokenizer))
    return checks
