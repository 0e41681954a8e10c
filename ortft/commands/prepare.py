"""`ortft prepare`: the host command that turns a model into a LoRA training bundle."""

from __future__ import annotations

import click

from ..config import FLOAT_LOSS_CHUNK_ROWS, TASKS, PrepareConfig
from ..errors import UserError

_defaults = PrepareConfig()


@click.command("prepare")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(), help="The bundle folder to create.")
@click.option("--gguf-file", default=None, help="The .gguf file inside MODEL (when MODEL is a folder).")
@click.option("--task", type=click.Choice(TASKS), default=_defaults.task, show_default=True,
              help="causal-lm: next-token prediction (text, instructions, chat); seq-cls: one label per text; "
                   "token-cls: one tag per word (named entities).")
@click.option("--num-labels", type=int, default=None, help="Number of classes (seq-cls) or tags (token-cls).")
@click.option("--labels", "label_names", default=None,
              help="Comma-separated class names: seq-cls e.g. negative,positive; token-cls IOB2 tags, e.g. O,B-PER,I-PER,B-LOC,I-LOC.")
@click.option("--rank", type=int, default=_defaults.rank, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=_defaults.alpha, show_default=True, help="LoRA alpha (scale = alpha / r).")
@click.option("--dropout", type=float, default=_defaults.dropout, show_default=True, help="LoRA dropout.")
@click.option("--targets", default=_defaults.targets, show_default=True,
              help="all-linear, or comma-separated module names such as q_proj,v_proj.")
@click.option("--layers", type=int, default=None, help="Adapt only the last N transformer layers.")
@click.option("--dora", is_flag=True, help="Weight-decomposed LoRA (DoRA): trains a magnitude vector too.")
@click.option("--rslora", is_flag=True, help="Rank-stabilised LoRA: scale = alpha / sqrt(r).")
@click.option("--adapter", type=click.Path(), default=None, help="Start from an existing PEFT LoRA adapter folder.")
@click.option("--max-seq-len", type=int, default=_defaults.max_seq_len, show_default=True,
              help="The longest row, in tokens, the bundle trains on (cut to the model's context length).")
@click.option("--weight-decay", type=float, default=_defaults.weight_decay, show_default=True, help="AdamW weight decay.")
@click.option("--max-grad-norm", type=float, default=_defaults.max_grad_norm, show_default=True,
              help="Clip the adapters' gradient norm (0 turns clipping off).")
@click.option("--external-data/--no-external-data", default=None,
              help="Store graph weights as ONNX external data (default: only past 2 GB).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=_defaults.quantize,
              help="QLoRA-style: store the frozen base weights of the adapted linear layers as int8 (per channel) "
                   "or int4 (blocked), dequantized in the graph; adapters stay float32. An embedding table "
                   "that is exactly int8 x a scale per 32 values (a GGUF's Q8_0) is stored as int8 too, losslessly.")
@click.option("--block-size", type=int, default=_defaults.block_size, show_default=True,
              help="int4: weights per scale block (along each layer's input dimension).")
@click.option("--asymmetric", is_flag=True, help="int4: asymmetric blocks (uint4 with a zero point per block).")
@click.option("--quantize-all-linear", is_flag=True, help="Quantize every frozen linear layer, not only the adapted ones.")
@click.option("--quantize-embeddings", is_flag=True, help="Quantize the embedding table and the LM head too.")
@click.option("--no-recompute", is_flag=True,
              help="Let the backward pass reuse the forward's dequantized weights (faster, more memory).")
@click.option("--no-recompute-activations", is_flag=True,
              help="Keep the MLP's act(gate) and act * up and the adapters' normed inputs for the backward "
                   "pass instead of computing them again (more memory, no faster; docs/benchmarks.md).")
@click.option("--loss-chunks", type=click.IntRange(min=0), default=_defaults.loss_chunks, show_default=True,
              help="Causal LM: compute the LM head and cross-entropy in this many row slices, as a log-sum-exp of "
                   "threaded ops; 0 keeps ORT's SoftmaxCrossEntropyLoss (one thread, slower; docs/benchmarks.md).")
@click.option("--loss-chunk-rows", type=click.IntRange(min=1), default=None,
              help="The fewest labelled rows per loss slice: batches with few labelled positions use fewer, larger "
                   "slices (larger LM-head products run faster); more rows per slice cost memory. "
                   f"[default: {FLOAT_LOSS_CHUNK_ROWS}; 1, even slices, with --quantize]")
@click.option("--attention-chunk-rows", type=click.IntRange(min=0), default=_defaults.attention_chunk_rows,
              show_default=True,
              help="Causal attention in chunks of about this many query rows whose scores the backward pass "
                   "computes again, so memory grows linearly with the row length; 0 keeps the full "
                   "[seq, seq] scores and probabilities (kept from the forward to the backward pass).")
@click.option("--seed", type=int, default=_defaults.seed, show_default=True, help="Seed for new weights (classifier head).")
@click.option("--record-source-path", is_flag=True,
              help="Record the model's and --adapter's paths in the manifest as given (default: their names only; "
                   "the bundle travels, host paths stay here).")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder.")
@click.option("--verbose", is_flag=True, help="Show the exporters' and ONNX Runtime's logs.")
@click.pass_context
def command(ctx, model, out, gguf_file, task, num_labels, label_names, rank, alpha, dropout, targets, layers, dora,
            rslora, adapter, max_seq_len, weight_decay, max_grad_norm, external_data, quantize, block_size, asymmetric, quantize_all_linear, quantize_embeddings, no_recompute,
            no_recompute_activations, loss_chunks, loss_chunk_rows, attention_chunk_rows, seed, record_source_path, force, verbose):
    """Turn MODEL (a Hugging Face folder or a .gguf file) into a LoRA training bundle.

    Only the adapter weights (LoRA A/B, DoRA magnitudes, a classifier head) are trainable; every base
    weight is frozen (and, with --quantize, stored as int8/int4). Needs the [prepare] extra (torch, transformers, peft, optimum).
    """
    try:
        from ..prepare.pipeline import prepare_bundle
    except ImportError as exc:
        raise UserError(
            f"`ortft prepare` needs the host extra: {exc}",
            hint="pip install 'ortft[prepare]' on a workstation; devices only need `ortft train`",
        ) from exc
    config = PrepareConfig(
        model=model, out=out, gguf_file=gguf_file, task=task, num_labels=num_labels,
        labels=[name.strip() for name in label_names.split(",")] if label_names else None,
        rank=rank, alpha=alpha, dropout=dropout, targets=targets, layers=layers, dora=dora, rslora=rslora,
        adapter=adapter, max_seq_len=max_seq_len, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        external_data=external_data, quantize=quantize, block_size=block_size, quantize_symmetric=not asymmetric,
        quantize_all_linear=quantize_all_linear, quantize_embeddings=quantize_embeddings,
        quantize_recompute=not no_recompute, recompute_activations=not no_recompute_activations,
        loss_chunks=loss_chunks, loss_chunk_rows=loss_chunk_rows, attention_chunk_rows=attention_chunk_rows, seed=seed, record_source_path=record_source_path,
        force=force, verbose=verbose,
    )
    if adapter:
        explicit = {name: value for name, value in (("rank", rank), ("alpha", alpha), ("dora", dora), ("targets", targets))
                    if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
        config.adapter_overrides = explicit
    prepare_bundle(config)
