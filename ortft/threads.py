"""The default number of compute threads: the machine's physical cores (hyper-threads rarely help GEMM)."""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Count physical cores from /proc/cpuinfo on Linux; fall back to os.cpu_count()."""
    logical = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return logical
    cores = set()
    physical_id = core_id = None
    for line in text.splitlines():
        if line.startswith("physical id"):
            physical_id = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            core_id = line.split(":", 1)[1].strip()
        elif not line.strip():
            if core_id is not None:
                cores.add((physical_id, core_id))
            physical_id = core_id = None
    if core_id is not None:
        cores.add((physical_id, core_id))
    return max(1, min(len(cores), logical)) if cores else logical


def default_threads() -> int:
    """Threads for training and inference unless --threads says otherwise (ORTFT_THREADS overrides)."""
    env = os.environ.get("ORTFT_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(1, min(physical_cores(), available))
