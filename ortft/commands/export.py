"""`ortft export`: turn a run's checkpoint into a merged ONNX model, a PEFT adapter folder, or raw adapter weights.

Device side: no torch, no transformers. The output folder appears complete or not at all.
"""

from __future__ import annotations

import click

EXPORT_FORMATS = ("merged-onnx", "peft", "adapter")


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(), help="The export folder to create.")
@click.option("--checkpoint", default="latest", show_default=True,
              help="latest, best, or the path of a checkpoint folder (or its adapter.safetensors).")
@click.option("--format", "export_format", type=click.Choice(EXPORT_FORMATS), default="merged-onnx", show_default=True,
              help="merged-onnx: base + adapter folded into one ONNX model with KV cache; peft: a folder "
                   "PeftModel.from_pretrained loads; adapter: the adapter weights under their graph names.")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="merged-onnx only: store the merged linear weights quantized: int8 (per output channel, "
                   "DequantizeLinear) or int4 (blocked, com.microsoft MatMulNBits). Embeddings stay float32.")
@click.option("--block-size", type=int, default=None, help="int4 block size along the input dimension (power of two >= 16)  [default: 32]")
@click.option("--force", is_flag=True, help="Replace an existing export folder.")
def command(run_dir: str, out_dir: str, checkpoint: str, export_format: str, quantize: str | None, block_size: int | None, force: bool) -> None:
    """Export RUN_DIR's adapter (from `ortft train`) to --out."""
    from ..export import export_run

    export_manifest = export_run(run_dir, out_dir, checkpoint=checkpoint, kind=export_format, force=force, quantize=quantize, block_size=block_size)
    size_bytes = sum(facts["bytes"] for facts in export_manifest["files"].values())
    click.echo(f"wrote {export_format} export to {out_dir} ({len(export_manifest['files'])} files, {size_bytes / 1e6:.1f} MB)", err=True)
    quantization = export_manifest.get("quantization")
    if quantization:
        click.echo(f"{quantization['scheme']}: {quantization['quantized_layers']} linear layers, {quantization['bytes_before'] / 1e6:.1f} MB -> "
                   f"{quantization['bytes_after'] / 1e6:.1f} MB (max relative error per group {quantization['max_rel_error']:.4f})", err=True)
