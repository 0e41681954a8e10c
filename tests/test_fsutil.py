"""ortft/fsutil.py: staged folders replace their target atomically and sweep up after killed processes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ortft.fsutil import TEMP_PREFIX, native_write_errors, remove_stale_staging, staged_dir


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staged_dir_removes_leftovers_of_killed_processes_only(tmp_path):
    final = tmp_path / "bundle"
    stale = tmp_path / f"{TEMP_PREFIX}bundle-{_dead_pid()}-abcd1234"
    live = tmp_path / f"{TEMP_PREFIX}bundle-{os.getpid()}-live5678"
    other_target = tmp_path / f"{TEMP_PREFIX}bundle-12-{_dead_pid()}-abcd1234"  # belongs to "bundle-12"
    for folder in (stale, live, other_target):
        folder.mkdir()
        (folder / "weights").write_bytes(b"x" * 10)
    with staged_dir(final) as tmp:
        assert Path(tmp).name.startswith(f"{TEMP_PREFIX}bundle-{os.getpid()}-")
        (Path(tmp) / "manifest.json").write_text("{}")
    assert (final / "manifest.json").is_file()
    assert not stale.exists()
    assert live.exists() and other_target.exists()


def test_remove_stale_staging_ignores_foreign_names(tmp_path):
    (tmp_path / f"{TEMP_PREFIX}bundle-notapid-abcd1234").mkdir()
    (tmp_path / "bundle-123-abcd1234").mkdir()
    assert remove_stale_staging(tmp_path / "bundle") == []


def test_native_write_errors_become_os_errors():
    message = "checkpoint.cc:231 ToFile Failed to save checkpoint to file: /x/checkpoint. error:No space left on device errno:28"
    with pytest.raises(OSError) as caught, native_write_errors():
        raise RuntimeError(message)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="no errno here"), native_write_errors():
        raise RuntimeError("no errno here")  # any other native failure is left as it is

