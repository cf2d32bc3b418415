"""Loading user market data: a directory of CSV or Parquet files, validated row by row.

File names: `<SYMBOL>_<TIMEFRAME>.csv|.parquet` (e.g. `AAPL_5m.csv`), one per symbol and timeframe; or, with a
base timeframe configured, `<SYMBOL>.csv|.parquet` holding that timeframe, resampled to every coarser one.
Nothing is silently dropped or fixed: the first broken row raises a MarketDataError naming file, row and rule.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pandas as pd

from vlm_assets.market.timeframes import OHLCV, TIMEFRAMES, resample, timeframe_rank

PRICE_COLUMNS = ("open", "high", "low", "close")
TIMESTAMP_ALIASES = ("timestamp", "datetime", "date", "time")
SUPPORTED_SUFFIXES = (".csv", ".parquet")
OHLC_RULE = "low <= min(open, close) <= max(open, close) <= high"


class MarketDataError(ValueError):
    """A market data file breaks a rule. `row` is the 1-based data row (header excluded), or None for the file."""

    def __init__(self, source: str, rule: str, row: int | None = None, detail: str = ""):
        self.source, self.rule, self.row = source, rule, row
        where = f"{source}: row {row}" if row is not None else source
        super().__init__(f"{where}: {detail or rule} (rule: {rule})")


def validate_bars(frame: pd.DataFrame, source: str, timezone: str | None = None) -> pd.DataFrame:
    """Check one file's rows and return them as float OHLCV indexed by exchange-local naive timestamps."""
    if frame.empty:
        raise MarketDataError(source, "file has at least one data row", detail="file has no data rows")
    columns = {str(c).strip().lower(): c for c in frame.columns}
    ts_column = next((columns[a] for a in TIMESTAMP_ALIASES if a in columns), None)
    missing = [c for c in OHLCV if c not in columns] + ([] if ts_column is not None else ["timestamp"])
    if missing:
        raise MarketDataError(
            source, "required columns: timestamp (or date/datetime/time), open, high, low, close, volume",
            detail=f"missing column(s) {', '.join(missing)}",
        )

    timestamps = _parse_timestamps(frame[ts_column], source, timezone)
    values = {}
    for name in OHLCV:
        raw = frame[columns[name]]
        numeric = pd.to_numeric(raw, errors="coerce").to_numpy(dtype="float64")
        bad = np.isnan(numeric) & raw.notna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise MarketDataError(source, f"'{name}' is numeric", row + 1, f"'{name}' is not a number: {raw.iloc[row]!r}")
        values[name] = numeric

    check_rows(timestamps, values, source)
    return pd.DataFrame(values, index=pd.DatetimeIndex(timestamps, name="timestamp"))


def check_rows(timestamps: pd.DatetimeIndex, values: dict[str, np.ndarray], source: str) -> None:
    """The row rules (finite, positive prices, volume >= 0, OHLC consistency, increasing time) on float columns;
    raises a MarketDataError for the first failing row, naming the rule."""
    failures: list[tuple[int, int, str, str]] = []  # (row, rule order, rule, detail)

    def first_failure(mask: np.ndarray, order: int, rule: str, describe) -> None:
        hits = np.flatnonzero(mask)
        if hits.size:
            failures.append((int(hits[0]), order, rule, describe(int(hits[0]))))

    for order, name in enumerate(OHLCV):
        first_failure(~np.isfinite(values[name]), order, f"'{name}' is finite",
                      lambda r, n=name: f"'{n}' is not finite ({values[n][r]})")
    for order, name in enumerate(PRICE_COLUMNS):
        first_failure(values[name] <= 0, 10 + order, f"'{name}' > 0",
                      lambda r, n=name: f"'{n}' must be positive, got {values[n][r]}")
    first_failure(values["volume"] < 0, 20, "'volume' >= 0", lambda r: f"negative volume {values['volume'][r]}")
    o, h, l, c = (values[n] for n in PRICE_COLUMNS)
    with np.errstate(invalid="ignore"):
        broken = (l > np.minimum(o, c)) | (np.maximum(o, c) > h)
    first_failure(broken, 30, OHLC_RULE,
                  lambda r: f"open={o[r]} high={h[r]} low={l[r]} close={c[r]} breaks {OHLC_RULE}")
    ts = timestamps.asi8
    not_increasing = np.r_[False, ts[1:] <= ts[:-1]]
    first_failure(not_increasing, 40, "timestamps strictly increase",
                  lambda r: f"timestamp {timestamps[r]} is not after the previous row's {timestamps[r - 1]}")
    if failures:
        row, _, rule, detail = min(failures)
        others = sum(1 for f in failures if f[0] != row)
        suffix = f" ({others} other rule(s) also fail on later rows)" if others else ""
        raise MarketDataError(source, rule, row + 1, detail + suffix)


def _parse_timestamps(raw: pd.Series, source: str, timezone: str | None) -> pd.DatetimeIndex:
    if raw.isna().any():
        row = int(np.flatnonzero(raw.isna().to_numpy())[0])
        raise MarketDataError(source, "timestamp is present", row + 1, "timestamp is empty")
    try:
        parsed = pd.to_datetime(raw, errors="raise", utc=False, format="mixed")
    except (ValueError, TypeError):
        coerced = pd.to_datetime(raw, errors="coerce", format="mixed")
        row = int(np.flatnonzero(coerced.isna().to_numpy())[0]) if coerced.isna().any() else 0
        raise MarketDataError(source, "timestamp parses as a date/time", row + 1,
                              f"cannot parse timestamp {raw.iloc[row]!r}") from None
    index = pd.DatetimeIndex(parsed)
    if index.tz is not None:
        # Buckets (sessions, days) are defined in exchange-local time, so aware timestamps are converted to it.
        index = index.tz_convert(timezone or "UTC").tz_localize(None)
    return index.as_unit("ns")


def read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except Exception as exc:  # unreadable file: say which one
        raise MarketDataError(path.name, "file is readable CSV/Parquet", detail=f"cannot read: {exc}") from exc


_NAME = re.compile(r"^(?P<symbol>[A-Za-z0-9.\-]+?)(?:_(?P<tf>1m|5m|15m|1h|1d))?$")


def load_directory(directory: str | Path, base_timeframe: str | None = None, timezone: str | None = None,
                   session_start: dt.time | None = None) -> dict[tuple[str, str], pd.DataFrame]:
    """Load and validate every file; returns {(symbol, timeframe): bars}."""
    root = Path(directory)
    if not root.is_dir():
        raise MarketDataError(str(root), "market data directory exists", detail="not a directory")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise MarketDataError(str(root), "directory holds .csv or .parquet files", detail="no data files found")
    out: dict[tuple[str, str], pd.DataFrame] = {}
    for path in files:
        match = _NAME.match(path.stem)
        if not match:
            raise MarketDataError(path.name, "file name is <SYMBOL>_<TIMEFRAME> or <SYMBOL>",
                                  detail="cannot read symbol/timeframe from the file name")
        symbol, timeframe = match["symbol"].upper(), match["tf"] or base_timeframe
        if timeframe is None:
            raise MarketDataError(path.name, "file name is <SYMBOL>_<TIMEFRAME> or a base timeframe is configured",
                                  detail=f"no timeframe in the name and no base_timeframe set ({', '.join(TIMEFRAMES)})")
        if (symbol, timeframe) in out:
            raise MarketDataError(path.name, "one file per symbol and timeframe",
                                  detail=f"duplicate data for {symbol} {timeframe}")
        out[(symbol, timeframe)] = validate_bars(read_table(path), path.name, timezone)
    if base_timeframe is not None:
        for (symbol, timeframe), bars in list(out.items()):
            if timeframe != base_timeframe:
                continue
            for target in TIMEFRAMES:
                if timeframe_rank(target) > timeframe_rank(base_timeframe) and (symbol, target) not in out:
                    out[(symbol, target)] = resample(bars, target, session_start)
    return dict(sorted(out.items()))
