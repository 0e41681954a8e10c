"""`ortft doctor`: what this environment has (versions, execution providers, threads, host extra)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

import click


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Gather the facts `doctor` prints, as a dict (also used by tests and bug reports)."""
    from .. import __version__
    from ..threads import default_threads

    facts: dict = {
        "ortft": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": _version("onnxruntime-training-cpu"),
        "onnx": _version("onnx"),
        "numpy": _version("numpy"),
        "tokenizers": _version("tokenizers"),
    }
    if facts["onnxruntime"] == "not installed":
        facts["onnxruntime"] = _version("onnxruntime-training")
    try:
        from ..runtime import onnxruntime_module  # a plain `import onnxruntime` loads onnxruntime.training, which needs torch

        facts["execution_providers"] = list(onnxruntime_module().get_available_providers())
    except Exception as exc:  # a broken install is exactly what doctor must report
        facts["execution_providers"] = [f"unavailable: {exc}"]
    try:
        from ..runtime import training_api

        training_api()
        facts["training_api"] = "ok"
    except Exception as exc:
        facts["training_api"] = f"unavailable: {exc}"
    host_packages = ["torch", "transformers", "peft", "optimum"]
    missing = [name for name in host_packages if importlib.util.find_spec(name) is None]
    facts["prepare_extra"] = "installed" if not missing else f"not installed (missing: {', '.join(missing)})"
    facts["cpu_count"] = os.cpu_count()
    facts["training_threads"] = default_threads()
    return facts


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def command(as_json: bool) -> None:
    """Print versions, execution providers, host extra and thread settings."""
    facts = collect()
    if as_json:
        import json

        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if isinstance(value, list):
            value = ", ".join(value)
        click.echo(f"{key:20s} {value}")
