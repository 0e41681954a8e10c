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
        "onnx": _version("onnx"),
        "numpy": _version("numpy"),
        "tokenizers": _version("tokenizers"),
    }
    from ..runtime import onnxruntime_distribution

    distribution = onnxruntime_distribution()
    facts["onnxruntime"] = f"{distribution[0]} {distribution[1]}" if distribution else "not installed"
    try:
        from ..runtime import onnxruntime_module

        ort = onnxruntime_module()
        facts["execution_providers"] = list(ort.get_available_providers())
        ort.InferenceSession  # noqa: B018  (a broken install fails here)
        facts["training"] = "ok (stock onnxruntime runs ortft's training graphs)" if distribution and \
            not distribution[0].startswith("onnxruntime-training") else "the training build: ortft needs stock onnxruntime"
    except Exception as exc:  # a broken install is exactly what doctor must report
        facts["execution_providers"] = [f"unavailable: {exc}"]
        facts["training"] = f"unavailable: {exc}"
    from ..providers import auto_provider

    try:
        facts["auto_provider"] = auto_provider()
    except Exception as exc:
        facts["auto_provider"] = f"unavailable: {exc}"
    host_packages = ["torch", "transformers", "peft", "optimum"]
    missing = [name for name in host_packages if importlib.util.find_spec(name) is None]
    facts["prepare_extra"] = "installed" if not missing else f"not installed (missing: {', '.join(missing)})"
    if not missing:
        from ..prepare.gradient_env import ConfigError, gradient_python

        try:
            facts["gradient_builder"] = str(gradient_python(create_if_missing=False))
        except ConfigError as exc:
            facts["gradient_builder"] = f"not set up ({exc.hint})"
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
