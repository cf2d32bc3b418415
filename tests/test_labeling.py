"""The candlestick rule engine: hand-built fire / look-alike sequences, causality, invariances, doc agreement."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vlm_assets.labeling import (
    ALL_PATTERNS,
    CORE_PATTERNS,
    NEUTRAL,
    PATTERN_CANDLES,
    POLARITY,
    REQUIRED_TREND,
    TIERS,
    ZERO_SHOT_PATTERNS,
    RuleParams,
    label_bars,
    validate_ohlc_for_labeling,
)

TAXONOMY = Path(__file__).resolve().parents[1] / "docs" / "pattern_taxonomy.md"
PARAMS = RuleParams()
HISTORY = 2 + max(PARAMS.avg_period, PARAMS.trend_period)  # first bar at which every rule is evaluable


def frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["open", "high", "low", "close"], dtype=float)


def random_walk_bars(n: int, seed: int, substeps: int = 32) -> pd.DataFrame:
    """Driftless random walk with realistic candles: each bar's high/low come from an intrabar path, opens equal the
    previous close, and volatility clusters (smoothed log-volatility)."""
    rng = np.random.default_rng(seed)
    kernel = 0.97 ** np.arange(200)
    log_vol = np.convolve(rng.normal(0.0, 0.04, n + 199), kernel, mode="valid")
    paths = np.cumsum(rng.normal(0.0, 1.0 / np.sqrt(substeps), (n, substeps)), axis=1) * np.exp(log_vol)[:, None]
    close = 10_000.0 + np.cumsum(paths[:, -1])
    open_ = np.r_[10_000.0, close[:-1]]
    high = np.maximum(open_ + paths.max(axis=1), np.maximum(open_, close))
    low = np.minimum(open_ + paths.min(axis=1), np.minimum(open_, close))
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close})


# ---------------------------------------------------------------- hand-built sequences
def context(trend: int, n: int = 15, start: float = 100.0) -> list[tuple[float, float, float, float]]:
    """Bars of range exactly 1 and body 0.5 (avg_range 1, avg_body 0.5): steady steps for a trend, zigzag for none."""
    rows, close = [], start
    for i in range(n):
        step = 0.5 * trend if trend else (0.5 if i % 2 == 0 else -0.5)
        open_, close = close, close + step
        rows.append((open_, max(open_, close) + 0.25, min(open_, close) - 0.25, close))
    return rows


def labels_after(trend: int, candles: list[tuple[float, float, float, float]]) -> pd.Series:
    """Labels at the last of `candles` (given as offsets from the context's last close) planted after a context."""
    rows = context(trend)
    last_close = rows[-1][3]
    rows += [tuple(last_close + x for x in candle) for candle in candles]
    return label_bars(frame(rows)).iloc[-1]


@dataclass(frozen=True)
class Case:
    pattern: str
    trend: int
    candles: list[tuple[float, float, float, float]]  # (open, high, low, close) offsets from the last context close
    fires: bool
    instead: tuple[str, ...] = ()  # patterns the look-alike must fire
    why: str = ""


ENGULF_FIRST_BLACK = (0.0, 0.1, -0.7, -0.6)
ENGULF_FIRST_WHITE = (0.0, 0.7, -0.1, 0.6)
MORNING_FIRST_TWO = [(0.0, 0.1, -1.3, -1.2), (-1.2, -1.0, -1.5, -1.25)]
EVENING_FIRST_TWO = [(0.0, 1.3, -0.1, 1.2), (1.2, 1.5, 1.0, 1.25)]
HAMMER = (0.0, 0.25, -0.5, 0.2)  # body 0.2, lower shadow 0.5 >= 2 x body, upper 0.05
INVERTED_HAMMER = (0.0, 0.7, -0.05, 0.2)
DRAGONFLY = (0.0, 0.06, -0.8, 0.05)
GRAVESTONE = (0.0, 0.8, -0.06, -0.05)

CASES = [
    Case("bullish_engulfing", -1, [ENGULF_FIRST_BLACK, (-0.6, 0.3, -0.7, 0.2)], True),
    Case("bullish_engulfing", -1, [ENGULF_FIRST_BLACK, (-0.6, 0.0, -0.7, -0.09)], False, why="covers 85% of body"),
    Case("bullish_engulfing", 0, [(0.0, 0.1, -0.1, -0.05), (-0.05, 0.3, -0.1, 0.2)], False, why="first is a doji"),
    Case("bearish_engulfing", 1, [ENGULF_FIRST_WHITE, (0.6, 0.7, -0.3, -0.2)], True),
    Case("bearish_engulfing", 1, [ENGULF_FIRST_WHITE, (0.6, 0.7, 0.0, 0.09)], False, why="covers 85% of body"),
    Case("hammer", -1, [HAMMER], True),
    Case("hammer", 1, [HAMMER], False, ("hanging_man",), why="same shape after an uptrend"),
    Case("hammer", -1, [(0.0, 0.25, -0.3, 0.2)], False, why="lower shadow 1.5x body"),
    Case("hammer", -1, [DRAGONFLY], False, ("dragonfly_doji", "doji"), why="body at doji size"),
    Case("hammer", -1, [(0.0, 0.4, -0.5, 0.2)], False, why="upper shadow 0.2 not very short"),
    Case("hammer", 0, [HAMMER], False, why="no downtrend"),
    Case("inverted_hammer", -1, [INVERTED_HAMMER], True),
    Case("inverted_hammer", 1, [INVERTED_HAMMER], False, ("shooting_star",), why="same shape after an uptrend"),
    Case("inverted_hammer", -1, [(0.0, 0.5, -0.05, 0.2)], False, why="upper shadow 1.5x body"),
    Case("doji", 0, [(0.0, 0.4, -0.4, 0.05)], True),
    Case("doji", 0, [(0.0, 0.4, -0.4, 0.15)], False, why="body just above the doji threshold"),
    Case("morning_star", -1, MORNING_FIRST_TWO + [(-1.25, -0.3, -1.3, -0.4)], True),
    Case("morning_star", -1, MORNING_FIRST_TWO + [(-1.25, -0.8, -1.3, -0.9)], False, why="third closes 25% in"),
    Case("morning_star", -1, [(0.0, 0.1, -1.3, -1.2), (-1.2, -0.9, -1.5, -1.0), (-1.0, -0.3, -1.1, -0.4)], False,
         why="white star body reaches 0.2 back into the first body"),
    Case("morning_star", 1, MORNING_FIRST_TWO + [(-1.25, -0.3, -1.3, -0.4)], False, why="no prior downtrend"),
    Case("evening_star", 1, EVENING_FIRST_TWO + [(1.25, 1.3, 0.3, 0.4)], True),
    Case("evening_star", 1, EVENING_FIRST_TWO + [(1.25, 1.3, 0.8, 0.9)], False, why="third closes 25% in"),
    Case("inside_bar", 0, [(0.0, 1.0, -0.2, 0.8), (0.8, 0.9, 0.3, 0.4)], True),
    Case("inside_bar", 0, [(0.0, 1.0, -0.2, 0.8), (0.8, 1.1, 0.3, 0.4)], False, why="harami body, high pokes out"),
    Case("inside_bar", 0, [(0.0, 1.0, -0.2, 0.8), (0.8, 1.0, 0.3, 0.4)], False, why="equal high is not inside"),
    Case("outside_bar", 0, [(0.0, 0.6, -0.2, 0.4), (0.4, 0.7, -0.3, -0.1)], True),
    Case("outside_bar", 0, [(0.0, 0.6, -0.2, 0.4), (0.4, 0.7, -0.2, -0.1)], False, why="equal low"),
    Case("shooting_star", 1, [(0.0, 0.7, -0.25, -0.2)], True),
    Case("shooting_star", -1, [(0.0, 0.7, -0.25, -0.2)], False, ("inverted_hammer",), why="after a downtrend"),
    Case("hanging_man", 1, [(0.0, 0.05, -0.7, -0.2)], True),
    Case("hanging_man", -1, [(0.0, 0.05, -0.7, -0.2)], False, ("hammer",), why="after a downtrend"),
    Case("dragonfly_doji", 0, [DRAGONFLY], True, ("doji",)),
    Case("dragonfly_doji", 0, [(0.0, 0.35, -0.8, 0.05)], False, ("doji",), why="visible upper shadow"),
    Case("dragonfly_doji", 0, [(0.0, 0.06, -0.3, 0.05)], False, ("doji",), why="lower shadow too short"),
    Case("gravestone_doji", 0, [GRAVESTONE], True, ("doji",)),
    Case("gravestone_doji", 0, [(0.0, 0.8, -0.35, -0.05)], False, ("doji",), why="visible lower shadow"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.pattern}-{'fires' if c.fires else c.why}")
def test_hand_built_sequence(case: Case):
    labels = labels_after(case.trend, case.candles)
    assert len(case.candles) == PATTERN_CANDLES[case.pattern]
    assert bool(labels[case.pattern]) is case.fires
    assert (labels[f"{case.pattern}_margin"] >= 0) if case.fires else (labels[f"{case.pattern}_margin"] <= 0)
    assert (labels[f"{case.pattern}_tier"] in TIERS) is case.fires
    for other in case.instead:
        assert labels[other], f"look-alike should fire {other}"


def test_every_pattern_has_a_firing_case_and_a_look_alike():
    for pattern in ALL_PATTERNS:
        assert {c.fires for c in CASES if c.pattern == pattern} == {True, False}, pattern


def test_tiers_follow_the_margin():
    clear = labels_after(0, [(0.0, 1.0, -0.2, 0.8), (0.8, 0.9, 0.3, 0.4)])
    barely = labels_after(0, [(0.0, 1.0, -0.2, 0.8), (0.8, 0.98, 0.3, 0.4)])  # high 0.02 avg ranges inside
    assert clear["inside_bar_margin"] == pytest.approx(0.1)
    assert clear["inside_bar_tier"] == "rule_high"
    assert barely["inside_bar_margin"] == pytest.approx(0.02)
    assert barely["inside_bar_tier"] == "rule_medium"


def test_intraday_engulfing_is_not_capped_by_the_open_at_previous_close():
    labels = labels_after(0, [ENGULF_FIRST_BLACK, (-0.6, 0.3, -0.7, 0.2)])
    assert labels["bullish_engulfing_margin"] == pytest.approx(0.2)  # min(first body 0.6 - 0.1, close beyond 0.2)
    gapped_up = labels_after(0, [ENGULF_FIRST_BLACK, (-0.55, 0.3, -0.7, 0.2)])  # opens inside the first body
    assert not gapped_up["bullish_engulfing"]
    assert gapped_up["bullish_engulfing_margin"] == pytest.approx(-0.05)


def test_params_move_the_thresholds():
    rows = context(0) + [(100.0, 100.4, 99.6, 100.15)]  # body 0.15
    assert not label_bars(frame(rows))["doji"].iloc[-1]
    assert label_bars(frame(rows), RuleParams(body_doji=0.2))["doji"].iloc[-1]


def test_rule_params_reject_nonsense():
    with pytest.raises(ValueError, match="trend_period"):
        RuleParams(trend_period=1)
    with pytest.raises(ValueError, match="body_doji"):
        RuleParams(body_doji=-0.1)


# ---------------------------------------------------------------- structure, history, degenerate input
def test_output_columns_index_and_dtypes():
    bars = random_walk_bars(300, seed=1)
    bars.index = pd.date_range("2024-01-02 09:30", periods=len(bars), freq="min")
    labels = label_bars(bars)
    assert labels.index.equals(bars.index)
    for pattern in ALL_PATTERNS:
        assert labels[pattern].dtype == bool
        assert labels[f"{pattern}_margin"].dtype == float
        assert set(labels[f"{pattern}_tier"].unique()) <= {"", *TIERS}
    assert labels[NEUTRAL].dtype == bool
    for column in ("trend", "avg_range", "avg_body"):
        assert labels[column].dtype == float
    assert set(ALL_PATTERNS) == set(CORE_PATTERNS) | set(ZERO_SHOT_PATTERNS)
    assert set(POLARITY) == set(PATTERN_CANDLES) == set(REQUIRED_TREND) == set(ALL_PATTERNS)
    assert set(POLARITY.values()) <= {"bullish", "bearish", "neutral"}


def test_short_history_never_fires_and_is_not_neutral():
    labels = label_bars(random_walk_bars(60, seed=2))
    early = labels.iloc[: PARAMS.avg_period]
    assert not early[list(ALL_PATTERNS) + [NEUTRAL]].to_numpy().any()
    assert early[[f"{p}_margin" for p in ALL_PATTERNS]].isna().all().all()
    for pattern in ALL_PATTERNS:
        needed = PATTERN_CANDLES[pattern] - 1 + max(PARAMS.avg_period, PARAMS.trend_period * bool(REQUIRED_TREND[pattern]))
        margins = labels[f"{pattern}_margin"]
        assert margins.iloc[:needed].isna().all() and margins.iloc[needed:].notna().all(), pattern
    assert not labels[NEUTRAL].iloc[:HISTORY].any()
    assert labels[NEUTRAL].iloc[HISTORY:].any()


def test_margin_tier_and_neutral_are_consistent():
    labels = label_bars(random_walk_bars(20_000, seed=3))
    for pattern in ALL_PATTERNS:
        fires, margin, tier = labels[pattern], labels[f"{pattern}_margin"], labels[f"{pattern}_tier"]
        assert (margin[fires] >= 0).all()
        assert fires[margin > 0].all()  # margin > 0 means every condition holds
        assert ((tier != "") == fires).all()
        assert ((tier == "rule_high") == (fires & (margin >= PARAMS.tier_margin))).all()
    evaluable = labels[[f"{p}_margin" for p in ALL_PATTERNS]].notna().all(axis=1)
    assert (labels[NEUTRAL] == (evaluable & ~labels[list(ALL_PATTERNS)].any(axis=1))).all()


def test_mutually_exclusive_and_nested_patterns():
    labels = label_bars(random_walk_bars(20_000, seed=4))
    assert not (labels["hammer"] & labels["hanging_man"]).any()  # differ only by trend
    assert not (labels["inverted_hammer"] & labels["shooting_star"]).any()
    assert not (labels["hammer"] & labels["doji"]).any()  # differ by body: hammer is never a doji
    assert not (labels["inverted_hammer"] & labels["doji"]).any()
    assert not (labels["dragonfly_doji"] & ~labels["doji"]).any()  # a dragonfly doji is a doji
    assert not (labels["gravestone_doji"] & ~labels["doji"]).any()
    assert not (labels["inside_bar"] & labels["outside_bar"]).any()
    assert not (labels["bullish_engulfing"] & labels["bearish_engulfing"]).any()
    for pattern in ALL_PATTERNS:
        assert labels[pattern].any(), f"{pattern} never fires on 20k random-walk bars"


def test_degenerate_bars_never_fire_and_do_not_divide_by_zero():
    flat = (100.0, 100.0, 100.0, 100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after_context = label_bars(frame(context(-1) + [(92.5, 92.5, 92.5, 92.5)])).iloc[-1]
        flat_history = label_bars(frame([flat] * 30))
    assert not any(after_context[p] for p in ALL_PATTERNS)  # a flat bar is not even an inside bar
    assert after_context[NEUTRAL]
    assert not flat_history[list(ALL_PATTERNS) + [NEUTRAL]].to_numpy().any()
    assert flat_history[[f"{p}_margin" for p in ALL_PATTERNS]].isna().all().all()


def test_empty_and_tiny_inputs():
    assert label_bars(frame([])).empty
    tiny = label_bars(frame(context(1, n=3)))
    assert len(tiny) == 3 and not tiny[list(ALL_PATTERNS) + [NEUTRAL]].to_numpy().any()


@pytest.mark.parametrize(
    "row, message",
    [
        ((100.0, np.nan, 99.0, 100.0), "non-finite"),
        ((100.0, 101.0, 99.0, np.inf), "non-finite"),
        ((100.0, 100.5, 99.0, 101.0), "violated"),  # close above high
        ((100.0, 101.0, 100.2, 100.5), "violated"),  # open below low
    ],
)
def test_validation_names_the_first_bad_row(row, message):
    bars = frame(context(0) + [row, (100.0, np.nan, 99.0, 100.0)])
    bars.index = pd.date_range("2024-03-01", periods=len(bars), freq="D")
    with pytest.raises(ValueError, match=rf"row 15 \(index Timestamp\('2024-03-16.*{message}"):
        validate_ohlc_for_labeling(bars)
    with pytest.raises(ValueError, match="row 15"):
        label_bars(bars)


def test_validation_handles_nullable_columns():
    bars = frame(context(0)).astype("Float64")
    bars.loc[3, "close"] = pd.NA
    with pytest.raises(ValueError, match="row 3 .*non-finite"):
        label_bars(bars)


def test_validation_requires_ohlc_columns():
    with pytest.raises(ValueError, match="missing columns"):
        label_bars(frame(context(0)).drop(columns="low"))


# ---------------------------------------------------------------- causality
def test_no_look_ahead():
    bars = random_walk_bars(400, seed=5)
    labels = label_bars(bars)
    ends = sorted({0, 1, HISTORY - 1, HISTORY, HISTORY + 1, 399, *np.random.default_rng(0).integers(0, 400, 25)})
    for t in ends:
        pd.testing.assert_frame_equal(label_bars(bars.iloc[: t + 1]), labels.iloc[: t + 1])


def test_future_bars_do_not_change_past_labels():
    bars = random_walk_bars(400, seed=6)
    other_future = pd.concat([bars.iloc[:200], random_walk_bars(200, seed=7) + 50.0])
    pd.testing.assert_frame_equal(label_bars(bars).iloc[:200], label_bars(other_future).iloc[:200])


# ---------------------------------------------------------------- invariances
@st.composite
def tick_bars(draw) -> pd.DataFrame:
    """Integer-tick bars, mostly opening at the previous close and often touching thresholds exactly."""
    n = draw(st.integers(HISTORY, HISTORY + 25))
    gap = draw(arrays(np.int64, n, elements=st.sampled_from([0, 0, 0, 1, -1, 3])))
    move = draw(arrays(np.int64, n, elements=st.integers(-12, 12)))
    upper, lower = (draw(arrays(np.int64, n, elements=st.integers(0, 12))) for _ in range(2))
    close = 1_000 + np.cumsum(gap + move)
    open_ = close - move
    return frame({"open": open_, "high": np.maximum(open_, close) + upper, "low": np.minimum(open_, close) - lower,
                  "close": close})


def assert_same_labels(base: pd.DataFrame, other: pd.DataFrame) -> None:
    """Equal labels except where a condition sits exactly on its boundary (float rounding may tip those)."""
    margin_columns = [f"{p}_margin" for p in ALL_PATTERNS]
    margins = base[margin_columns].to_numpy()
    np.testing.assert_allclose(other[margin_columns].to_numpy(), margins, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(other["trend"].to_numpy(), base["trend"].to_numpy(), rtol=1e-9, atol=1e-9)
    clear = np.isnan(margins) | (np.abs(margins) > 1e-9)
    flags = list(ALL_PATTERNS)
    np.testing.assert_array_equal(other[flags].to_numpy()[clear], base[flags].to_numpy()[clear])
    tier_clear = clear & (np.isnan(margins) | (np.abs(margins - PARAMS.tier_margin) > 1e-9))
    tiers = [f"{p}_tier" for p in ALL_PATTERNS]
    np.testing.assert_array_equal(other[tiers].to_numpy(str)[tier_clear], base[tiers].to_numpy(str)[tier_clear])
    all_clear = clear.all(axis=1)
    np.testing.assert_array_equal(other[NEUTRAL].to_numpy()[all_clear], base[NEUTRAL].to_numpy()[all_clear])


@settings(max_examples=60, deadline=None)
@given(bars=tick_bars(), factor=st.floats(1e-3, 1e3))
def test_invariant_to_price_scale(bars: pd.DataFrame, factor: float):
    base, scaled = label_bars(bars), label_bars(bars * factor)
    assert_same_labels(base, scaled)
    np.testing.assert_allclose(scaled["avg_range"], base["avg_range"] * factor, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(bars=tick_bars(), shift=st.floats(-400.0, 1e5))
def test_invariant_to_price_shift(bars: pd.DataFrame, shift: float):
    base, shifted = label_bars(bars), label_bars(bars + shift)
    assert_same_labels(base, shifted)
    np.testing.assert_allclose(shifted["avg_range"], base["avg_range"], rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(bars=tick_bars(), power=st.integers(-20, 20), shift=st.integers(-400, 10**6))
def test_exactly_invariant_on_exact_arithmetic(bars: pd.DataFrame, power: int, shift: int):
    """Integer shifts and power-of-two scales are exact in floating point, so nothing may change at all."""
    base = label_bars(bars)
    pd.testing.assert_frame_equal(label_bars(bars + shift), base)
    scaled = label_bars(bars * 2.0**power)
    pd.testing.assert_frame_equal(scaled.drop(columns=["avg_range", "avg_body"]), base.drop(columns=["avg_range", "avg_body"]))


# ---------------------------------------------------------------- calibration
def test_trend_threshold_splits_a_random_walk_into_quarters():
    trend = label_bars(random_walk_bars(20_000, seed=8))["trend"].dropna()
    up, down = (trend > PARAMS.trend_threshold).mean(), (trend < -PARAMS.trend_threshold).mean()
    assert 0.2 < up < 0.3 and 0.2 < down < 0.3, (up, down)



# ---------------------------------------------------------------- the taxonomy document agrees with the code
def doc_table_rows(section: str) -> dict[str, list[str]]:
    """Rows of the markdown tables under the `## {section}` heading, keyed by their first cell (backticks stripped)."""
    text = TAXONOMY.read_text()
    body = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert body, f"no section {section!r} in {TAXONOMY.name}"
    rows = {}
    for line in body.group(1).splitlines():
        if line.startswith("|"):
            cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_doc_lists_every_parameter_with_its_default():
    rows = doc_table_rows("Parameters")
    for field in fields(RuleParams):
        assert field.name in rows, f"{field.name} missing from the parameter table"
        assert float(rows[field.name][0]) == getattr(PARAMS, field.name), field.name


def test_doc_summary_table_matches_pattern_metadata():
    rows = doc_table_rows("Patterns at a glance")
    trend_words = {-1: "down", 0: "none", 1: "up"}
    for pattern in ALL_PATTERNS:
        pattern_set, candles, trend, polarity = rows[pattern][:4]
        assert pattern_set == ("core" if pattern in CORE_PATTERNS else "zero-shot"), pattern
        assert int(candles) == PATTERN_CANDLES[pattern], pattern
        assert trend == trend_words[REQUIRED_TREND[pattern]], pattern
        assert polarity == POLARITY[pattern], pattern
    text = TAXONOMY.read_text()
    for pattern in ALL_PATTERNS:
        assert f"### `{pattern}`" in text, f"no condition table for {pattern}"
