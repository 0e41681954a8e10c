"""Helpers of the federated tests: non-IID shards of data/sft, running `ortft federate local`, loopback checks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from .paths import ROOT

KINDS = ("math", "words", "facts")
# Small and fast: 3 SuperNodes share 2 cores.
FAST_FED = ("--seq-len", "128", "--batch-size", "4", "--threads", "1", "--lr", "3e-3")


def kind_of(row: dict) -> str:
    user = next(m["content"] for m in row["messages"] if m["role"] == "user")
    if "How many" in user or "buys" in user:
        return "math"
    if "opposite" in user or "plural" in user:
        return "words"
    return "facts"


def write_shards(folder: Path, train: int = 24, valid: int = 8) -> dict[str, tuple[Path, Path]]:
    """One shard per kind of question (non-IID): {kind: (train.jsonl, valid.jsonl)}."""
    rows = [json.loads(line) for line in (ROOT / "data/sft/train.jsonl").read_text(encoding="utf-8").splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    shards = {}
    for kind in KINDS:
        chosen = [row for row in rows if kind_of(row) == kind]
        train_path, valid_path = folder / f"{kind}.jsonl", folder / f"{kind}-valid.jsonl"
        train_path.write_text("".join(json.dumps(r) + "\n" for r in chosen[:train]), encoding="utf-8")
        valid_path.write_text("".join(json.dumps(r) + "\n" for r in chosen[train:train + valid]), encoding="utf-8")
        shards[kind] = (train_path, valid_path)
    return shards


def shard_args(shards: dict[str, tuple[Path, Path]]) -> list[str]:
    args = []
    for train_path, valid_path in shards.values():
        args += ["--shard", str(train_path), "--valid", str(valid_path)]
    return args


def federation_pids(role: str | None = None) -> list[int]:
    """PIDs of every process started for a local federation (they carry ORTFT_FEDERATION in their environment);
    with `role`, only those of that part (ORTFT_FEDERATION_ROLE: superlink, supernode-NAME, flwr-run), which
    includes the helpers and apps that part started (the SuperLink's superexec and ServerApp, ...)."""
    from ortft.federated.local import marked_processes

    return marked_processes(None, role)


def wait_for(condition, timeout: float, what: str, process=None, period: float = 0.3) -> float:
    """Poll `condition()` until true; fail after `timeout` s or if `process` ends first. Returns the seconds waited."""
    started = time.monotonic()
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the federation ended (exit {process.returncode}) before: {what}")
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(period)
    return time.monotonic() - started


class ListenWatcher(threading.Thread):
    """Samples the listening sockets of every federation process until stopped."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period = period
        self.stop_event = threading.Event()
        self.listening: set[tuple[str, int, str]] = set()  # (ip, port, command line)
        self.cmdlines: set[str] = set()

    def run(self) -> None:
        import psutil

        while not self.stop_event.is_set():
            for pid in federation_pids():
                try:
                    process = psutil.Process(pid)
                    cmdline = " ".join(process.cmdline())
                    self.cmdlines.add(cmdline)
                    for conn in process.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            self.listening.add((conn.laddr.ip, conn.laddr.port, cmdline[:120]))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.stop_event.wait(self.period)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
