"""Planted pattern templates fire the rule engine; their near misses never do."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlm_assets.labeling import ALL_PATTERNS, PATTERN_CANDLES, REQUIRED_TREND, label_bars
from vlm_assets.market.templates import MAX_GAP, NEAR_MISS_DESCRIPTIONS, pattern_candles

TRIALS = 200
CONTEXT_BARS = 15  # more than avg_period and trend_period, so every trial is labelled from its own context only


def random_context(rng: np.random.Generator, trend: int, avg_range: float, start: float) -> list[list[float]]:
    """Bars of average range ~avg_range, stepping steadily in the trend's direction (random steps without one)."""
    rows, close = [], start
    for _ in range(CONTEXT_BARS):
        step = trend * rng.uniform(0.3, 0.7) if trend else rng.choice([-1, 1]) * rng.uniform(0.1, 0.8)
        open_, close = close, close + step * avg_range
        upper, lower = rng.uniform(0.0, 0.35, 2) * avg_range
        rows.append([open_, max(open_, close) + upper, min(open_, close) - lower, close])
    return rows


def planted_trials(pattern: str, near_miss: bool, allow_gap: bool, seed: int = 0) -> tuple[pd.DataFrame, list[int]]:
    """TRIALS independent (context + pattern) segments in one frame, and the position of each pattern's last candle."""
    rng = np.random.default_rng(seed)
    rows, ends = [], []
    for _ in range(TRIALS):
        avg_range = rng.uniform(0.2, 3.0)
        rows += random_context(rng, REQUIRED_TREND[pattern], avg_range, start=rng.uniform(80.0, 120.0))
        rows += pattern_candles(pattern, rng, rows[-1][3], avg_range, near_miss=near_miss, allow_gap=allow_gap).tolist()
        ends.append(len(rows) - 1)
    return pd.DataFrame(rows, columns=["open", "high", "low", "close"]), ends


@pytest.mark.parametrize("allow_gap", [False, True], ids=["intraday", "daily"])
@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_planted_pattern_fires_and_near_miss_does_not(pattern: str, allow_gap: bool):
    bars, ends = planted_trials(pattern, near_miss=False, allow_gap=allow_gap)
    fired = label_bars(bars)[pattern].to_numpy()[ends]
    assert fired.mean() >= 0.99, f"{pattern} fired in {fired.mean():.1%} of trials"

    bars, ends = planted_trials(pattern, near_miss=True, allow_gap=allow_gap)
    assert not label_bars(bars)[pattern].to_numpy()[ends].any(), f"near miss of {pattern} fired"


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_planted_pattern_fires_clearly(pattern: str):
    """Not just barely: the margin clears every condition in most trials (the trend comes from the context)."""
    bars, ends = planted_trials(pattern, near_miss=False, allow_gap=False, seed=1)
    labels = label_bars(bars).iloc[ends]
    assert (labels[f"{pattern}_margin"] > 0.02).mean() >= 0.95


@pytest.mark.parametrize("near_miss", [False, True])
@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_intraday_candles_open_at_the_previous_close(pattern: str, near_miss: bool):
    rng = np.random.default_rng(2)
    for _ in range(50):
        prev_close = rng.uniform(50.0, 500.0)
        candles = pattern_candles(pattern, rng, prev_close, rng.uniform(0.1, 5.0), near_miss=near_miss)
        assert candles.shape == (PATTERN_CANDLES[pattern], 4)
        np.testing.assert_array_equal(candles[:, 0], np.r_[prev_close, candles[:-1, 3]])


@pytest.mark.parametrize("allow_gap", [False, True])
@pytest.mark.parametrize("near_miss", [False, True])
@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_candles_are_consistent_ohlc(pattern: str, near_miss: bool, allow_gap: bool):
    rng = np.random.default_rng(3)
    for _ in range(100):
        avg_range = rng.uniform(0.01, 10.0)
        candles = pattern_candles(pattern, rng, avg_range * rng.uniform(8.0, 100.0), avg_range, near_miss, allow_gap)
        o, h, l, c = candles.T
        assert (candles > 0).all()
        assert (l <= np.minimum(o, c)).all() and (np.maximum(o, c) <= h).all()


def test_daily_candles_gap_a_little():
    rng = np.random.default_rng(4)
    gaps = []
    for pattern in ALL_PATTERNS:
        for _ in range(20):
            candles = pattern_candles(pattern, rng, 100.0, 1.0, allow_gap=True)
            gaps += list(np.abs(candles[:, 0] - np.r_[100.0, candles[:-1, 3]]))
    gaps = np.array(gaps)
    assert (gaps > 0).mean() > 0.5
    assert gaps.max() <= MAX_GAP + 1e-9


def test_same_seed_same_candles():
    first = pattern_candles("morning_star", np.random.default_rng(5), 100.0, 1.0)
    np.testing.assert_array_equal(first, pattern_candles("morning_star", np.random.default_rng(5), 100.0, 1.0))


def test_every_pattern_has_a_near_miss_description():
    assert set(NEAR_MISS_DESCRIPTIONS) == set(ALL_PATTERNS)
    assert all(NEAR_MISS_DESCRIPTIONS.values())


def test_bad_arguments_are_rejected():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="unknown pattern"):
        pattern_candles("three_white_soldiers", rng, 100.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        pattern_candles("doji", rng, 100.0, 0.0)
    with pytest.raises(ValueError, match="too small"):
        pattern_candles("morning_star", rng, 1.0, 1.0)
