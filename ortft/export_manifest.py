"""The manifest.json of an export folder: what was exported, from which run and bundle, and every file's hash.

Device side: JSON only.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import BundleError
from .fsutil import sha256_file, write_json_atomic
from .manifest import MANIFEST_NAME, manifest_digest

EXPORT_FORMAT = "ortft-export"
# 2: merged-onnx holds the tokenizer at its root, with config.json and genai_config.json; onnx-adapter,
# gguf and gguf-lora kinds.
EXPORT_FORMAT_VERSION = 2


def write_export_manifest(staging: Path, kind: str, bundle_dir: Path | None, manifest: dict, source: dict | None,
                          extra: dict | None = None) -> dict:
    """Write `staging/manifest.json` for an export of `kind` made from `manifest`'s bundle; returns it."""
    source = dict(source or {})
    if bundle_dir is not None and "bundle_manifest_sha256" not in source:
        source.update(bundle=Path(bundle_dir).resolve().name, bundle_manifest_sha256=manifest_digest(bundle_dir))
    export_manifest = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": kind,
        "created": now(),
        "ortft": __version__,
        "source": source,
        "task": manifest.get("task"),
        "model": manifest.get("model"),
        "tokenizer": manifest.get("tokenizer"),
        **(extra or {}),
        "files": file_table(staging),
    }
    write_json_atomic(staging / MANIFEST_NAME, export_manifest)
    return export_manifest


def read_export_manifest(folder: Path) -> dict | None:
    """The manifest of an export folder, or None when `folder` holds no ortft export."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not readable JSON ({exc})", hint="export into a new folder, or pass --force") from exc
    return manifest if isinstance(manifest, dict) and manifest.get("format") == EXPORT_FORMAT else None


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_table(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file below `root` except the manifest itself."""
    table = {}
    for path in sorted(Path(root).rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and relative != MANIFEST_NAME:
            table[relative] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table
