"""Answer held-out prompts with the base model and the fine-tuned export, side by side (device side).

Run: python scripts/demo_compare.py BUNDLE EXPORT_DIR PROMPTS_FILE [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path


def answer(generator, prompt: str, max_new_tokens: int) -> str:
    from ortft.generate import SamplingSettings

    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    return "".join(generator.stream_chat([{"role": "user", "content": prompt}], settings)).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the training bundle (its base model answers 'before')")
    parser.add_argument("export", type=Path, help="the merged-onnx export (answers 'after')")
    parser.add_argument("prompts", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from ortft.generate import open_generator

    prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    before = open_generator(args.bundle)
    after = open_generator(args.export)
    width = 100
    for prompt in prompts:
        print("=" * width)
        print(f"prompt: {prompt}")
        print(textwrap.fill(f"before: {answer(before, prompt, args.max_new_tokens)}", width, subsequent_indent="        "))
        print(textwrap.fill(f"after:  {answer(after, prompt, args.max_new_tokens)}", width, subsequent_indent="        "))
    print("=" * width)
    print(f"generation speed (after): {after.stats.summary()}")


if __name__ == "__main__":
    main()
