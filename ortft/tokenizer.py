"""Device-side tokenizer: a Hugging Face `tokenizer.json` read with the `tokenizers` library alone.

`load_tokenizer(folder)` returns a `TextTokenizer` that encodes like `PreTrainedTokenizerFast` (the
tokenizer.json post-processor adds the special tokens), knows the special token ids and renders the
chat template through the sandbox in `ortft.chat_template`. Never imports transformers or torch.
A Rust panic inside `tokenizers` (a PanicException, which is a BaseException: e.g. a tokenizer.json whose
regex backtracks past onig's limit) becomes a ModelError, not a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .chat_template import ChatTemplate
from .errors import ModelError, TemplateError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Special-token roles that a chat template may reference as variables (`{{ bos_token }}` ...).
SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _RustPanics:
    """Turns a PanicException of the `tokenizers` library (pyo3's, a BaseException) into a ModelError."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, _traceback) -> bool:
        if kind is not None and kind.__name__ == "PanicException":
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "no message"
            raise ModelError(f"the tokenizer crashed while {self.what} (a panic in the tokenizers library: {first})",
                             hint="its tokenizer.json is broken or hostile (e.g. a pre-tokenizer regex that backtracks "
                                  "without end); use the model's original tokenizer") from exc
        return False


@dataclass(frozen=True)
class EncodedText:
    """Token ids of one text with, per token, its character span and whether the post-processor added it."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    added_by_post_processor: list[bool]


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of its Hugging Face folder."""

    def __init__(
        self,
        tokenizer,  # tokenizers.Tokenizer
        special_tokens: dict[str, str],
        chat_template: str | None = None,
        extra_eos_tokens: Iterable[str | int] = (),
        additional_special_tokens: Sequence[str] = (),
    ):
        self._tokenizer = tokenizer
        # Our data pipeline truncates and pads itself; a tokenizer.json may carry its own settings.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.special_tokens = {role: text for role, text in special_tokens.items() if text is not None}
        self.additional_special_tokens = list(additional_special_tokens)
        self.chat_template = chat_template
        self._compiled_template: ChatTemplate | None = None
        self._extra_eos_ids = [self._id_of(token, "extra eos token") for token in extra_eos_tokens]

    # ---- special tokens -------------------------------------------------------------------------

    def _id_of(self, token: str | int, what: str) -> int:
        if isinstance(token, int):
            return token
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelError(
                f"the tokenizer has no token {token!r} (its {what})",
                hint="check tokenizer_config.json / special_tokens_map.json against tokenizer.json",
            )
        return token_id

    def _role_id(self, role: str) -> int | None:
        text = self.special_tokens.get(role)
        return None if text is None else self._id_of(text, role)

    @property
    def bos_token_id(self) -> int | None:
        return self._role_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The one eos token of the tokenizer config (see `eos_token_ids` for every generation end)."""
        return self._role_id("eos_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """The config's eos token followed by any extra end-of-generation tokens given, without repeats."""
        ids: list[int] = []
        for token_id in [self.eos_token_id, *self._extra_eos_ids]:
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    @property
    def pad_token_id(self) -> int | None:
        """The pad token, or the eos token when the tokenizer defines no pad token."""
        pad = self._role_id("pad_token")
        return pad if pad is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added tokens (Hugging Face's `len(tokenizer)`)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    # ---- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the tokenizer.json post-processor adds BOS etc."""
        with _RustPanics("encoding a text"):
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> EncodedText:
        """Like `encode`, plus each token's (start, end) character span in `text`."""
        with _RustPanics("encoding a text"):
            encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return EncodedText(
            ids=list(encoding.ids),
            offsets=[tuple(span) for span in encoding.offsets],
            added_by_post_processor=[bool(flag) for flag in encoding.special_tokens_mask],
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        with _RustPanics("decoding token ids"):
            return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------

    def template_variables(self) -> dict[str, object]:
        """The special-token variables Hugging Face passes to a chat template (`bos_token`, ...)."""
        variables: dict[str, object] = dict(self.special_tokens)
        if self.additional_special_tokens:
            variables["additional_special_tokens"] = list(self.additional_special_tokens)
        return variables

    @property
    def compiled_chat_template(self) -> ChatTemplate:
        """The chat template compiled in the sandbox; raises TemplateError when there is none."""
        if self._compiled_template is None:
            if self.chat_template is None:
                raise TemplateError(
                    "this tokenizer has no chat template, so chat (`messages`) data cannot be rendered",
                    hint="use {'prompt', 'completion'} or {'text'} data, or add chat_template.jinja to the tokenizer folder",
                )
            self._compiled_template = ChatTemplate(self.chat_template, self.template_variables())
        return self._compiled_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render `messages` with the chat template, as `apply_chat_template(..., tokenize=False)` does."""
        return self.compiled_chat_template.render(messages, add_generation_prompt=add_generation_prompt)


def _token_text(value: object) -> str | None:
    """A special token as stored by Hugging Face: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}", hint="the tokenizer folder looks damaged; prepare the bundle again") from exc
    if not isinstance(value, dict):
        raise ModelError(f"{path} does not hold a JSON object", hint="prepare the bundle again")
    return value


def _chat_template_from_config(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # several named templates: Hugging Face uses the one named "default"
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def load_tokenizer(folder: Path | str, extra_eos_tokens: Iterable[str | int] = ()) -> TextTokenizer:
    """Load tokenizer.json (required), tokenizer_config.json and special_tokens_map.json (optional).

    The chat template comes from chat_template.jinja when present, else from the config's
    `chat_template` key. `extra_eos_tokens` (texts or ids) are added to `eos_token_ids`, e.g.
    `<|im_end|>` for a ChatML model whose config names another eos token.
    """
    from tokenizers import Tokenizer

    folder = Path(folder)
    tokenizer_path = folder / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise ModelError(
            f"no {TOKENIZER_FILE} in {folder}",
            hint="ortft needs a fast (tokenizer.json) tokenizer; prepare the bundle again from a model that has one",
        )
    try:
        with _RustPanics(f"loading {tokenizer_path}"):
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except ModelError:
        raise
    except Exception as exc:  # the Rust side raises a plain Exception for malformed files
        raise ModelError(f"cannot load {tokenizer_path}: {exc}", hint="prepare the bundle again") from exc

    config_path = folder / TOKENIZER_CONFIG_FILE
    config = _read_json_object(config_path) if config_path.is_file() else {}
    map_path = folder / SPECIAL_TOKENS_MAP_FILE
    special_map = _read_json_object(map_path) if map_path.is_file() else {}

    special_tokens: dict[str, str] = {}
    for role in SPECIAL_TOKEN_ROLES:
        text = _token_text(config.get(role))
        if text is None:
            text = _token_text(special_map.get(role))
        if text is not None:
            special_tokens[role] = text
    additional = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
    additional_texts = [t for t in (_token_text(item) for item in additional) if t is not None]

    template_path = folder / CHAT_TEMPLATE_FILE
    if template_path.is_file():
        chat_template = template_path.read_text(encoding="utf-8")
    else:
        chat_template = _chat_template_from_config(config)

    return TextTokenizer(
        tokenizer,
        special_tokens,
        chat_template=chat_template,
        extra_eos_tokens=extra_eos_tokens,
        additional_special_tokens=additional_texts,
    )
