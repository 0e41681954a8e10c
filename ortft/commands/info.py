"""`ortft info BUNDLE`: a short human summary of a bundle (model, adapters, sizes)."""

from __future__ import annotations

import click


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return str(num_bytes)


def summary_lines(manifest: dict) -> list[str]:
    from ..bundle import BundleManifest

    manifest = BundleManifest.of(manifest)
    model = manifest.model
    adapter = manifest.adapter
    trainable = manifest["num_trainable_parameters"]
    total = trainable + manifest["num_frozen_parameters"]
    source = manifest.source
    lines = [
        f"model        {source['architecture']} ({source['model_type']}) from {source['path']}"
        + (f" [{source['gguf_file']}]" if source.get("gguf_file") else ""),
        f"task         {manifest.task}" + (f"  labels: {', '.join(manifest.labels)}" if manifest.labels else ""),
        f"size         {model['num_layers']} layers, hidden {model['hidden_size']}, vocab {model['vocab_size']}, max seq {model['max_seq_len']}",
        f"parameters   {total:,} total, {trainable:,} trainable ({100.0 * trainable / max(total, 1):.3f}%)",
        f"adapter      {adapter['type']} r={adapter['rank']} alpha={adapter['alpha']:g} scale={adapter['scale']:.4g}"
        f" dropout={adapter['dropout']:g}{' rslora' if adapter['rslora'] else ''}",
        f"targets      {', '.join(adapter['targets'])}",
        f"layers       {_layer_span(adapter['layers'], model['num_layers'])}",
        f"optimizer    AdamW ({manifest.optimizer.get('update', 'old transformers.AdamW')} update) "
        f"weight_decay={manifest.optimizer['weight_decay']:g} max_grad_norm={manifest.optimizer['max_grad_norm']:g}",
        f"created      {manifest['created']} with ortft {manifest['versions']['ortft']}, onnxruntime {manifest['versions']['onnxruntime']}",
    ]
    zeros = manifest.get("initial_adapter_zeros") or []
    if zeros:
        lines.append(f"initial      {len(zeros)} of {len(manifest.trainable_names)} trainable tensors start at zero"
                     " (not stored in initial_adapter.safetensors)")
    lines.extend(quantization_lines(manifest.quantization))
    lines.append("files:")
    for rel, facts in sorted(manifest.files.items()):
        lines.append(f"  {rel:40s} {_size(facts['bytes']):>10s}")
    lines.append(f"  {'total':40s} {_size(sum(f['bytes'] for f in manifest.files.values())):>10s}")
    return lines


def quantization_lines(section: dict | None) -> list[str]:
    """Frozen-weight bytes before/after and the quantization error per layer (QLoRA bundles)."""
    if not section:
        return []
    before, after = section["frozen_bytes_before"], section["frozen_bytes_after"]
    block = f" block {section['block_size']}" if section.get("block_size") else ""
    lines = [
        f"quantized    {section['scheme']}{block} {'symmetric' if section['symmetric'] else 'asymmetric'}, "
        f"{len(section['layers'])} weights, {section.get('recomputed_for_backward', 0)} recomputed for backward",
        f"embeddings   {embeddings_storage(section)}",
        f"frozen bytes {_size(before)} -> {_size(after)} ({after / max(before, 1):.2f}x)",
        f"quant error  max relative {section['max_rel_error']:.4f}, mean relative RMS {section['mean_rel_rms_error']:.4f}",
    ]
    for name, layer in section["layers"].items():
        lines.append(f"  {name:64s} {_size(layer['bytes_before']):>9s} -> {_size(layer['bytes_after']):>9s}"
                     f"  max rel {layer['max_rel_error']:.4f}  rms {layer['rel_rms_error']:.4f}")
    return lines


def embeddings_storage(section: dict) -> str:
    """How a quantized bundle stores its embedding table (and a tied LM head), from `quantization.embeddings`:
    true (--quantize-embeddings), "int8-exact" (a GGUF's Q8_0 table kept losslessly) or false (float32)."""
    embeddings = section.get("embeddings", False)
    if embeddings == "int8-exact":
        tables = [layer for layer in section["layers"].values() if layer.get("scheme") == "int8-exact"]
        if not tables:
            raise ValueError("quantization.embeddings is \"int8-exact\" but no layer has that scheme")
        return f"int8, exact (the GGUF's Q8_0 table, {tables[0]['block_size']} values per scale)"
    if embeddings is True:
        block = f" block {section['block_size']}" if section.get("block_size") else ""
        return f"{section['scheme']}{block}, quantized with the linear weights (--quantize-embeddings; also the LM head)"
    if embeddings is False:
        return "float32"
    raise ValueError(f"quantization.embeddings is {embeddings!r}, not true, false or \"int8-exact\"")


def _layer_span(layers: list[int], total: int) -> str:
    if len(layers) == total:
        return f"all {total}"
    return f"{len(layers)} of {total} ({min(layers)}-{max(layers)})"


@click.command("info")
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def command(bundle, as_json):
    """Summarise BUNDLE: model, parameter counts, adapter settings and file sizes."""
    from ..errors import BundleError
    from ..trust import open_bundle

    manifest = open_bundle(bundle, check_hashes=False)  # types, paths, links, sizes, the graphs' external data
    if as_json:
        import json

        click.echo(json.dumps(manifest, indent=2))
        return
    try:
        lines = summary_lines(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{bundle}/manifest.json lacks a field `info` shows or has a wrong type ({exc.__class__.__name__}: {exc})",
                          hint="prepare the bundle again") from exc
    for line in lines:
        click.echo(line)
