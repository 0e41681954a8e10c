"""Learning-rate schedules (ortft/schedule.py): warm-up, cosine, linear, constant."""

from __future__ import annotations

import math

import pytest

from ortft.errors import ConfigError
from ortft.schedule import SCHEDULES, learning_rate

PEAK = 2e-4


def lrs(total: int, warmup: int, schedule: str) -> list[float]:
    return [learning_rate(step, total, PEAK, warmup, schedule) for step in range(1, total + 1)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_rises_linearly_to_the_peak(schedule):
    values = lrs(100, 10, schedule)
    assert values[:10] == pytest.approx([PEAK * step / 10 for step in range(1, 11)])
    assert values[10] == pytest.approx(PEAK)  # the first step after warm-up uses the peak


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_never_above_peak_positive_and_non_increasing_after_warmup(schedule):
    values = lrs(50, 5, schedule)
    assert all(0 < value <= PEAK * (1 + 1e-12) for value in values)
    after = values[5:]
    assert all(b <= a for a, b in zip(after, after[1:]))


def test_cosine_formula():
    total, warmup = 30, 4
    for step in range(warmup + 1, total + 1):
        progress = (step - warmup - 1) / (total - warmup)
        expected = PEAK * 0.5 * (1 + math.cos(math.pi * progress))
        assert learning_rate(step, total, PEAK, warmup, "cosine") == pytest.approx(expected)
    # halfway through the decay the rate is half the peak
    assert learning_rate(warmup + 1 + (total - warmup) // 2, total, PEAK, warmup, "cosine") == pytest.approx(PEAK / 2)


def test_linear_formula_and_last_step():
    values = lrs(10, 0, "linear")
    assert values == pytest.approx([PEAK * (1 - i / 10) for i in range(10)])
    assert values[-1] == pytest.approx(PEAK / 10)  # never zero: the last step still learns


def test_constant_is_the_peak_after_warmup():
    assert lrs(20, 3, "constant")[3:] == [PEAK] * 17
    assert lrs(5, 0, "constant") == [PEAK] * 5


def test_warmup_longer_than_the_run_is_clamped():
    values = lrs(5, 100, "cosine")
    assert values[:4] == pytest.approx([PEAK * step / 4 for step in range(1, 5)])  # warm-up shrinks to total - 1
    assert values[4] == pytest.approx(PEAK)
    assert learning_rate(1, 1, PEAK, 10, "cosine") == PEAK  # a one-step run has no warm-up


def test_steps_past_the_total_stay_at_the_end_of_the_schedule():
    assert learning_rate(15, 10, PEAK, 0, "linear") == pytest.approx(0.0)
    assert learning_rate(15, 10, PEAK, 0, "cosine") == pytest.approx(0.0, abs=1e-20)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="--schedule exponential is unknown"):
        learning_rate(1, 10, PEAK, 0, "exponential")
