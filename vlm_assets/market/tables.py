"""Long-format tables of bars (one per timeframe, a `symbol` column) for storage, and back."""

from __future__ import annotations

import pandas as pd

from vlm_assets.market.timeframes import OHLCV


def to_table(bars: dict[tuple[str, str], pd.DataFrame], timeframe: str) -> pd.DataFrame:
    parts = []
    for (symbol, tf), frame in sorted(bars.items()):
        if tf != timeframe:
            continue
        part = frame[OHLCV].reset_index(names="timestamp")
        part.insert(0, "symbol", symbol)
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["symbol", "timestamp", *OHLCV])
    return pd.concat(parts, ignore_index=True)


def from_table(table: pd.DataFrame, timeframe: str, columns: list[str] | None = None) -> dict[tuple[str, str], pd.DataFrame]:
    out = {}
    for symbol, part in table.groupby("symbol", sort=True):
        frame = part.drop(columns="symbol").set_index("timestamp")
        frame.index = pd.DatetimeIndex(frame.index, name="timestamp")
        out[(str(symbol), timeframe)] = frame if columns is None else frame[columns]
    return out
