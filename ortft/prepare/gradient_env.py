"""The gradient builder's own Python environment: onnxruntime-training-cpu 1.19.2, apart from ortft's.

ortft trains on stock onnxruntime, but the backward graph is still built once, at prepare time, by ORT's
gradient builder, which only the deprecated training build (`onnxruntime-training-cpu` 1.19.2, the last
release; CPython 3.10-3.12) contains. Both packages install the module `onnxruntime`, so they can never
share an environment: the builder runs in a small venv of its own (onnxruntime-training-cpu, onnx,
numpy; ~60 MB), in a subprocess (`gradient_worker.py`), which also returns all of its memory when it ends.

Where it lives: `$ORTFT_GRADIENT_PYTHON` (a Python interpreter that has the training build), else
`$XDG_CACHE_HOME/ortft/gradient-builder` (default `~/.cache/ortft/gradient-builder`), made on first use
from the package registry, or beforehand by `python -m ortft.prepare.gradient_env` (scripts/setup.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError

TRAINING_BUILD = "onnxruntime-training-cpu==1.19.2"  # the last release that has ORT's gradient builder
# ORT 1.19 reads ONNX IR version <= 10; onnx 1.17+ stamps newer IR versions on the graphs onnxblock builds.
BUILDER_ONNX = "onnx==1.16.2"
BUILDER_NUMPY = "numpy>=1.24,<3"
BUILDER_PYTHONS = ((3, 10), (3, 11), (3, 12))  # the training build's wheels
ENV_VARIABLE = "ORTFT_GRADIENT_PYTHON"
STAMP_FILE = ".ortft-gradient-builder"


def builder_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ortft" / "gradient-builder"


def _requirements() -> list[str]:
    return [TRAINING_BUILD, BUILDER_ONNX, BUILDER_NUMPY]


def _venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _is_ready(folder: Path) -> bool:
    stamp = folder / STAMP_FILE
    return _venv_python(folder).exists() and stamp.is_file() and stamp.read_text().strip() == " ".join(_requirements())


def _base_python() -> str:
    """A Python the training build has wheels for: this one, or a python3.12/3.11/3.10 on PATH."""
    if sys.version_info[:2] in BUILDER_PYTHONS:
        return sys.executable
    for major, minor in reversed(BUILDER_PYTHONS):
        found = shutil.which(f"python{major}.{minor}")
        if found:
            return found
    raise ConfigError(
        f"ORT's gradient builder (onnxruntime-training-cpu 1.19.2) needs Python 3.10-3.12; this is "
        f"{sys.version_info.major}.{sys.version_info.minor} and no python3.10-3.12 is on PATH",
        hint=f"install Python 3.12 beside it, or point {ENV_VARIABLE} at a Python that has {TRAINING_BUILD}",
    )


def create(quiet: bool = False) -> Path:
    """Make (or refresh) the builder venv; returns its Python. Idempotent: a ready venv costs nothing."""
    folder = builder_dir()
    if _is_ready(folder):
        return _venv_python(folder)
    if not quiet:
        print(f"[ortft] setting up ORT's gradient builder in {folder} (once; ~60 MB from the package registry)",
              file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        subprocess.run([_base_python(), "-m", "venv", str(staging)], check=True)
        python = _venv_python(staging)
        result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *_requirements()],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ConfigError(
                f"could not install ORT's gradient builder ({TRAINING_BUILD}): {result.stderr.strip()[-800:]}",
                hint=f"check the connection to the package registry, or set {ENV_VARIABLE} to a Python that has it",
            )
        (staging / STAMP_FILE).write_text(" ".join(_requirements()) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)  # venvs are relocatable enough for `python -m`: scripts are not used
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _venv_python(folder)


def gradient_python(create_if_missing: bool = True) -> Path:
    """The interpreter that runs ORT's gradient builder."""
    override = os.environ.get(ENV_VARIABLE)
    if override:
        path = Path(override)
        if not path.exists():
            raise ConfigError(f"{ENV_VARIABLE}={override} does not exist", hint="point it at a Python interpreter that has "
                              f"{TRAINING_BUILD}, or unset it")
        return path
    folder = builder_dir()
    if _is_ready(folder):
        return _venv_python(folder)
    if not create_if_missing:
        raise ConfigError(f"ORT's gradient builder is not set up ({folder})",
                          hint="run `python -m ortft.prepare.gradient_env`")
    return create()


def main() -> None:
    print(gradient_python())


if __name__ == "__main__":
    main()
