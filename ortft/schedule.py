"""Learning-rate schedules with linear warm-up: cosine, linear and constant (set each step).

lr(step) for step = 1..total: warm-up rises linearly to `peak` over `warmup` steps, then
cosine: peak * 0.5 * (1 + cos(pi * progress)); linear: peak * (1 - progress); constant: peak,
where progress = (step - warmup - 1) / (total - warmup), so the first step after warm-up uses the peak.
"""

from __future__ import annotations

import math

from .errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate(step: int, total: int, peak: float, warmup: int, schedule: str) -> float:
    if schedule not in SCHEDULES:
        raise ConfigError(f"--schedule {schedule} is unknown", hint=f"choose one of {', '.join(SCHEDULES)}")
    warmup = max(0, min(warmup, total - 1)) if total > 1 else 0
    if warmup and step <= warmup:
        return peak * step / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = min(1.0, max(0.0, (step - warmup - 1) / max(1, total - warmup)))
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
