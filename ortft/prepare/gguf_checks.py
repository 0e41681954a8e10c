"""Check a GGUF file's declared sizes against its tensors, and the memory loading it takes, before loading it.

transformers builds the model from the GGUF's metadata first and fills in the tensors afterwards, so a
0.5 MB file declaring `embedding_length` 65536 made it allocate 17 GB. Here the metadata is read without
loading a tensor (`gguf.GGUFReader` maps the file): the embedding length, block count, feed-forward
length and vocabulary must match the shapes of the tensors that carry them, and the float32 model
(every tensor de-quantized, which is what prepare loads) must fit in the memory this machine has.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelError
from ..memory import available_memory_bytes

BLOCK = re.compile(r"^blk\.(\d+)\.")
FLOAT32_BYTES = 4
# Loading keeps about two float32 copies of the weights at its peak (the GGUF's de-quantized tensors and the
# model's parameters); more than the memory available is refused before anything is allocated.
LOAD_COPIES = 2


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    return value.tolist()[0] if hasattr(value, "tolist") and len(value) == 1 else None


def declared_problems(reader) -> list[str]:
    """Where the metadata's sizes disagree with the tensors' shapes (GGUF shapes are [columns, rows])."""
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode("utf-8", "replace") \
        if "general.architecture" in reader.fields else None
    shapes = {tensor.name: [int(dim) for dim in tensor.shape] for tensor in reader.tensors}
    problems = []
    if arch is None:
        return ["it has no general.architecture"]
    embedding = _field(reader, f"{arch}.embedding_length")
    blocks = _field(reader, f"{arch}.block_count")
    feed_forward = _field(reader, f"{arch}.feed_forward_length")
    token_embd = shapes.get("token_embd.weight")
    if embedding is not None and token_embd and token_embd[0] != embedding:
        problems.append(f"{arch}.embedding_length is {embedding}, but token_embd.weight has rows of {token_embd[0]}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and token_embd and len(tokens.data) > token_embd[-1]:
        problems.append(f"the vocabulary has {len(tokens.data)} tokens, but token_embd.weight only {token_embd[-1]} rows")
    found_blocks = {int(match.group(1)) for name in shapes if (match := BLOCK.match(name))}
    if blocks is not None and shapes and found_blocks != set(range(blocks)):  # (a tokenizer-only file has no tensors)
        problems.append(f"{arch}.block_count is {blocks}, but the file has tensors for {len(found_blocks)} blocks")
    up = shapes.get("blk.0.ffn_up.weight") or shapes.get("blk.0.ffn_gate.weight")
    if feed_forward is not None and up and up[-1] != feed_forward and up[0] != feed_forward:
        problems.append(f"{arch}.feed_forward_length is {feed_forward}, but blk.0's feed-forward weight is {up}")
    if embedding is not None and up and embedding not in up:
        problems.append(f"{arch}.embedding_length is {embedding}, but blk.0's feed-forward weight is {up}")
    return problems


def declared_parameters(reader) -> int:
    """Parameters of the model the metadata describes (embedding and head, attention and MLP per block): what
    transformers allocates before it reads a tensor."""
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode("utf-8", "replace") \
        if "general.architecture" in reader.fields else ""
    embedding = _field(reader, f"{arch}.embedding_length") or 0
    blocks = _field(reader, f"{arch}.block_count") or 0
    feed_forward = _field(reader, f"{arch}.feed_forward_length") or 0
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else 0)
    return int(2 * vocab * embedding + blocks * (4 * embedding * embedding + 3 * embedding * feed_forward))


def check_gguf(path: Path | str, available: int | None = None) -> None:
    """A ModelError when the GGUF's declared sizes disagree with its tensors or its float32 model cannot fit."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises ValueError, struct errors, IndexError ... for damaged files
        raise ModelError(f"{path} is not a readable GGUF file ({exc.__class__.__name__}: {str(exc)[:200]})",
                         hint="use a GGUF written by llama.cpp's converter or the gguf package") from exc
    problems = declared_problems(reader)
    if problems:
        raise ModelError(f"{path}: the declared sizes do not match its tensors: {'; '.join(problems[:3])}",
                         hint="the file is damaged or was edited; convert the model again")
    elements = max(sum(int(tensor.n_elements) for tensor in reader.tensors), declared_parameters(reader))
    needed = elements * FLOAT32_BYTES * LOAD_COPIES
    available = available_memory_bytes() if available is None else available
    if available is not None and needed > available:
        raise ModelError(f"{path}: loading it as float32 needs about {needed / 2**30:.1f} GiB ({elements:,} parameters x 4 bytes "
                         f"x {LOAD_COPIES}), more than the {available / 2**30:.1f} GiB available",
                         hint="prepare on a machine with more memory")
