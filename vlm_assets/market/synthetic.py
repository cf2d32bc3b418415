"""A seeded synthetic market: realistic 1-minute OHLCV for several symbols, every coarser timeframe resampled
from it, and candlestick patterns (plus near-miss look-alikes) planted at realistic positions.

What makes it more than noise:
- regimes: multi-day up, down and mean-reverting ranges (a Markov chain over days), plus intraday swings;
- volatility clustering: slow and fast log-volatility AR(1) components, fat-tailed (Student-t) shocks;
- an intraday U-shaped volatility and volume profile, volume rising with volatility;
- overnight gaps between sessions (visible on daily bars), with occasional large ones.
Patterns are planted by rewriting the 1-minute bars inside the chosen bars (a bridge that reproduces the target
candle exactly), coarsest timeframe first; finer plantings never touch minutes a coarser one owns, and the path
after a planted pattern is rescaled so prices stay continuous.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from vlm_assets.labeling import ALL_PATTERNS, PATTERN_CANDLES, REQUIRED_TREND, RuleParams, label_bars
from vlm_assets.market.templates import pattern_candles
from vlm_assets.market.timeframes import TIMEFRAMES, bucket_starts, resample

PLANTING_ORDER = ("1d", "1h", "15m", "5m", "1m")  # coarse first: finer plantings must not break coarser ones
CONTEXT_BARS = 30


@dataclass(frozen=True)
class SyntheticMarketConfig:
    symbols: tuple[str, ...] = ("ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT")
    trading_days: int = 750
    start: str = "2022-01-03"
    seed: int = 20250919
    session_start: str = "09:30"
    session_minutes: int = 390
    plants_per_timeframe: int = 160  # per symbol and timeframe, at most
    plant_spacing: int = 14  # untouched bars around each planted pattern, so its context stays natural
    near_miss_share: float = 0.3

    def __post_init__(self):
        if not self.symbols:
            raise ValueError("symbols: at least one symbol is needed")
        if self.trading_days < 5:
            raise ValueError("trading_days: at least 5 days are needed")
        if not 0 <= self.near_miss_share <= 1:
            raise ValueError("near_miss_share must be within [0, 1]")

    @property
    def session_time(self) -> dt.time:
        return dt.time.fromisoformat(self.session_start)


@dataclass
class SyntheticMarket:
    bars: dict[tuple[str, str], pd.DataFrame]  # (symbol, timeframe) -> OHLCV indexed by bar start
    plants: pd.DataFrame  # symbol, timeframe, timestamp (of the pattern's last candle), pattern, near_miss


def _symbol_profile(index: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Start price, daily volatility and typical minute volume: varied on purpose (scale-free rules, many looks)."""
    prices = (18.0, 47.5, 132.0, 410.0, 1850.0, 76.0, 9.4, 265.0)
    price = prices[index % len(prices)] * float(np.exp(rng.normal(0, 0.1)))
    daily_vol = float(rng.uniform(0.012, 0.03))
    volume = float(np.exp(rng.uniform(np.log(2e3), np.log(8e4))))
    return price, daily_vol, volume


def _session_index(config: SyntheticMarketConfig) -> pd.DatetimeIndex:
    days = pd.bdate_range(config.start, periods=config.trading_days)
    offsets = pd.to_timedelta(np.arange(config.session_minutes), unit="min")
    start = pd.Timedelta(hours=config.session_time.hour, minutes=config.session_time.minute)
    stamps = days.values[:, None] + (start + offsets).values[None, :]
    return pd.DatetimeIndex(stamps.ravel(), name="timestamp").as_unit("ns")


def _ar1(rng: np.random.Generator, n: int, phi: float, stationary_sd: float) -> np.ndarray:
    shocks = rng.normal(0.0, stationary_sd * np.sqrt(1 - phi**2), n)
    shocks[0] = rng.normal(0.0, stationary_sd)  # start in the stationary distribution
    return lfilter([1.0], [1.0, -phi], shocks)


def _minute_bars(config: SyntheticMarketConfig, index: pd.DatetimeIndex, symbol_index: int,
                 rng: np.random.Generator) -> pd.DataFrame:
    days, minutes = config.trading_days, config.session_minutes
    n = days * minutes
    price0, daily_vol, base_volume = _symbol_profile(symbol_index, rng)
    sigma_minute = daily_vol / np.sqrt(minutes)

    # Intraday U-shape: busy open, quiet lunch, pick-up into the close.
    u = np.arange(minutes) / max(minutes - 1, 1)
    vol_shape = 0.7 + 1.2 * np.exp(-8 * u) + 0.5 * np.exp(-10 * (1 - u))
    vol_shape /= np.sqrt(np.mean(vol_shape**2))
    log_vol = _ar1(rng, n, 0.9995, 0.35) + _ar1(rng, n, 0.98, 0.15)
    sigma = sigma_minute * np.tile(vol_shape, days) * np.exp(log_vol - 0.5 * (0.35**2 + 0.15**2))

    # Student-t(5) shocks scaled to unit variance: fat tails.
    shocks = rng.standard_t(5, n) / np.sqrt(5 / 3)

    # Intraday swings: piecewise-constant drift over segments of ~90 minutes.
    seg_len = rng.geometric(1 / 90, size=n // 20 + 10)
    seg_id = np.repeat(np.arange(seg_len.size), seg_len)[:n]
    seg_drift = rng.choice([-1.0, 0.0, 1.0], size=seg_len.size, p=[0.35, 0.3, 0.35])
    seg_drift *= rng.uniform(0.03, 0.1, size=seg_len.size) * sigma_minute
    minute_drift = seg_drift[seg_id]

    # Daily regimes: 0 range (mean-reverting), 1 up, -1 down; persistent, so daily charts trend for weeks.
    transition = np.array([[0.90, 0.05, 0.05], [0.08, 0.90, 0.02], [0.08, 0.02, 0.90]])
    regime_sign = np.array([0.0, 1.0, -1.0])
    state = 0
    gap_sd = 0.25 * daily_vol
    log_close = np.log(price0)
    anchor = log_close
    opens = np.empty(n)
    closes = np.empty(n)
    for day in range(days):
        new_state = int(rng.choice(3, p=transition[state]))
        if new_state == 0 and state != 0:
            anchor = log_close
        state = new_state
        if state == 0:
            daily_drift = -0.35 * (log_close - anchor)
        else:
            daily_drift = regime_sign[state] * rng.uniform(0.1, 0.35) * daily_vol
        gap = rng.normal(0.0, gap_sd) if day else 0.0
        if day and rng.random() < 0.05:
            gap += rng.normal(0.0, 1.5 * daily_vol)
        span = slice(day * minutes, (day + 1) * minutes)
        returns = daily_drift / minutes + minute_drift[span] + sigma[span] * shocks[span]
        path = log_close + gap + np.cumsum(returns)
        opens[span] = np.r_[log_close + gap, path[:-1]]
        closes[span] = path
        log_close = path[-1]

    open_, close = np.exp(opens), np.exp(closes)
    wick = 0.6 * sigma
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 1, n)) * wick)
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 1, n)) * wick)
    volume_shape = np.tile(0.6 + 1.6 * np.exp(-6 * u) + 0.9 * np.exp(-8 * (1 - u)), days)
    volume = base_volume * volume_shape * (sigma / sigma_minute) ** 0.7 * np.exp(rng.normal(0, 0.4, n))
    return pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "volume": np.round(volume)}, index=index
    )


def bridge_minutes(o: float, h: float, l: float, c: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n minute bars [open, high, low, close] whose aggregate is exactly (o, h, l, c), with continuous opens."""
    if n == 1:
        return np.array([[o, h, l, c]])
    span = h - l
    steps = rng.normal(0.0, 0.3 * span / np.sqrt(n), n)
    walk = np.r_[0.0, np.cumsum(steps)]
    path = o + walk - np.linspace(0.0, 1.0, n + 1) * (walk[-1] - (c - o))  # Brownian bridge from o to c
    path = np.clip(path, l, h)
    path[0], path[-1] = o, c
    opens, closes = path[:-1], path[1:]
    wick = np.abs(rng.normal(0.0, 0.05 * span, (2, n)))
    highs = np.minimum(np.maximum(opens, closes) + wick[0], h)
    lows = np.maximum(np.minimum(opens, closes) - wick[1], l)
    highs[int(np.argmax(np.maximum(opens, closes)))] = h  # the candle's extremes are reached somewhere
    lows[int(np.argmin(np.minimum(opens, closes)))] = l
    return np.column_stack([opens, highs, lows, closes])


def _plant_timeframe(minutes: pd.DataFrame, protected: np.ndarray, timeframe: str, config: SyntheticMarketConfig,
                     rng: np.random.Generator, params: RuleParams) -> list[tuple[pd.Timestamp, str, bool]]:
    """Plant patterns into `minutes` in place at `timeframe`; returns (last candle start, pattern, near_miss)."""
    keys = bucket_starts(pd.DatetimeIndex(minutes.index), timeframe, config.session_time)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    bounds = np.r_[starts, len(keys)]
    bars = resample(minutes, timeframe, config.session_time)
    context = label_bars(bars, params)
    trend = context["trend"].to_numpy()
    avg_range = context["avg_range"].to_numpy()
    n_bars = len(bars)
    spacing = config.plant_spacing
    count = min(config.plants_per_timeframe, max(0, (n_bars - CONTEXT_BARS) // (spacing + 3)))
    if count == 0:
        return []

    protected_before = np.r_[0, np.cumsum(protected)]
    occupied = np.zeros(n_bars, dtype=bool)
    occupied[:CONTEXT_BARS] = True
    threshold = params.trend_threshold
    events = []
    for pattern in rng.permutation(np.resize(np.array(ALL_PATTERNS), count)):
        span = PATTERN_CANDLES[pattern]
        near_miss = bool(rng.random() < config.near_miss_share)
        required = REQUIRED_TREND[pattern]
        first = np.arange(n_bars - span)
        ok = ~occupied[first] & ~occupied[first + span - 1] & np.isfinite(trend[first]) & (avg_range[first] > 0)
        # Neither the pattern nor its context may touch minutes owned by a coarser planted pattern.
        lo = bounds[np.maximum(first - 10, 0)]
        hi = bounds[first + span]
        ok &= (protected_before[hi] - protected_before[lo]) == 0
        if required:
            ok &= required * trend[first] > 1.2 * threshold
        candidates = first[ok]
        if candidates.size == 0:
            continue
        j = int(rng.choice(candidates))
        occupied[max(j - spacing, 0): j + span + spacing] = True
        events.append((j, str(pattern), near_miss))

    o, h, l, c = (minutes[col].to_numpy().copy() for col in ("open", "high", "low", "close"))
    original_close = c.copy()
    written = np.zeros(len(minutes), dtype=bool)
    scale = np.ones(len(minutes))
    running, done_until = 1.0, 0
    planted = []
    for j, pattern, near_miss in sorted(events):
        span = PATTERN_CANDLES[pattern]
        first_minute, end_minute = bounds[j], bounds[j + span]
        scale[done_until:first_minute] = running
        if timeframe == "1d":
            anchor, allow_gap = original_close[first_minute - 1] * running, True
        else:
            anchor, allow_gap = o[first_minute] * running, False
        candles = pattern_candles(pattern, rng, anchor, avg_range[j] * running, near_miss=near_miss,
                                  allow_gap=allow_gap)
        for k, (co, ch, cl, cc) in enumerate(candles):
            a, b = bounds[j + k], bounds[j + k + 1]
            rows = bridge_minutes(co, ch, cl, cc, b - a, rng)
            o[a:b], h[a:b], l[a:b], c[a:b] = rows.T
        written[first_minute:end_minute] = True
        running = candles[-1, 3] / original_close[end_minute - 1]
        done_until = end_minute
        protected[first_minute:end_minute] = True
        planted.append((bars.index[j + span - 1], pattern, near_miss))
    scale[done_until:] = running

    # Rewritten minutes keep their new values; everything else (coarser plantings included) is rescaled.
    for name, values in (("open", o), ("high", h), ("low", l), ("close", c)):
        minutes[name] = np.where(written, values, minutes[name].to_numpy() * scale)
    return planted


def generate_market(config: SyntheticMarketConfig = SyntheticMarketConfig(),
                    params: RuleParams = RuleParams(), progress=None) -> SyntheticMarket:
    """Every symbol at every timeframe, deterministic for a given config."""
    index = _session_index(config)
    bars: dict[tuple[str, str], pd.DataFrame] = {}
    plant_rows = []
    for symbol_index, symbol in enumerate(config.symbols):
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, symbol_index]))
        minutes = _minute_bars(config, index, symbol_index, rng)
        protected = np.zeros(len(minutes), dtype=bool)
        for timeframe in PLANTING_ORDER:
            for stamp, pattern, near_miss in _plant_timeframe(minutes, protected, timeframe, config, rng, params):
                plant_rows.append((symbol, timeframe, stamp, pattern, near_miss))
        for timeframe in TIMEFRAMES:
            bars[(symbol, timeframe)] = minutes if timeframe == "1m" else resample(minutes, timeframe, config.session_time)
        if progress is not None:
            progress(symbol_index + 1, len(config.symbols), symbol)
    plants = pd.DataFrame(plant_rows, columns=["symbol", "timeframe", "timestamp", "pattern", "near_miss"])
    return SyntheticMarket(bars=bars, plants=plants)
