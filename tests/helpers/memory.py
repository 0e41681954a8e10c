"""What this process holds in memory, as the memory tests measure it (Linux: /proc/self/smaps)."""

from __future__ import annotations


def resident_kb(path) -> int:
    """Rss of this process's mappings of `path`, from /proc/self/smaps."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            if "-" in line.split(maxsplit=1)[0] and not line.startswith(("Rss", "Pss")):
                inside = line.rstrip().endswith(target)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total
