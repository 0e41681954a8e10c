"""`ortft export --format onnx-adapter`: the base model once, with each run's adapter in a small file beside it.

The folder holds the bundle's inference template rewritten so that every adapted linear layer reads its
adapter from graph inputs, each with a default initializer of the same name (so the graph without an
adapter is the base model), plus `adapters/NAME.onnx_adapter` files (ONNX Runtime's adapter format,
written with `onnxruntime.AdapterFormat`) that hold those inputs' values for one run. Exporting another
run of the same bundle into the folder adds its adapter file only. onnxruntime-genai serves them with
its Adapters API, ONNX Runtime with `RunOptions.add_active_adapter`, `ortft generate DIR --adapter NAME`
too.

For a linear layer y = x W^T with LoRA (A [r, in], B [out, r], scale s) the graph computes
  y = x W^T + (x A_t) B_t                  inputs MODULE.lora_A = A^T [in, r] (default 0),
                                                  MODULE.lora_B = s B^T [r, out] (default 0; the scale folded in)
and with DoRA (magnitude m) the merged weight's row factor as a third input:
  y = d * (x W^T + (x A_t) B_t)           MODULE.dora_scale = m / ||W + s B A||_row [out] (default 1)
which is exactly what the merged export computes (ortft/merge.py). Device side: numpy, onnx, onnxruntime.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import BundleManifest
from .errors import BundleError, ConfigError, OutputExistsError
from .export_files import write_serving_files
from .export_manifest import now, read_export_manifest, write_export_manifest
from .fsutil import TEMP_PREFIX, disk_error, sha256_file, staged_dir, write_json_atomic
from .inference_template import template_session_config
from .manifest import MANIFEST_NAME, manifest_digest
from .merge import AdaptedModule, adapted_modules, dora_output_scale

KIND = "onnx-adapter"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
ADAPTER_FORMAT_VERSION = 1  # what ortft writes as the adapter version of each file
NODE_PREFIX = "ortft_lora/"
VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class AdapterSlot:
    """The graph inputs through which one linear layer reads its adapter."""

    module: str  # HF module path, e.g. model.layers.0.self_attn.q_proj
    base_weight: str  # HF parameter name of its frozen weight
    in_features: int
    out_features: int
    rank: int
    dora: bool

    @property
    def lora_a(self) -> str:
        return f"{self.module}.lora_A"

    @property
    def lora_b(self) -> str:
        return f"{self.module}.lora_B"

    @property
    def dora_scale(self) -> str:
        return f"{self.module}.dora_scale"

    def inputs(self) -> list[tuple[str, list[int], float]]:
        """(name, shape, default value) of each input."""
        inputs = [(self.lora_a, [self.in_features, self.rank], 0.0), (self.lora_b, [self.rank, self.out_features], 0.0)]
        if self.dora:
            inputs.append((self.dora_scale, [self.out_features], 1.0))
        return inputs


def adapter_slots(manifest: dict) -> list[AdapterSlot]:
    """One slot per adapted linear layer of the bundle, in the manifest's order."""
    trainable = BundleManifest.of(manifest).trainable
    if any(entry["role"] == "full" for entry in trainable):
        names = sorted(entry["name"] for entry in trainable if entry["role"] == "full")
        raise BundleError(f"the bundle trains whole modules ({', '.join(names[:3])}), which an adapter file cannot carry",
                          hint="export with --format merged-onnx instead")
    shapes: dict[str, dict] = {}
    for entry in trainable:
        shapes.setdefault(entry["base_weight"], {})[entry["role"]] = entry["shape"]
    slots = []
    for base_weight, roles in shapes.items():
        if "lora_A" not in roles or "lora_B" not in roles:
            raise BundleError(f"the adapter of {base_weight} lacks lora_A or lora_B", hint="prepare the bundle again")
        rank, in_features = roles["lora_A"]
        out_features = roles["lora_B"][0]
        slots.append(AdapterSlot(base_weight.removesuffix(".weight"), base_weight, int(in_features), int(out_features), int(rank),
                                 "magnitude" in roles))
    return slots


# ---- the graph ---------------------------------------------------------------------------------------


def adapter_graph(template, slots: list[AdapterSlot]):
    """A copy of the template graph in which every slot's linear layer adds its adapter from graph inputs."""
    from onnx import TensorProto, helper, numpy_helper

    proto = copy.deepcopy(template.proto)
    graph = proto.graph
    weights = template.section["weights"]
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_initializer: dict[str, list[str]] = {}
    for hf_name, facts in weights.items():
        by_initializer.setdefault(facts["initializer"], []).append(hf_name)
    added_nodes: dict[int, list] = {}  # id(MatMul) -> nodes that follow it
    adapted = {slot.base_weight for slot in slots}
    for slot in slots:
        if slot.base_weight not in weights:
            raise BundleError(f"the inference template has no weight {slot.base_weight}", hint="prepare the bundle again")
        initializer = weights[slot.base_weight]["initializer"]
        if any(name != slot.base_weight and name in adapted for name in by_initializer[initializer]):
            raise BundleError(f"{slot.base_weight} shares its weights with another adapted layer", hint="export with --format peft")
        matmuls = _matmuls_reading(initializer, consumers)
        if not matmuls:
            raise BundleError(f"{slot.base_weight} is not read as MatMul(x, W) or MatMul(x, Transpose(W)) in the template",
                              hint="export with --format merged-onnx instead")
        for index, matmul in enumerate(matmuls):
            prefix = f"{NODE_PREFIX}{slot.module}" + (f"/{index}" if index else "")
            output = matmul.output[0]
            base_output = f"{prefix}/base"
            matmul.output[0] = base_output
            down, up = f"{prefix}/down", f"{prefix}/up"
            nodes = [
                helper.make_node("MatMul", [matmul.input[0], slot.lora_a], [down], name=f"{prefix}/MatMul_A"),
                helper.make_node("MatMul", [down, slot.lora_b], [up], name=f"{prefix}/MatMul_B"),
            ]
            if slot.dora:
                nodes.append(helper.make_node("Add", [base_output, up], [f"{prefix}/sum"], name=f"{prefix}/Add"))
                nodes.append(helper.make_node("Mul", [f"{prefix}/sum", slot.dora_scale], [output], name=f"{prefix}/Mul_dora"))
            else:
                nodes.append(helper.make_node("Add", [base_output, up], [output], name=f"{prefix}/Add"))
            added_nodes[id(matmul)] = nodes
        for name, shape, default in slot.inputs():
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            graph.initializer.append(numpy_helper.from_array(np.full(shape, default, np.float32), name))
    ordered = []
    for node in graph.node:
        ordered.append(node)
        ordered.extend(added_nodes.get(id(node), []))
    del graph.node[:]
    graph.node.extend(ordered)
    proto.ir_version = max(proto.ir_version, 4)  # initializers that are also inputs (overridable defaults) need IR version 4
    return proto


def _matmuls_reading(initializer: str, consumers: dict[str, list]) -> list:
    """The MatMuls that multiply by this weight: MatMul(x, W) or MatMul(x, Transpose(W)) (a Gather, the
    embedding lookup of a tied table, is not one of them)."""
    found = []
    for node in consumers.get(initializer, []):
        if node.op_type == "MatMul" and node.input[1] == initializer:
            found.append(node)
        elif node.op_type == "Transpose" and _perm(node) in (None, [1, 0]):
            found.extend(user for user in consumers.get(node.output[0], []) if user.op_type == "MatMul" and user.input[1] == node.output[0])
    return found


def _perm(node) -> list[int] | None:
    return next((list(attribute.ints) for attribute in node.attribute if attribute.name == "perm"), None)


# ---- the adapter files --------------------------------------------------------------------------------


def adapter_tensors(manifest: dict, template, adapter: dict[str, np.ndarray], slots: list[AdapterSlot]) -> dict[str, np.ndarray]:
    """The values of every slot's inputs for one trained adapter."""
    scale = float(BundleManifest.of(manifest).adapter["scale"])
    modules: dict[str, AdaptedModule] = adapted_modules(manifest, adapter)
    tensors = {}
    for slot in slots:
        module = modules[slot.base_weight]
        tensors[slot.lora_a] = np.ascontiguousarray(module.lora_A.astype(np.float32).T)
        tensors[slot.lora_b] = np.ascontiguousarray((np.float32(scale) * module.lora_B.astype(np.float32)).T)
        if slot.dora:
            stored = template.read(slot.base_weight)
            base = stored if template.section["weights"][slot.base_weight]["layout"] == "out_in" else stored.T
            tensors[slot.dora_scale] = dora_output_scale(base, module, scale)
    return tensors


def write_onnx_adapter(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write an .onnx_adapter file (onnxruntime.AdapterFormat) under a temporary name and rename it into place."""
    from .runtime import onnxruntime_module

    ort = onnxruntime_module()
    if not hasattr(ort, "AdapterFormat"):
        raise ConfigError(f"writing {path.name} needs onnxruntime >= 1.20 (this is {ort.__version__})",
                          hint="install ortft's own onnxruntime (`pip install .`), or export --format merged-onnx")
    arrays = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in tensors.items()}
    # set_parameters does not keep the numpy arrays alive: `arrays` and `values` hold them until the export
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    adapter_format = ort.AdapterFormat()
    adapter_format.set_adapter_version(ADAPTER_FORMAT_VERSION)
    adapter_format.set_model_version(1)
    adapter_format.set_parameters(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=ADAPTER_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        adapter_format.export_adapter(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise disk_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    del values, arrays


def adapter_relative_path(name: str) -> str:
    return f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}"


def check_adapter_name(name: str) -> str:
    if not VALID_NAME.match(name or ""):
        raise ConfigError(f"adapter name {name!r} is not a plain file name (letters, digits, '.', '_', '-'; at most 100)",
                          hint="pass --adapter-name NAME")
    return name


# ---- the export ---------------------------------------------------------------------------------------


def export_onnx_adapter(bundle_dir: Path | str, manifest: dict, adapter: dict[str, np.ndarray], out_dir: Path | str, name: str,
                        force: bool = False, source: dict | None = None) -> dict:
    """Write OUT/{model.onnx, model.onnx.data, genai_config.json, config.json, tokenizer, adapters/NAME.onnx_adapter,
    manifest.json}, or, when OUT already holds an onnx-adapter export of the same bundle, add adapters/NAME.onnx_adapter
    to it (an existing NAME only with `force`). Returns the export manifest (with `added_adapter` when one was added)."""
    from .adapter import check_adapter
    from .export import inference_facts, open_template

    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    check_adapter_name(name)
    check_adapter(manifest, adapter)
    slots = adapter_slots(manifest)
    existing = read_export_manifest(out_dir) if out_dir.is_dir() else None
    digest = manifest_digest(bundle_dir)
    same_base = existing is not None and existing.get("kind") == KIND and (existing.get("source") or {}).get("bundle_manifest_sha256") == digest
    if out_dir.exists() and not same_base and not force:
        what = "an onnx-adapter export of another bundle" if existing is not None and existing.get("kind") == KIND else "something else"
        raise OutputExistsError(f"output path {out_dir} already exists and holds {what}",
                                hint="choose another --out, or pass --force to replace the whole folder")
    template = open_template(bundle_dir, manifest)
    tensors = adapter_tensors(manifest, template, adapter, slots)
    entry = {"file": adapter_relative_path(name), "run": (source or {}).get("run"), "checkpoint": (source or {}).get("checkpoint"),
             "created": now()}
    if same_base:
        return _add_adapter(out_dir, name, tensors, entry, force)
    with staged_dir(out_dir, force) as staging:
        template.write_model(staging, adapter_graph(template, slots), {}, MODEL_FILE, DATA_FILE)
        session_config = template_session_config(manifest)  # a QLoRA bundle's base stays quantized here
        serving = write_serving_files(staging, bundle_dir, manifest, MODEL_FILE, session_config)
        write_onnx_adapter(staging / entry["file"], tensors)
        extra = {
            "inference": inference_facts(manifest),
            "tokenizer": serving["tokenizer"],
            "adapter": manifest.get("adapter"),
            "adapter_inputs": [{"module": slot.module, "base_weight": slot.base_weight,
                                "inputs": [{"name": input_name, "shape": shape, "default": default} for input_name, shape, default in slot.inputs()]}
                               for slot in slots],
            "adapters": {name: entry},
            **({"session_config": session_config} if session_config else {}),
            **({"notes": serving["notes"]} if serving["notes"] else {}),
        }
        bundle_source = {key: value for key, value in (source or {}).items() if key in ("bundle", "bundle_manifest_sha256")}
        return write_export_manifest(staging, KIND, bundle_dir, manifest, bundle_source, extra=extra)


def _add_adapter(out_dir: Path, name: str, tensors: dict[str, np.ndarray], entry: dict, force: bool) -> dict:
    """Add adapters/NAME.onnx_adapter to an existing folder: the file appears complete (renamed into place),
    then the manifest that lists it (written atomically). Concurrent exports into one folder take turns."""
    with _folder_lock(out_dir):
        export_manifest = read_export_manifest(out_dir)
        adapters = dict(export_manifest.get("adapters") or {})
        if name in adapters and not force:
            raise OutputExistsError(f"{out_dir} already has an adapter named {name}",
                                    hint="choose another --adapter-name, or pass --force to replace it")
        path = out_dir / entry["file"]
        write_onnx_adapter(path, tensors)
        adapters[name] = entry
        export_manifest["adapters"] = dict(sorted(adapters.items()))
        files = dict(export_manifest.get("files") or {})
        files[entry["file"]] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        export_manifest["files"] = dict(sorted(files.items()))
        write_json_atomic(out_dir / MANIFEST_NAME, export_manifest)
    return {**export_manifest, "added_adapter": name}


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on the folder itself (flock on its descriptor), where the platform has one."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks on folders; one export at a time is up to the user
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
