"""`ortft export`: turn a run's checkpoint into something other runtimes load: ONNX (merged, or base +
adapter files), GGUF (merged, or a LoRA adapter), a PEFT adapter folder, or raw adapter weights.

Device side: no torch, no transformers. The output folder appears complete or not at all; an adapter
added to an onnx-adapter folder appears complete or not at all.
"""

from __future__ import annotations

import click

from ..cli_paths import InputPath
from ..config import INT4_BLOCK_SIZE, ExportConfig
from ..export import EXPORT_KINDS
from ..export_gguf import GGUF_TYPES

_defaults = ExportConfig()


@click.command("export")
@click.argument("run_dir", type=InputPath("pass the run folder `ortft train --out` wrote", file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(), help="The export folder to create (onnx-adapter: or to add to).")
@click.option("--checkpoint", default=_defaults.checkpoint, show_default=True,
              help="latest, best, or the path of a checkpoint folder (or its adapter.safetensors).")
@click.option("--format", "export_format", type=click.Choice(EXPORT_KINDS), default=_defaults.format, show_default=True,
              help="merged-onnx: base + adapter folded into one ONNX model with KV cache, config.json, tokenizer and "
                   "genai_config.json (Optimum, onnxruntime-genai, lm-eval load it); onnx-adapter: the base model with "
                   "the adapter as inputs plus adapters/NAME.onnx_adapter (export more runs into the same folder); "
                   "gguf: a merged llama.cpp model; gguf-lora: a llama.cpp LoRA adapter (llama-cli --lora); "
                   "peft: a folder PeftModel.from_pretrained loads; adapter: the adapter weights under their graph names. "
                   "A seq-cls or token-cls run exports as merged-onnx (the classifier, head included: ortft predict), "
                   "peft or adapter.")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=_defaults.quantize,
              help="merged-onnx only: store the merged linear weights quantized: int8 (per output channel, "
                   "DequantizeLinear) or int4 (blocked, com.microsoft MatMulNBits). Embeddings stay float32.")
@click.option("--block-size", type=int, default=_defaults.block_size,
              help=f"int4 block size along the input dimension (power of two >= 16)  [default: {INT4_BLOCK_SIZE}]")
@click.option("--adapter-name", default=_defaults.adapter_name,
              help="onnx-adapter only: the adapter's name (adapters/NAME.onnx_adapter).  [default: the run folder's name]")
@click.option("--gguf-type", type=click.Choice(GGUF_TYPES), default=_defaults.gguf_type,
              help="gguf only: the weights' type (norms stay f32).  [default: f16]")
@click.option("--force", is_flag=True, help="Replace an existing export folder (onnx-adapter: an adapter of that name in a "
              "folder of the same bundle; any other folder is replaced whole).")
def command(run_dir: str, out_dir: str, checkpoint: str, export_format: str, quantize: str | None, block_size: int | None,
            adapter_name: str | None, gguf_type: str | None, force: bool) -> None:
    """Export RUN_DIR's adapter (from `ortft train`) to --out."""
    from ..export import export_run

    export_manifest = export_run(run_dir, out_dir, checkpoint=checkpoint, kind=export_format, force=force, quantize=quantize,
                                 block_size=block_size, adapter_name=adapter_name, gguf_type=gguf_type)
    size_bytes = sum(facts["bytes"] for facts in export_manifest["files"].values())
    added = export_manifest.get("added_adapter")
    if added:
        click.echo(f"added adapter {added} to {out_dir} ({len(export_manifest['adapters'])} adapters: "
                   f"{', '.join(sorted(export_manifest['adapters']))})", err=True)
    else:
        click.echo(f"wrote {export_format} export to {out_dir} ({len(export_manifest['files'])} files, {size_bytes / 1e6:.1f} MB)", err=True)
    quantization = export_manifest.get("quantization")
    if quantization:
        click.echo(f"{quantization['scheme']}: {quantization['quantized_layers']} linear layers, {quantization['bytes_before'] / 1e6:.1f} MB -> "
                   f"{quantization['bytes_after'] / 1e6:.1f} MB (max relative error per group {quantization['max_rel_error']:.4f})", err=True)
    for note in export_manifest.get("notes") or []:
        click.echo(f"note: {note}", err=True)
