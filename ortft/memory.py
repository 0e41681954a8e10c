"""Giving memory back to the system: freed heap (malloc_trim) and untouched file-mapped pages (madvise)."""

from __future__ import annotations

import gc


def release_freed_memory() -> None:
    """Collect garbage and ask glibc to hand freed heap back to the OS (Linux; a no-op elsewhere).

    Called between the big stages so that the next one (ORT's gradient graph) starts from a smaller
    resident set instead of on top of freed-but-kept torch and protobuf memory.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def drop_mapped_pages(path) -> int:
    """madvise(MADV_DONTNEED) this process's unmodified mappings of `path`; returns the bytes of those mappings.

    ORT maps each external tensor on its own (private, writable); a mapping none of whose pages was
    written (no anonymous pages in /proc/self/smaps) only holds page-cache pages, so dropping it only
    removes them from this process's resident set: the next read maps them back (a minor fault, no disk
    read). Mappings with written pages are left alone. Linux only; elsewhere nothing happens.
    """
    import ctypes
    import mmap
    import sys
    from pathlib import Path

    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    target = str(Path(path).resolve())
    regions = []  # [start, end, anonymous kB] of each mapping of `target`
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        current = None
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                current = None
                if line.rstrip().endswith(target):
                    start, end = (int(value, 16) for value in head.split("-"))
                    current = [start, end, 0]
                    regions.append(current)
            elif current is not None and head == "Anonymous:":
                current[2] = int(line.split()[1])
    libc = ctypes.CDLL(None, use_errno=True)
    dropped = 0
    for start, end, anonymous_kb in regions:
        if anonymous_kb == 0 and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped
