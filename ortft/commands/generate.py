"""`ortft generate`: complete a prompt or chat with an export (merged, or base + one of its adapters), a
bundle's base model, or a run folder.

Text streams to stdout; speed (tokens/s) goes to stderr.
"""

from __future__ import annotations

import sys

import click

from ..cli_paths import InputPath
from ..config import GenerateConfig, SamplingSettings
from ..providers import provider_option

_defaults = SamplingSettings()
_settings = GenerateConfig()


@click.command("generate")
@click.argument("model_dir", metavar="EXPORT_DIR_OR_RUN", type=InputPath(
    "pass an export folder (`ortft export --out`), a run folder (`ortft train --out`) or a bundle (`ortft prepare --out`)",
    file_okay=False))
@click.option("--prompt", default=None, help="The text to continue (with --chat: the user's message).")
@click.option("--chat", is_flag=True,
              help="Use the chat template; without --prompt, a conversation on stdin: one message per line (a line ending "
                   "in \\ continues on the next), /reset starts anew, /exit or Ctrl-D leaves.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=_defaults.max_new_tokens, show_default=True,
              help="Stop after this many new tokens (or earlier, at an end-of-sequence token or the model's context).")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=_defaults.temperature, show_default=True,
              help="0 picks the most likely token (greedy).")
@click.option("--top-k", type=click.IntRange(min=0), default=_defaults.top_k, show_default=True, help="0 keeps every token.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=_defaults.top_p, show_default=True,
              help="Sample from the fewest most likely tokens whose probabilities add up to this; 1.0 keeps every token.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0.0, min_open=True), default=_defaults.repetition_penalty,
              show_default=True, help="Make tokens already in the text less likely (above 1.0) or more likely (below); "
                                      "1.0 turns it off.")
@click.option("--seed", type=int, default=_defaults.seed, show_default=True, help="Seed of the sampler (temperature above 0).")
@click.option("--checkpoint", default=_settings.checkpoint, show_default=True, help="For a run folder: latest, best or a path.")
@click.option("--adapter", default=None, metavar="NAME",
              help="For an onnx-adapter export: serve its adapter NAME (adapters/NAME.onnx_adapter); without it, the base model.")
@provider_option(_settings.provider)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Compute threads (default: physical cores).")
@click.option("--verbose", is_flag=True, help="Show ONNX Runtime's logs.")
def command(model_dir, prompt, chat, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, checkpoint,
            adapter, provider, threads, verbose) -> None:
    """Generate text with EXPORT_DIR_OR_RUN (a merged-onnx or onnx-adapter export, a run folder or a bundle)."""
    if prompt is None and not chat:
        raise click.UsageError("give --prompt TEXT, or --chat for an interactive chat")
    from ..generate import open_generator

    settings = SamplingSettings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    generator = open_generator(model_dir, checkpoint=checkpoint, provider=provider, threads=threads, verbose=verbose,
                               adapter=adapter)
    if generator.folder.adapter_names and generator.folder.adapter_path is None:
        click.echo(f"note: serving the base model; this folder's adapters: {', '.join(generator.folder.adapter_names)} "
                   "(--adapter NAME)", err=True)
    from ..tokenizer_facts import tokenizer_notes

    for note in tokenizer_notes(generator.folder.folder):  # the folder holding the manifest
        click.echo(f"note: {note}", err=True)
    if not chat:
        _print_stream(generator, generator.stream_text(prompt, settings))
    elif prompt is not None:
        _print_stream(generator, generator.stream_chat([{"role": "user", "content": prompt}], settings))
    else:
        _interactive_chat(generator, settings)


def _print_stream(generator, pieces) -> str:
    reply = []
    for piece in pieces:
        reply.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    click.echo(generator.stats.summary(), err=True)
    return "".join(reply)


def _interactive_chat(generator, settings: SamplingSettings) -> None:
    """Messages from stdin until /exit or its end; the conversation so far is the context (/reset clears it)."""
    from ..chat_input import CHAT_HELP, read_chat_input

    messages: list[dict] = []
    prompt = (lambda text: click.echo(text, nl=False, err=True)) if sys.stdin.isatty() else None
    click.echo(CHAT_HELP, err=True)
    while True:
        entry = read_chat_input(sys.stdin, prompt)
        if entry.command == "exit":
            break
        if entry.command == "reset":
            messages.clear()
            click.echo("(a new conversation)", err=True)
            continue
        messages.append({"role": "user", "content": entry.message})
        reply = _print_stream(generator, generator.stream_chat(messages, settings))
        messages.append({"role": "assistant", "content": reply})
