"""`ortft validate BUNDLE`: check a bundle's integrity and that it trains, before using it."""

from __future__ import annotations

import click


@click.command("validate")
@click.argument("bundle", type=click.Path())
@click.option("--threads", type=int, default=None, help="ORT intra-op threads (default: physical cores).")
@click.option("--no-train-step", is_flag=True, help="Skip the synthetic training step.")
def command(bundle, threads, no_train_step):
    """Check BUNDLE: hashes, versions, that ORT loads it, and that one step trains only the adapters."""
    from ..errors import BundleError
    from ..threads import default_threads
    from ..validate import validate_bundle

    report = validate_bundle(bundle, threads=threads or default_threads(), train_step=not no_train_step)
    for name, ok, detail in report.checks:
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}")
    if not report.ok:
        failed = [name for name, ok, _ in report.checks if not ok]
        raise BundleError(f"bundle {bundle} failed validation: {', '.join(failed)}", hint="prepare the bundle again")
    click.echo(f"bundle {bundle} is valid")
