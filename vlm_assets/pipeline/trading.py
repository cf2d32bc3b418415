"""Trading assets (group `trading`): direction_model and gated_signals, with their checks."""

import dataclasses
import json
import tempfile

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult, AssetCheckSeverity, AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue,
    asset, asset_check,
)
from pydantic import Field

from vlm_assets import __version__
from vlm_assets import calibration as cal
from vlm_assets import evaluation as ev
from vlm_assets import trading
from vlm_assets.features import FEATURE_NAMES, BoostingConfig, feature_frame
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.market.timeframes import TIMEFRAMES
from vlm_assets.pipeline import metadata as md
from vlm_assets.pipeline.artifacts import load_bars, write_version
from vlm_assets.pipeline.data import ohlcv_bars, vlm_dataset
from vlm_assets.pipeline.fusion import fuser
from vlm_assets.pipeline.model import dataset_windows
from vlm_assets.storage import parquet_bytes
from vlm_resources import ArtifactStoreResource, ComputeResource

TRADING_GROUP = "trading"
GATED_SIGNALS_CODE_VERSION = "1"
WINDOW_COLUMNS = ["window_id", "symbol", "timeframe", "pos", "n_bars", "block", "split", "end"]
STORED_COLUMNS = ["symbol", "timeframe", "pos", *trading.ROW_COLUMNS, "fold", "p_raw", "p_up"]
MIN_GATED_TEST_TRADES = 20  # fewer and the gated figures say little
ERROR = AssetCheckSeverity.ERROR
_BOOST = trading.DIRECTION_BOOSTING
_WALK = trading.WalkForwardConfig()
_GATE = trading.GateConfig()


class DirectionModelConfig(Config):
    horizons: dict[str, int] = Field(default_factory=lambda: dict(trading.DEFAULT_HORIZONS),
                                     description="forward horizon h in bars per timeframe (the trade enters at the "
                                     "open of bar t+1 and exits at the close of bar t+h); a timeframe left out gets "
                                     "no direction model")
    folds: int = Field(default=_WALK.folds, description="walk-forward folds (equal calendar segments; the first "
                       "only trains)")
    min_train_rows: int = Field(default=_WALK.min_train_rows, description="rows a timeframe needs in a fold to be "
                                "predicted there")
    n_estimators: int = _BOOST.n_estimators
    learning_rate: float = _BOOST.learning_rate
    num_leaves: int = _BOOST.num_leaves
    min_child_samples: int = _BOOST.min_child_samples
    seed: int = _BOOST.seed
    threads: int = Field(default=_BOOST.threads, description="LightGBM threads (1 is faster on small data or busy "
                         "cores)")
    guard_sample: int = Field(default=512, description="rows whose features the look-ahead guard re-derives from "
                              "the bars (every row's label is re-derived)")

    def walk_forward(self) -> trading.WalkForwardConfig:
        return trading.WalkForwardConfig(folds=self.folds, min_train_rows=self.min_train_rows)

    def boosting(self) -> BoostingConfig:
        return BoostingConfig(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                              num_leaves=self.num_leaves, min_child_samples=self.min_child_samples, seed=self.seed,
                              threads=self.threads)


def _periods(artifacts, windows: pd.DataFrame, bars) -> trading.BlockPeriods:
    """The dataset's (symbol, block) splits, with the block length the windows were chosen with."""
    settings = artifacts.read_json(f"chart_images/{artifacts.current_version('chart_images')}/settings.json")
    return trading.BlockPeriods.from_windows(windows, bars, settings["sampling"]["block_days"])


def _metrics_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per period (val, test) and timeframe (and all): the calibrated walk-forward metrics, the raw ECE and the
    share of the period's rows that have a prediction."""
    records = []
    for period in ("val", "test"):
        part = rows[rows["split"] == period]
        for tf in [*TIMEFRAMES, "all"]:
            chosen = part if tf == "all" else part[part["timeframe"] == tf]
            if chosen.empty:
                continue
            metrics = trading.direction_metrics(chosen["up"], chosen["p_up"])
            records.append({"period": period, "timeframe": tf, **metrics,
                            "ece_raw": trading.direction_metrics(chosen["up"], chosen["p_raw"])["ece"],
                            "coverage": float(np.isfinite(chosen["p_up"]).mean())})
    return pd.DataFrame(records)


def _importance_table(model: trading.DirectionModel, top: int = 15) -> pd.DataFrame:
    importances = model.combined().importances()
    share = importances / importances.sum().replace(0, 1)
    return share.loc[share.sum(axis=1).sort_values(ascending=False).index[:top]].round(4)


@asset(group_name=TRADING_GROUP, code_version="1", deps=[vlm_dataset, ohlcv_bars], kinds={"lightgbm"})
def direction_model(context: AssetExecutionContext, config: DirectionModelConfig,
                    store: ArtifactStoreResource) -> MaterializeResult:
    """LightGBM per timeframe predicting the sign of the forward return over h bars from the engineered features
    at bar t, walk-forward in calendar time (purged, never trained on a test-block bar), Platt-scaled on the
    validation period; AUC, accuracy and calibration on the test period. Also predicts the dataset's val/test
    windows for `gated_signals`."""
    artifacts = store.store()
    horizons = trading.check_horizons(config.horizons)
    windows = dataset_windows(artifacts, WINDOW_COLUMNS)
    bars = load_bars(artifacts, timeframes=tuple(horizons))
    periods = _periods(artifacts, windows, bars)
    rows = trading.label_rows(trading.sample_points(bars, horizons), bars, horizons, periods)
    context.log.info(f"{len(rows):,} rows ({rows['split'].value_counts().to_dict()}); walk-forward over "
                     f"{config.folds} folds")
    model, walk, raw = trading.fit_direction_model(rows, bars, horizons, config.walk_forward(), config.boosting(),
                                                   config.guard_sample)
    rows["p_raw"], rows["fold"] = raw, walk.fold_of(rows["time"])
    rows["p_up"] = model.calibrate(rows["p_raw"], rows["timeframe"])
    evaluated = windows[windows["split"].isin(["val", "test"]) & windows["timeframe"].isin(list(horizons))]
    window_rows = trading.label_rows(evaluated.rename(columns={"split": "dataset_split"}), bars, horizons, periods)
    disagree = window_rows["dataset_split"] != window_rows["split"]
    if disagree.any():  # the blocks are recomputed from the calendar: they must be the dataset's
        first = window_rows[disagree].iloc[0]
        raise ValueError(f"window {first['window_id']}: dataset split {first['dataset_split']} but its block is "
                         f"{first['split']}: chart_images' block_days does not match the dataset")
    window_rows["fold"] = walk.fold_of(window_rows["time"])
    window_rows["p_raw"] = walk.predict(window_rows, window_rows["time"], window_rows["timeframe"])
    window_rows["p_up"] = model.calibrate(window_rows["p_raw"], window_rows["timeframe"])

    table = _metrics_table(rows)
    test = table[(table["period"] == "test") & (table["timeframe"] == "all")].iloc[0]
    summary = {f"test_{k}": float(test[k]) for k in ("auc", "accuracy", "brier", "ece", "ece_raw", "up_share",
                                                     "coverage")} | {"test_rows": int(test["rows"])}
    tested = rows[(rows["split"] == "test") & np.isfinite(rows["p_up"])]
    reliability = cal.reliability_figure(cal.reliability(tested["p_raw"], tested["up"]),
                                         cal.reliability(tested["p_up"], tested["up"]),
                                         "direction model on the test period: raw (before) vs Platt (after)")
    report = {"summary": summary, "metrics": table, "folds": walk.folds, "horizons": horizons,
              "config": json.loads(config.model_dump_json())}
    version = write_version(artifacts, "direction_model", {
        "direction_model.json": model.to_json().encode(),
        "rows.parquet": parquet_bytes(rows[STORED_COLUMNS]),
        "windows.parquet": parquet_bytes(window_rows[["window_id", *STORED_COLUMNS]].reset_index(drop=True)),
        "report.json": json.dumps(ev.to_jsonable(report), indent=2, sort_keys=True, allow_nan=False).encode()})
    return MaterializeResult(
        metadata={"version": version, "path": MetadataValue.path(str(artifacts.path("direction_model", version))),
                  **{k: MetadataValue.float(v) if isinstance(v, float) else v for k, v in summary.items()},
                  "horizons": MetadataValue.json(horizons),
                  "metrics_by_period": md.table(table.round(4)),
                  "walk_forward_folds": md.table(walk.folds.astype({c: str for c in
                                                                    ("start", "end", "last_train_label_end")})),
                  "platt": md.table(pd.DataFrame(model.platt, index=["slope", "intercept"]).T, index_name="timeframe"),
                  "feature_importance": md.table(_importance_table(model), index_name="feature"),
                  "reliability_test": md.plot_markdown(reliability, "direction model reliability", width=700,
                                                       height=600)},
        data_version=DataVersion(version))

class GatedSignalsConfig(Config):
    min_confidence: float = Field(default=_GATE.min_confidence, description="the direction model's least probability "
                                  "of a pattern's direction for its signal to fire (also the direction-alone "
                                  "strategy's bar)")
    min_precision: float = Field(default=_GATE.min_precision, description="a pattern's gate: the lowest fused "
                                 "probability whose validation precision reaches this")
    min_probability: float = Field(default=_GATE.min_probability, description="the lowest a pattern's gate may be")
    cost_bps: float = Field(default=_GATE.cost_bps, description="cost per trade (round trip) in basis points")

    def gate(self) -> trading.GateConfig:
        return trading.GateConfig(min_confidence=self.min_confidence, min_precision=self.min_precision,
                                  min_probability=self.min_probability, cost_bps=self.cost_bps)


def _fused(artifacts, windows: pd.DataFrame, features: pd.DataFrame, device: str):
    """The fused, calibrated core-pattern probabilities of the windows as the service computes them with bars:
    the current parts assembled into a bundle and scored through the predictor. Returns the scores and the
    bundle's part versions."""
    from vlm_assets import promotion
    from vlm_assets.serving.predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="candle-vlm-gate-") as scratch:
        manifest = promotion.assemble_bundle(artifacts, scratch, f"{__version__}+gate{GATED_SIGNALS_CODE_VERSION}")
        with_bars, _ = Predictor(scratch, device).evaluate(windows["png"].tolist(), features)
    return with_bars, manifest["parts"]


def _trades_frame(trades: dict[str, pd.DataFrame], period: str) -> pd.DataFrame:
    columns = ["window_id", "symbol", "timeframe", "pos", "time", "horizon", "direction", "gross_bps", "net_bps"]
    return pd.concat([t[columns].assign(strategy=name, period=period) for name, t in trades.items()], ignore_index=True)


@asset(group_name=TRADING_GROUP, code_version=GATED_SIGNALS_CODE_VERSION, deps=[direction_model, fuser],
       kinds={"lightgbm", "pytorch"})
def gated_signals(context: AssetExecutionContext, config: GatedSignalsConfig, store: ArtifactStoreResource,
                  compute: ComputeResource) -> MaterializeResult:
    """Per val/test window: the fused pattern probabilities (through the serving path), the direction model's
    walk-forward P(up) and the gate's decision. Gates chosen on validation only (each pattern's precision target);
    on the test period raw patterns, the direction model alone and the gate side by side (hit rate, mean net
    return, Sharpe-like ratio, signals) with costs, and their equity curves. Stores gate.json +
    direction_model.json for the bundle."""
    artifacts = store.store()
    compute.apply_threads()
    gate_config = config.gate()
    model_version = artifacts.current_version("direction_model")
    model_bytes = artifacts.read_bytes(f"direction_model/{model_version}/direction_model.json")
    rows = artifacts.read_parquet(f"direction_model/{model_version}/windows.parquet")
    charts = dataset_windows(artifacts, ["window_id", "symbol", "timeframe", "pos", "n_bars", "png", *CORE_PATTERNS])
    charts = charts.set_index("window_id").loc[rows["window_id"]].reset_index()
    features = feature_frame(charts, load_bars(artifacts, timeframes=tuple(rows["timeframe"].unique())))
    context.log.info(f"scoring {len(charts)} val/test windows through the serving path")
    scores, parts = _fused(artifacts, charts, features, compute.resolved_device())
    truth = charts[list(CORE_PATTERNS)].to_numpy(bool)
    frame = pd.concat([rows, pd.DataFrame(scores.probabilities, columns=list(CORE_PATTERNS)),
                       pd.DataFrame(truth, columns=[f"truth_{p}" for p in CORE_PATTERNS])], axis=1)
    usable = np.isfinite(frame["forward_return"]) & np.isfinite(frame["p_up"])
    frame["chose_gate"] = frame["split"] == "val"
    frame["evaluated"] = usable & (frame["split"] == "test")
    chose = frame["chose_gate"].to_numpy()
    gate, gates = trading.fit_gate(scores.probabilities[chose], truth[chose], frame.loc[chose, "split"], gate_config)
    decisions = gate.decide(frame[list(CORE_PATTERNS)].to_numpy(), frame["p_up"].to_numpy())
    frame = frame.assign(direction=decisions.direction, confidence=decisions.confidence, gated=decisions.gated,
                         passed=decisions.passed(), raw_direction=trading.pattern_direction(scores.detected))
    results, trades = {}, {}
    for period, mask in (("test", frame["evaluated"]), ("validation", usable & (frame["split"] == "val"))):
        results[period], trades[period] = trading.compare(frame[mask], gate, scores.detected[mask.to_numpy()],
                                                          gate_config.cost_bps)
    equity = trading.equity_figure(trades["test"], f"test period: cumulative net return per strategy "
                                   f"({gate_config.cost_bps:g} bps per trade)")
    test = results["test"].set_index("strategy")
    coverage = {"val_windows": int(chose.sum()), "val_windows_evaluated": int((usable & chose).sum()),
                "test_windows": int((frame["split"] == "test").sum()),
                "test_windows_evaluated": int(frame["evaluated"].sum())}
    summary = {f"{key}_{column}": float(test.loc[name, column])
               for key, name in (("gated", "gated"), ("raw", "raw patterns"), ("direction", "direction model"))
               for column in ("trades", "hit_rate", "mean_net_bps", "sharpe_per_trade")}
    report = {"summary": summary, "coverage": coverage, "gate_config": dataclasses.asdict(gate_config), "gates": gates,
              "test": results["test"], "validation": results["validation"],
              "fitted_for": parts | {"direction_model": model_version}}
    files = trading.gate_files(gate, model_bytes, report["fitted_for"]) | {
        "signals.parquet": parquet_bytes(frame),
        "trades.parquet": parquet_bytes(pd.concat([_trades_frame(t, period) for period, t in trades.items()],
                                                  ignore_index=True)),
        "report.json": json.dumps(ev.to_jsonable(report), indent=2, sort_keys=True, allow_nan=False).encode()}
    version = write_version(artifacts, "gated_signals", files)
    return MaterializeResult(
        metadata={"version": version, "path": MetadataValue.path(str(artifacts.path("gated_signals", version))),
                  **{k: MetadataValue.float(v) for k, v in summary.items()}, "coverage": MetadataValue.json(coverage),
                  "test_comparison": md.table(results["test"].round(4)),
                  "validation_comparison": md.table(results["validation"].round(4)),
                  "gates": md.table(gates.round(4)),
                  "equity_curves": md.plot_markdown(equity, "equity curves on the test period"),
                  "fitted_for": MetadataValue.json(report["fitted_for"])},
        data_version=DataVersion(version))


TRADING_ASSETS = [direction_model, gated_signals]


# ---- checks ------------------------------------------------------------------------------------------------

def _read(store: ArtifactStoreResource, asset_name: str, file: str, version: str | None = None):
    artifacts = store.store()
    version = version or artifacts.current_version(asset_name)
    path = f"{asset_name}/{version}/{file}"
    if file.endswith(".parquet"):
        return artifacts.read_parquet(path)
    return artifacts.read_bytes(path)


@asset_check(asset=direction_model, description="walk-forward without look-ahead: every fold trained only on rows "
             "whose labels closed before its segment and that read no test-block bar, fold 0 predicts nothing, and "
             "every stored label re-derives from the bars")
def walk_forward_is_purged(store: ArtifactStoreResource) -> AssetCheckResult:
    report = json.loads(_read(store, "direction_model", "report.json"))
    folds = pd.DataFrame(report["folds"])
    ends = pd.to_datetime(folds["last_train_label_end"])
    bad_folds = folds.loc[(ends > pd.to_datetime(folds["start"])) | (folds["train_rows_in_test_blocks"] > 0), "fold"]
    rows = _read(store, "direction_model", "rows.parquet")
    windows = _read(store, "direction_model", "windows.parquet")
    predicted_in_fold_0 = int((np.isfinite(rows["p_raw"]) & (rows["fold"] == 0)).sum())
    bars = load_bars(store.store(), timeframes=tuple(report["horizons"]))
    problem = None
    try:
        for frame in (rows, windows):
            trading.check_no_lookahead(frame, bars, feature_sample=0)
    except ValueError as error:
        problem = str(error)
    return AssetCheckResult(passed=bad_folds.empty and not predicted_in_fold_0 and problem is None, severity=ERROR,
                            metadata={"folds_breaking_the_purge": MetadataValue.json(bad_folds.tolist()),
                                      "rows_predicted_in_fold_0": predicted_in_fold_0,
                                      "label_problem": problem or "none"})


@asset_check(asset=direction_model, description="the stored model loads and gives probabilities in [0, 1] for every "
             "timeframe it has")
def direction_model_loads(store: ArtifactStoreResource) -> AssetCheckResult:
    model = trading.DirectionModel.from_json(_read(store, "direction_model", "direction_model.json"))
    probe = np.vstack([np.zeros(len(FEATURE_NAMES)), np.full(len(FEATURE_NAMES), np.nan)])
    values = np.concatenate([model.probability_up(probe, tf) for tf in model.timeframes]) if model.timeframes else []
    ok = bool(len(values) and np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all())
    return AssetCheckResult(passed=ok, severity=ERROR, metadata={
        "timeframes": ", ".join(model.timeframes),
        "horizon_timeframes_without_model": ", ".join(tf for tf in model.horizons if tf not in model.timeframes)})


@asset_check(asset=direction_model, description="test-period AUC >= 0.51 over >= 1000 predicted rows")
def direction_model_beats_chance(store: ArtifactStoreResource) -> AssetCheckResult:
    from vlm_assets.pipeline.checks import _kpi_result  # here: checks imports the serving assets, which may need ours

    summary = json.loads(_read(store, "direction_model", "report.json"))["summary"]
    return _kpi_result({"test_auc": summary["test_auc"], "test_rows": summary["test_rows"]},
                       {"test_auc": (">=", 0.51), "test_rows": (">=", 1000)})


@asset_check(asset=gated_signals, description="only validation windows chose the gates, and re-fitting the gate "
             "from them gives the stored gate")
def gates_chosen_on_validation_only(store: ArtifactStoreResource) -> AssetCheckResult:
    signals = _read(store, "gated_signals", "signals.parquet")
    report = json.loads(_read(store, "gated_signals", "report.json"))
    stored = trading.Gate.from_dict(json.loads(_read(store, "gated_signals", "gate.json")))
    chose = signals[signals["chose_gate"]]
    outside = int((chose["split"] != "val").sum())
    refit, _ = trading.fit_gate(chose[list(CORE_PATTERNS)].to_numpy(), chose[[f"truth_{p}" for p in CORE_PATTERNS]],
                                chose["split"], trading.GateConfig(**report["gate_config"]))
    return AssetCheckResult(passed=outside == 0 and refit == stored, severity=ERROR, metadata={
        "rows_outside_validation": outside, "refit_equals_stored": refit == stored,
        "gates": MetadataValue.json(ev.to_jsonable(stored.thresholds))})


@asset_check(asset=gated_signals, description="gate.json + direction_model.json load through the public API, carry "
             "the direction_model asset's model, and SignalGate.signal answers test windows as Gate.decide does")
def gate_api_serves(store: ArtifactStoreResource) -> AssetCheckResult:
    files = {name: _read(store, "gated_signals", name) for name in trading.GATE_FILES}
    served = trading.load_signal_gate(files)
    same_model = files["direction_model.json"] == _read(store, "direction_model", "direction_model.json")
    signals = _read(store, "gated_signals", "signals.parquet")
    sample = signals[signals["evaluated"]].head(50).reset_index(drop=True)
    bars = load_bars(store.store(), timeframes=tuple(sample["timeframe"].unique()))
    features = feature_frame(sample.assign(n_bars=trading.FEATURE_HISTORY), bars)
    mismatches = 0
    for i, row in sample.iterrows():
        answer = served.signal({p: row[p] for p in CORE_PATTERNS}, features.iloc[i].to_numpy(), row["timeframe"])
        expected = served.gate.decide(row[list(CORE_PATTERNS)].to_numpy(float)[None, :],
                                      served.direction.probability_up(features.iloc[[i]], row["timeframe"]))
        mismatches += int(answer["direction"] != trading.DIRECTION_NAMES[int(expected.direction[0])]
                          or not np.isclose(answer["confidence"], expected.confidence[0]) or not answer["reasons"])
    return AssetCheckResult(passed=same_model and mismatches == 0 and len(sample) > 0, severity=ERROR, metadata={
        "same_direction_model": same_model, "windows_answered": len(sample), "mismatches": mismatches})


@asset_check(asset=gated_signals, description=f"the gate takes >= {MIN_GATED_TEST_TRADES} trades on the test period")
def gated_signals_not_thin(store: ArtifactStoreResource) -> AssetCheckResult:
    from vlm_assets.pipeline.checks import _kpi_result  # here: checks imports the serving assets, which may need ours

    summary = json.loads(_read(store, "gated_signals", "report.json"))["summary"]
    return _kpi_result({"gated_test_trades": summary["gated_trades"]},
                       {"gated_test_trades": (">=", MIN_GATED_TEST_TRADES)})


TRADING_CHECKS = [walk_forward_is_purged, direction_model_loads, direction_model_beats_chance,
                  gates_chosen_on_validation_only, gate_api_serves, gated_signals_not_thin]
