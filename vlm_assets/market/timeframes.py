"""Timeframes and exact OHLCV resampling.

Intraday buckets are aligned to the session start of each day (09:30 for the synthetic market), so an hourly
bar covers 09:30-10:29, ..., 15:30-15:59 (a half bar), the way exchanges report them. Daily bars group by
calendar date and weekly bars by ISO week (labelled by the week's Monday).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

TIMEFRAMES: tuple[str, ...] = ("1m", "5m", "15m", "1h", "1d")
INTRADAY_MINUTES: dict[str, int] = {"1m": 1, "5m": 5, "15m": 15, "1h": 60}
# The panel shown beside a window in multi-timeframe composites ("1w" exists only for that panel).
HIGHER_TIMEFRAME: dict[str, str] = {"1m": "15m", "5m": "1h", "15m": "1h", "1h": "1d", "1d": "1w"}
OHLCV = ["open", "high", "low", "close", "volume"]


def check_timeframe(timeframe: str) -> str:
    if timeframe not in TIMEFRAMES and timeframe != "1w":
        raise ValueError(f"unknown timeframe {timeframe!r}; expected one of {', '.join(TIMEFRAMES)}")
    return timeframe


def timeframe_rank(timeframe: str) -> int:
    return (*TIMEFRAMES, "1w").index(check_timeframe(timeframe))


def bucket_starts(index: pd.DatetimeIndex, timeframe: str, session_start: dt.time | None = None) -> np.ndarray:
    """Start timestamp (int64 ns) of the `timeframe` bucket that each timestamp belongs to."""
    check_timeframe(timeframe)
    index = pd.DatetimeIndex(index).as_unit("ns")  # pandas may hand us microseconds; all arithmetic below is ns
    days = index.normalize()
    if timeframe == "1d":
        return days.asi8
    if timeframe == "1w":
        return (days - pd.to_timedelta(days.dayofweek, unit="D")).asi8
    anchor = days.asi8
    if session_start is not None:
        anchor = anchor + pd.Timedelta(hours=session_start.hour, minutes=session_start.minute).value
    period = pd.Timedelta(minutes=INTRADAY_MINUTES[timeframe]).value
    return anchor + np.floor_divide(index.asi8 - anchor, period) * period


def resample(bars: pd.DataFrame, timeframe: str, session_start: dt.time | None = None) -> pd.DataFrame:
    """Aggregate time-sorted bars (DatetimeIndex, OHLCV columns) into `timeframe` bars: first open, max high,
    min low, last close, summed volume. The result's index is each bucket's start."""
    if bars.empty:
        return bars.iloc[:0][OHLCV].copy()
    if getattr(bars.index, "tz", None) is not None:
        raise ValueError("resample works on exchange-local naive timestamps; convert tz-aware data first")
    keys = bucket_starts(pd.DatetimeIndex(bars.index), timeframe, session_start)
    if np.any(np.diff(keys) < 0):
        raise ValueError("resample needs bars sorted by time")
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)] - 1
    out = pd.DataFrame(
        {
            "open": bars["open"].to_numpy()[starts],
            "high": np.maximum.reduceat(bars["high"].to_numpy(), starts),
            "low": np.minimum.reduceat(bars["low"].to_numpy(), starts),
            "close": bars["close"].to_numpy()[ends],
            "volume": np.add.reduceat(bars["volume"].to_numpy(), starts),
        },
        index=pd.DatetimeIndex(keys[starts].astype("datetime64[ns]"), name=bars.index.name or "timestamp"),
    )
    return out


def bar_end(index: pd.DatetimeIndex, timeframe: str) -> pd.DatetimeIndex:
    """The instant each bar closes (start + duration); used to keep higher-timeframe panels free of look-ahead."""
    if timeframe in INTRADAY_MINUTES:
        return index + pd.Timedelta(minutes=INTRADAY_MINUTES[timeframe])
    if timeframe == "1d":
        return index + pd.Timedelta(days=1)
    return index + pd.Timedelta(days=7)
