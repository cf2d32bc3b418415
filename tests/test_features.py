import numpy as np
import pandas as pd
import pytest

from vlm_assets.features import FEATURE_NAMES, feature_frame, window_features


def _bars(n=40, seed=0):
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[100, close[:-1]]
    return pd.DataFrame({"open": open_, "high": np.maximum(open_, close) * 1.004,
                         "low": np.minimum(open_, close) * 0.996, "close": close, "volume": rng.uniform(1e3, 2e3, n)})


def test_features_describe_the_last_candles_in_range_units():
    bars = _bars()
    # Make the last bar a hammer-like candle that sits inside the previous bar's range.
    prev = bars.iloc[-2]
    low, high = prev["low"] + 0.01, prev["high"] - 0.01
    bars.iloc[-1] = [high - 0.3 * (high - low), high, low, high - 0.05 * (high - low), 1e4]
    f = dict(zip(FEATURE_NAMES, window_features(bars)))
    assert f["last_body_range"] == pytest.approx(0.25) and f["last_upper_range"] == pytest.approx(0.05)
    assert f["last_lower_range"] == pytest.approx(0.7) and f["last_direction"] == 1.0
    assert f["inside"] == 1.0 and f["outside"] == 0.0 and f["volume_z"] > 3


def test_features_are_scale_free_and_short_windows_give_missing_values():
    bars = _bars()
    scaled = bars.copy()
    scaled[["open", "high", "low", "close"]] *= 37.0
    assert np.allclose(window_features(bars), window_features(scaled), equal_nan=True)
    short = window_features(bars.iloc[-4:])
    names = list(FEATURE_NAMES)
    assert np.isnan(short[names.index("trend_20")]) and np.isfinite(short[names.index("last_body_range")])


def test_trend_slopes_are_least_squares_fits_in_range_units():
    bars = _bars()
    f = dict(zip(FEATURE_NAMES, window_features(bars)))
    close = bars["close"].to_numpy()
    history = (bars["high"] - bars["low"]).to_numpy()[-11:-1]
    for lookback in (5, 10, 20):
        segment = close[-2 - lookback:-1]  # up to the bar before the last, as the rule engine's trend
        slope = np.polyfit(np.arange(segment.size), segment, 1)[0] / history.mean()
        assert f[f"slope_{lookback}"] == pytest.approx(slope, rel=1e-9)


def test_bad_bars_and_windows_are_named():
    bars = _bars()
    bars.loc[5, "low"] = bars.loc[5, "high"] * 2
    with pytest.raises(ValueError, match="row 5"):
        window_features(bars)
    windows = pd.DataFrame({"symbol": ["X"], "timeframe": ["1d"], "pos": [50], "n_bars": [30]}, index=["w1"])
    with pytest.raises(ValueError, match="'w1'.*outside"):
        feature_frame(windows, {("X", "1d"): _bars()})
    frame = feature_frame(windows.assign(pos=39), {("X", "1d"): _bars()})
    assert list(frame.index) == ["w1"] and np.allclose(frame.iloc[0], window_features(_bars().iloc[10:]), equal_nan=True)


def test_feature_model_learns_a_rule_round_trips_and_is_deterministic():
    from vlm_assets.features import BoostingConfig, FeatureModel, train_feature_model

    rows = [window_features(_bars(30, seed)) for seed in range(300)]
    features = pd.DataFrame(rows, columns=list(FEATURE_NAMES))
    labels = pd.DataFrame({"bullish": features["last_direction"] > 0, "never": np.zeros(300, bool)})
    config = BoostingConfig(n_estimators=40)
    model = train_feature_model(features.iloc[:200], labels.iloc[:200], config)
    probabilities = model.predict(features.iloc[200:])
    truth = labels.iloc[200:]["bullish"].to_numpy()
    assert ((probabilities[:, 0] > 0.5) == truth).mean() > 0.95
    assert np.all(probabilities[:, 1] == 0.0)  # no positives in training: its base rate
    importances = model.importances()
    assert importances["bullish"].idxmax() == "last_direction"
    again = FeatureModel.from_json(model.to_json())
    assert np.array_equal(again.predict(features), model.predict(features))
    assert train_feature_model(features.iloc[:200], labels.iloc[:200], config).to_json() == model.to_json()
    with pytest.raises(ValueError, match="missing column"):
        model.predict(features.drop(columns=["last_gap_avg"]))


def test_one_row_predictions_equal_the_batch_path_bit_for_bit():
    # A served request predicts one row through LightGBM's single-row C path; it must agree with Booster.predict,
    # missing values included.
    from vlm_assets.features import BoostingConfig, train_feature_model

    rows = np.array([window_features(_bars(30, seed)) for seed in range(200)])
    features = pd.DataFrame(rows, columns=list(FEATURE_NAMES))
    labels = pd.DataFrame({"bullish": features["last_direction"] > 0, "never": np.zeros(200, bool)})
    model = train_feature_model(features, labels, BoostingConfig(n_estimators=30))
    probe = np.random.default_rng(1).normal(size=(50, len(FEATURE_NAMES)))
    probe[::3, ::4] = np.nan
    one_by_one = np.vstack([model.predict(probe[i:i + 1]) for i in range(len(probe))])
    assert np.array_equal(one_by_one, model.predict(probe))
    assert one_by_one[:, 1].tolist() == [0.0] * len(probe)  # the base-rate class answers on this path too
