"""The drift reference: charts of the dataset's test period replayed through the promoted bundle one request at a
time, as the service answers them.

Why not the stored test PNGs: those are drawn in seeded random styles with higher-timeframe panels and were chosen
to meet per-pattern quotas, while the service draws every chart from bars in the bundle's one style and sees
patterns at their natural rate. Comparing served charts with the stored test charts would report drift from the
first request. The reference therefore takes windows ending at uniformly drawn bars inside the test split's time
blocks (never trained on), `render_bars` long, and answers each as a `/predict/patterns` request with bars: the
embedding, the fused probabilities (and the image-only ones a screenshot of that chart would get), the market state
of its bars (`vlm_assets.features.market_state`) and the serving time of that request.

Embeddings of different timeframes differ a lot (a 1m chart is not a 1h chart), and so do charts of different hours
of the session (an intraday chart at the open shows the overnight gap and the opening volatility). The reference
keeps both for every chart, and the drift statistics weight it to the traffic's own mix of timeframes and session
hours (`Reference.weights_for`): more 1m charts, or an hourly check that sees only the opening hour, is not drift.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from vlm_assets.dataset import calendar_blocks, symbol_origins
from vlm_assets.features import MARKET_FEATURES, MARKET_INDICES
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.market.timeframes import INTRADAY_MINUTES, bar_end
from vlm_assets.storage import parquet_bytes
from vlm_assets.versioning import stable_rng

SEGMENTS = ("bars", "image")  # a request with bars (engineered features join the fusion), or a chart image only
UNKNOWN_TIMEFRAME = "?"  # records without a timeframe (zero-shot queries)
# Timeframes whose charts are matched by session hour: their request comes within a bar of the chart's last close.
HOURLY_TIMEFRAMES = [tf for tf, minutes in INTRADAY_MINUTES.items() if minutes <= 15]


MARKET_COLUMNS = [f"m_{name}" for name in MARKET_FEATURES]  # the market state of each reference chart's bars


def probability_columns(segment: str) -> list[str]:
    return [f"p_{segment}_{pattern}" for pattern in CORE_PATTERNS]


@dataclass(frozen=True)
class Session:
    """The exchange's regular session: request times (UTC) and chart closes (exchange time) map to its hours."""

    timezone: str = "America/New_York"
    open: str = "09:30"
    minutes: int = 390
    bucket_minutes: int = 60

    def __post_init__(self):
        try:
            pd.Timestamp("2026-01-02").tz_localize(self.timezone)
        except Exception:  # noqa: BLE001  pytz and zoneinfo raise different types
            raise ValueError(f"session.timezone: unknown time zone {self.timezone!r}") from None
        try:
            pd.Timedelta(f"{self.open}:00")
        except ValueError:
            raise ValueError(f"session.open: {self.open!r} is not HH:MM") from None
        if not 0 < self.bucket_minutes <= self.minutes <= 24 * 60:
            raise ValueError(f"session: need 0 < bucket_minutes <= minutes <= 1440, got {self.bucket_minutes}, "
                             f"{self.minutes}")

    def hours(self, closes: pd.DatetimeIndex, timeframes) -> np.ndarray:
        """Session hour (0 = the first) of naive exchange-time instants; -1 outside the session and for timeframes
        above HOURLY_TIMEFRAMES (a request of a 1h chart may come an hour or a night after its last bar closed, and
        its look depends little on the hour)."""
        closes = pd.DatetimeIndex(closes)
        minutes = (closes - closes.normalize() - pd.Timedelta(f"{self.open}:00")) / pd.Timedelta(minutes=1)
        minutes = np.asarray(minutes, dtype=float)
        intraday = np.isin(np.asarray(timeframes, dtype=object), HOURLY_TIMEFRAMES)
        inside = intraday & (minutes > 0) & (minutes <= self.minutes)
        return np.where(inside, (minutes - 1) // self.bucket_minutes, -1).astype(int)

    def local(self, times_utc) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(times_utc).tz_localize("UTC").tz_convert(self.timezone).tz_localize(None)


@dataclass(frozen=True)
class ReferenceSampling:
    per_timeframe: int = 300  # charts per timeframe
    timeframes: tuple[str, ...] = ()  # () = every timeframe whose test blocks hold a full chart
    seed: int = 0

    def __post_init__(self):
        if self.per_timeframe < 2:
            raise ValueError(f"per_timeframe must be at least 2, got {self.per_timeframe}")


def test_period_windows(bars: dict[tuple[str, str], pd.DataFrame], windows: pd.DataFrame, block_days: int,
                        chart_bars: int, sampling: ReferenceSampling) -> list[tuple[str, str, pd.DataFrame]]:
    """(symbol, timeframe, bars) of chart windows `chart_bars` long that lie inside one test-split time block, at most
    `per_timeframe` per timeframe, drawn uniformly over every such window of every symbol (seeded)."""
    missing = [c for c in ("symbol", "block", "split") if c not in windows.columns]
    if missing:
        raise ValueError(f"windows is missing column(s) {missing}")
    test_blocks = windows.loc[windows["split"] == "test", ["symbol", "block"]].drop_duplicates()
    blocks_of = test_blocks.groupby("symbol")["block"].apply(set).to_dict()
    if not blocks_of:
        raise ValueError("windows has no test split: the reference is drawn from the test period")
    origins = symbol_origins(bars)
    wanted = sampling.timeframes or tuple(sorted({tf for _, tf in bars}))
    candidates: dict[str, list[tuple[str, int]]] = {tf: [] for tf in wanted}
    for (symbol, timeframe), series in sorted(bars.items()):
        if timeframe not in candidates or symbol not in blocks_of or len(series) < chart_bars:
            continue
        block = calendar_blocks(pd.DatetimeIndex(series.index), origins[symbol], block_days)
        ends = np.arange(chart_bars - 1, len(series))
        inside = (block[ends] == block[ends - chart_bars + 1]) & np.isin(block[ends], sorted(blocks_of[symbol]))
        candidates[timeframe].extend((symbol, int(end)) for end in ends[inside])
    chosen = []
    for timeframe in wanted:
        pool = candidates[timeframe]
        if not pool:
            continue
        rng = stable_rng(sampling.seed, timeframe)
        for i in sorted(rng.choice(len(pool), size=min(sampling.per_timeframe, len(pool)), replace=False)):
            symbol, end = pool[i]
            chosen.append((symbol, timeframe, bars[(symbol, timeframe)].iloc[end - chart_bars + 1: end + 1]))
    if not chosen:
        raise ValueError(f"timeframes {list(wanted)}: no test block holds a {chart_bars}-bar chart; lower the "
                         "chart length or use longer test blocks")
    return chosen


def _strata(timeframes: np.ndarray, hours: np.ndarray) -> np.ndarray:
    return np.array([f"{tf}|{h}" for tf, h in zip(timeframes, hours)], dtype=object)


def bars_payload(window: pd.DataFrame) -> list[dict]:
    """A window as a client sends it to /predict/patterns."""
    return [{"timestamp": stamp.isoformat(), "open": o, "high": h, "low": l, "close": c, "volume": v}
            for stamp, o, h, l, c, v in zip(window.index, *(window[k].to_numpy(float).tolist()
                                                            for k in ("open", "high", "low", "close", "volume")))]


def serve_bars(predictor, bars: list[dict]) -> tuple[np.ndarray, dict, object, np.ndarray]:
    """The service's /predict/patterns path for a request with bars (validation, chart, encoder, features, fusion):
    (embedding, answer, chart image, engineered features)."""
    from vlm_assets.serving.requests import parse_bar_arrays

    window = predictor.window(parse_bar_arrays(bars)[1])
    image = predictor.render(window)
    embedding = predictor.encode([image])[0]
    features = predictor.features([window])[0]
    resnet = predictor.resnet_outputs([image]) if "resnet" in predictor.sources_for(True) else None
    return embedding, predictor.score_patterns(embedding, list(CORE_PATTERNS), features, resnet), image, features


def answer_batch(predictor, images: list, windows: list | None,
                 batch: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Embeddings, trained-pattern probabilities and engineered features (None without bars) of many charts, as the
    service answers each one: with their bars (`windows`: the features join the fusion) or, with `windows` None, as
    chart images only."""
    parts = [_answer(predictor, images[i:i + batch], None if windows is None else windows[i:i + batch])
             for i in range(0, len(images), batch)]
    features = None if windows is None else np.concatenate([f for _, _, f in parts])
    return np.concatenate([e for e, _, _ in parts]), np.concatenate([p for _, p, _ in parts]), features


def _answer(predictor, images: list, windows: list | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    embeddings = predictor.encode(images)
    features = predictor.features(windows) if windows is not None else None
    resnet = predictor.resnet_outputs(images) if "resnet" in predictor.sources_for(windows is not None) else None
    return embeddings, predictor.trained(embeddings, features, resnet).probabilities, features


@dataclass(frozen=True)
class Reference:
    table: pd.DataFrame  # one row per chart: symbol, timeframe, end, latency_ms, p_<segment>_<pattern>, m_<feature>
    embeddings: np.ndarray  # (n, d) float32, L2-normalized
    info: dict  # model tag, bundle, encoder, sampling, spot-check baseline, summary statistics

    @property
    def model(self) -> str:
        return self.info["model"]

    def probabilities(self, segment: str) -> np.ndarray:
        return self.table[probability_columns(segment)].to_numpy(float)

    def market(self) -> np.ndarray | None:
        """(n, len(MARKET_FEATURES)) market state of the reference charts' bars (NaN where a window lacks the
        history); None for a reference built before it was kept."""
        if not set(MARKET_COLUMNS) <= set(self.table.columns):
            return None
        return self.table[MARKET_COLUMNS].to_numpy(float)

    @cached_property
    def strata(self) -> np.ndarray:
        """(timeframe, session hour) of every chart; the timeframe alone when the reference has no session."""
        timeframes = self.table["timeframe"].to_numpy(object)
        if "session" not in self.info:
            return timeframes
        closes = pd.Series(pd.NaT, index=self.table.index, dtype="datetime64[ns]")
        for timeframe, rows in self.table.groupby("timeframe").groups.items():
            closes[rows] = bar_end(pd.DatetimeIndex(self.table.loc[rows, "end"]), timeframe)
        return _strata(timeframes, Session(**self.info["session"]).hours(pd.DatetimeIndex(closes), timeframes))

    def weights_for(self, timeframes, times=None) -> tuple[np.ndarray, list[str]]:
        """Weights (summing to 1) that give the reference the traffic's mix of timeframes and, with the request
        `times` (UTC), session hours; and the traffic's timeframes the reference lacks. A stratum the reference lacks
        takes its timeframe's charts, an unknown timeframe all of them."""
        current = self.current_strata(timeframes, times)
        weights = np.zeros(len(self.table))
        for key, share in pd.Series(current).value_counts(normalize=True).items():
            rows = self.rows_like(key)
            weights[rows] += share / rows.sum()
        uncovered = sorted({str(k).split("|")[0] for k in current} - set(self.table["timeframe"]) - {UNKNOWN_TIMEFRAME})
        return weights / weights.sum(), uncovered

    def rows_like(self, key: str) -> np.ndarray:
        """Charts of stratum `key`; of its timeframe when the reference has none of that stratum; else all."""
        for rows in (self.strata == key, self.table["timeframe"].to_numpy(object) == str(key).split("|")[0]):
            if rows.any():
                return rows
        return np.ones(len(self.table), dtype=bool)

    def current_strata(self, timeframes, times) -> np.ndarray:
        current = pd.Series(list(timeframes), dtype=object).fillna(UNKNOWN_TIMEFRAME).to_numpy(object)
        if times is None or "session" not in self.info:
            return current
        session = Session(**self.info["session"])
        return _strata(current, session.hours(session.local(times), current))

    def to_files(self) -> dict[str, bytes]:
        columns = [f"e{j:03d}" for j in range(self.embeddings.shape[1])]
        frame = pd.concat([self.table, pd.DataFrame(self.embeddings, columns=columns, index=self.table.index)], axis=1)
        return {"reference.parquet": parquet_bytes(frame),
                "reference.json": json.dumps(self.info, indent=2, sort_keys=True, allow_nan=False).encode()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Reference:
        import pyarrow.parquet as pq

        frame = pq.read_table(io.BytesIO(files["reference.parquet"])).to_pandas()
        columns = [c for c in frame.columns if c.startswith("e") and c[1:].isdigit()]
        return cls(frame.drop(columns=columns), frame[columns].to_numpy(np.float32),
                   json.loads(files["reference.json"]))


def replay(predictor, charts: list[tuple[str, str, pd.DataFrame]], info: dict, progress=None) -> Reference:
    """Each chart as one /predict/patterns request with bars, timed; the image-only answer is computed beside it."""
    rows, embeddings = [], []
    serve_bars(predictor, bars_payload(charts[0][2]))  # warm-up: the first request pays one-off costs
    for done, (symbol, timeframe, window) in enumerate(charts, start=1):
        payload = bars_payload(window)
        started = time.perf_counter()
        embedding, answer, image, features = serve_bars(predictor, payload)
        latency_ms = (time.perf_counter() - started) * 1000
        resnet = predictor.resnet_outputs([image]) if "resnet" in predictor.sources_for(False) else None
        image_only = predictor.trained(embedding[None, :], None, resnet).probabilities[0]
        row = {"symbol": symbol, "timeframe": timeframe, "end": window.index[-1], "latency_ms": latency_ms}
        row |= dict(zip(probability_columns("bars"), (answer["probabilities"][p] for p in CORE_PATTERNS)))
        row |= dict(zip(probability_columns("image"), image_only.tolist()))
        row |= dict(zip(MARKET_COLUMNS, features[MARKET_INDICES].tolist()))
        rows.append(row)
        embeddings.append(embedding.astype(np.float32))
        if progress is not None:
            progress(done, len(charts))
    table = pd.DataFrame(rows)
    matrix = np.vstack(embeddings)
    centroid = matrix.mean(axis=0)
    cosine = matrix @ centroid / np.linalg.norm(centroid)
    info = info | {
        "charts": len(table), "embedding_dim": int(matrix.shape[1]),
        "per_timeframe": table["timeframe"].value_counts().sort_index().to_dict(),
        "centroid_norm": float(np.linalg.norm(centroid)), "cosine_variance": float(cosine.var()),
        "latency_ms": {"p50": float(np.percentile(table["latency_ms"], 50)),
                       "p95": float(np.percentile(table["latency_ms"], 95))},
    }
    return Reference(table, matrix, info)


def spot_check(predictor, pngs: list[bytes], features: pd.DataFrame, truth: np.ndarray) -> dict:
    """Recall of the trained patterns on labelled charts, scored as promotion scores the test split (stored charts,
    engineered features from their bars, the fused answer at the validation thresholds)."""
    from vlm_assets import evaluation as ev

    with_bars, _ = predictor.evaluate(pngs, features)
    report = ev.multilabel_report(truth, with_bars.detected, CORE_PATTERNS)
    recall = report["recall"]
    return {"macro_recall": float(recall["macro"]), "windows": int(len(truth)),
            "recall": {p: None if pd.isna(recall[p]) else float(recall[p]) for p in CORE_PATTERNS}}
