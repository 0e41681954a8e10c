"""The loader gate: what ortft checks before it opens any file of a bundle, a run or an export.

Bundles, runs and exports travel between people and devices, and whoever makes one writes its manifest
too, so the manifest's hashes only catch accidents. Before a command reads a file of such a folder:
- the path is relative, stays inside the folder (no absolute path, no `..` out of it, no backslash) and
  no part of it below the folder is a symbolic link; the file is a regular file;
- it is listed in the folder's manifest, with its size and sha256 (checked);
- every ONNX graph's external-data location is such a listed file, with offset + length inside it and
  the length the tensor needs (checked from the graph alone: `onnx.load(load_external_data=False)`).
Anything else is a user error (exit 2) that names the file. Exports copy only listed regular files
(`listed_files`). `open_bundle` and `open_export` are the gates the commands call; `member_path`,
`verify_listed` and `check_external_data` are the pieces, for new formats to call too.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from .bundle import MANIFEST_NAME
from .errors import BundleError
from .fsutil import sha256_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
EXTERNAL_KEYS = ("location", "offset", "length", "checksum")
ONNX_SUFFIX = ".onnx"
# Bits per element of every ONNX tensor type that can be stored as external data.
_ELEMENT_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
                 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}


# ---- paths -----------------------------------------------------------------------------------------


def member_parts(relative) -> tuple[str, ...]:
    """The parts of `relative`, a path inside its folder as manifests record it; ValueError when it is
    not one (absolute, a drive, `..` leaving the folder, a backslash, NUL, empty)."""
    if not isinstance(relative, str) or not relative or "\0" in relative or "\\" in relative:
        raise ValueError("not a relative path")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).drive or PureWindowsPath(relative).is_absolute():
        raise ValueError("an absolute path")
    normal = posixpath.normpath(relative)
    if normal in (".", "") or normal == ".." or normal.startswith("../"):
        raise ValueError("a path leaving the folder")
    return tuple(normal.split("/"))


def member_path(root: Path | str, relative: str, error: type[Exception] = BundleError, what: str = "bundle",
                directory: bool = False) -> Path:
    """root/relative after checking it: inside `root`, no symbolic link on the way, a regular file (or a
    folder with `directory`). `error` (a UserError class) names the file when it is not."""
    root = Path(root)
    try:
        parts = member_parts(relative)
    except ValueError as exc:
        raise error(f"{what} {root}: {relative!r} is {exc}, not a path inside the folder",
                    hint=f"ortft reads only files inside the {what}; the {what} was edited or made by something else") from exc
    current = root
    for index, part in enumerate(parts):
        current = current / part
        try:
            facts = os.lstat(current)
        except FileNotFoundError as exc:
            raise error(f"{what} {root}: {'/'.join(parts)} is missing", hint=f"copy the {what} anew") from exc
        except OSError as exc:
            raise error(f"{what} {root}: cannot read {'/'.join(parts)} ({exc.strerror or exc})", hint=f"copy the {what} anew") from exc
        if stat.S_ISLNK(facts.st_mode):
            raise error(f"{what} {root}: {'/'.join(parts[:index + 1])} is a symbolic link; ortft does not follow links inside a {what}",
                        hint=f"replace the link by the file itself (copy the {what} with `cp -rL`), or remove it")
        last = index == len(parts) - 1
        if last and not directory and not stat.S_ISREG(facts.st_mode):
            raise error(f"{what} {root}: {'/'.join(parts)} is not a regular file", hint=f"copy the {what} anew")
        if (not last or directory) and not stat.S_ISDIR(facts.st_mode):
            raise error(f"{what} {root}: {'/'.join(parts[:index + 1])} is not a folder", hint=f"copy the {what} anew")
    return current


def _file_problem(root: Path, relative: str, facts: dict, check_hashes: bool, what: str) -> str | None:
    try:
        path = member_path(root, relative, what=what)
    except BundleError as exc:
        return exc.message.split(": ", 1)[-1]
    size = path.stat().st_size
    if size != facts.get("bytes"):
        return f"{relative}: {size} bytes, manifest says {facts.get('bytes')}"
    if check_hashes and sha256_file(path) != facts.get("sha256"):
        return f"{relative}: sha256 differs from the manifest"
    return None


def verify_listed(root: Path | str, files: dict, check_hashes: bool = True, what: str = "bundle") -> list[str]:
    """Problems with the listed files (`{relative path: {sha256, bytes}}`): unsafe path, a link, missing,
    wrong size or hash. Empty when every one is a regular file inside `root` that matches."""
    problems = []
    for relative, facts in sorted(files.items()):
        problem = _file_problem(Path(root), relative, facts if isinstance(facts, dict) else {}, check_hashes, what)
        if problem:
            problems.append(problem)
    return problems


def listed_files(root: Path | str, files: dict, prefix: str = "", what: str = "bundle") -> list[tuple[str, Path]]:
    """(relative path, path) of every listed file under `prefix` (e.g. "tokenizer/", one level), each a regular
    file reached without links: the files an export may copy. Unlisted files are never returned."""
    chosen = []
    for relative in sorted(files):
        rest = relative[len(prefix):] if relative.startswith(prefix) else None
        if rest and "/" not in rest:
            chosen.append((relative, member_path(root, relative, what=what)))
    return chosen


# ---- ONNX external data ------------------------------------------------------------------------------


def _graph_tensors(graph):
    """Every TensorProto of a graph: initializers, sparse initializers' parts, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node):
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        for sparse in attribute.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for subgraph in attribute.graphs:
            yield from _graph_tensors(subgraph)


def model_tensors(model):
    """Every TensorProto of a model: its graph's (see _graph_tensors) and its local functions' nodes'."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def tensor_bytes(tensor) -> int | None:
    """Bytes a tensor's data takes (4-bit types packed two per byte); None for a type without a fixed size."""
    bits = _ELEMENT_BITS.get(tensor.data_type)
    if bits is None:
        return None
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return (count * bits + 7) // 8


def external_data_problems(root: Path | str, graph_relative: str, files: dict, model=None) -> list[str]:
    """What is wrong with the external-data locations of graph `graph_relative` (inside `root`), checked
    against the listed `files` ({relative path: {sha256, bytes}}); empty when every one is fine."""
    import onnx

    root = Path(root)
    if model is None:
        try:
            model = onnx.load(str(member_path(root, graph_relative)), load_external_data=False)
        except BundleError as exc:
            return [exc.message]
        except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX model
            return [f"{graph_relative}: not a readable ONNX model ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"]
    folder = posixpath.dirname(posixpath.normpath(graph_relative))
    problems = []
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        problem = _external_problem(root, folder, tensor, files)
        if problem:
            problems.append(f"{graph_relative}: tensor {tensor.name!r} {problem}")
            if len(problems) >= 5:
                break
    return problems


def _external_problem(root: Path, folder: str, tensor, files: dict) -> str | None:
    entries = {}
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_KEYS:
            return f"has an unknown external-data key {entry.key!r}"
        entries[entry.key] = entry.value
    location = entries.get("location")
    if not location:
        return "is external data without a location"
    try:
        member_parts(location)
        relative = "/".join(member_parts(posixpath.join(folder, location) if folder else location))
    except ValueError:
        return f"reads its data from {location!r}, which is not a file inside the folder"
    if relative not in files:
        return f"reads its data from {relative}, which the manifest does not list"
    try:
        offset = int(entries.get("offset", "0"))
        expected = tensor_bytes(tensor)
        length = int(entries["length"]) if "length" in entries else expected
    except ValueError:
        return "has an offset or length that is not a whole number"
    if expected is None:
        return f"has ONNX data type {tensor.data_type}, which cannot be external data"
    if offset < 0 or length is None or length < 0:
        return "has a negative offset or length"
    if length != expected:
        return f"claims {length} bytes of {relative}, but its shape and type need {expected}"
    size = files[relative].get("bytes") if isinstance(files[relative], dict) else None
    if not isinstance(size, int) or offset + length > size:
        return f"reads bytes {offset}..{offset + length} of {relative}, which has {size} bytes"
    path = member_path(root, relative)
    if path.stat().st_size != size:
        return f"reads {relative}, whose size differs from the manifest's"
    return None


def check_external_data(root: Path | str, files: dict, error: type[Exception] = BundleError, what: str = "bundle") -> None:
    """Every listed `.onnx` graph's external-data locations are listed files with offset + length inside them."""
    problems = []
    for relative in sorted(files):
        if relative.endswith(ONNX_SUFFIX):
            problems += external_data_problems(root, relative, files)
    if problems:
        raise error(f"{what} {root} is unsafe or damaged: {'; '.join(problems[:5])}",
                    hint=f"use a {what} made by ortft; a graph may read only files its {what} lists")


# ---- the gates --------------------------------------------------------------------------------------


def verify_folder(root: Path | str, files: dict, check_hashes: bool = True, error: type[Exception] = BundleError,
                  what: str = "bundle") -> None:
    """The listed files are intact regular files inside `root`, and every graph reads only listed files."""
    problems = verify_listed(root, files, check_hashes, what)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise error(f"{what} {root} is damaged or unsafe: {shown}", hint=f"prepare the {what} again or copy it anew" if what == "bundle"
                    else f"make the {what} again")
    check_external_data(root, files, error, what)


def check_tokenizer_files(root: Path | str, manifest: dict, directory: str, what: str = "bundle") -> None:
    """Every tokenizer file ortft would read from `directory` (tokenizer.json, its config, special tokens, chat
    template) is listed in the manifest; the folder itself is not a link."""
    root = Path(root)
    prefix = "" if directory in (".", "") else directory.rstrip("/") + "/"
    if prefix:
        member_path(root, prefix.rstrip("/"), what=what, directory=True)
    files = manifest.get("files") or {}
    for name in TOKENIZER_FILES:
        relative = prefix + name
        if os.path.lexists(root / relative) and relative not in files:
            raise BundleError(f"{what} {root}: {relative} is not listed in its manifest; ortft reads only listed files",
                              hint=f"remove {relative}, or make the {what} again")


def open_bundle(root: Path | str, check_hashes: bool = True) -> dict:
    """The bundle's manifest after the whole gate: types, every listed file, the graphs' external data, the
    tokenizer files (ortft.manifest.load_verified). `check_hashes=False` skips only the sha256 (sizes, paths and
    links are still checked)."""
    from .manifest import load_verified

    return load_verified(root, check_hashes)


def open_export(folder: Path | str) -> dict:
    """An export folder's manifest after the gate: its files are intact listed regular files, its graphs read
    only listed files, and its tokenizer files are listed."""
    from .export_manifest import read_export_manifest

    folder = Path(folder)
    manifest = read_export_manifest(folder)
    if manifest is None:
        raise BundleError(f"{folder} holds no ortft export (no manifest.json of format ortft-export)",
                          hint="pass a folder made by `ortft export`")
    from .json_types import check
    from .schemas import EXPORT_MANIFEST

    check(manifest, EXPORT_MANIFEST, str(folder / MANIFEST_NAME), BundleError, hint="the export was edited or damaged: export again")
    verify_folder(folder, manifest["files"], True, BundleError, "export")
    tokenizer_dir = (manifest.get("tokenizer") or {}).get("dir") or "."
    check_tokenizer_files(folder, manifest, tokenizer_dir, "export")
    return manifest


def open_model_folder(folder: Path | str) -> dict:
    """The manifest of a folder `generate` may run (an export or a bundle), after the gate that fits it;
    a manifest of any other format is returned as read (the caller says what it is not)."""
    import json

    folder = Path(folder)
    path = member_path(folder, MANIFEST_NAME, BundleError, "folder") if os.path.lexists(folder / MANIFEST_NAME) else None
    if path is None:
        raise BundleError(f"{folder} has no manifest.json", hint="pass a folder made by `ortft export` (or a run folder)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not readable JSON ({exc.__class__.__name__})", hint="export again") from exc
    kind = manifest.get("format") if isinstance(manifest, dict) else None
    if kind == "ortft-export":
        return open_export(folder)
    if kind == "ortft-bundle":
        return open_bundle(folder)
    return manifest if isinstance(manifest, dict) else {}


def context_length(folder: Path | str, manifest: dict) -> int | None:
    """The most tokens (prompt + generated) the folder's model takes: the source config's
    max_position_embeddings (a listed config.json), else the manifest's model.max_seq_len; None if neither."""
    import json

    files = manifest.get("files") or {}
    relative = ((manifest.get("inference") or {}).get("config") if manifest.get("format") == "ortft-bundle" else "config.json")
    value = None
    if relative and relative in files:
        try:
            config = json.loads(member_path(folder, relative).read_text(encoding="utf-8"))
            value = config.get("max_position_embeddings") if isinstance(config, dict) else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            value = None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        value = (manifest.get("model") or {}).get("max_seq_len")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None
