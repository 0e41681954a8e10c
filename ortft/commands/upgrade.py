"""`ortft upgrade BUNDLE`: rewrite a bundle made for ORT's training API so stock onnxruntime trains it."""

from __future__ import annotations

import click


@click.command("upgrade")
@click.argument("bundle", type=click.Path())
def command(bundle):
    """Upgrade BUNDLE (prepared before ortft trained on stock onnxruntime) in place.

    Lowers the training-only ops of its graphs to standard ONNX, moves the checkpoint's adapter into
    initial_adapter.safetensors and drops the optimizer graph; runs made with the old bundle keep
    working with the upgraded one. Needs no torch and no gradient builder: it runs on the device.
    """
    from ..upgrade import upgrade_bundle

    upgrade_bundle(bundle, report=lambda line: click.echo(line, err=True))
