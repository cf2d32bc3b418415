"""Engineered OHLCV features of a chart window, for the LightGBM feature model and the learned fuser.

Every feature describes the window as of its last bar and is scale-free (ratios, or prices in units of the
window's average range), so one model serves every symbol and timeframe. History a feature needs but the
window lacks is NaN, which LightGBM treats as missing, not as zero.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from vlm_assets.rendering.raster import OhlcvArrays, validate_bars

AVG_PERIOD = 10  # bars averaged for the range unit, as in the rule engine
TREND_LOOKBACKS = (5, 10, 20)
VOLUME_PERIOD = 20
# Centred bar positions of each trend segment (lookback + 1 closes): the least-squares slope is then one dot product
# (np.polyfit gives the same slope to ~1e-11 at three times the cost, a request's largest feature cost).
_SEGMENT_POSITIONS = {n: np.arange(n + 1) - n / 2 for n in TREND_LOOKBACKS}
_CANDLES = ((1, "last"), (2, "prev"), (3, "prev2"))

FEATURE_NAMES: tuple[str, ...] = tuple(
    f"{name}_{part}" for _, name in _CANDLES
    for part in ("body_range", "upper_range", "lower_range", "direction", "body_avg", "range_avg", "gap_avg")
) + ("inside", "outside", "body_inside", "body_engulfs", "close_position") + tuple(
    f"{kind}_{n}" for n in TREND_LOOKBACKS for kind in ("trend", "slope")
) + ("volatility", "avg_range_price", "volume_z", "volume_z3")


# The two features that are not scale-free: they describe the market's regime (how far prices move per bar), not the
# candles, and a chart drawn to its own price range hides them. The prediction log keeps them for drift monitoring.
MARKET_FEATURES = ("volatility", "avg_range_price")
MARKET_INDICES = [FEATURE_NAMES.index(name) for name in MARKET_FEATURES]  # their columns in a feature vector


def market_state(features: np.ndarray) -> dict[str, float | None]:
    """MARKET_FEATURES of one window's feature vector, None where the window lacks the history (JSON has no NaN)."""
    return {name: float(features[j]) if np.isfinite(features[j]) else None
            for name, j in zip(MARKET_FEATURES, MARKET_INDICES)}


def window_features(bars: pd.DataFrame | OhlcvArrays) -> np.ndarray:
    """Feature vector (len(FEATURE_NAMES),) of a window's last bar (a frame or its OhlcvArrays). Raises ValueError
    naming a bad row."""
    o, h, l, c, v = validate_bars(bars)  # the checked columns: five frame lookups cost as much as all the maths
    n = len(c)
    history = h[max(0, n - 1 - AVG_PERIOD): n - 1] - l[max(0, n - 1 - AVG_PERIOD): n - 1]
    unit = float(history.mean()) if history.size else float(h[-1] - l[-1])
    unit = unit if unit > 0 else np.nan
    values: list[float] = []
    for back, _ in _CANDLES:
        if n < back:
            values += [np.nan] * 7
            continue
        i = n - back
        top, bottom, span = max(o[i], c[i]), min(o[i], c[i]), h[i] - l[i]
        ratio = (lambda x: x / span) if span > 0 else (lambda x: np.nan)
        gap = (o[i] - c[i - 1]) / unit if i > 0 else np.nan
        values += [ratio(top - bottom), ratio(h[i] - top), ratio(bottom - l[i]), float(np.sign(c[i] - o[i])),
                   (top - bottom) / unit, span / unit, gap]
    if n >= 2:
        top1, bottom1, top2, bottom2 = max(o[-1], c[-1]), min(o[-1], c[-1]), max(o[-2], c[-2]), min(o[-2], c[-2])
        values += [float(h[-1] < h[-2] and l[-1] > l[-2]), float(h[-1] > h[-2] and l[-1] < l[-2]),
                   float(top1 <= top2 and bottom1 >= bottom2), float(top1 >= top2 and bottom1 <= bottom2)]
    else:
        values += [np.nan] * 4
    values.append((c[-1] - l[-1]) / (h[-1] - l[-1]) if h[-1] > l[-1] else np.nan)
    for lookback in TREND_LOOKBACKS:  # measured up to the bar before the last, as the rule engine's trend
        if n < lookback + 2:
            values += [np.nan, np.nan]
            continue
        segment = c[n - 2 - lookback: n - 1]
        positions = _SEGMENT_POSITIONS[lookback]
        slope = float(positions @ (segment - segment.mean()) / (positions @ positions))
        values += [(segment[-1] - segment[0]) / unit, slope / unit]
    returns = np.diff(np.log(c[-(VOLUME_PERIOD + 1):]))
    values += [float(returns.std()) if returns.size >= 2 else np.nan, unit / c[-1]]
    past = v[max(0, n - 1 - VOLUME_PERIOD): n - 1]
    spread = float(past.std()) if past.size >= 2 else 0.0
    values += [(v[-1] - past.mean()) / spread if spread > 0 else np.nan,
               (v[-3:].mean() - past.mean()) / spread if spread > 0 else np.nan]
    return np.asarray(values, dtype=np.float64)


def feature_frame(windows: pd.DataFrame, bars: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """Features of dataset windows (columns symbol, timeframe, pos, n_bars), one row per window, same index."""
    missing = [k for k in ("symbol", "timeframe", "pos", "n_bars") if k not in windows.columns]
    if missing:
        raise ValueError(f"windows is missing column(s) {missing}")
    rows = []
    for window_index, symbol, timeframe, pos, n_bars in zip(windows.index, windows["symbol"], windows["timeframe"],
                                                            windows["pos"], windows["n_bars"]):
        key = (symbol, timeframe)
        if key not in bars:
            raise ValueError(f"window {window_index!r}: no bars for {symbol} {timeframe}")
        series = bars[key]
        start = int(pos) - int(n_bars) + 1
        if start < 0 or int(pos) >= len(series):
            raise ValueError(f"window {window_index!r}: bars {start}..{pos} outside {symbol} {timeframe}'s {len(series)}")
        rows.append(window_features(series.iloc[start: int(pos) + 1]))
    return pd.DataFrame(np.vstack(rows) if rows else np.zeros((0, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES),
                        index=windows.index)


# ---- the feature model ---------------------------------------------------------------------------------------

FEATURE_MODEL_FORMAT = "candle-vlm/feature-model-1"


@dataclass(frozen=True)
class BoostingConfig:
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 10
    seed: int = 5
    threads: int = 2

    def params(self) -> dict:
        # deterministic + fixed threads: the same data and seed give the same trees on every run
        return {"objective": "binary", "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
                "min_child_samples": self.min_child_samples, "seed": self.seed, "deterministic": True,
                "force_row_wise": True, "num_threads": self.threads, "verbosity": -1}


class _RowPredictor:
    """LightGBM's single-row fast path (C API `LGBM_BoosterPredictForMatSingleRowFast`): the prediction config is
    prepared once, so a one-row call costs microseconds. `Booster.predict` spends most of a one-row call on
    Python-side checks and conversions, and a request has one row (nine boosters: ~0.5 ms of the event loop)."""

    def __init__(self, booster):
        import ctypes

        from lightgbm.basic import _LIB, _c_str, _safe_call

        self._booster = booster  # owns the handle the config points into
        self._config = ctypes.c_void_p()
        _safe_call(_LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
            booster._handle, ctypes.c_int(0),  # C_API_PREDICT_NORMAL: probabilities, as Booster.predict
            ctypes.c_int(0), ctypes.c_int(-1),  # every iteration
            ctypes.c_int(1),  # C_API_DTYPE_FLOAT64
            ctypes.c_int32(len(FEATURE_NAMES)), _c_str("num_threads=1"), ctypes.byref(self._config)))
        self._out = np.zeros(1, dtype=np.float64)
        self._out_pointer = ctypes.c_void_p(self._out.__array_interface__["data"][0])
        self._length = ctypes.c_int64(0)
        self._lock = threading.Lock()  # the config holds the row buffer: one call at a time
        self._call, self._check, self._void_p, self._byref = (
            _LIB.LGBM_BoosterPredictForMatSingleRowFast, _safe_call, ctypes.c_void_p, ctypes.byref)
        self._free = _LIB.LGBM_FastConfigFree  # held: __del__ may run at interpreter shutdown, past imports

    def __call__(self, row: np.ndarray) -> float:
        row = np.ascontiguousarray(row, dtype=np.float64)
        with self._lock:
            self._check(self._call(self._config, self._void_p(row.__array_interface__["data"][0]),
                                   self._byref(self._length), self._out_pointer))
            return float(self._out[0])

    def __del__(self):
        if getattr(self, "_free", None) is not None:
            self._free(self._config)


@dataclass
class FeatureModel:
    """One LightGBM booster per class on FEATURE_NAMES; a class without both outcomes in training predicts its rate."""

    classes: tuple[str, ...]
    boosters: dict[str, Any]  # class -> lightgbm.Booster, or a float base rate
    _rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _row_predictor(self, name: str) -> _RowPredictor:
        if name not in self._rows:
            self._rows[name] = _RowPredictor(self.boosters[name])
        return self._rows[name]

    def predict(self, features: pd.DataFrame | np.ndarray) -> np.ndarray:
        """(n, classes) probabilities; `features` is a frame with FEATURE_NAMES columns or an (n, 36) array in
        FEATURE_NAMES order (as `window_features` gives)."""
        if isinstance(features, np.ndarray):
            if features.ndim != 2 or features.shape[1] != len(FEATURE_NAMES):
                raise ValueError(f"features must be (n, {len(FEATURE_NAMES)}) in FEATURE_NAMES order, got {features.shape}")
            x = features.astype(np.float64, copy=False)
        else:
            missing = [name for name in FEATURE_NAMES if name not in features.columns]
            if missing:
                raise ValueError(f"features are missing column(s) {missing}")
            x = features[list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
        if len(x) == 1:  # a served request
            return np.array([[b if isinstance(b, float) else self._row_predictor(c)(x[0])
                              for c, b in ((c, self.boosters[c]) for c in self.classes)]], dtype=np.float64)
        # one thread: a few rows gain nothing from OpenMP, which would fight the encoder's threads for the cores
        columns = [np.full(len(x), booster) if isinstance(booster, float) else booster.predict(x, num_threads=1)
                   for booster in (self.boosters[c] for c in self.classes)]
        return np.column_stack(columns) if columns else np.zeros((len(x), 0))

    def importances(self) -> pd.DataFrame:
        """Total split gain per feature (rows) and class (columns)."""
        table = {c: (np.zeros(len(FEATURE_NAMES)) if isinstance(b, float) else b.feature_importance("gain"))
                 for c, b in self.boosters.items()}
        return pd.DataFrame(table, index=list(FEATURE_NAMES))

    def to_json(self) -> str:
        boosters = {c: b if isinstance(b, float) else b.model_to_string() for c, b in self.boosters.items()}
        return json.dumps({"format": FEATURE_MODEL_FORMAT, "features": list(FEATURE_NAMES),
                           "classes": list(self.classes), "boosters": boosters}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureModel:
        import lightgbm

        data = json.loads(text)
        if data.get("format") != FEATURE_MODEL_FORMAT:
            raise ValueError(f"not a feature model: format {data.get('format')!r}, expected {FEATURE_MODEL_FORMAT!r}")
        if data["features"] != list(FEATURE_NAMES):
            raise ValueError("the feature model was trained on a different feature list; retrain it")
        boosters = {c: b if isinstance(b, float) else lightgbm.Booster(model_str=b) for c, b in data["boosters"].items()}
        return cls(tuple(data["classes"]), boosters)


def train_feature_model(features: pd.DataFrame, labels: pd.DataFrame, config: BoostingConfig = BoostingConfig()) -> FeatureModel:
    """One binary booster per label column."""
    import lightgbm

    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} label rows")
    x = features[list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
    boosters: dict[str, Any] = {}
    for name in labels.columns:
        y = labels[name].to_numpy(dtype=bool)
        if y.all() or not y.any():
            boosters[name] = float(y.mean())
            continue
        data = lightgbm.Dataset(x, label=y.astype(np.float64), feature_name=list(FEATURE_NAMES), free_raw_data=False)
        boosters[name] = lightgbm.train(config.params(), data, num_boost_round=config.n_estimators)
    return FeatureModel(tuple(labels.columns), boosters)
