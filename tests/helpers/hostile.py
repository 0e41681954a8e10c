"""Helpers of the hostile-input tests: tamper with a copy of a tiny bundle as an attacker would (hashes
recomputed, so only the loader gate can tell), and check that a command refuses it cleanly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + b"s3cret" * 1000 + b"\n-----END OPENSSH PRIVATE KEY-----\n"


def copy_bundle(pristine: Path, destination: Path) -> Path:
    shutil.copytree(pristine, destination, symlinks=True)
    return destination


def write_secret(folder: Path) -> Path:
    """A file outside every bundle that no command may read: folder/secret/id_rsa."""
    path = folder / "secret" / "id_rsa"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET)
    return path


def reseal(bundle: Path, add: tuple[str, ...] = ()) -> dict:
    """Recompute the manifest's size and sha256 of every listed file (through links, as whoever edits a
    bundle would) and list `add` too: the manifest then vouches for the tampered bundle."""
    from ortft.fsutil import sha256_file

    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for relative in [*manifest["files"], *add]:
        target = bundle / relative
        manifest["files"][relative] = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def edit_manifest(bundle: Path, change) -> dict:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def point_external_data(graph: Path, location: str, min_bytes: int = 1, max_bytes: int = len(SECRET)) -> str:
    """Make one external initializer of `graph` (between min_bytes and max_bytes long) read from `location`,
    offset 0; returns the tensor's name. The graph file is rewritten in place."""
    import onnx

    from ortft.trust import tensor_bytes

    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        size = tensor_bytes(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL and size and min_bytes <= size <= max_bytes:
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            graph.write_bytes(model.SerializeToString())
            return tensor.name
    raise AssertionError(f"{graph} has no external initializer of {min_bytes}..{max_bytes} bytes")


def inference_graph(bundle: Path) -> Path:
    """The bundle's inference template graph (as its manifest names it)."""
    return bundle / json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["inference"]["model"]


def location_of(target: Path, graph: Path) -> str:
    """`target` as an external-data location relative to `graph`'s folder (with `..` where needed)."""
    import os

    return Path(os.path.relpath(target, graph.parent)).as_posix()


def refused(argv: list, capsys, *fragments: str) -> str:
    """Run `ortft ARGV` in this process: exit code 2, one `error:` message holding every fragment, no traceback."""
    from ortft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "error:" in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def succeeds(argv: list, capsys) -> str:
    from ortft.cli import main

    try:
        main([str(arg) for arg in argv])
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().err


def files_under(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")} if folder.exists() else set()


def holds_secret(folder: Path) -> bool:
    """Does any file below `folder` contain bytes of the secret?"""
    marker = SECRET[40:80]
    return any(path.is_file() and marker in path.read_bytes() for path in folder.rglob("*")) if folder.exists() else False
