"""Tests of ortft/memory.py: pages of file mappings dropped from the resident set, written ones kept; large
freed blocks kept for reuse."""

from __future__ import annotations

import mmap
import sys

import pytest

from helpers.memory import resident_kb
from ortft.memory import drop_mapped_pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the helper does nothing elsewhere")
def test_dropped_pages_leave_the_resident_set_and_read_back_the_same(tmp_path):
    path = tmp_path / "weights.data"
    data = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB
    path.write_bytes(data)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        assert mapped[:] == data  # every page read, so resident
        assert resident_kb(path) >= 4096
        assert drop_mapped_pages(path) >= len(data)
        assert resident_kb(path) < 64
        assert mapped[:] == data  # paged back in from the page cache
        mapped.close()


def test_nothing_mapped_means_nothing_dropped(tmp_path):
    path = tmp_path / "never-mapped.data"
    path.write_bytes(b"x" * 8192)
    assert drop_mapped_pages(path) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the helper does nothing elsewhere")
def test_a_private_mapping_with_written_pages_is_left_alone(tmp_path):
    """ORT maps tensors private and writable; a written page exists only in memory and must survive."""
    path = tmp_path / "weights.data"
    path.write_bytes(b"\0" * (1 << 20))
    with open(path, "r+b") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        mapped[0:5] = b"wrote"
        assert drop_mapped_pages(path) == 0
        assert mapped[0:5] == b"wrote"
        mapped.close()


_FAULTS_SCRIPT = """
import resource, sys
from ortft.memory import reuse_large_blocks
if sys.argv[1] == "on":
    assert reuse_large_blocks()
block = bytearray(96 << 20)  # 96 MiB, above glibc's largest mmap threshold; zero-filled, so every page is touched
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(96 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; the helper does nothing elsewhere")
def test_reused_large_blocks_are_not_faulted_in_again():
    """glibc unmaps a freed 96 MiB block, so allocating it again faults every page in; kept, it does not."""
    import subprocess

    def faults(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(result.stdout.strip())

    default, kept = faults("off"), faults("on")
    assert default >= 40  # at least one fault per 2 MiB huge page, ~24k with 4 KiB pages
    assert kept <= default // 10
