import numpy as np
import pandas as pd
import pytest

from vlm_assets.labeling import label_bars
from vlm_assets.market.synthetic import SyntheticMarketConfig, bridge_minutes, generate_market
from vlm_assets.market.timeframes import TIMEFRAMES, resample

CONFIG = SyntheticMarketConfig(symbols=("AAA", "BBB"), trading_days=60, plants_per_timeframe=60)


@pytest.fixture(scope="module")
def market():
    return generate_market(CONFIG)


def test_same_seed_same_market_other_seed_other_market(market):
    again = generate_market(CONFIG)
    for key, frame in market.bars.items():
        pd.testing.assert_frame_equal(frame, again.bars[key])
    pd.testing.assert_frame_equal(market.plants, again.plants)
    other = generate_market(SyntheticMarketConfig(symbols=("AAA",), trading_days=60, seed=1))
    assert not np.allclose(other.bars[("AAA", "1m")]["close"].to_numpy(), market.bars[("AAA", "1m")]["close"].to_numpy())


def test_bars_are_valid_and_timeframes_agree(market):
    assert set(market.bars) == {(s, tf) for s in CONFIG.symbols for tf in TIMEFRAMES}
    for (symbol, tf), bars in market.bars.items():
        o, h, l, c = (bars[k].to_numpy() for k in ("open", "high", "low", "close"))
        assert np.all(np.isfinite(bars.to_numpy())) and np.all(l > 0)
        assert np.all(l <= np.minimum(o, c)) and np.all(np.maximum(o, c) <= h)
        assert np.all(np.diff(bars.index.asi8) > 0)
        if tf != "1m":
            expected = resample(market.bars[(symbol, "1m")], tf, CONFIG.session_time)
            np.testing.assert_allclose(bars.to_numpy(), expected.to_numpy(), rtol=1e-12)
    assert len(market.bars[("AAA", "1h")]) == 60 * 7 and len(market.bars[("AAA", "1d")]) == 60


def test_realistic_structure(market):
    minute = market.bars[("AAA", "1m")]
    daily = market.bars[("AAA", "1d")]
    # Overnight gaps: daily opens differ from the prior close; intraday opens continue the prior close.
    gaps = np.abs(daily["open"].to_numpy()[1:] / daily["close"].to_numpy()[:-1] - 1)
    assert np.median(gaps) > 1e-4
    same_day = minute.index.normalize()[1:] == minute.index.normalize()[:-1]
    np.testing.assert_allclose(minute["open"].to_numpy()[1:][same_day], minute["close"].to_numpy()[:-1][same_day])
    # Intraday U-shape in volume: the first half hour trades more than midday.
    minute_of_day = (minute.index - minute.index.normalize()).total_seconds() // 60 - 570
    assert minute["volume"][minute_of_day < 30].mean() > 1.5 * minute["volume"][(minute_of_day > 150) & (minute_of_day < 240)].mean()
    # Volatility clustering: absolute 5m returns are autocorrelated; raw returns are not (much).
    returns = np.diff(np.log(market.bars[("AAA", "5m")]["close"].to_numpy()))
    abs_r = np.abs(returns) - np.abs(returns).mean()
    assert np.corrcoef(abs_r[:-1], abs_r[1:])[0, 1] > 0.1
    assert abs(np.corrcoef(returns[:-1], returns[1:])[0, 1]) < 0.1


def test_planted_patterns_fire_and_near_misses_do_not(market):
    labels = {key: label_bars(bars) for key, bars in market.bars.items()}
    plants = market.plants
    assert set(plants["timeframe"]) >= {"1m", "5m", "15m", "1h"}
    fired = np.array([bool(labels[(r.symbol, r.timeframe)].loc[r.timestamp, r.pattern]) for r in plants.itertuples()])
    near = plants["near_miss"].to_numpy()
    assert near.sum() > 10 and (~near).sum() > 50
    assert fired[~near].mean() >= 0.95
    assert fired[near].mean() <= 0.02


def test_bridge_reproduces_the_candle_exactly():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 60, 390):
        rows = bridge_minutes(100.0, 103.0, 99.0, 102.5, n, rng)
        assert rows.shape == (n, 4)
        assert rows[0, 0] == 100.0 and rows[-1, 3] == 102.5
        assert rows[:, 1].max() == 103.0 and rows[:, 2].min() == 99.0
        np.testing.assert_array_equal(rows[1:, 0], rows[:-1, 3])
        assert np.all(rows[:, 2] <= rows[:, [0, 3]].min(axis=1)) and np.all(rows[:, [0, 3]].max(axis=1) <= rows[:, 1])


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="symbols"):
        SyntheticMarketConfig(symbols=())
    with pytest.raises(ValueError, match="near_miss_share"):
        SyntheticMarketConfig(near_miss_share=2)
