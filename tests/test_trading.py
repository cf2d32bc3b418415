"""Trading integration: the look-ahead guard, the purged walk-forward, the gate, the evaluation and the public API,
and direction_model + gated_signals materialized for real on top of the tiny pipeline run."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from dagster import materialize

from bench.common import check_outcomes
from vlm_assets import trading
from vlm_assets.features import FEATURE_NAMES, BoostingConfig, window_features
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.pipeline.artifacts import load_bars
from vlm_assets.pipeline.model import dataset_windows
from vlm_assets.pipeline.trading import TRADING_ASSETS, TRADING_CHECKS
from vlm_assets.storage import ArtifactStore
from tests.conftest import TINY_HORIZONS, TINY_TRADING, tiny_resources

HORIZONS = TINY_HORIZONS
TINY_BOOSTING = BoostingConfig(n_estimators=20, learning_rate=0.1, num_leaves=7, min_child_samples=5, seed=3, threads=1)
TINY_WALK = trading.WalkForwardConfig(folds=4, min_train_rows=20)


@pytest.fixture(scope="module")
def tiny(model_run):
    """The tiny run's bars and labelled training rows."""
    root, _ = model_run
    store = ArtifactStore(root)
    windows = dataset_windows(store, ["window_id", "symbol", "timeframe", "pos", "n_bars", "block", "split"])
    bars = load_bars(store, timeframes=tuple(HORIZONS))
    settings = store.read_json(f"chart_images/{store.current_version('chart_images')}/settings.json")
    block_days = settings["sampling"]["block_days"]
    periods = trading.BlockPeriods.from_windows(windows, bars, block_days)
    rows = trading.label_rows(trading.sample_points(bars, HORIZONS), bars, HORIZONS, periods)
    return bars, rows, periods


@pytest.fixture(scope="module")
def trading_run(model_run):
    root, _ = model_run
    return root, materialize([*TRADING_ASSETS, *TRADING_CHECKS], resources=tiny_resources(root),
                             run_config=TINY_TRADING)


def _shifted_labels(rows: pd.DataFrame, bars, shift: int) -> pd.DataFrame:
    """The rows with each label taken `shift` bars later (the trade of bar t + shift)."""
    out = rows.copy()
    for (symbol, tf), group in rows.groupby(["symbol", "timeframe"]):
        returns = trading.forward_returns(bars[(symbol, tf)], HORIZONS[tf])
        out.loc[group.index, "forward_return"] = returns[group["pos"].to_numpy() + shift]
    out["up"] = out["forward_return"] > 0
    return out


# ---- labels and the look-ahead guard -------------------------------------------------------------------------

def test_forward_return_enters_at_the_next_open_and_exits_h_bars_later():
    bars = pd.DataFrame({"open": [10.0, 11.0, 12.0, 13.0, 14.0], "close": [10.5, 11.5, 12.5, 13.5, 14.5]})
    returns = trading.forward_returns(bars, 2)
    assert returns[0] == pytest.approx(1e4 * math.log(12.5 / 11.0))  # open of bar 1 to close of bar 2
    assert returns[2] == pytest.approx(1e4 * math.log(14.5 / 13.0))
    assert np.isnan(returns[3:]).all()  # bar t+h does not exist
    with pytest.raises(ValueError, match="row 1: .*positive prices"):
        trading.forward_returns(bars.assign(open=[10.0, 0.0, 12.0, 13.0, 14.0]), 2)


def test_feature_history_is_all_window_features_reads(tiny):
    bars, _, _ = tiny
    series = bars[("AAA", "5m")]
    for t in (90, 200, len(series) - 1):
        assert np.array_equal(window_features(series.iloc[t - trading.FEATURE_HISTORY + 1: t + 1]),
                              window_features(series.iloc[t - 80: t + 1]), equal_nan=True)


@pytest.mark.parametrize("shift", [1, -1])
def test_lookahead_guard_refuses_labels_shifted_by_one_bar(tiny, shift):
    """The acceptance test: a label one bar off (+1: into the future; -1: the label starts at bar t, whose candle
    the features already see) is refused before anything is trained; the clean table passes."""
    bars, rows, _ = tiny
    trading.check_no_lookahead(rows, bars)
    shifted = _shifted_labels(rows, bars, shift)
    with pytest.raises(ValueError, match=r"look-ahead guard: row \d+ .*labels are misaligned with the bars"):
        trading.walk_forward(shifted, bars, TINY_WALK, TINY_BOOSTING)
    if shift == -1:  # why it matters: that label is predictable from bar t's own candle
        from sklearn.metrics import roc_auc_score

        direction = rows["last_direction"].fillna(0)
        assert roc_auc_score(shifted["up"], direction) > roc_auc_score(rows["up"], direction) + 0.03


def test_lookahead_guard_refuses_features_that_saw_the_next_bar(tiny):
    bars, rows, periods = tiny
    leaked = rows.copy()
    next_bar = rows[["symbol", "timeframe", "pos"]].assign(pos=rows["pos"] + 1)
    later = trading.label_rows(next_bar, bars, HORIZONS, periods)
    leaked[list(FEATURE_NAMES)] = later[list(FEATURE_NAMES)].to_numpy()
    with pytest.raises(ValueError, match="look-ahead guard: row .*feature .* it saw another bar"):
        trading.check_no_lookahead(leaked, bars, feature_sample=32)


# ---- the walk-forward --------------------------------------------------------------------------------------

def test_walk_forward_trains_only_on_closed_labels_that_read_no_test_bar(tiny):
    bars, rows, periods = tiny
    walk, predicted = trading.walk_forward(rows, bars, TINY_WALK, TINY_BOOSTING)
    # fit_ok recomputed bar by bar: no bar from t-21 to t+h lies in a test block
    for row in rows.sample(n=200, random_state=0).itertuples():
        series = bars[(row.symbol, row.timeframe)]
        read = series.index[max(row.pos - trading.FEATURE_HISTORY + 1, 0): row.pos + row.horizon + 1]
        assert row.fit_ok == ("test" not in set(periods.of(row.symbol, read)))
    assert not rows.loc[rows["split"] == "test", "fit_ok"].any()
    folds = walk.folds
    assert folds.loc[0, "train_rows"] == 0 and walk.models[0] == {}
    fold = walk.fold_of(rows["time"])
    assert np.isnan(predicted[fold == 0]).all() and np.isfinite(predicted[fold == len(folds) - 1]).all()
    for k in range(1, len(folds)):
        start = walk.boundaries[k]
        purged = rows["fit_ok"] & (rows["label_end"] <= start)
        assert folds.loc[k, "train_rows"] == int(purged.sum()) > 0
        assert pd.Timestamp(folds.loc[k, "last_train_label_end"]) <= pd.Timestamp(start)
        assert folds.loc[k, "train_rows_in_test_blocks"] == 0
        # the purge has work to do: some earlier bars' labels were still open at the fold's start (and the last
        # training label end above shows none of them was trained on)
        assert ((rows["time"] < start) & (rows["label_end"] > start) & rows["fit_ok"]).any()


def test_direction_model_is_deterministic_and_round_trips(tiny):
    bars, rows, _ = tiny
    model, _, raw = trading.fit_direction_model(rows, bars, HORIZONS, TINY_WALK, TINY_BOOSTING, guard_sample=16)
    again, _, raw_again = trading.fit_direction_model(rows, bars, HORIZONS, TINY_WALK, TINY_BOOSTING, guard_sample=16)
    assert model.to_json() == again.to_json() and np.array_equal(raw, raw_again, equal_nan=True)
    calibrated = model.calibrate(raw, rows["timeframe"])
    one_by_one = np.concatenate([model.calibrate(raw[rows["timeframe"] == tf], tf)
                                 for tf in rows["timeframe"].unique()])
    assert np.array_equal(np.sort(calibrated[np.isfinite(calibrated)]), np.sort(one_by_one[np.isfinite(one_by_one)]))
    loaded = trading.DirectionModel.from_json(model.to_json())
    x = rows[rows["timeframe"] == "1m"].head(5)
    assert np.allclose(loaded.probability_up(x, "1m"), model.probability_up(x, "1m"))
    assert set(model.platt) <= set(HORIZONS) and set(model.timeframes) == set(HORIZONS)
    with pytest.raises(ValueError, match="timeframe '1d'"):
        model.raw(x, "1d")
    with pytest.raises(ValueError, match=r"features must be \(n, 36\)"):
        model.raw(np.zeros((2, 5)), "1m")


# ---- the gate and the evaluation ---------------------------------------------------------------------------

def _probabilities(**given) -> np.ndarray:
    row = np.zeros(len(CORE_PATTERNS))
    for pattern, value in given.items():
        row[CORE_PATTERNS.index(pattern)] = value
    return row[None, :]


def test_gate_fires_only_when_probability_and_direction_agree():
    gate = trading.Gate({p: 0.7 for p in trading.DIRECTIONAL_PATTERNS} | {"evening_star": math.inf}, 0.55)
    cases = [  # probabilities, p_up -> direction, confidence
        (_probabilities(hammer=0.9), 0.6, 1, 0.6),
        (_probabilities(hammer=0.9), 0.5, 0, 0.0),  # the direction model is not sure enough
        (_probabilities(hammer=0.6), 0.9, 0, 0.0),  # the pattern does not clear its gate
        (_probabilities(bearish_engulfing=0.8), 0.3, -1, 0.7),
        (_probabilities(bearish_engulfing=0.8), 0.7, 0, 0.0),  # the model disagrees with the polarity
        (_probabilities(evening_star=1.0), 0.0, 0, 0.0),  # a closed gate never opens
        (_probabilities(doji=1.0, inside_bar=1.0, outside_bar=1.0), 0.9, 0, 0.0),  # neutral patterns never trade
        (_probabilities(hammer=0.9, evening_star=1.0), 0.9, 1, 0.9),
    ]
    for probabilities, p_up, direction, confidence in cases:
        decided = gate.decide(probabilities, np.array([p_up]))
        assert (decided.direction[0], decided.confidence[0]) == pytest.approx((direction, confidence)), p_up
    coin = trading.Gate({p: 0.5 for p in trading.DIRECTIONAL_PATTERNS}, 0.5)
    both = coin.decide(_probabilities(hammer=0.9, bearish_engulfing=0.9), np.array([0.5]))
    assert both.direction[0] == 0 and both.passed() == ["bearish_engulfing,hammer"]  # a conflict is no trade
    assert gate.decide(_probabilities(hammer=0.9), np.array([np.nan])).direction[0] == 0  # no model: no signal
    assert trading.Gate.from_dict(json.loads(json.dumps(gate.to_dict()))) == gate
    with pytest.raises(ValueError, match="another polarity for \\['hammer'\\]"):
        trading.Gate.from_dict(gate.to_dict() | {"polarity": {**gate.to_dict()["polarity"], "hammer": "bearish"}})
    with pytest.raises(ValueError, match="min_confidence"):
        trading.Gate(gate.thresholds, 0.4)


def test_fit_gate_chooses_precision_gates_on_validation_only():
    probabilities, truth = np.zeros((7, len(CORE_PATTERNS))), np.zeros((7, len(CORE_PATTERNS)), bool)
    hammer, bearish = CORE_PATTERNS.index("hammer"), CORE_PATTERNS.index("bearish_engulfing")
    probabilities[:, hammer] = [0.95, 0.9, 0.85, 0.8, 0.6, 0.5, 0.3]
    truth[:, hammer] = [True, True, True, True, False, True, False]  # precision 1.0 down to 0.8, then 0.8, 0.83, 0.71
    probabilities[:, bearish] = 0.9  # confident and always wrong
    splits = ["val"] * 7
    gate, table = trading.fit_gate(probabilities, truth, splits, trading.GateConfig(min_precision=0.9))
    assert gate.thresholds["hammer"] == 0.8 and gate.min_confidence == trading.GateConfig.min_confidence
    assert all(math.isinf(gate.thresholds[p]) for p in trading.DIRECTIONAL_PATTERNS if p != "hammer")
    rows = table.set_index("pattern")
    assert (rows.loc["hammer", "val_precision"], rows.loc["hammer", "val_recall"]) == (1.0, 0.8)
    assert rows.loc["bearish_engulfing", "status"].startswith("closed: never reaches precision 0.9 on validation")
    looser, _ = trading.fit_gate(probabilities, truth, splits, trading.GateConfig(min_precision=0.8, min_probability=0))
    assert looser.thresholds["hammer"] == 0.5  # the lowest cut whose precision (5/6) still reaches 0.8
    floored, _ = trading.fit_gate(probabilities, truth, splits,
                                  trading.GateConfig(min_precision=0.8, min_probability=0.55))
    assert floored.thresholds["hammer"] == 0.55  # no cut below the floor; at the floor precision is 4/5 already
    with pytest.raises(ValueError, match=r"validation only: got rows of split\(s\) \['test'\]"):
        trading.fit_gate(probabilities, truth, splits[:-1] + ["test"])
    with pytest.raises(ValueError, match="validation row 2: a probability is not finite"):
        trading.fit_gate(np.where(np.arange(7)[:, None] == 2, np.nan, probabilities), truth, splits)


def test_overlapping_signals_trade_once_and_costs_are_per_trade():
    frame = pd.DataFrame({"symbol": "S", "timeframe": "1m", "pos": [10, 12, 15, 16, 30], "horizon": 5,
                          "time": pd.date_range("2024-01-02 10:00", periods=5, freq="min"),
                          "forward_return": [10.0, 50.0, -4.0, 7.0, 3.0]})
    trades = trading.take_trades(frame, np.array([1, 1, -1, 1, 0]), cost_bps=2.0)
    # 12 falls inside the trade of 10 (open until the close of bar 15); 15 starts when it has closed
    assert list(trades["pos"]) == [10, 15]
    assert list(trades["net_bps"]) == [8.0, 2.0]  # long +10 - 2, short of -4 = +4 - 2
    stats = trading.performance(trades, signals=4)
    assert stats["signals"] == 4 and stats["trades"] == 2 and stats["hit_rate"] == 1.0
    assert stats["mean_gross_bps"] == 7.0 and stats["mean_net_bps"] == 5.0
    assert stats["sharpe_per_trade"] == pytest.approx(5.0 / np.std([8.0, 2.0], ddof=1))
    assert trading.performance(trading.take_trades(frame, np.zeros(5, int), 2.0), 0)["trades"] == 0


# ---- the assets and the public API -------------------------------------------------------------------------

def test_trading_assets_materialize_with_checks_tables_and_plot(trading_run):
    root, result = trading_run
    assert result.success
    checks = check_outcomes(result)
    for name in ("walk_forward_is_purged", "direction_model_loads", "gates_chosen_on_validation_only",
                 "gate_api_serves"):
        assert checks[name], (name, checks)
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert {"metrics_by_period", "walk_forward_folds", "reliability_test", "test_auc"} <= set(meta["direction_model"])
    gated = meta["gated_signals"]
    strategies = [r.data["strategy"] for r in gated["test_comparison"].value.records]
    assert strategies == list(trading.STRATEGIES)
    assert gated["equity_curves"].value.startswith("![") or "unavailable" in gated["equity_curves"].value
    store = ArtifactStore(root)
    version = store.current_version("gated_signals")
    signals = store.read_parquet(f"gated_signals/{version}/signals.parquet")
    assert set(signals["split"]) <= {"val", "test"} and signals["evaluated"].any() and signals["chose_gate"].any()
    assert not (signals["evaluated"] & signals["chose_gate"]).any()
    # the stored decision is the gate's on the stored inputs
    gate = trading.load_signal_gate(store.local_path("gated_signals", version)).gate
    decided = gate.decide(signals[list(CORE_PATTERNS)].to_numpy(), signals["p_up"].to_numpy())
    assert np.array_equal(decided.direction, signals["direction"]) and decided.passed() == list(signals["passed"])
    rows = store.read_parquet(f"direction_model/{store.current_version('direction_model')}/rows.parquet")
    assert not rows.loc[rows["split"] == "test", "fit_ok"].any() and rows["p_raw"][rows["fold"] == 0].isna().all()


def test_public_api_answers_a_bar_and_rejects_bad_input(trading_run, tiny):
    root, _ = trading_run
    bars, _, _ = tiny
    store = ArtifactStore(root)
    served = trading.load_signal_gate(store.local_path("gated_signals", store.current_version("gated_signals")))
    assert served.fitted_for["fuser"] == store.current_version("fuser")
    window = bars[("AAA", "5m")].iloc[100:200]
    probabilities = dict.fromkeys(CORE_PATTERNS, 0.0) | {"hammer": 1.0}
    answer = served.signal_for_bars(window, probabilities, "5m")
    assert json.loads(json.dumps(answer, allow_nan=False)) == answer  # the service can send it as it is
    assert set(answer) >= {"direction", "confidence", "gated", "reasons"} and answer["horizon_bars"] == HORIZONS["5m"]
    p_up = served.direction.probability_up(window_features(window)[None, :], "5m")[0]
    assert answer["p_up"] == pytest.approx(p_up)
    hammer = answer["gates"]["hammer"]
    assert hammer["direction_gate"] == (p_up >= served.gate.min_confidence)
    fires = hammer["probability_gate"] and hammer["direction_gate"]
    assert answer["gated"] == (answer["direction"] == "long") == fires
    assert set(answer["gates"]) == set(trading.DIRECTIONAL_PATTERNS) and answer["reasons"]
    by_name = dict(zip(FEATURE_NAMES, window_features(window)))
    assert served.signal(probabilities, by_name, "5m") == answer
    unknown = served.signal(probabilities, window_features(window), "1d")
    assert unknown["direction"] == "flat" and "no direction model for timeframe 1d" in unknown["reasons"][0]
    features = window_features(window)
    infinite = np.where(np.arange(len(features)) == 3, np.inf, features)
    for given, feature_values, timeframe, message in (
            ({"hammr": 0.5}, features, "5m", "unknown pattern"), ({"hammer": 1.5}, features, "5m", "hammer is 1.5"),
            ({"hammer": 0.5}, features[:10], "5m", "expected 36 values"),
            ({"hammer": 0.5}, infinite, "5m", f"{FEATURE_NAMES[3]} is infinite"),
            ({"hammer": 0.5}, features, "2m", "timeframe '2m' is unknown")):
        with pytest.raises(ValueError, match=message):
            served.signal(given, feature_values, timeframe)
    files = {name: (store.local_path("gated_signals", store.current_version("gated_signals")) / name).read_bytes()
             for name in trading.GATE_FILES}
    with pytest.raises(ValueError, match="another direction_model.json"):
        trading.load_signal_gate(files | {"direction_model.json": files["direction_model.json"] + b" "})
