"""Crash-safe file writing: everything ortft writes goes to a temporary name, is fsynced, then renamed.

A crash, a kill -9 or a full disk therefore never leaves a half-written file or folder in place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DiskWriteError, OutputExistsError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".ortft-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(directory: bool) -> int:
    """The mode a plain open()/mkdir() would give: mkstemp/mkdtemp use 0600/0700 instead."""
    return (0o777 if directory else 0o666) & ~_umask()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_error(exc: OSError, target: Path) -> DiskWriteError:
    """Turn an OSError while writing `target` into a user error that says what to do."""
    if exc.errno == errno.ENOSPC:
        what = "the disk is full"
        todo = "free some space or choose another output folder, then run the command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "permission denied"
        todo = "choose a folder you can write to"
    else:
        what = exc.strerror or str(exc)
        todo = "check the output location and try again"
    return DiskWriteError(f"could not write {target}: {what}; nothing half-written was left", hint=todo)


_NATIVE_ERRNO = re.compile(r"errno:\s*(\d+)")


@contextlib.contextmanager
def native_write_errors() -> Iterator[None]:
    """Re-raise a failed write inside ONNX Runtime's C++ code as the OSError it stands for.

    ORT reports e.g. a full disk while saving a checkpoint as a RuntimeError whose message ends in
    "error:No space left on device errno:28"; as an OSError it reaches `disk_error` like any other.
    """
    try:
        yield
    except RuntimeError as exc:
        match = _NATIVE_ERRNO.search(str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code)) from exc


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync, and rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _default_mode(directory=False))
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise disk_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below `root` so that a rename of `root` is durable."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output path unless `force` is set."""
    if out.exists() and not force:
        raise OutputExistsError(
            f"output path {out} already exists",
            hint="choose another --out, or pass --force to replace it",
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_staging(final: Path) -> list[Path]:
    """Delete temporary folders for `final` left by a process that was killed (SIGKILL, OOM, power loss).

    staged_dir names its folder `.ortft-tmp-<name>-<pid>-<random>`; one whose process no longer exists
    can never be finished, and for a model it can be gigabytes. Folders of live processes are kept.
    """
    removed = []
    prefix = f"{TEMP_PREFIX}{final.name}-"
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[a-z0-9_]{8}$")  # mkdtemp adds 8 such characters
    for candidate in final.parent.glob(prefix + "*"):
        match = pattern.match(candidate.name)
        if not match or not candidate.is_dir() or _process_alive(int(match.group(1))):
            continue
        pid_text = match.group(1)
        shutil.rmtree(candidate, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run (process %s is gone)", candidate, pid_text)
        removed.append(candidate)
    return removed


@contextlib.contextmanager
def staged_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success move it to `final` atomically.

    On any failure the temporary folder is removed and an existing `final` is left untouched.
    With `force`, an existing `final` is replaced only after the new folder is complete.
    """
    final = Path(final)
    check_output_dir(final, force)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-{os.getpid()}-", dir=final.parent))
        os.chmod(tmp, _default_mode(directory=True))
    except OSError as exc:
        raise disk_error(exc, final) from exc
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = final.parent / f"{TEMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(exc, final) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()
