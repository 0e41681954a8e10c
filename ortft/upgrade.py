"""`upgrade_bundle`: turn a bundle made for ORT's training API (format 1) into one stock onnxruntime trains.

Needs only onnx, numpy and onnxruntime's own checkpoint reader, so it runs on the device. It lowers the
training-only ops of both graphs (ortft/graph/lower_training_ops.py), writes the ORT checkpoint's trainable
tensors as initial_adapter.safetensors (and any frozen tensors an older checkpoint held into
frozen_weights.data, as initializers of both graphs), drops the optimizer graph and the checkpoint, and
records the old manifest's sha256 (`upgraded_from`), so runs made with the old bundle still name it.
The new bundle is built beside the old one (unchanged large files are hard-linked where the file system
allows) and swapped in only when complete.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from pathlib import Path

from .bundle import FROZEN_DATA, GRAPH_FILES, INITIAL_ADAPTER, TRAINING_API_CHECKPOINT, TRAINING_API_FILES
from .errors import BundleError
from .fsutil import staged_dir
from .manifest import FORMAT_VERSION, TRAINING_API_FORMAT, load_verified, manifest_digest, write_manifest
from .optimizer import ADAMW_UPDATE

log = logging.getLogger(__name__)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _frozen_into_graphs(folder: Path, frozen: dict) -> int:
    """Make the checkpoint's frozen tensors initializers of both graphs, stored once in FROZEN_DATA."""
    import onnx
    from onnx import TensorProto, helper

    from .graph.externalize_inputs import ExternalizeInputs, write_external_blobs

    if (folder / FROZEN_DATA).exists():
        raise BundleError(f"{folder.name}: both a checkpoint with frozen tensors and {FROZEN_DATA}",
                          hint="prepare the bundle again")
    offsets = write_external_blobs(((name, value.astype(value.dtype, copy=False).tobytes()) for name, value in frozen.items()),
                                   folder / FROZEN_DATA)
    dtypes = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE,
              "int64": TensorProto.INT64, "int32": TensorProto.INT32}
    shapes = {}
    for name, value in frozen.items():
        shape = helper.make_tensor(name, dtypes[str(value.dtype)], list(value.shape), vals=[], raw=True)
        shapes[name] = shape
    for file_name in GRAPH_FILES:
        path = folder / file_name
        graph = onnx.load(str(path), load_external_data=False)
        wanted = {value.name for value in graph.graph.input} & set(shapes)
        ExternalizeInputs({name: shapes[name] for name in wanted}, FROZEN_DATA, offsets).call(graph)
        onnx.save_model(graph, str(path))
    return len(frozen)


def upgrade_bundle(bundle: Path | str, quiet: bool = False, report=None) -> dict:
    """Upgrade `bundle` in place; returns the new manifest. A bundle already of the current format is left alone.

    `report(line)` hears what was done (the CLI prints it; default: the log at INFO); `quiet` says nothing."""
    from .legacy_checkpoint import read_ort_checkpoint
    from .graph.lower_bundle import lower_training_graphs
    from .adapter import adapter_bytes

    bundle = Path(bundle)
    manifest = load_verified(bundle)
    if manifest.format_version > TRAINING_API_FORMAT:
        if not quiet:
            (report or log.info)(f"{bundle} is already a stock-onnxruntime bundle (format_version {manifest.format_version})")
        return manifest
    old_digest = manifest_digest(bundle)
    checkpoint = read_ort_checkpoint(bundle / TRAINING_API_CHECKPOINT)
    trainable = manifest.trainable_names
    missing = [name for name in trainable if name not in checkpoint.trainable]
    if missing:
        raise BundleError(f"{bundle}/checkpoint lacks trainable tensors the manifest lists (e.g. {missing[0]})",
                          hint="prepare the bundle again")
    with staged_dir(bundle, force=True) as stage:
        for rel in manifest.files:
            if rel not in TRAINING_API_FILES and rel not in GRAPH_FILES:
                _link_or_copy(bundle / rel, stage / rel)
        for rel in GRAPH_FILES:
            shutil.copy2(bundle / rel, stage / rel)  # rewritten below: never a link to the old file
        (stage / INITIAL_ADAPTER).write_bytes(adapter_bytes({name: checkpoint.trainable[name] for name in trainable}))
        moved = _frozen_into_graphs(stage, checkpoint.frozen) if checkpoint.frozen else 0
        lowered = lower_training_graphs(stage)
        upgraded = dict(manifest)
        upgraded.pop("files", None)
        upgraded["format_version"] = FORMAT_VERSION
        upgraded["upgraded_from"] = {"format_version": manifest.get("format_version", TRAINING_API_FORMAT),
                                     "manifest_sha256": old_digest,
                                     "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        optimizer = dict(upgraded.get("optimizer") or {})
        optimizer["update"] = ADAMW_UPDATE
        upgraded["optimizer"] = optimizer
        patches = dict(upgraded.get("graph_patches") or {})
        patches["lowered_training_ops"] = lowered
        upgraded["graph_patches"] = patches
        if moved:
            upgraded["frozen_weights"] = {"file": FROZEN_DATA, "tensors": moved,
                                          "bytes": int(sum(value.nbytes for value in checkpoint.frozen.values()))}
        new_manifest = write_manifest(stage, upgraded)
    if not quiet:
        (report or log.info)(f"upgraded {bundle}: training-only ops lowered to standard ONNX, initial adapter in {INITIAL_ADAPTER}"
                             + (f", {moved} frozen tensors into {FROZEN_DATA}" if moved else ""))
    return new_manifest
