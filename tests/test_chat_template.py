"""Tests of ortft.chat_template: Hugging Face-compatible rendering, the sandbox, and assistant spans."""

from __future__ import annotations

import pytest

from ortft.chat_template import ChatTemplate
from ortft.errors import DataError, TemplateError
from helpers.tokenizers import build_tiny_tokenizer, CHATML_TEMPLATE

VARIABLES = {"bos_token": "<s>", "eos_token": "<|im_end|>"}

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Answer: 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Answer: 6."},
]

SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ self._TemplateReference__context }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{% set x = messages.append(1) %}",
    "{{ messages.pop() }}",
    "{{ (messages|first).update({'role': 'x'}) }}",
    "{{ range(10**9)|list }}",
]


def test_renders_chatml_with_generation_prompt() -> None:
    template = ChatTemplate(CHATML_TEMPLATE, VARIABLES)
    text = template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a tiny assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("source", SANDBOX_ESCAPES)
def test_sandbox_escapes_raise_template_error(source: str) -> None:
    with pytest.raises(TemplateError) as caught:
        ChatTemplate(source, VARIABLES).render(CHAT)
    assert "chat template" in caught.value.message
    assert isinstance(caught.value, DataError)  # a user error, printed without a traceback


def test_sandbox_message_names_the_attribute() -> None:
    with pytest.raises(TemplateError, match=r"sandbox.*'__class__'"):
        ChatTemplate("{{ ''.__class__ }}").render([])


def test_syntax_error_names_the_template_line() -> None:
    with pytest.raises(TemplateError, match=r"does not compile.*line 2"):
        ChatTemplate("ok\n{% for %}")


def test_raise_exception_and_undefined_are_template_errors() -> None:
    with pytest.raises(TemplateError, match="roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render(CHAT)
    with pytest.raises(TemplateError, match="undefined"):
        ChatTemplate("{{ nothing.here.at_all }}").render(CHAT)
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 // 0 }}").render(CHAT)


def test_helpers_like_hugging_face() -> None:
    template = ChatTemplate("{{ bos_token }}{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}", VARIABLES)
    assert template.render([{"role": "user", "content": "<é>"}]) == '<s>{"role": "user", "content": "<é>"}|4'


def _assistant_texts(rendered) -> list[str]:
    return [rendered.text[start:end] for start, end in rendered.assistant_spans]


def test_assistant_spans_by_prefix_difference() -> None:
    rendered = ChatTemplate(CHATML_TEMPLATE, VARIABLES).render_with_assistant_spans(CHAT)
    assert _assistant_texts(rendered) == ["Answer: 4.<|im_end|>", "Answer: 6.<|im_end|>"]


def test_assistant_spans_by_generation_blocks() -> None:
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    )
    template = ChatTemplate(source, VARIABLES)
    assert template.has_generation_blocks
    rendered = template.render_with_assistant_spans(CHAT)
    assert _assistant_texts(rendered) == ["Answer: 4.<|im_end|>", "Answer: 6.<|im_end|>"]


def test_assistant_spans_when_template_rewrites_earlier_turns() -> None:
    # Earlier assistant turns lose their "<think>" part (as some reasoning templates do), so the
    # prefix renderings are no prefixes of the full chat: the content search must find the replies.
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>x</think>first"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "<think>y</think>second"},
    ]
    rendered = ChatTemplate(source, VARIABLES).render_with_assistant_spans(chat)
    assert _assistant_texts(rendered) == ["first<|im_end|>", "<think>y</think>second<|im_end|>"]


def test_assistant_spans_when_template_transforms_replies() -> None:
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper if m.role == 'assistant' else m.content }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "quiet answer"}]
    rendered = ChatTemplate(source, VARIABLES).render_with_assistant_spans(chat)
    assert _assistant_texts(rendered) == ["QUIET ANSWER<|im_end|>"]


def test_assistant_first_message_and_no_assistant() -> None:
    template = ChatTemplate(CHATML_TEMPLATE, VARIABLES)
    rendered = template.render_with_assistant_spans([{"role": "assistant", "content": "Hello there"}])
    assert _assistant_texts(rendered) == ["Hello there<|im_end|>"]
    assert template.render_with_assistant_spans([{"role": "user", "content": "hi"}]).assistant_spans == []


def test_unlocatable_assistant_reply_raises() -> None:
    # The template never shows assistant text (and its generation prompt breaks the prefix property).
    source = "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}|{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "quiet answer"}]
    with pytest.raises(TemplateError, match="cannot find assistant message 1"):
        ChatTemplate(source, VARIABLES).render_with_assistant_spans(chat)


def test_matches_transformers_apply_chat_template() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=build_tiny_tokenizer(), bos_token="<s>", eos_token="<|im_end|>"
    )
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('bad role') }}{% endif %}"
        "[{{ m.role | upper }}] {{ m.content | trim }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}{{ {'n': messages | length} | tojson }}"
    )
    ours = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "<|im_end|>"})
    for add_generation_prompt in (False, True):
        for chat in (CHAT, CHAT[1:3], [{"role": "user", "content": "  ünï  "}]):
            expected = hf.apply_chat_template(
                chat, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours.render(chat, add_generation_prompt=add_generation_prompt) == expected
