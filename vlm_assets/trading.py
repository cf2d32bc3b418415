"""Trading integration: a direction model, pattern polarity and a confidence gate, evaluated without look-ahead.

* **Trade and label.** A signal at bar t is known at the close of bar t. Its trade enters at the open of bar t+1
  and exits at the close of bar t+h (h per timeframe); its return is the log return in basis points, and the
  direction label is its sign. Features are `window_features` of the bars up to t.
* **Periods.** The dataset's time blocks: every (symbol, block) group belongs to train, val or test. Nothing is
  fitted on a row that reads a test-block bar, neither through its features (bars t-21..t) nor its label
  (bars t+1..t+h).
* **Direction model.** LightGBM per timeframe, walk-forward in calendar time: the rows starting in a fold's time
  segment are predicted by a model trained on rows whose labels closed before the segment starts (the purge),
  then Platt-scaled on validation-period predictions. `check_no_lookahead` re-derives labels and features from the
  bars and refuses a table that does not match them.
* **Gate.** A signal fires when a directional pattern's fused probability clears its gate (the lowest probability
  with the target precision on validation) and the direction model gives the pattern's direction at least
  `min_confidence`.
* **Evaluation.** Raw patterns, the direction model alone and the gate on the same bars; one open trade per series
  at a time; costs in basis points per round trip.

No Dagster or BentoML here: a trading system loads `gate.json` + `direction_model.json` with `load_signal_gate` and
calls `SignalGate.signal` with its own pattern probabilities and features.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vlm_assets import calibration as cal
from vlm_assets.features import (
    AVG_PERIOD, FEATURE_NAMES, TREND_LOOKBACKS, VOLUME_PERIOD, BoostingConfig, FeatureModel, feature_frame,
    train_feature_model, window_features,
)
from vlm_assets.fusion import logit
from vlm_assets.labeling import CORE_PATTERNS, POLARITY
from vlm_assets.market.timeframes import TIMEFRAMES, bar_end

DIRECTION_MODEL_FORMAT = "candle-vlm/direction-model-1"
GATE_FORMAT = "candle-vlm/gate-1"
GATE_FILES = ("gate.json", "direction_model.json")  # what a bundle carries for the signal
DEFAULT_HORIZONS = {"1m": 30, "5m": 12, "15m": 8, "1h": 7, "1d": 5}
# The bars `window_features` reads: more history does not change a feature.
FEATURE_HISTORY = max(AVG_PERIOD + 1, max(TREND_LOOKBACKS) + 2, VOLUME_PERIOD + 1)
POLARITY_SIGN = {"bullish": 1, "bearish": -1, "neutral": 0}
DIRECTION_NAMES = {1: "long", -1: "short", 0: "flat"}
DIRECTIONAL_PATTERNS: tuple[str, ...] = tuple(p for p in CORE_PATTERNS if POLARITY[p] != "neutral")
DIRECTION_BOOSTING = BoostingConfig(n_estimators=200, learning_rate=0.03, num_leaves=15, min_child_samples=100, seed=7)
ROW_COLUMNS = ("time", "horizon", "label_end", "split", "fit_ok", "forward_return", "up")


def polarity(pattern: str) -> int:
    """+1 bullish, -1 bearish, 0 neutral (docs/pattern_taxonomy.md)."""
    if pattern not in CORE_PATTERNS:
        raise ValueError(f"pattern {pattern!r} is not a core pattern; expected one of {list(CORE_PATTERNS)}")
    return POLARITY_SIGN[POLARITY[pattern]]


def check_horizons(horizons: Mapping[str, int]) -> dict[str, int]:
    if not horizons:
        raise ValueError("horizons: give at least one timeframe's forward horizon in bars")
    for timeframe, h in horizons.items():
        if timeframe not in TIMEFRAMES:
            raise ValueError(f"horizons: unknown timeframe {timeframe!r}; expected some of {list(TIMEFRAMES)}")
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
            raise ValueError(f"horizons: {timeframe} horizon must be a whole number of bars >= 1, got {h!r}")
    return {tf: int(horizons[tf]) for tf in TIMEFRAMES if tf in horizons}


# ---- labels, periods, rows ---------------------------------------------------------------------------------

def forward_returns(bars: pd.DataFrame, horizon: int) -> np.ndarray:
    """Per bar t: the log return in basis points of entering at the open of bar t+1 and exiting at the close of
    bar t+h; NaN where bar t+h does not exist."""
    opens, closes = bars["open"].to_numpy(np.float64), bars["close"].to_numpy(np.float64)
    bad = ~((opens > 0) & (closes > 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"bars: row {row}: open={opens[row]} close={closes[row]}: returns need positive prices")
    out = np.full(len(closes), np.nan)
    if len(closes) > horizon:
        out[:len(closes) - horizon] = 1e4 * np.log(closes[horizon:] / opens[1:len(closes) - horizon + 1])
    return out


def _label_ends(index: pd.DatetimeIndex, timeframe: str, pos: np.ndarray, horizon: int) -> np.ndarray:
    """The close of bar t+h per bar position t (NaT where that bar does not exist)."""
    ends = bar_end(pd.DatetimeIndex(index).as_unit("ns"), timeframe).to_numpy()
    return np.where(pos + horizon < len(ends), ends[np.minimum(pos + horizon, len(ends) - 1)], np.datetime64("NaT"))


@dataclass(frozen=True)
class BlockPeriods:
    """The dataset split of each bar's time block: `calendar_blocks` of the symbol's calendar, and the split the
    dataset gave the (symbol, block) group ("none" for a block without windows)."""

    block_days: int
    origins: dict[str, pd.Timestamp]
    groups: dict[tuple[str, int], str]

    @classmethod
    def from_windows(cls, windows: pd.DataFrame, bars: dict[tuple[str, str], pd.DataFrame],
                     block_days: int) -> BlockPeriods:
        from vlm_assets.dataset import symbol_origins

        splits = windows.groupby(["symbol", "block"])["split"].unique()
        mixed = splits[splits.map(len) > 1]
        if len(mixed):
            raise ValueError(f"windows: group {mixed.index[0]} is in several splits {list(mixed.iloc[0])}")
        return cls(int(block_days), symbol_origins(bars), {(s, int(b)): str(v[0]) for (s, b), v in splits.items()})

    def of(self, symbol: str, index: pd.DatetimeIndex) -> np.ndarray:
        from vlm_assets.dataset import calendar_blocks

        blocks = calendar_blocks(pd.DatetimeIndex(index), self.origins[symbol], self.block_days)
        unique, inverse = np.unique(blocks, return_inverse=True)
        return np.array([self.groups.get((symbol, int(b)), "none") for b in unique], dtype=object)[inverse]


def sample_points(bars: dict[tuple[str, str], pd.DataFrame], horizons: Mapping[str, int]) -> pd.DataFrame:
    """Training points of every series with a horizon: every h-th bar with a full feature history and a label, so
    the labels of one series never overlap."""
    horizons = check_horizons(horizons)
    parts = [pd.DataFrame({"symbol": symbol, "timeframe": tf,
                           "pos": np.arange(FEATURE_HISTORY - 1, len(series) - horizons[tf], horizons[tf])})
             for (symbol, tf), series in sorted(bars.items()) if tf in horizons]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["symbol", "timeframe", "pos"])


def label_rows(points: pd.DataFrame, bars: dict[tuple[str, str], pd.DataFrame], horizons: Mapping[str, int],
               periods: BlockPeriods) -> pd.DataFrame:
    """`points` (symbol, timeframe, pos; other columns are kept) with, per row: `time` (bar start), `horizon`,
    `label_end` (close of bar t+h, NaT without one), `split` (of bar t's block), `fit_ok` (no bar in t-21..t+h is
    in a test block), `forward_return` (bps), `up` and the features of the bars up to t."""
    horizons = check_horizons(horizons)
    missing = [c for c in ("symbol", "timeframe", "pos") if c not in points.columns]
    if missing:
        raise ValueError(f"points is missing column(s) {missing}")
    points = points.reset_index(drop=True)
    out = {"time": np.empty(len(points), "datetime64[ns]"), "horizon": np.zeros(len(points), np.int64),
           "label_end": np.empty(len(points), "datetime64[ns]"), "split": np.empty(len(points), dtype=object),
           "fit_ok": np.zeros(len(points), bool), "forward_return": np.full(len(points), np.nan)}
    for (symbol, tf), group in points.groupby(["symbol", "timeframe"], sort=True):
        row = int(group.index[0])
        if tf not in horizons:
            raise ValueError(f"points row {row}: no horizon for timeframe {tf!r} (have {list(horizons)})")
        if (symbol, tf) not in bars:
            raise ValueError(f"points row {row}: no bars for {symbol} {tf}")
        series, h = bars[(symbol, tf)], horizons[tf]
        pos = group["pos"].to_numpy(np.int64)
        outside = (pos < 0) | (pos >= len(series))
        if outside.any():
            raise ValueError(f"points row {int(group.index[outside][0])}: bar {pos[outside][0]} is outside "
                             f"{symbol} {tf}'s {len(series)} bars")
        index = pd.DatetimeIndex(series.index)
        split = periods.of(symbol, index)
        tests = np.r_[0, np.cumsum(split == "test")]
        lo, hi = np.maximum(pos - FEATURE_HISTORY + 1, 0), np.minimum(pos + h, len(series) - 1)
        rows = group.index.to_numpy()
        out["time"][rows] = index.as_unit("ns").to_numpy()[pos]
        out["label_end"][rows] = _label_ends(index, tf, pos, h)
        out["horizon"][rows] = h
        out["split"][rows] = split[pos]
        out["fit_ok"][rows] = tests[hi + 1] == tests[lo]
        out["forward_return"][rows] = forward_returns(series, h)[pos]
    frame = points.assign(**out)
    frame["up"] = frame["forward_return"] > 0
    features = feature_frame(frame.assign(n_bars=np.minimum(frame["pos"] + 1, FEATURE_HISTORY)), bars)
    return pd.concat([frame, features], axis=1)


def check_no_lookahead(rows: pd.DataFrame, bars: dict[tuple[str, str], pd.DataFrame], feature_sample: int = 512,
                       seed: int = 0) -> None:
    """The leakage guard. Every row's time, label end, forward return and label are re-derived from the bars, and
    the features of a seeded sample of rows from the bars up to their bar t only; the first row that differs
    raises a ValueError (a label shifted by a bar, or a feature that saw a later bar)."""
    for (symbol, tf), group in rows.groupby(["symbol", "timeframe"], sort=True):
        series = bars.get((symbol, tf))
        if series is None:
            raise ValueError(f"look-ahead guard: row {group.index[0]}: no bars for {symbol} {tf}")
        horizons = group["horizon"].unique()
        if len(horizons) != 1:
            raise ValueError(f"look-ahead guard: {symbol} {tf} rows mix horizons {sorted(horizons)}")
        h, pos = int(horizons[0]), group["pos"].to_numpy(np.int64)
        index = pd.DatetimeIndex(series.index).as_unit("ns")
        expected = forward_returns(series, h)[pos]
        expected_end = _label_ends(index, tf, pos, h)
        given = group["forward_return"].to_numpy(np.float64)
        bad = ~np.isclose(given, expected, rtol=0, atol=1e-6, equal_nan=True)
        bad |= group["up"].to_numpy(bool) != (expected > 0)
        bad |= group["time"].to_numpy("datetime64[ns]") != index.to_numpy()[pos]
        given_end = group["label_end"].to_numpy("datetime64[ns]")
        bad |= ~((given_end == expected_end) | (np.isnat(expected_end) & np.isnat(given_end)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"look-ahead guard: row {group.index[i]} ({symbol} {tf} bar {pos[i]}): its label "
                f"{given[i]:.4f} bps (up={bool(group['up'].iloc[i])}) is not the return from the open of bar "
                f"{pos[i] + 1} to the close of bar {pos[i] + h} ({expected[i]:.4f} bps), or its times differ: "
                "labels are misaligned with the bars")
    if feature_sample <= 0 or rows.empty:
        return
    sample = rows.sample(n=min(feature_sample, len(rows)), random_state=seed).sort_index()
    derived = feature_frame(sample.assign(n_bars=np.minimum(sample["pos"] + 1, FEATURE_HISTORY)), bars)
    given = sample[list(FEATURE_NAMES)].to_numpy(np.float64)
    bad = ~np.isclose(given, derived.to_numpy(np.float64), rtol=1e-9, atol=1e-9, equal_nan=True)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"look-ahead guard: row {sample.index[i]} ({sample['symbol'].iloc[i]} "
                         f"{sample['timeframe'].iloc[i]} bar {sample['pos'].iloc[i]}): feature {FEATURE_NAMES[j]} is "
                         f"{given[i, j]}, but {derived.iat[i, j]} from the bars up to that bar: it saw another bar")


# ---- the direction model -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WalkForwardConfig:
    folds: int = 10
    min_train_rows: int = 200  # per timeframe: a fold with fewer does not predict that timeframe

    def __post_init__(self):
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2 (the first fold only trains), got {self.folds}")
        if self.min_train_rows < 1:
            raise ValueError(f"min_train_rows must be >= 1, got {self.min_train_rows}")


def _train_timeframes(rows: pd.DataFrame, mask: np.ndarray, min_rows: int,
                      boosting: BoostingConfig) -> dict[str, FeatureModel]:
    """A binary booster per timeframe with at least `min_rows` rows under `mask` (a one-class FeatureModel each,
    its class named by the timeframe)."""
    models = {}
    for tf in TIMEFRAMES:
        part = rows[mask & (rows["timeframe"] == tf).to_numpy()]
        if len(part) >= min_rows:
            models[tf] = train_feature_model(part[list(FEATURE_NAMES)], pd.DataFrame({tf: part["up"].to_numpy(bool)}),
                                             boosting)
    return models


@dataclass
class DirectionModel:
    """P(the forward return over the next h bars is positive), per timeframe: the boosters and the Platt scaling
    (on the logit of the booster's probability) fitted on validation-period walk-forward predictions."""

    horizons: dict[str, int]
    models: dict[str, FeatureModel]  # timeframe -> its booster (class named by the timeframe)
    platt: dict[str, tuple[float, float]]

    @property
    def timeframes(self) -> tuple[str, ...]:
        return tuple(self.models)

    def raw(self, features, timeframe: str) -> np.ndarray:
        """The booster's P(up); `features` as FeatureModel.predict takes them (FEATURE_NAMES frame or (n, 36))."""
        if timeframe not in self.models:
            raise ValueError(f"timeframe {timeframe!r}: the direction model has {list(self.models)}")
        return self.models[timeframe].predict(features)[:, 0]

    def calibrate(self, raw, timeframes) -> np.ndarray:
        """Platt-scaled P(up) from the boosters' probabilities; `timeframes` is one timeframe or one per value (a
        timeframe without a scaling keeps its raw probability; NaN stays NaN)."""
        raw = np.asarray(raw, dtype=np.float64)
        timeframes = np.broadcast_to(np.asarray(timeframes, dtype=object), raw.shape)
        slope, intercept = np.array([self.platt.get(tf, (1.0, 0.0)) for tf in timeframes]).reshape(-1, 2).T
        return np.where(np.isnan(raw), np.nan, 1.0 / (1.0 + np.exp(-(slope * logit(raw) + intercept))))

    def probability_up(self, features, timeframe: str) -> np.ndarray:
        return self.calibrate(self.raw(features, timeframe), timeframe)

    def combined(self) -> FeatureModel:
        """Every timeframe's booster in one FeatureModel (classes = timeframes): its file format and importances."""
        return FeatureModel(self.timeframes, {tf: m.boosters[tf] for tf, m in self.models.items()})

    def to_json(self) -> str:
        return json.dumps({"format": DIRECTION_MODEL_FORMAT, "horizons": self.horizons,
                           "entry": "open of bar t+1", "exit": "close of bar t+h",
                           "platt": {tf: {"slope": s, "intercept": i} for tf, (s, i) in self.platt.items()},
                           "boosters": json.loads(self.combined().to_json())}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DirectionModel:
        data = json.loads(text)
        if data.get("format") != DIRECTION_MODEL_FORMAT:
            raise ValueError(f"not a direction model: format {data.get('format')!r}, "
                             f"expected {DIRECTION_MODEL_FORMAT!r}")
        platt = {tf: (float(p["slope"]), float(p["intercept"])) for tf, p in data["platt"].items()}
        combined = FeatureModel.from_json(json.dumps(data["boosters"]))
        models = {tf: FeatureModel((tf,), {tf: combined.boosters[tf]}) for tf in combined.classes}
        return cls(check_horizons(data["horizons"]), models, platt)


@dataclass
class WalkForward:
    """Fold k predicts the rows whose bar starts in [boundaries[k], boundaries[k+1]) (the last fold includes its
    end) with `models[k]`, trained on the rows whose labels closed at or before boundaries[k] and that read no
    test-block bar. Fold 0 has nothing before it and predicts nothing."""

    boundaries: np.ndarray  # datetime64[ns], folds + 1
    models: list[dict[str, FeatureModel]]  # per fold: timeframe -> booster
    folds: pd.DataFrame  # per fold: its segment, training rows per timeframe, where its training labels ended

    def fold_of(self, times) -> np.ndarray:
        times = np.asarray(times, dtype="datetime64[ns]")
        return np.clip(np.searchsorted(self.boundaries, times, side="right") - 1, 0, len(self.models) - 1)

    def predict(self, features, times, timeframes) -> np.ndarray:
        """Out-of-sample P(up) from the booster of each row's fold and timeframe (NaN where that fold has none);
        `features` is a frame with FEATURE_NAMES columns or an (n, 36) array."""
        timeframes = np.asarray(timeframes, dtype=object)
        fold = self.fold_of(times)
        out = np.full(len(features), np.nan)
        for k, models in enumerate(self.models):
            for tf, model in models.items():
                rows = (fold == k) & (timeframes == tf)
                if rows.any():
                    out[rows] = model.predict(features[rows])[:, 0]
        return out


def walk_forward(rows: pd.DataFrame, bars: dict[tuple[str, str], pd.DataFrame],
                 config: WalkForwardConfig = WalkForwardConfig(), boosting: BoostingConfig = DIRECTION_BOOSTING,
                 guard_sample: int = 512) -> tuple[WalkForward, np.ndarray]:
    """Expanding-window walk-forward over calendar time, after the look-ahead guard. Returns the folds and each
    row's out-of-sample P(up) (NaN where its fold has no model for its timeframe)."""
    check_no_lookahead(rows, bars, guard_sample, seed=boosting.seed)
    times = rows["time"].to_numpy("datetime64[ns]")
    first, last = times.min().astype(np.int64), times.max().astype(np.int64)
    boundaries = np.linspace(first, last + 1, config.folds + 1).astype(np.int64).astype("datetime64[ns]")
    label_end = rows["label_end"].to_numpy("datetime64[ns]")
    eligible = rows["fit_ok"].to_numpy(bool) & np.isfinite(rows["forward_return"].to_numpy(np.float64))
    models, records = [], []
    for k in range(config.folds):
        train = eligible & ~np.isnat(label_end) & (label_end <= boundaries[k])  # the purge
        models.append(_train_timeframes(rows, train, config.min_train_rows, boosting))
        counts = rows.loc[train, "timeframe"].value_counts()
        records.append({"fold": k, "start": boundaries[k], "end": boundaries[k + 1], "train_rows": int(train.sum()),
                        **{f"train_{tf}": int(counts.get(tf, 0)) for tf in TIMEFRAMES},
                        "timeframes_predicted": ",".join(models[-1]),
                        "last_train_label_end": label_end[train].max() if train.any() else pd.NaT,
                        "train_rows_in_test_blocks": int((train & (rows["split"] == "test").to_numpy()).sum())})
    result = WalkForward(boundaries, models, pd.DataFrame(records))
    predicted = result.predict(rows, times, rows["timeframe"].to_numpy(object))
    fold = result.fold_of(times)
    result.folds["predicted_rows"] = [int(np.isfinite(predicted[fold == k]).sum()) for k in range(config.folds)]
    return result, predicted


def fit_direction_model(rows: pd.DataFrame, bars: dict[tuple[str, str], pd.DataFrame], horizons: Mapping[str, int],
                        config: WalkForwardConfig = WalkForwardConfig(), boosting: BoostingConfig = DIRECTION_BOOSTING,
                        guard_sample: int = 512) -> tuple[DirectionModel, WalkForward, np.ndarray]:
    """The walk-forward predictions, a Platt scaling per timeframe fitted on the validation-period ones, and the
    served model: boosters trained on every row that reads no test-block bar, with that scaling.
    Returns (served model, walk-forward, each row's raw out-of-sample P(up); `served.calibrate` scales it)."""
    horizons = check_horizons(horizons)
    result, raw = walk_forward(rows, bars, config, boosting, guard_sample)
    val = (rows["split"] == "val").to_numpy() & rows["fit_ok"].to_numpy(bool) & np.isfinite(raw)
    platt = {}
    for tf in TIMEFRAMES:
        part = val & (rows["timeframe"] == tf).to_numpy()
        if part.any():
            platt[tf] = cal.fit_platt(logit(raw[part]), rows.loc[part, "up"].to_numpy(bool))
    eligible = rows["fit_ok"].to_numpy(bool) & np.isfinite(rows["forward_return"].to_numpy(np.float64))
    served = DirectionModel(horizons, _train_timeframes(rows, eligible, config.min_train_rows, boosting), platt)
    return served, result, raw


def direction_metrics(up, probability) -> dict:
    """AUC, accuracy at 0.5, Brier, ECE and log loss of P(up) against the outcomes (rows with a probability)."""
    from sklearn.metrics import roc_auc_score

    p, y = np.asarray(probability, dtype=np.float64), np.asarray(up, dtype=bool)
    keep = np.isfinite(p)
    p, y = p[keep], y[keep]
    if not len(p):
        return {"rows": 0, "up_share": math.nan, "auc": math.nan, "accuracy": math.nan, "brier": math.nan,
                "ece": math.nan, "log_loss": math.nan}
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    return {"rows": int(len(p)), "up_share": float(y.mean()),
            "auc": float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else math.nan,
            "accuracy": float(((p >= 0.5) == y).mean()), "brier": cal.brier_score(p, y),
            "ece": cal.expected_calibration_error(p, y),
            "log_loss": float(-np.mean(np.where(y, np.log(clipped), np.log(1 - clipped))))}


# ---- the gate ----------------------------------------------------------------------------------------------

def _signed(long: np.ndarray, short: np.ndarray) -> np.ndarray:
    """+1 / -1 where only one side fires, 0 where none or both (a conflict is no trade)."""
    return np.where(long & ~short, 1, np.where(short & ~long, -1, 0))


def pattern_direction(detected: np.ndarray) -> np.ndarray:
    """The raw pattern signal: the polarity of the detected directional patterns (columns CORE_PATTERNS)."""
    detected = np.asarray(detected, dtype=bool)
    signs = np.array([polarity(p) for p in CORE_PATTERNS])
    return _signed((detected & (signs > 0)).any(axis=1), (detected & (signs < 0)).any(axis=1))


def model_direction(p_up: np.ndarray, min_confidence: float) -> np.ndarray:
    """The direction model alone: its direction wherever it is at least `min_confidence` sure."""
    p_up = np.asarray(p_up, dtype=np.float64)
    return _signed(p_up >= min_confidence, 1 - p_up >= min_confidence)


@dataclass(frozen=True)
class Decisions:
    direction: np.ndarray  # +1 long, -1 short, 0 flat
    confidence: np.ndarray  # the direction model's probability of `direction` (0 when flat)
    probability_pass: np.ndarray  # (n, DIRECTIONAL_PATTERNS): the fused probability clears the pattern's gate
    direction_pass: np.ndarray  # (n, DIRECTIONAL_PATTERNS): the direction model agrees with at least min_confidence

    @property
    def gated(self) -> np.ndarray:
        return self.direction != 0

    def passed(self) -> list[str]:
        """Per row, the patterns that passed both gates (comma-separated)."""
        both = self.probability_pass & self.direction_pass
        return [",".join(p for p, ok in zip(DIRECTIONAL_PATTERNS, row) if ok) for row in both]


@dataclass(frozen=True)
class Gate:
    """Per directional core pattern, the fused-probability gate (inf: closed), and the direction model's minimum
    confidence in the pattern's direction."""

    thresholds: dict[str, float]
    min_confidence: float

    def __post_init__(self):
        if set(self.thresholds) != set(DIRECTIONAL_PATTERNS):
            raise ValueError(f"gate thresholds must name exactly {list(DIRECTIONAL_PATTERNS)}, "
                             f"got {sorted(self.thresholds)}")
        for pattern, threshold in self.thresholds.items():
            if math.isnan(threshold):
                raise ValueError(f"gate threshold of {pattern} is NaN")
        if not 0.5 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence must be within [0.5, 1], got {self.min_confidence}")

    def decide(self, probabilities: np.ndarray, p_up: np.ndarray) -> Decisions:
        """`probabilities` (n, CORE_PATTERNS) fused and calibrated; `p_up` (n,) the calibrated direction model (NaN:
        none, so nothing passes its direction gate)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        p_up = np.asarray(p_up, dtype=np.float64)
        if probabilities.ndim != 2 or probabilities.shape[1] != len(CORE_PATTERNS) or len(p_up) != len(probabilities):
            raise ValueError(f"probabilities must be (n, {len(CORE_PATTERNS)}) in CORE_PATTERNS order and p_up (n,), "
                             f"got {probabilities.shape} and {p_up.shape}")
        columns = [CORE_PATTERNS.index(p) for p in DIRECTIONAL_PATTERNS]
        signs = np.array([polarity(p) for p in DIRECTIONAL_PATTERNS])
        probability_pass = probabilities[:, columns] >= np.array([self.thresholds[p] for p in DIRECTIONAL_PATTERNS])
        agreement = np.where(signs > 0, p_up[:, None], 1 - p_up[:, None])
        direction_pass = agreement >= self.min_confidence
        both = probability_pass & direction_pass
        direction = _signed((both & (signs > 0)).any(axis=1), (both & (signs < 0)).any(axis=1))
        confidence = np.where(direction > 0, p_up, np.where(direction < 0, 1 - p_up, 0.0))
        return Decisions(direction, confidence, probability_pass, direction_pass)

    def to_dict(self) -> dict:
        return {"format": GATE_FORMAT, "min_confidence": self.min_confidence,
                "thresholds": {p: (t if math.isfinite(t) else "inf") for p, t in self.thresholds.items()},
                "polarity": {p: POLARITY[p] for p in DIRECTIONAL_PATTERNS}}

    @classmethod
    def from_dict(cls, data: Mapping) -> Gate:
        if data.get("format") != GATE_FORMAT:
            raise ValueError(f"not a gate: format {data.get('format')!r}, expected {GATE_FORMAT!r}")
        stored = data.get("polarity", {})
        changed = [p for p in DIRECTIONAL_PATTERNS if stored.get(p) != POLARITY[p]]
        if changed:
            raise ValueError(f"the gate was fitted with another polarity for {changed}: refit it")
        return cls({p: float(t) for p, t in data["thresholds"].items()}, float(data["min_confidence"]))


@dataclass(frozen=True)
class GateConfig:
    min_confidence: float = 0.55  # the direction model's least probability of the pattern's direction
    min_precision: float = 0.9  # a pattern's gate: the lowest probability with this validation precision ...
    min_probability: float = 0.5  # ... and at least this (near-separable validation data would allow ~0)
    cost_bps: float = 2.0  # per trade, round trip

    def __post_init__(self):
        if not 0.5 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence must be within [0.5, 1], got {self.min_confidence}")
        if not 0 < self.min_precision <= 1:
            raise ValueError(f"min_precision must be within (0, 1], got {self.min_precision}")
        if not 0 <= self.min_probability <= 1:
            raise ValueError(f"min_probability must be within [0, 1], got {self.min_probability}")
        if self.cost_bps < 0:
            raise ValueError(f"cost_bps must be >= 0, got {self.cost_bps}")


EVALUATION_COLUMNS = ("symbol", "timeframe", "pos", "time", "horizon", "forward_return", "p_up", *CORE_PATTERNS)


def _check_frame(frame: pd.DataFrame, name: str) -> None:
    missing = [c for c in EVALUATION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}")
    for column in ("forward_return", "p_up"):
        bad = ~np.isfinite(frame[column].to_numpy(np.float64))
        if bad.any():
            raise ValueError(f"{name} row {frame.index[bad][0]}: {column} is not finite (drop rows without a label "
                             "or a direction-model prediction first)")


def fit_gate(probabilities: np.ndarray, truth: np.ndarray, splits,
             config: GateConfig = GateConfig()) -> tuple[Gate, pd.DataFrame]:
    """Gates chosen on validation only, from pattern truth, not from returns: a directional pattern's gate is the
    lowest fused probability of at least `min_probability` whose validation precision reaches `min_precision`
    (`min_probability` itself when every validation window above it is precise enough; closed when no cut is).
    `probabilities` and `truth` are (n, CORE_PATTERNS) of validation windows, `splits` their split names.
    Returns the gate and a table per pattern (gate, validation support, precision and recall at the gate)."""
    probabilities, truth = np.asarray(probabilities, dtype=np.float64), np.asarray(truth, dtype=bool)
    splits = np.asarray(splits, dtype=object)
    if probabilities.shape != truth.shape or probabilities.ndim != 2 or probabilities.shape[1] != len(CORE_PATTERNS) \
            or len(splits) != len(probabilities):
        raise ValueError(f"probabilities {probabilities.shape} and truth {truth.shape} must be "
                         f"(n, {len(CORE_PATTERNS)}) "
                         f"with a split per row ({len(splits)} given)")
    not_val = sorted(set(splits) - {"val"})
    if not_val:
        raise ValueError(f"gates are chosen on validation only: got rows of split(s) {not_val}")
    if not np.isfinite(probabilities).all():
        row = int(np.argwhere(~np.isfinite(probabilities))[0][0])
        raise ValueError(f"validation row {row}: a probability is not finite")
    thresholds, rows = {}, []
    for pattern in DIRECTIONAL_PATTERNS:
        j = CORE_PATTERNS.index(pattern)
        eligible = probabilities[:, j] >= config.min_probability  # cuts below the floor are not candidates
        threshold = cal.precision_threshold(probabilities[eligible, j], truth[eligible, j], config.min_precision)
        if eligible.any() and threshold == probabilities[eligible, j].min():
            threshold = config.min_probability  # the floor passes the same validation windows: no data-made cut
        passed = probabilities[:, j] >= threshold
        thresholds[pattern] = threshold
        rows.append({"pattern": pattern, "polarity": POLARITY[pattern], "gate": threshold,
                     "status": "open" if math.isfinite(threshold) else
                     f"closed: never reaches precision {config.min_precision:g} on validation at a probability "
                     f">= {config.min_probability:g}",
                     "val_support": int(truth[:, j].sum()), "val_passing": int(passed.sum()),
                     "val_precision": float(truth[passed, j].mean()) if passed.any() else math.nan,
                     "val_recall": cal.recall_at(probabilities[:, j], truth[:, j], threshold)})
    return Gate(thresholds, config.min_confidence), pd.DataFrame(rows)


# ---- evaluation --------------------------------------------------------------------------------------------

def take_trades(frame: pd.DataFrame, direction: np.ndarray, cost_bps: float) -> pd.DataFrame:
    """The trades of the signals `direction` (+1/-1; 0 no signal) on `frame`'s rows (symbol, timeframe, pos,
    time, horizon, forward_return). One position per series at a time: a signal while the series' previous trade
    is open (it entered at the open of bar t+1 and exits at the close of bar t+h) is not taken. Net return = the
    direction times the forward return minus `cost_bps`."""
    direction = np.asarray(direction)
    if len(direction) != len(frame):
        raise ValueError(f"{len(direction)} directions for {len(frame)} rows")
    fired = frame.loc[direction != 0].assign(direction=direction[direction != 0])
    keep = []
    for _, group in fired.sort_values(["symbol", "timeframe", "pos"]).groupby(["symbol", "timeframe"], sort=True):
        free_from = -1
        for index, pos, h in zip(group.index, group["pos"], group["horizon"]):
            if pos >= free_from:
                keep.append(index)
                free_from = pos + h
    trades = fired.loc[keep]
    gross = trades["direction"].to_numpy() * trades["forward_return"].to_numpy(np.float64)
    return trades.assign(gross_bps=gross, net_bps=gross - cost_bps).sort_values(["time", "symbol", "timeframe"],
                                                                             kind="stable")


def performance(trades: pd.DataFrame, signals: int) -> dict:
    """Signals fired, trades taken, hit rate (net return > 0), mean gross and net return per trade (bps), the
    Sharpe-like ratio mean/std of net returns per trade, its t-statistic (× √trades) and the total."""
    net = trades["net_bps"].to_numpy(np.float64)
    n = len(net)
    std = float(net.std(ddof=1)) if n > 1 else math.nan
    mean = float(net.mean()) if n else math.nan
    sharpe = mean / std if n > 1 and std > 0 else math.nan
    return {"signals": int(signals), "trades": n,
            "hit_rate": float((net > 0).mean()) if n else math.nan,
            "mean_gross_bps": float(trades["gross_bps"].mean()) if n else math.nan, "mean_net_bps": mean,
            "std_net_bps": std, "sharpe_per_trade": sharpe, "t_stat": sharpe * math.sqrt(n) if n > 1 else math.nan,
            "total_net_bps": float(net.sum())}


STRATEGIES = ("raw patterns", "direction model", "gated", "always long (reference)")


def strategy_directions(frame: pd.DataFrame, gate: Gate, detected: np.ndarray) -> dict[str, np.ndarray]:
    """Per strategy, the signal of each row: the detected patterns' polarity (the fuser's thresholds), the direction
    model alone at the gate's min_confidence, the gate, and always long (what the market alone gave)."""
    p_up = frame["p_up"].to_numpy(np.float64)
    return {"raw patterns": pattern_direction(detected),
            "direction model": model_direction(p_up, gate.min_confidence),
            "gated": gate.decide(frame[list(CORE_PATTERNS)].to_numpy(np.float64), p_up).direction,
            "always long (reference)": np.ones(len(frame), dtype=int)}


def compare(frame: pd.DataFrame, gate: Gate, detected: np.ndarray, cost_bps: float) -> tuple[pd.DataFrame, dict]:
    """Side by side on the same rows: a table per strategy and the trades of each."""
    _check_frame(frame, "evaluation rows")
    directions = strategy_directions(frame, gate, detected)
    trades = {name: take_trades(frame, d, cost_bps) for name, d in directions.items()}
    table = pd.DataFrame([{"strategy": name, **performance(trades[name], int((d != 0).sum()))}
                          for name, d in directions.items()])
    return table, trades


def equity_figure(trades: Mapping[str, pd.DataFrame], title: str):
    """Cumulative net return (bps, equal notional per trade) of each strategy's trades in entry order."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for name, part in trades.items():
        if len(part):
            figure.add_trace(go.Scatter(x=part["time"], y=part["net_bps"].cumsum(), mode="lines",
                                        name=f"{name} ({len(part)} trades)"))
    figure.update_layout(title=title, xaxis_title="signal bar", yaxis_title="cumulative net return (bps)",
                         template="plotly_white")
    return figure


# ---- the public API ----------------------------------------------------------------------------------------

def _feature_vector(features) -> np.ndarray:
    if isinstance(features, Mapping):
        missing = [n for n in FEATURE_NAMES if n not in features]
        if missing:
            raise ValueError(f"features: missing {missing}")
        features = [features[n] for n in FEATURE_NAMES]
    try:
        x = np.asarray(features, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise ValueError(f"features: not numbers ({error})") from None
    if x.size != len(FEATURE_NAMES):
        raise ValueError(f"features: expected {len(FEATURE_NAMES)} values in FEATURE_NAMES order (window_features), "
                         f"got {x.size}")
    infinite = np.isinf(x)
    if infinite.any():
        raise ValueError(f"features: {FEATURE_NAMES[int(np.flatnonzero(infinite)[0])]} is infinite (NaN means missing)")
    return x


def _pattern_vector(pattern_probabilities: Mapping[str, float]) -> np.ndarray:
    if not isinstance(pattern_probabilities, Mapping):
        raise ValueError("pattern_probabilities: a mapping of core pattern -> fused, calibrated probability")
    unknown = [p for p in pattern_probabilities if p not in CORE_PATTERNS]
    if unknown:
        raise ValueError(f"pattern_probabilities: unknown pattern(s) {unknown}; "
                         f"expected core patterns {list(CORE_PATTERNS)}")
    vector = np.full(len(CORE_PATTERNS), np.nan)
    for pattern, value in pattern_probabilities.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"pattern_probabilities: {pattern} is {value!r}, not a number") from None
        if not 0 <= value <= 1:
            raise ValueError(f"pattern_probabilities: {pattern} is {value}, not a probability in [0, 1]")
        vector[CORE_PATTERNS.index(pattern)] = value
    return vector


@dataclass
class SignalGate:
    """The gate and the direction model it was fitted with: what the service and a trading system call."""

    gate: Gate
    direction: DirectionModel
    fitted_for: dict = field(default_factory=dict)  # versions of the models whose probabilities the gate was fitted on

    def signal(self, pattern_probabilities: Mapping[str, float], features, timeframe: str) -> dict:
        """One bar's signal. `pattern_probabilities`: core pattern -> fused, calibrated probability (a pattern left
        out cannot fire); `features`: `window_features` of the bars up to this bar (36 values, or a mapping by
        FEATURE_NAMES; NaN = missing); `timeframe` of the bars. Returns direction ("long"/"short"/"flat"),
        confidence (the direction model's probability of that direction, 0 when flat), gated, reasons, p_up,
        horizon_bars and, per directional pattern, which gates passed."""
        probabilities = _pattern_vector(pattern_probabilities)
        x = _feature_vector(features)
        if timeframe not in TIMEFRAMES:
            raise ValueError(f"timeframe {timeframe!r} is unknown; expected one of {list(TIMEFRAMES)}")
        known = timeframe in self.direction.timeframes
        p_up = float(self.direction.probability_up(x[None, :], timeframe)[0]) if known else math.nan
        decided = self.gate.decide(np.nan_to_num(probabilities, nan=-1.0)[None, :], np.array([p_up]))
        direction = int(decided.direction[0])
        gates, reasons = {}, []
        if not known:
            reasons.append(f"no direction model for timeframe {timeframe} "
                           f"(trained: {', '.join(self.direction.timeframes)})")
        for j, pattern in enumerate(DIRECTIONAL_PATTERNS):
            p = probabilities[CORE_PATTERNS.index(pattern)]
            threshold = self.gate.thresholds[pattern]
            by_probability, by_direction = bool(decided.probability_pass[0, j]), bool(decided.direction_pass[0, j])
            gates[pattern] = {"polarity": POLARITY[pattern], "probability": None if np.isnan(p) else float(p),
                              "threshold": threshold if math.isfinite(threshold) else None,
                              "probability_gate": by_probability, "direction_gate": by_direction}
            if by_probability and known:
                side = p_up if polarity(pattern) > 0 else 1 - p_up
                reasons.append(f"{pattern} ({POLARITY[pattern]}): probability {p:.3f} >= gate {threshold:.3f}; "
                               f"direction model gives {side:.3f} {'>=' if by_direction else '<'} "
                               f"{self.gate.min_confidence:.3f} for {DIRECTION_NAMES[polarity(pattern)]}")
        if not any(g["probability_gate"] for g in gates.values()):
            reasons.append("no directional pattern clears its gate")
        elif direction == 0 and (decided.probability_pass[0] & decided.direction_pass[0]).any():
            reasons.append("bullish and bearish patterns both pass: no trade")
        return {"direction": DIRECTION_NAMES[direction], "confidence": float(decided.confidence[0]),
                "gated": direction != 0, "reasons": reasons, "p_up": None if np.isnan(p_up) else p_up,
                "horizon_bars": self.direction.horizons.get(timeframe), "gates": gates}

    def signal_for_bars(self, bars: pd.DataFrame, pattern_probabilities: Mapping[str, float], timeframe: str) -> dict:
        """`signal` with the features of `bars` (OHLCV, oldest first; the last bar is the signal bar)."""
        return self.signal(pattern_probabilities, window_features(bars), timeframe)


def gate_files(gate: Gate, direction_model_json: bytes, fitted_for: Mapping) -> dict[str, bytes]:
    """`gate.json` (the gate, the horizons, the versions it was fitted for) and `direction_model.json` as given,
    tied by the model's sha256: a gate is only valid with the direction model it was fitted with."""
    horizons = json.loads(direction_model_json)["horizons"]
    document = gate.to_dict() | {"direction_model_sha256": hashlib.sha256(direction_model_json).hexdigest(),
                                 "horizons": horizons, "fitted_for": dict(fitted_for)}
    return {"gate.json": json.dumps(document, indent=2, sort_keys=True).encode(),
            "direction_model.json": direction_model_json}


def load_signal_gate(source: str | os.PathLike | Mapping[str, bytes]) -> SignalGate:
    """A SignalGate from a directory holding GATE_FILES (e.g. a bundle) or from {file name: bytes}."""
    if not isinstance(source, Mapping):
        source = {name: (Path(source) / name).read_bytes() for name in GATE_FILES}
    missing = [name for name in GATE_FILES if name not in source]
    if missing:
        raise ValueError(f"signal gate: missing file(s) {missing}")
    document = json.loads(source["gate.json"])
    if document.get("direction_model_sha256") != hashlib.sha256(source["direction_model.json"]).hexdigest():
        raise ValueError("gate.json was fitted with another direction_model.json: keep the two files of one "
                         "gated_signals version together")
    return SignalGate(Gate.from_dict(document), DirectionModel.from_json(source["direction_model.json"]),
                      document.get("fitted_for", {}))
