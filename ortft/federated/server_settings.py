"""The ServerApp's run configuration keys and their defaults (shared by the app folder and the ServerApp)."""

from __future__ import annotations

# run-config key -> default. Keys use dashes, as Flower's run configs do.
DEFAULTS = {
    "bundle": "",
    "out": "",
    "rounds": 3,
    "strategy": "fedavg",
    "local-steps": 20,
    "lr": 2e-4,
    "batch-size": 4,
    "seq-len": 512,
    "schedule": "constant",
    "warmup": 0,
    "seed": 0,
    "min-nodes": 2,
    "fraction-train": 1.0,
    "round-timeout": 3600.0,
    "proximal-mu": 0.01,
    "server-lr": 0.01,
    "trim-beta": 0.2,
    "krum-malicious-nodes": 0,
    "dp-clip": 0.0,
    "dp-noise": 0.0,
    "max-update-norm": 0.0,
    "max-examples": 10_000_000,
    "resume": False,
    "keep": 3,
}
