"""Candle templates the synthetic market generator plants: each pattern, and its nearest look-alike that must not fire.

Candles are built in "offset space" (prices relative to prev_close, in units of avg_range) for the bullish /
lower-shadow orientation; bearish patterns are the mirror image (offsets negated, high and low swapped), exactly as
the rule engine mirrors its shape rules. Sizes are chosen to clear the thresholds of vlm_assets.labeling for any
context whose measured average range is within about 0.7x..1.4x of avg_range and whose average body is at least a
quarter of its average range.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vlm_assets.labeling import ALL_PATTERNS

MAX_GAP = 0.15  # largest gap between candles with allow_gap=True, in avg ranges

NEAR_MISS_DESCRIPTIONS: dict[str, str] = {
    "bullish_engulfing": "white body covers only ~80-90% of the prior black body (closes below the prior open)",
    "bearish_engulfing": "black body covers only ~80-90% of the prior white body (closes above the prior open)",
    "hammer": "hammer shape whose lower shadow is only ~1.3-1.7x the body",
    "inverted_hammer": "inverted-hammer shape whose upper shadow is only ~1.3-1.7x the body",
    "doji": "doji-like candle whose body is ~1.6-2.2x the doji threshold",
    "morning_star": "long black, small star, white third candle closing only 15-35% into the first body",
    "evening_star": "long white, small star, black third candle closing only 15-35% into the first body",
    "inside_bar": "harami-like: body inside the prior body, but one shadow pokes beyond the prior high or low",
    "outside_bar": "exceeds the prior bar at one end only; the other extreme stays inside the prior range",
    "shooting_star": "shooting-star shape whose upper shadow is only ~1.3-1.7x the body",
    "hanging_man": "hanging-man shape whose lower shadow is only ~1.3-1.7x the body",
    "dragonfly_doji": "doji with a long lower shadow but a visible upper shadow (~0.2-0.35 avg ranges)",
    "gravestone_doji": "doji with a long upper shadow but a visible lower shadow (~0.2-0.35 avg ranges)",
}


def _candle(open_: float, close: float, upper: float, lower: float) -> list[float]:
    return [open_, max(open_, close) + upper, min(open_, close) - lower, close]


class _Draw:
    """Random sizes in avg-range units; gaps are zero unless allowed (intraday bars open at the previous close)."""

    def __init__(self, rng: np.random.Generator, allow_gap: bool):
        self.rng = rng
        self.allow_gap = allow_gap

    def size(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def gap(self, low: float = -MAX_GAP, high: float = MAX_GAP) -> float:
        return self.size(low, high) if self.allow_gap else 0.0

    def sign(self) -> int:
        return 1 if self.rng.random() < 0.5 else -1


def _hammer(draw: _Draw, near_miss: bool) -> list[list[float]]:
    open_ = draw.gap()
    body = draw.size(0.2, 0.35)
    lower = body * (draw.size(1.3, 1.7) if near_miss else draw.size(2.6, 4.0))
    return [_candle(open_, open_ + draw.sign() * body, draw.size(0.0, 0.03), lower)]


def _doji(draw: _Draw, near_miss: bool) -> list[list[float]]:
    open_ = draw.gap()
    body = draw.size(0.16, 0.22) if near_miss else draw.size(0.0, 0.04)
    return [_candle(open_, open_ + draw.sign() * body, draw.size(0.15, 0.6), draw.size(0.15, 0.6))]


def _dragonfly(draw: _Draw, near_miss: bool) -> list[list[float]]:
    open_ = draw.gap()
    upper = draw.size(0.2, 0.35) if near_miss else draw.size(0.0, 0.03)
    return [_candle(open_, open_ + draw.sign() * draw.size(0.0, 0.04), upper, draw.size(0.8, 1.5))]


def _bullish_engulfing(draw: _Draw, near_miss: bool) -> list[list[float]]:
    open1 = draw.gap()
    body1 = draw.size(0.5, 1.0)
    close1 = open1 - body1
    open2 = close1 - draw.gap(0.0, MAX_GAP)  # a daily gap opens beyond the first close, keeping the body engulfing
    close2 = close1 + draw.size(0.8, 0.9) * body1 if near_miss else open1 + draw.size(0.15, 0.5)
    return [
        _candle(open1, close1, draw.size(0.0, 0.2), draw.size(0.0, 0.2)),
        _candle(open2, close2, draw.size(0.0, 0.2), draw.size(0.0, 0.2)),
    ]


def _morning_star(draw: _Draw, near_miss: bool) -> list[list[float]]:
    open1 = draw.gap()
    body1 = draw.size(1.5, 2.5)
    close1 = open1 - body1
    open2 = close1 - draw.gap(0.05, MAX_GAP)
    close2 = open2 + draw.sign() * draw.size(0.01, 0.05)  # small enough to stay within the star tolerance if white
    open3 = close2 + draw.gap(0.05, MAX_GAP)
    close3 = close1 + (draw.size(0.15, 0.35) if near_miss else draw.size(0.6, 0.9)) * body1
    return [
        _candle(open1, close1, draw.size(0.0, 0.15), draw.size(0.0, 0.15)),
        _candle(open2, close2, draw.size(0.05, 0.4), draw.size(0.05, 0.4)),
        _candle(open3, close3, draw.size(0.0, 0.15), draw.size(0.0, 0.15)),
    ]


def _inside_bar(draw: _Draw, near_miss: bool) -> list[list[float]]:
    open1 = draw.gap()
    close1 = open1 + draw.sign() * draw.size(0.4, 1.0)
    mother = _candle(open1, close1, draw.size(0.15, 0.4), draw.size(0.15, 0.4))
    bottom1, top1 = min(open1, close1), max(open1, close1)
    open2 = float(np.clip(close1 + draw.gap(), bottom1, top1))
    close2 = draw.size(bottom1, top1)  # the body stays inside the mother body in both variants
    top2, bottom2 = max(open2, close2), min(open2, close2)
    if near_miss:  # the upper shadow pokes out: the range is not inside although the body is
        high2 = mother[1] + draw.size(0.05, 0.3)
    else:
        high2 = top2 + draw.size(0.0, 0.6) * (mother[1] - top2)
    low2 = bottom2 - draw.size(0.0, 0.6) * (bottom2 - mother[2])
    return [mother, [open2, high2, low2, close2]]


def _outside_bar(draw: _Draw, near_miss: bool) -> list[list[float]]:
    open1 = draw.gap()
    close1 = open1 + draw.sign() * draw.size(0.2, 0.6)
    mother = _candle(open1, close1, draw.size(0.1, 0.3), draw.size(0.1, 0.3))
    bottom1, top1 = min(open1, close1), max(open1, close1)
    open2 = float(np.clip(close1 + draw.gap(), bottom1, top1))
    high2 = mother[1] + draw.size(0.1, 0.5)
    if near_miss:  # the low stays strictly above the mother's low (the body bottom is >= 0.1 above it)
        close2 = draw.size(mother[2] + 0.1, high2)
        low2 = mother[2] + draw.size(0.3, 0.7) * (min(open2, close2) - mother[2])
    else:
        low2 = mother[2] - draw.size(0.1, 0.5)
        close2 = draw.size(low2, high2)
    return [mother, [open2, high2, low2, close2]]


# pattern -> (bullish-orientation builder, mirror): True mirrors into the bearish pattern, None mirrors at random
# (patterns without polarity, to vary colour and side).
_TEMPLATES: dict[str, tuple[Callable[[_Draw, bool], list[list[float]]], bool | None]] = {
    "bullish_engulfing": (_bullish_engulfing, False),
    "bearish_engulfing": (_bullish_engulfing, True),
    "hammer": (_hammer, False),
    "inverted_hammer": (_hammer, True),
    "doji": (_doji, None),
    "morning_star": (_morning_star, False),
    "evening_star": (_morning_star, True),
    "inside_bar": (_inside_bar, None),
    "outside_bar": (_outside_bar, None),
    "shooting_star": (_hammer, True),
    "hanging_man": (_hammer, False),
    "dragonfly_doji": (_dragonfly, False),
    "gravestone_doji": (_dragonfly, True),
}


def pattern_candles(
    pattern: str,
    rng: np.random.Generator,
    prev_close: float,
    avg_range: float,
    near_miss: bool = False,
    allow_gap: bool = False,
) -> np.ndarray:
    """[open, high, low, close] rows for the PATTERN_CANDLES[pattern] candles of `pattern`, continuing from prev_close.

    Placed after ~10 bars whose average range is ~avg_range and whose trend matches REQUIRED_TREND[pattern], the
    rule engine fires `pattern` at the last candle; near_miss=True gives the look-alike of NEAR_MISS_DESCRIPTIONS,
    which never fires it. allow_gap=False: every candle opens exactly at the previous close (intraday);
    allow_gap=True: gaps of up to MAX_GAP avg ranges (daily), only in directions that keep the pattern intact.
    """
    if pattern not in _TEMPLATES:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {ALL_PATTERNS}")
    if not (np.isfinite(prev_close) and prev_close > 0 and np.isfinite(avg_range) and avg_range > 0):
        raise ValueError(f"prev_close and avg_range must be positive, got {prev_close}, {avg_range}")
    builder, mirror = _TEMPLATES[pattern]
    draw = _Draw(rng, allow_gap)
    offsets = np.array(builder(draw, near_miss), dtype=float)
    if mirror is None:
        mirror = draw.sign() < 0
    if mirror:
        offsets = -offsets[:, [0, 2, 1, 3]]  # negated prices: the old low is the new high
    candles = prev_close + avg_range * offsets
    if not (candles > 0).all():
        raise ValueError(f"prev_close={prev_close} is too small for avg_range={avg_range}: prices would not stay > 0")
    return candles
