import datetime as dt

import numpy as np
import pandas as pd
import pytest

from vlm_assets.market.timeframes import bar_end, resample


def minutes(days=3):
    stamps = np.concatenate([pd.date_range(f"2024-03-0{4 + d} 09:30", periods=390, freq="1min").values for d in range(days)])
    rng = np.random.default_rng(0)
    close = 50 + np.cumsum(rng.normal(0, 0.05, len(stamps)))
    open_ = np.r_[50, close[:-1]]
    return pd.DataFrame({"open": open_, "high": np.maximum(open_, close) + 0.01, "low": np.minimum(open_, close) - 0.01,
                         "close": close, "volume": rng.integers(1, 100, len(stamps)).astype(float)},
                        index=pd.DatetimeIndex(stamps, name="timestamp"))


@pytest.mark.parametrize("timeframe, per_day", [("5m", 78), ("15m", 26), ("1h", 7), ("1d", 1)])
def test_resample_matches_a_plain_groupby(timeframe, per_day):
    bars = minutes()
    out = resample(bars, timeframe, dt.time(9, 30))
    assert len(out) == 3 * per_day
    if timeframe == "1d":
        keys = bars.index.normalize()
    else:
        offset = pd.Timedelta(hours=9, minutes=30)
        period = pd.Timedelta(timeframe.replace("m", "min"))
        keys = bars.index.normalize() + offset + ((bars.index - bars.index.normalize() - offset) // period) * period
    expected = bars.groupby(keys).agg({"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"})
    np.testing.assert_allclose(out.to_numpy(), expected.to_numpy())
    assert (out.index == expected.index).all()


def test_hourly_bars_align_to_the_session_open_and_weekly_to_monday():
    out = resample(minutes(1), "1h", dt.time(9, 30))
    assert [t.strftime("%H:%M") for t in out.index] == ["09:30", "10:30", "11:30", "12:30", "13:30", "14:30", "15:30"]
    weekly = resample(resample(minutes(3), "1d"), "1w")
    assert list(weekly.index) == [pd.Timestamp("2024-03-04")]
    assert bar_end(out.index[:1], "1h")[0] == pd.Timestamp("2024-03-04 10:30")


def test_resample_refuses_unsorted_or_aware_input():
    bars = minutes(1)
    with pytest.raises(ValueError, match="sorted"):
        resample(bars.iloc[::-1], "5m")
    with pytest.raises(ValueError, match="naive"):
        resample(bars.tz_localize("UTC"), "5m")
    with pytest.raises(ValueError, match="unknown timeframe"):
        resample(bars, "2h")
