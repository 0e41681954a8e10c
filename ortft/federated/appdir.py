"""The Flower App folder that `flwr run` packs into a FAB and ships to the SuperLink.

It holds only pyproject.toml: the ServerApp and ClientApp live in the installed ortft package
(`ortft.federated.server_app:app`, `ortft.federated.client_app:app`), which must be installed,
with the `federated` extra, wherever the SuperLink and the SuperNodes run (Flower's runtime
dependency installation stays off).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..config import FederationConfig
from ..fsutil import write_text_atomic
from . import FLOWER_REQUIREMENT

APP_NAME = "ortft-federated"
PUBLISHER = "ortft"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def toml_table(values: dict) -> str:
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())


def app_pyproject(defaults: dict | None = None) -> str:
    config = FederationConfig.run_config_defaults()
    config.update(defaults or {})
    return (
        "# A Flower App whose ServerApp and ClientApp live in the installed `ortft` package.\n"
        "# Written by `ortft federate app`; run it with `flwr run <this folder> <superlink connection>`.\n"
        "[project]\n"
        f'name = "{APP_NAME}"\n'
        f'version = "{__version__}"\n'
        'description = "Federated fine-tuning of an ortft bundle\'s adapter (only the adapter travels)"\n'
        'license = "Apache-2.0"\n'
        f'dependencies = ["{FLOWER_REQUIREMENT}", "ortft[federated]=={__version__}"]\n'
        "\n[tool.flwr.app]\n"
        f'publisher = "{PUBLISHER}"\n'
        "\n[tool.flwr.app.components]\n"
        'serverapp = "ortft.federated.server_app:app"\n'
        'clientapp = "ortft.federated.client_app:app"\n'
        "\n# The ServerApp's settings (override with `flwr run ... --run-config FILE.toml`).\n"
        "[tool.flwr.app.config]\n"
        + toml_table(config)
    )


def write_app(folder: Path | str, defaults: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "pyproject.toml", app_pyproject(defaults))
    return folder
