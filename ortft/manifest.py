"""The bundle contract: write, read and verify manifest.json (see docs/bundle-format.md).

The device trusts nothing the manifest does not vouch for: every file's size and sha256 is
recorded and checked before use.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .bundle import MANIFEST_NAME, BundleManifest
from .errors import BundleError
from .fsutil import sha256_file, write_json_atomic

BUNDLE_FORMAT = "ortft-bundle"
FORMAT_VERSION = 2  # 2: standard-ONNX graphs for stock onnxruntime + initial_adapter.safetensors
TRAINING_API_FORMAT = 1  # bundles for ORT's deprecated training API (checkpoint, optimizer graph)


def list_files(root: Path) -> list[str]:
    """Relative paths of every file under `root` except the manifest, sorted."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST_NAME:
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def file_table(root: Path) -> dict[str, dict]:
    return {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size} for rel in list_files(root)}


def write_manifest(root: Path, manifest: dict) -> BundleManifest:
    """Record every file of `root` in `manifest['files']` and write manifest.json atomically."""
    manifest = BundleManifest(manifest)
    manifest["files"] = file_table(root)
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def manifest_digest(root: Path) -> str:
    """sha256 of manifest.json: identifies a bundle (it covers every file's hash)."""
    return hashlib.sha256((Path(root) / MANIFEST_NAME).read_bytes()).hexdigest()


def bundle_digests(root: Path | str) -> set[str]:
    """Every manifest sha256 this bundle has had: its own, and those of the bundle it was upgraded from
    (`ortft upgrade`), so runs made before an upgrade still name it."""
    digests = {manifest_digest(root)}
    try:
        manifest = json.loads((Path(root) / MANIFEST_NAME).read_text(encoding="utf-8"))
        earlier = (manifest.get("upgraded_from") or {}).get("manifest_sha256") if isinstance(manifest, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        earlier = None
    if isinstance(earlier, str):
        digests.add(earlier)
    return digests


def read_manifest(root: Path | str, expected_format: str = BUNDLE_FORMAT) -> BundleManifest:
    """Load and sanity-check manifest.json of a bundle folder, with user errors for what is wrong."""
    root = Path(root)
    if not root.exists():
        raise BundleError(f"{root} does not exist", hint="pass a folder made by `ortft prepare`")
    if not root.is_dir():
        raise BundleError(f"{root} is not a folder", hint="pass a folder made by `ortft prepare`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}", hint="pass a complete folder made by `ortft prepare`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})", hint="the bundle is damaged: prepare it again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise BundleError(f"{path} is not an {expected_format} manifest", hint="pass a folder made by `ortft prepare`")
    from .json_types import check
    from .schemas import BUNDLE_MANIFEST

    check(manifest, BUNDLE_MANIFEST, str(path), BundleError, hint="the manifest was edited or damaged: prepare the bundle again")
    if manifest["format_version"] > FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {manifest.get('format_version')}, newer than this ortft understands",
            hint="upgrade ortft on this device",
        )
    return BundleManifest(manifest)


def require_stock_runtime(root: Path | str, manifest: dict) -> None:
    """A BundleError for a bundle made for ORT's training API, with the command that upgrades it."""
    if BundleManifest.of(manifest).format_version <= TRAINING_API_FORMAT:
        raise BundleError(
            f"bundle {root} was prepared for ONNX Runtime's deprecated training API (format_version 1); "
            "ortft now trains on stock onnxruntime",
            hint=f"run `ortft upgrade {root}` (rewrites its graphs in place, a minute at most), or prepare it again",
        )


def verify_files(root: Path, manifest: dict, check_hashes: bool = True) -> list[str]:
    """Problems with the files the manifest lists (outside the folder, a symbolic link, not a regular file,
    missing, wrong size, wrong hash); empty if none (ortft/trust.py)."""
    from .trust import verify_listed

    return verify_listed(Path(root), manifest.get("files", {}), check_hashes)


def load_verified(root: Path | str, check_hashes: bool = True) -> BundleManifest:
    """read_manifest + verify_files + the rest of the loader gate (ortft/trust.py: the graphs' external data,
    the tokenizer files); a damaged or unsafe bundle is a BundleError listing what is wrong."""
    from .trust import check_external_data, check_tokenizer_files

    manifest = read_manifest(root)
    problems = verify_files(Path(root), manifest, check_hashes)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BundleError(f"bundle {root} is damaged: {shown}", hint="prepare the bundle again or copy it anew")
    check_external_data(root, manifest.files)
    check_tokenizer_files(root, manifest, manifest.tokenizer_dir)
    return manifest
