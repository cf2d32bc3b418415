import datetime as dt

import numpy as np
import pandas as pd
import pytest

from vlm_assets.market.io import MarketDataError, load_directory, validate_bars


def good_frame(n=20):
    stamps = pd.date_range("2024-03-04 09:30", periods=n, freq="1min")
    close = 100 + np.cumsum(np.sin(np.arange(n)))
    open_ = np.r_[100.0, close[:-1]]
    return pd.DataFrame({
        "timestamp": stamps.astype(str), "open": open_, "high": np.maximum(open_, close) + 0.2,
        "low": np.minimum(open_, close) - 0.2, "close": close, "volume": np.arange(n) * 10 + 100,
    })


def test_valid_file_loads_and_base_timeframe_is_resampled(tmp_path):
    frame = good_frame(390)
    frame.to_csv(tmp_path / "ACME.csv", index=False)
    bars = load_directory(tmp_path, base_timeframe="1m", session_start=dt.time(9, 30))
    assert set(bars) == {("ACME", tf) for tf in ("1m", "5m", "15m", "1h", "1d")}
    assert len(bars[("ACME", "1h")]) == 7  # 09:30..15:30, the last one a half hour
    assert bars[("ACME", "1d")]["volume"].iloc[0] == frame["volume"].sum()
    assert bars[("ACME", "1h")]["high"].iloc[0] == bars[("ACME", "1m")]["high"].iloc[:60].max()


def test_parquet_and_named_timeframe(tmp_path):
    good_frame().to_parquet(tmp_path / "XYZ_5m.parquet")
    bars = load_directory(tmp_path)
    assert list(bars) == [("XYZ", "5m")]


@pytest.mark.parametrize(
    "breakage, rule, row",
    [
        (lambda f: f.__setitem__("close", f["close"].where(f.index != 7, np.nan)), "'close' is finite", 8),
        (lambda f: f.loc.__setitem__((4, "high"), f.loc[4, "low"] - 1), "low <= min(open, close) <= max(open, close) <= high", 5),
        (lambda f: f.loc.__setitem__((11, "timestamp"), f.loc[3, "timestamp"]), "timestamps strictly increase", 12),
        (lambda f: f.loc.__setitem__((2, "low"), -5.0), "'low' > 0", 3),
        (lambda f: f.loc.__setitem__((6, "volume"), -1), "'volume' >= 0", 7),
        (lambda f: f.loc.__setitem__((9, "open"), np.inf), "'open' is finite", 10),
    ],
)
def test_broken_rows_are_named(tmp_path, breakage, rule, row):
    frame = good_frame()
    breakage(frame)
    frame.to_csv(tmp_path / "BAD_1m.csv", index=False)
    with pytest.raises(MarketDataError) as info:
        load_directory(tmp_path)
    error = info.value
    assert (error.source, error.rule, error.row) == ("BAD_1m.csv", rule, row)
    assert f"BAD_1m.csv: row {row}" in str(error) and rule in str(error)


def test_missing_column_empty_file_and_text_in_numbers(tmp_path):
    frame = good_frame().drop(columns="close")
    with pytest.raises(MarketDataError, match="missing column.*close"):
        validate_bars(frame, "f.csv")
    (tmp_path / "EMPTY_1m.csv").write_text("")
    with pytest.raises(MarketDataError, match="EMPTY_1m.csv: file has no data rows"):
        load_directory(tmp_path)
    (tmp_path / "EMPTY_1m.csv").unlink()
    (tmp_path / "HEADER_1m.csv").write_text("timestamp,open,high,low,close,volume\n")
    with pytest.raises(MarketDataError, match="no data rows"):
        load_directory(tmp_path)
    frame = good_frame().astype({"open": object})
    frame.loc[3, "open"] = "n/a"
    with pytest.raises(MarketDataError, match=r"row 4: 'open' is not a number: 'n/a'"):
        validate_bars(frame, "f.csv")


def test_bad_timestamp_and_names(tmp_path):
    frame = good_frame()
    frame.loc[5, "timestamp"] = "not a time"
    with pytest.raises(MarketDataError, match=r"row 6: cannot parse timestamp 'not a time'"):
        validate_bars(frame, "f.csv")
    good_frame().to_csv(tmp_path / "NOTF.csv", index=False)
    with pytest.raises(MarketDataError, match="no timeframe in the name"):
        load_directory(tmp_path)
    with pytest.raises(MarketDataError, match="not a directory"):
        load_directory(tmp_path / "missing")


def test_timezone_aware_timestamps_become_exchange_local():
    frame = good_frame(3)
    frame["timestamp"] = pd.date_range("2024-03-04 14:30", periods=3, freq="1min", tz="UTC").astype(str)
    bars = validate_bars(frame, "f.csv", timezone="America/New_York")
    assert bars.index[0] == pd.Timestamp("2024-03-04 09:30")
    assert bars.index.tz is None


def test_nothing_is_silently_dropped():
    frame = good_frame(50)
    assert len(validate_bars(frame, "f.csv")) == 50
