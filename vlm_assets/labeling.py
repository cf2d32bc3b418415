"""Candlestick pattern rule engine: labels every bar of an OHLC series, vectorized and causal.

The label of bar t uses only bars <= t. Every threshold is relative to the average range / body of the
`avg_period` bars before the pattern's first candle, and trend context is measured on the closes before that
candle, so a pattern never inflates its own thresholds. All slacks are price differences divided by that average
range, which makes the labels invariant to price scale and to adding a constant to all prices.
The exact definitions live in docs/pattern_taxonomy.md; the two must stay in agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import pandas as pd

CORE_PATTERNS: tuple[str, ...] = (
    "bullish_engulfing",
    "bearish_engulfing",
    "hammer",
    "inverted_hammer",
    "doji",
    "morning_star",
    "evening_star",
    "inside_bar",
    "outside_bar",
)
ZERO_SHOT_PATTERNS: tuple[str, ...] = ("shooting_star", "hanging_man", "dragonfly_doji", "gravestone_doji")
ALL_PATTERNS: tuple[str, ...] = CORE_PATTERNS + ZERO_SHOT_PATTERNS
NEUTRAL = "neutral"
TIERS = ("rule_high", "rule_medium")
OHLC_COLUMNS = ("open", "high", "low", "close")
_TIER_DTYPE = pd.CategoricalDtype(("",) + TIERS)  # codes: 0 does not fire, 1 rule_high, 2 rule_medium

PATTERN_CANDLES: dict[str, int] = {
    "bullish_engulfing": 2,
    "bearish_engulfing": 2,
    "hammer": 1,
    "inverted_hammer": 1,
    "doji": 1,
    "morning_star": 3,
    "evening_star": 3,
    "inside_bar": 2,
    "outside_bar": 2,
    "shooting_star": 1,
    "hanging_man": 1,
    "dragonfly_doji": 1,
    "gravestone_doji": 1,
}
POLARITY: dict[str, str] = {
    "bullish_engulfing": "bullish",
    "bearish_engulfing": "bearish",
    "hammer": "bullish",
    "inverted_hammer": "bullish",
    "doji": "neutral",
    "morning_star": "bullish",
    "evening_star": "bearish",
    "inside_bar": "neutral",
    "outside_bar": "neutral",
    "shooting_star": "bearish",
    "hanging_man": "bearish",
    "dragonfly_doji": "bullish",
    "gravestone_doji": "bearish",
}
REQUIRED_TREND: dict[str, int] = {
    "bullish_engulfing": 0,
    "bearish_engulfing": 0,
    "hammer": -1,
    "inverted_hammer": -1,
    "doji": 0,
    "morning_star": -1,
    "evening_star": 1,
    "inside_bar": 0,
    "outside_bar": 0,
    "shooting_star": 1,
    "hanging_man": 1,
    "dragonfly_doji": 0,
    "gravestone_doji": 0,
}


@dataclass(frozen=True)
class RuleParams:
    """Every threshold of the rule engine; "avg range" / "avg body" are the means over `avg_period` bars."""

    avg_period: int = 10  # bars averaged for avg_range / avg_body
    trend_period: int = 10  # closes in the trend regression
    trend_threshold: float = 1.5  # |trend| beyond this (in avg ranges) is an up/down trend
    body_doji: float = 0.1  # doji: body <= body_doji * avg range
    body_long: float = 1.0  # long body: body > body_long * avg body
    body_short: float = 0.5  # short (star) body: body < body_short * avg body
    shadow_long: float = 2.0  # hammer family: long shadow >= shadow_long * own body
    shadow_very_short: float = 0.1  # very short shadow: shadow <= shadow_very_short * avg range
    doji_shadow_long: float = 0.5  # dragonfly / gravestone: long shadow >= doji_shadow_long * avg range
    star_tolerance: float = 0.1  # star body may reach this many avg ranges back into the first body
    star_penetration: float = 0.5  # third star candle closes at least this fraction into the first body
    tier_margin: float = 0.05  # margin >= tier_margin is rule_high, otherwise rule_medium

    def __post_init__(self) -> None:
        if self.avg_period < 1:
            raise ValueError(f"avg_period must be >= 1, got {self.avg_period}")
        if self.trend_period < 2:
            raise ValueError(f"trend_period must be >= 2 to fit a slope, got {self.trend_period}")
        for field in fields(self):
            if field.name not in ("avg_period", "trend_period") and not getattr(self, field.name) >= 0:
                raise ValueError(f"{field.name} must be a non-negative number, got {getattr(self, field.name)}")


def validate_ohlc_for_labeling(bars: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """open, high, low, close as float arrays; ValueError naming the first non-finite or inconsistent row."""
    missing = [col for col in OHLC_COLUMNS if col not in bars.columns]
    if missing:
        raise ValueError(f"bars is missing columns {missing}")
    o, h, l, c = (bars[col].to_numpy(dtype=float, na_value=np.nan) for col in OHLC_COLUMNS)
    finite = np.isfinite(o) & np.isfinite(h) & np.isfinite(l) & np.isfinite(c)
    consistent = (l <= np.minimum(o, c)) & (h >= np.maximum(o, c))
    bad = ~(finite & consistent)
    if bad.any():
        row = int(np.argmax(bad))
        reason = "non-finite price" if not finite[row] else "low <= min(open, close) <= max(open, close) <= high violated"
        raise ValueError(
            f"bad OHLC at row {row} (index {bars.index[row]!r}): {reason}: "
            f"open={o[row]}, high={h[row]}, low={l[row]}, close={c[row]}"
        )
    return o, h, l, c


def _lag(x: np.ndarray, k: int) -> np.ndarray:
    """x[t - k] at position t, NaN where t < k."""
    out = np.empty(len(x))
    out[:k] = np.nan
    out[k:] = x[: max(len(x) - k, 0)]
    return out


def _mean_of_previous(x: np.ndarray, period: int) -> np.ndarray:
    """Mean of x[t - period .. t - 1] at position t (excludes bar t), NaN where t < period.

    Summed lag by lag (a loop over the window, not over bars) so every output is computed the same way whatever
    the series length: prefixes label exactly like the full series.
    """
    out = np.full(len(x), np.nan)
    n = len(x) - period
    if n > 0:
        out[period:] = sum(x[j : j + n] for j in range(period)) / period
    return out


def _trend_move(close: np.ndarray, period: int) -> np.ndarray:
    """Least-squares slope of close[t - period .. t - 1] times (period - 1) at position t: the fitted net move."""
    weights = np.arange(period) - (period - 1) / 2  # centred abscissae; they sum to zero, so price level drops out
    out = np.full(len(close), np.nan)
    n = len(close) - period
    if n > 0:
        out[period:] = sum(w * close[j : j + n] for j, w in enumerate(weights)) * (period - 1) / (weights @ weights)
    return out


class _Candles:
    """One candle position of a pattern, as arrays over all bars (derived quantities computed on access)."""

    def __init__(self, open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray):
        self.open, self.high, self.low, self.close = open_, high, low, close

    def lagged(self, k: int) -> _Candles:
        if k == 0:
            return self
        return _Candles(*(_lag(x, k) for x in (self.open, self.high, self.low, self.close)))

    def mirrored(self) -> _Candles:
        """Negated prices: turns every bullish shape into its bearish mirror (high and low swap roles)."""
        return _Candles(-self.open, -self.low, -self.high, -self.close)

    @property
    def top(self) -> np.ndarray:
        return np.maximum(self.open, self.close)

    @property
    def bottom(self) -> np.ndarray:
        return np.minimum(self.open, self.close)

    @property
    def body(self) -> np.ndarray:
        return np.abs(self.close - self.open)

    @property
    def range(self) -> np.ndarray:
        return self.high - self.low

    @property
    def upper(self) -> np.ndarray:
        return self.high - self.top

    @property
    def lower(self) -> np.ndarray:
        return self.bottom - self.low


@dataclass(frozen=True)
class _Condition:
    """One rule condition; slack is in units of the pattern's avg range, positive where comfortably met.

    A gate must hold but only lowers the margin when it fails: used for non-degeneracy and for contact conditions,
    whose boundary is the normal case (intraday bars open exactly at the previous close).
    """

    slack: np.ndarray
    strict: bool
    gate: bool = False

    @property
    def holds(self) -> np.ndarray:
        return self.slack > 0 if self.strict else self.slack >= 0


class _Reference:
    """Averages and trend measured before a pattern's first candle; builds slacks normalized by avg_range."""

    def __init__(self, avg_range: np.ndarray, avg_body: np.ndarray, trend: np.ndarray, params: RuleParams):
        self.avg_range = np.where(avg_range > 0, avg_range, np.nan)  # flat history: thresholds undefined
        self.avg_body = avg_body
        self.trend = trend
        self.params = params

    def greater(self, a: np.ndarray, b: np.ndarray | float, gate: bool = False) -> _Condition:
        return _Condition((a - b) / self.avg_range, strict=True, gate=gate)

    def greater_equal(self, a: np.ndarray, b: np.ndarray | float, gate: bool = False) -> _Condition:
        return _Condition((a - b) / self.avg_range, strict=False, gate=gate)

    def less(self, a: np.ndarray, b: np.ndarray | float, gate: bool = False) -> _Condition:
        return self.greater(b, a, gate)

    def less_equal(self, a: np.ndarray, b: np.ndarray | float, gate: bool = False) -> _Condition:
        return self.greater_equal(b, a, gate)

    def trend_beyond(self, direction: int) -> _Condition:
        return _Condition(direction * self.trend - self.params.trend_threshold, strict=True)


# Shape rules are written for the bullish / lower-shadow variant; the bearish mirror runs them on negated prices.
_ShapeRule = Callable[[list[_Candles], _Reference], list[_Condition]]


def _engulfing(candles: list[_Candles], ref: _Reference) -> list[_Condition]:
    first, second = candles
    return [
        ref.greater(first.open - first.close, ref.params.body_doji * ref.avg_range),  # black, body not a doji
        ref.less_equal(second.open, first.close, gate=True),  # opens at or beyond the first close
        ref.greater(second.close, first.open),  # closes beyond the first open
    ]


def _hammer(candles: list[_Candles], ref: _Reference) -> list[_Condition]:
    (bar,) = candles
    p = ref.params
    return [
        ref.greater(bar.body, p.body_doji * ref.avg_range),  # visible body: never a doji
        ref.greater_equal(bar.lower, p.shadow_long * bar.body),
        ref.less_equal(bar.upper, p.shadow_very_short * ref.avg_range),
    ]


def _doji(candles: list[_Candles], ref: _Reference) -> list[_Condition]:
    (bar,) = candles
    return [ref.less_equal(bar.body, ref.params.body_doji * ref.avg_range)]


def _dragonfly(candles: list[_Candles], ref: _Reference) -> list[_Condition]:
    (bar,) = candles
    p = ref.params
    return _doji(candles, ref) + [
        ref.less_equal(bar.upper, p.shadow_very_short * ref.avg_range),
        ref.greater_equal(bar.lower, p.doji_shadow_long * ref.avg_range),
    ]


def _morning_star(candles: list[_Candles], ref: _Reference) -> list[_Condition]:
    first, star, third = candles
    p = ref.params
    first_body = first.open - first.close
    return [
        ref.greater(first_body, p.body_long * ref.avg_body),  # long black
        ref.less(star.body, p.body_short * ref.avg_body),
        # No gap needed (intraday bars cannot gap): the star body sits at or below the first close, within tolerance.
        ref.less_equal(star.top, first.close + p.star_tolerance * ref.avg_range),
        ref.greater(third.close, third.open),  # white
        ref.greater_equal(third.close, first.close + p.star_penetration * first_body),
    ]


def _inside_bar(candles: list[_Candles], ref: _Reference) -> list[_Condition]:
    mother, bar = candles
    return [ref.less(bar.high, mother.high), ref.greater(bar.low, mother.low)]


def _outside_bar(candles: list[_Candles], ref: _Reference) -> list[_Condition]:
    mother, bar = candles
    return [ref.greater(bar.high, mother.high), ref.less(bar.low, mother.low)]


_RULES: dict[str, tuple[_ShapeRule, bool]] = {  # pattern -> (shape rule, run on mirrored prices)
    "bullish_engulfing": (_engulfing, False),
    "bearish_engulfing": (_engulfing, True),
    "hammer": (_hammer, False),
    "inverted_hammer": (_hammer, True),
    "doji": (_doji, False),
    "morning_star": (_morning_star, False),
    "evening_star": (_morning_star, True),
    "inside_bar": (_inside_bar, False),
    "outside_bar": (_outside_bar, False),
    "shooting_star": (_hammer, True),
    "hanging_man": (_hammer, False),
    "dragonfly_doji": (_dragonfly, False),
    "gravestone_doji": (_dragonfly, True),
}


def _evaluate(conditions: list[_Condition], evaluable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fires, margin): all conditions hold; minimum slack, gates counting only when they fail."""
    fires = evaluable.copy()
    margin = np.full(len(evaluable), np.inf)
    for condition in conditions:
        holds = condition.holds
        fires &= holds
        margin = np.minimum(margin, np.where(holds, np.inf, condition.slack) if condition.gate else condition.slack)
    margin[~evaluable] = np.nan
    return fires, margin


def label_bars(bars: pd.DataFrame, params: RuleParams = RuleParams()) -> pd.DataFrame:
    """Label every bar with every pattern of ALL_PATTERNS (see module docstring and docs/pattern_taxonomy.md).

    Returns a frame with the same index: one bool column per pattern, f"{p}_margin" (minimum normalized slack,
    NaN where the rule cannot be evaluated), f"{p}_tier" ("rule_high" / "rule_medium" where it fires, "" otherwise),
    "neutral" (every rule evaluable and none fires), and the context columns "trend", "avg_range", "avg_body"
    measured on the bars before bar t.
    """
    o, h, l, c = validate_ohlc_for_labeling(bars)
    candles = _Candles(o, h, l, c)
    avg_range = _mean_of_previous(candles.range, params.avg_period)
    avg_body = _mean_of_previous(candles.body, params.avg_period)
    trend = _trend_move(c, params.trend_period) / np.where(avg_range > 0, avg_range, np.nan)

    # Rows of 2-D blocks, handed to pandas without copies (a dict of 40 columns costs seconds to consolidate).
    flags = np.empty((len(ALL_PATTERNS) + 1, len(bars)), dtype=bool)  # one row per pattern, then neutral
    values = np.empty((len(ALL_PATTERNS) + 3, len(bars)))  # one margin per pattern, then trend, avg_range, avg_body
    tiers: dict[str, pd.Categorical] = {}
    all_evaluable = np.ones(len(bars), dtype=bool)
    for row, pattern in enumerate(ALL_PATTERNS):
        rule, mirror = _RULES[pattern]
        span = PATTERN_CANDLES[pattern]
        first_lag = span - 1
        ref = _Reference(_lag(avg_range, first_lag), _lag(avg_body, first_lag), _lag(trend, first_lag), params)
        positions = [candles.lagged(span - 1 - i) for i in range(span)]
        conditions = rule([x.mirrored() for x in positions] if mirror else positions, ref)
        # Degenerate candles (high == low) never take part in a pattern.
        conditions += [ref.greater(x.range, 0.0, gate=True) for x in positions]
        evaluable = np.isfinite(ref.avg_range)
        if REQUIRED_TREND[pattern]:
            conditions.append(ref.trend_beyond(REQUIRED_TREND[pattern]))
            evaluable &= np.isfinite(ref.trend)
        fires, margin = _evaluate(conditions, evaluable)
        flags[row], values[row] = fires, margin
        tier_codes = np.where(fires, np.where(margin >= params.tier_margin, 1, 2), 0).astype(np.int8)
        tiers[f"{pattern}_tier"] = pd.Categorical.from_codes(tier_codes, dtype=_TIER_DTYPE)
        all_evaluable &= evaluable
    flags[-1] = all_evaluable & ~flags[:-1].any(axis=0)
    values[-3:] = trend, avg_range, avg_body

    index = bars.index
    return pd.concat(
        [
            pd.DataFrame(flags.T, index=index, columns=[*ALL_PATTERNS, NEUTRAL], copy=False),
            pd.DataFrame(
                values.T,
                index=index,
                columns=[f"{p}_margin" for p in ALL_PATTERNS] + ["trend", "avg_range", "avg_body"],
                copy=False,
            ),
            pd.DataFrame(tiers, index=index),
        ],
        axis=1,
    )
