"""Chat templates rendered in jinja2's immutable sandbox, the way Hugging Face renders them.

`ChatTemplate(source, variables).render(messages, add_generation_prompt)` gives the same text as
transformers' `apply_chat_template(..., tokenize=False)`; `render_with_assistant_spans(messages)` also
returns the character spans of the assistant turns, which `ortft.data` turns into loss masks.
Every compile or render failure, and every attempt to leave the sandbox, raises `TemplateError`; so does
a render that runs longer than its time limit or would make more than its character cap
(ortft/template_limits.py), and jinja2's `lipsum`, `cycler` and `joiner` globals are not there.

How assistant spans are found, in order of preference:
1. `{% generation %}...{% endgeneration %}` blocks in the template (Hugging Face's marker for
   assistant text), when the recorded text is found at the recorded place in the output.
2. Markers, in one more render (linear in the number of turns): every assistant reply is rendered between
   two private-use characters; when removing them gives exactly the real rendering, they mark where each
   reply is. Each span then reaches over the end-of-turn text that the prefix method (3) finds after the
   first reply, when that same text follows every reply (else over a directly following eos token when the
   prefix method does not apply). Anything else falls back to 3 and 4, which render once or twice per
   reply (quadratic in the number of turns; data.py caps the turns per example).
3. Prefix differences: for assistant message i, render messages[:i] with the generation prompt
   (the text before the reply) and messages[:i+1] without it (the text through the reply and its
   end-of-turn token). When both are prefixes of the full rendering, the reply is the difference.
4. Otherwise (templates that rewrite earlier turns, e.g. drop their reasoning) the chat is rendered
   again with that reply replaced by a marker; the characters that differ from the real rendering
   are the reply (extended over a directly following eos token). A reply that cannot be located
   (the template does not show it) raises TemplateError rather than guessing.
Trailing whitespace after the end-of-turn token (ChatML's newline) is left out of a span.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .config import InputLimits
from .errors import TemplateError
from .template_limits import LimitedSandbox, RenderTimeout, TooLarge, time_limit

Span = tuple[int, int]

# `{% generation %}` with optional whitespace control, as Hugging Face detects it.
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Stands in for an assistant reply when locating it by difference; characters no real reply holds.
REPLY_MARKER = "\ue000\ue001ortft-reply\ue001\ue000"
# Put around every assistant reply to find all of them in one render.
REPLY_OPEN, REPLY_CLOSE = "\ue002", "\ue003"


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation and the [start, end) character spans of its assistant replies."""

    text: str
    assistant_spans: list[Span]


class _TemplateRaised(Exception):
    """Raised by the template's own `raise_exception(message)`."""


class _SpanRecorder:
    """Counts the characters a streaming render has produced and notes where generation blocks sit."""

    def __init__(self) -> None:
        self.length = 0
        self.spans: list[Span] = []
        self.texts: list[str] = []

    def mark(self, text: str) -> None:
        self.spans.append((self.length, self.length + len(text)))
        self.texts.append(text)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and, while recording, notes its span."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        self.recorder: _SpanRecorder | None = None

    def parse(self, parser):  # type: ignore[override]
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

    def _render_block(self, caller) -> str:
        text = caller()
        if self.recorder is not None:
            self.recorder.mark(text)
        return text


class _StrictSandbox(LimitedSandbox, ImmutableSandboxedEnvironment):
    """The immutable sandbox with size limits (LimitedSandbox), except that touching an unsafe attribute fails at once.

    jinja2's sandbox returns a silent Undefined for `''.__class__`, which prints as ''. We want such
    templates refused loudly instead of rendering something subtly different.
    """

    def unsafe_undefined(self, obj, attribute):  # type: ignore[override]
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")


def _raise_exception(message: object) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Hugging Face replaces jinja's tojson (which HTML-escapes) with plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TooLarge):
        return f"it was stopped: {exc}"
    if isinstance(exc, SecurityError):
        return f"it tried to leave the sandbox ({exc})"
    if isinstance(exc, _TemplateRaised):
        return f"it raised an error: {exc}"
    if isinstance(exc, jinja2.UndefinedError):
        return f"it used an undefined value ({exc})"
    if isinstance(exc, RecursionError):
        return "it recursed too deeply"
    return f"{type(exc).__name__}: {exc}"


class ChatTemplate:
    """A compiled chat template plus the variables (special tokens) that every render receives."""

    def __init__(self, source: str, variables: Mapping[str, object] | None = None, max_chars: int | None = None,
                 time_limit_s: float | None = None):
        limits = InputLimits()
        self.source = source
        self.variables = dict(variables or {})
        self.max_chars = limits.template_chars if max_chars is None else int(max_chars)
        self.time_limit_s = limits.template_seconds if time_limit_s is None else time_limit_s
        self._environment = _StrictSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
        )
        self._environment.max_chars = self.max_chars
        for name in ("lipsum", "cycler", "joiner"):  # not in Hugging Face's templates; lipsum(n) makes text of any size
            self._environment.globals.pop(name, None)
        self._environment.filters["tojson"] = _tojson
        self._environment.limit_filters()
        self._environment.globals["raise_exception"] = _raise_exception
        self._environment.globals["strftime_now"] = _strftime_now
        self._generation_block: _GenerationBlock = self._environment.extensions[_GenerationBlock.identifier]
        try:
            self._template = self._environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"the chat template does not compile: {exc.message} (template line {exc.lineno})",
                hint="fix chat_template.jinja (or the chat_template key of tokenizer_config.json)",
            ) from exc
        except Exception as exc:  # any other compile failure is still the template's fault
            raise TemplateError(f"the chat template does not compile: {_describe(exc)}") from exc
        self.has_generation_blocks = GENERATION_TAG.search(source) is not None

    def allow_chars(self, chars: int) -> None:
        """Raise the cap on the text one render may make to at least `chars` (data with a raised example cap)."""
        self.max_chars = max(self.max_chars, int(chars))
        self._environment.max_chars = self.max_chars

    # ---- rendering ------------------------------------------------------------------------------

    def _chunks(self, messages: Sequence[Mapping], add_generation_prompt: bool, extra: Mapping) -> Iterator[str]:
        context = {**self.variables, **extra, "messages": list(messages), "add_generation_prompt": add_generation_prompt}
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        return self._template.generate(**context)

    def _render(self, messages, add_generation_prompt, extra, recorder: _SpanRecorder | None = None) -> str:
        self._generation_block.recorder = recorder
        pieces: list[str] = []
        made = 0
        try:
            with time_limit(self.time_limit_s):
                for chunk in self._chunks(messages, add_generation_prompt, extra):
                    pieces.append(chunk)
                    made += len(chunk)
                    if made > self.max_chars:
                        raise TooLarge(f"the rendered text passed {self.max_chars} characters")
                    if recorder is not None:
                        recorder.length += len(chunk)
        except RenderTimeout as exc:
            raise TemplateError(f"the chat template took longer than {self.time_limit_s:g} s to render and was stopped",
                                hint="the template loops too much; fix chat_template.jinja") from exc
        except TemplateError:
            raise
        except Exception as exc:
            raise TemplateError(
                f"the chat template failed to render: {_describe(exc)}",
                hint="check the messages (roles, order, content) against what the template expects",
            ) from exc
        finally:
            self._generation_block.recorder = None
        return "".join(pieces)

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False, **extra) -> str:
        """The conversation as text, like Hugging Face's `apply_chat_template(..., tokenize=False)`."""
        return self._render(messages, add_generation_prompt, extra)

    def render_with_assistant_spans(self, messages: Sequence[Mapping], **extra) -> RenderedChat:
        """Render `messages` (no generation prompt) and locate every assistant reply in the text."""
        recorder = _SpanRecorder() if self.has_generation_blocks else None
        text = self._render(messages, False, extra, recorder)
        assistant_indices = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
        if recorder is not None and recorder.spans:
            if all(text[start:end] == piece for (start, end), piece in zip(recorder.spans, recorder.texts)):
                spans = [self._trim(text, span) for span in recorder.spans]
                return RenderedChat(text, [span for span in spans if span[1] > span[0]])
        marked = self._spans_by_markers(messages, assistant_indices, text, extra)
        if marked is not None:
            return RenderedChat(text, [self._trim(text, span) for span in marked])
        spans: list[Span] = []
        cursor = 0
        for index in assistant_indices:
            span = self._trim(text, self._locate_reply(messages, index, text, cursor, extra))
            spans.append(span)
            cursor = span[1]
        return RenderedChat(text, spans)

    def _spans_by_markers(self, messages, assistant_indices: list[int], full_text: str, extra) -> list[Span] | None:
        """Every reply's span from one render with the replies between markers (None when that does not work)."""
        if not assistant_indices:
            return []
        contents = [messages[i].get("content") for i in assistant_indices]
        if not all(isinstance(content, str) for content in contents) or any(
                REPLY_OPEN in str(m.get("content")) or REPLY_CLOSE in str(m.get("content")) for m in messages):
            return None
        changed = [dict(message) for message in messages]
        for index in assistant_indices:
            changed[index]["content"] = REPLY_OPEN + changed[index]["content"] + REPLY_CLOSE
        try:
            marked = self._render(changed, False, extra)
        except TemplateError:
            return None
        if marked.count(REPLY_OPEN) != len(assistant_indices) or marked.count(REPLY_CLOSE) != len(assistant_indices):
            return None
        spans, removed, start = [], 0, None
        for position, char in enumerate(marked):
            if char == REPLY_OPEN:
                if start is not None:
                    return None
                start = position - removed
                removed += 1
            elif char == REPLY_CLOSE:
                if start is None:
                    return None
                spans.append((start, position - removed))
                start = None
                removed += 1
        if marked.replace(REPLY_OPEN, "").replace(REPLY_CLOSE, "") != full_text:
            return None  # the template changed the replies (trimmed them, cut them): locate them one by one instead
        return self._extend_over_end_of_turn(messages, assistant_indices[0], spans, full_text, extra)

    def _extend_over_end_of_turn(self, messages, first: int, spans: list[Span], full_text: str, extra) -> list[Span] | None:
        """Extend each reply's span over its end-of-turn text: what the chat rendered through the first reply has
        after that reply, as far as it agrees with the whole chat (a template may end the whole chat differently,
        as Phi-3's adds the eos token), when the same text follows every reply; else over a following eos token."""
        start, end = spans[0]
        try:
            before = self._render(messages[:first], True, extra)
            through = self._render(messages[: first + 1], False, extra)
        except TemplateError:
            before = through = None
        if before is not None and len(before) == start and full_text.startswith(before):
            agreed = os.path.commonprefix([through, full_text])
            if len(agreed) < end:
                return None
            suffix = full_text[end:len(agreed)]
            if len(agreed) < len(through):  # they part inside the next piece of text: keep what precedes its whitespace
                boundary = max(suffix.rfind(space) for space in " \n\t\r")
                suffix = suffix[:boundary] if boundary >= 0 else ""
            suffix = suffix.rstrip()
            if not all(full_text.startswith(suffix, span_end) for _start, span_end in spans):
                return None
            return [(span_start, span_end + len(suffix)) for span_start, span_end in spans]
        eos = self.variables.get("eos_token")
        if not isinstance(eos, str) or not eos:
            return spans
        return [(start, end + len(eos)) if full_text.startswith(eos, end) else (start, end) for start, end in spans]

    @staticmethod
    def _trim(text: str, span: Span) -> Span:
        start, end = span
        while end > start and text[end - 1].isspace():
            end -= 1
        return (start, end)

    def _span_by_prefixes(self, messages, index: int, full_text: str, extra) -> Span | None:
        try:
            before = self._render(messages[:index], True, extra)
            through = self._render(messages[: index + 1], False, extra)
        except TemplateError:
            return None  # e.g. a template that cannot render an empty or partial conversation
        if full_text.startswith(through) and through.startswith(before) and len(through) > len(before):
            return (len(before), len(through))
        return None

    def _span_by_substitution(self, messages, index: int, full_text: str, cursor: int, extra) -> Span | None:
        """Render again with message `index`'s content replaced by a marker; the text that differs is the reply."""
        content = messages[index].get("content")
        if not isinstance(content, str):
            return None
        changed = [dict(message) for message in messages]
        changed[index]["content"] = REPLY_MARKER
        try:
            other = self._render(changed, False, extra)
        except TemplateError:
            return None
        if other == full_text:
            return None  # the template does not show this reply at all
        limit = min(len(full_text), len(other))
        prefix = 0
        while prefix < limit and full_text[prefix] == other[prefix]:
            prefix += 1
        suffix = 0
        while suffix < limit - prefix and full_text[-1 - suffix] == other[-1 - suffix]:
            suffix += 1
        start, end = prefix, len(full_text) - suffix
        if start < cursor or end <= start:
            return None
        eos = self.variables.get("eos_token")
        if isinstance(eos, str) and eos and full_text.startswith(eos, end):
            end += len(eos)
        return (start, end)

    def _locate_reply(self, messages, index: int, full_text: str, cursor: int, extra) -> Span:
        span = self._span_by_prefixes(messages, index, full_text, extra)
        if span is None or span[0] < cursor:
            span = self._span_by_substitution(messages, index, full_text, cursor, extra)
        if span is None:
            raise TemplateError(
                f"cannot find assistant message {index} in the rendered chat, so its tokens cannot be masked",
                hint="the chat template hides or rewrites assistant text; set mask_prompt off or use prompt/completion data",
            )
        return span
