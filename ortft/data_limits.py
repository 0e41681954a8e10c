"""Cut an example to what ortft reads before tokenizing it: at most `chars` characters and, for a chat,
at most `turns` messages (ortft.config.InputLimits gives the caps, from --seq-len).

A tokenizer's time and memory grow with the text it is given, and only the first --seq-len tokens are
kept anyway, so a text is cut before it reaches the tokenizer: a 20 MB line no longer aborts the
process inside the tokenizer. Each function returns the kept parts and whether anything was cut.
"""

from __future__ import annotations


def cut_text(text: str, chars: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= chars else (text[:chars], True)


def cut_prompt_completion(prompt: str, completion: str, chars: int) -> tuple[str, str, bool]:
    """The prompt first, then as much of the completion as fits in `chars` together."""
    if len(prompt) + len(completion) <= chars:
        return prompt, completion, False
    prompt = prompt[:chars]
    return prompt, completion[:chars - len(prompt)], True


def cut_messages(messages: list[dict], chars: int, turns: int) -> tuple[list[dict], bool]:
    """The first `turns` messages whose contents add up to at most `chars` characters (the message that
    crosses the cap is kept cut, the rest dropped)."""
    kept: list[dict] = []
    used = 0
    for message in messages[:turns]:
        content = message["content"]
        if used + len(content) > chars:
            kept.append({**message, "content": content[:chars - used]})
            return kept, True
        kept.append(message)
        used += len(content)
    return kept, len(messages) > turns
