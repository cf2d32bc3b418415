"""Drift statistics of a window of the prediction log against the reference (the plan's monitoring table).

- centroid shift: ||mu_t - mu_ref|| / ||mu_ref||, mu_ref weighted to the window's timeframe mix;
- cosine variance increase: Var(cos(e, mu_ref)) over the window relative to the reference's, minus 1;
- prediction shift: the population stability index (PSI) of every trained pattern's probability, per input kind
  (requests with bars are answered with engineered features, chart images without), judged net of its sampling
  noise (`psi`);
- market shift: the PSI of the market state of requests with bars (log volatility and log range over price, the
  two features a chart drawn to its own price range hides: `vlm_assets.features.MARKET_FEATURES`), judged as the
  prediction shift is; it watches the market itself, so a regime change shows even where the model's answers and
  embeddings hardly move;
- latency: P95 of the logged serving time of requests with bars over the reference's P95 (the baseline at
  promotion), judged by the P95's lower confidence bound (an order statistic);
- recall: the spot-check set's macro recall against its baseline at promotion (`recall_metric`).

A chart requested again (clients poll) has the same embedding id; embedding and prediction statistics count it
once per window, so a chart polled every minute does not outweigh the rest.

Charts of one symbol in one window are not independent draws: they share that symbol's market of the last hours,
and a few hours of a few dozen symbols move the window's centroid well beyond what independent charts would (the
drift simulation measures it; docs/monitoring.md). The embedding statistics are therefore judged net of that
sampling noise, estimated by a leave-one-symbol-out jackknife, at the one-sided 99.9% level: the centroid shift is
judged as sqrt(max(0, shift^2 - q)), q the 99.9th percentile of the squared norm of the window centroid's error
(its jackknife covariance, by a Satterthwaite chi-square, as an F for a covariance estimated from g symbols) plus the
reference centroid's error; the cosine variance increase as its value less t(0.999, g - 1) jackknife standard
errors. A window of a single symbol is not judged (insufficient). Both the raw and the judged values are reported; a
threshold is breached when the judged value exceeds it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from vlm_assets.features import MARKET_FEATURES
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.monitoring.reference import SEGMENTS, UNKNOWN_TIMEFRAME, Reference
from vlm_assets.serving.requests import pattern_key

LOG_FIELDS = ("time", "embedding", "embedding_id", "input", "probabilities", "calibrated", "latency_ms",
              "model_version", "endpoint")
SEGMENT_OF_INPUT = {"bars": "bars", "market": "bars", "image": "image"}
PSI_BINS = 10
PSI_DECIMALS = 3
PSI_MIN_BIN = 0.01  # bins are at least one probability point wide
PSI_FLOOR = 1e-4  # share given to an empty bin, so one empty bin does not make the index infinite
# The log keeps embeddings to 6 decimals: cosines are known to about 1e-5, so smaller spreads are not measurable
# (a barely trained model embeds every chart alike, and its variance ratio would be noise over noise).
COSINE_VARIANCE_FLOOR = 1e-8
CONFIDENCE = 0.999  # one-sided: a breach needs the statistic beyond its threshold net of this noise quantile
# The PSI breaches when any pattern of either input kind does: each of those tests gets an equal part of 1 - CONFIDENCE
# (Bonferroni), so the metric, not each test, is judged at CONFIDENCE.
PSI_CONFIDENCE = 1 - (1 - CONFIDENCE) / (len(CORE_PATTERNS) * len(SEGMENTS))
MARKET_CONFIDENCE = 1 - (1 - CONFIDENCE) / len(MARKET_FEATURES)  # the same for the market shift's tests
PSI_NULL_DRAWS = 4000


def doc(default, text: str):
    """A settings field with its default and a description (the Dagster config shows it: `pipeline.monitoring`)."""
    return field(default=default, metadata={"doc": text})


def require_numbers(settings, prefix: str = "", names=None, integer_from: int | None = None) -> None:
    """ValueError naming the field unless each of `names` (default: every field) is a positive finite number, or
    with `integer_from` an integer of at least that."""
    for name in names or [item.name for item in fields(settings)]:
        value = getattr(settings, name)
        kind = int if integer_from is not None else (int, float)
        valid = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and \
            (value >= integer_from if integer_from is not None else value > 0)
        if not valid:
            wanted = "a positive number" if integer_from is None else f"an integer of at least {integer_from}"
            raise ValueError(f"{prefix}{name} must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class Thresholds:
    """Warn levels (the plan's monitoring table; the prediction shift uses the usual PSI level of a major shift)."""

    centroid_shift: float = doc(0.15, "warn when ||mu_t - mu_ref|| / ||mu_ref|| exceeds this")
    cosine_variance_increase: float = doc(0.20, "warn when Var(cos to mu_ref) rises by more than this share (+20%)")
    recall_drop: float = doc(0.05, "warn when the spot-check macro recall falls this share (or more) below baseline")
    latency_p95_ratio: float = doc(2.0, "warn when the logged P95 latency exceeds this multiple of the baseline")
    prediction_psi: float = doc(0.25, "warn when a pattern's probability PSI (any input kind) exceeds this")
    market_psi: float = doc(0.25, "warn when the PSI of a market-state feature of requests with bars (log "
                                  "volatility, log range over price) exceeds this")

    def __post_init__(self):
        require_numbers(self, "thresholds.")


@dataclass(frozen=True)
class Minimums:
    """Least data a statistic is computed from; with less, it is reported as insufficient (never as a breach)."""

    charts: int = doc(200, "distinct charts for the embedding statistics")
    segment: int = doc(100, "distinct answers of one input kind for its PSI")
    latency: int = doc(50, "requests with bars for the latency P95")

    def __post_init__(self):
        require_numbers(self, "minimums.", integer_from=2)


@dataclass(frozen=True)
class LogWindow:
    """Prediction-log records as arrays (one row per record)."""

    time: np.ndarray  # datetime64[ns] UTC
    embeddings: np.ndarray  # (n, d) float32
    embedding_id: np.ndarray
    timeframe: np.ndarray  # UNKNOWN_TIMEFRAME where the request had none
    segment: np.ndarray  # "bars" or "image"
    probabilities: np.ndarray  # (n, len(CORE_PATTERNS)): trained patterns' calibrated answers, NaN where not asked
    latency_ms: np.ndarray
    endpoint: np.ndarray
    model_version: np.ndarray
    symbol: np.ndarray  # "" where the request had none
    market: np.ndarray  # (n, len(MARKET_FEATURES)): the bars' market state, NaN where the record has none

    def __len__(self) -> int:
        return len(self.time)

    @classmethod
    def from_records(cls, frame: pd.DataFrame) -> LogWindow:
        """From `read_predictions`' frame."""
        if frame.empty:
            return cls.empty()
        missing = [f for f in LOG_FIELDS if f not in frame.columns]
        if missing:
            raise ValueError(f"prediction log records lack field(s) {missing}")
        unknown = sorted(set(frame["input"]) - set(SEGMENT_OF_INPUT))
        if unknown:
            raise ValueError(f"prediction log field input has unknown value(s) {unknown}")
        lengths = frame["embedding"].map(len)
        if lengths.nunique() != 1:
            raise ValueError(f"prediction log field embedding has mixed lengths {sorted(lengths.unique())}")
        probabilities = np.full((len(frame), len(CORE_PATTERNS)), np.nan)
        columns = {p: j for j, p in enumerate(CORE_PATTERNS)}
        for i, (answer, calibrated) in enumerate(zip(frame["probabilities"], frame["calibrated"])):
            for name, value in answer.items():
                j = columns.get(pattern_key(name))
                if j is not None and calibrated.get(name):
                    probabilities[i, j] = value
        market = np.full((len(frame), len(MARKET_FEATURES)), np.nan)
        if "market" in frame.columns:  # records of requests with bars, since the log kept it
            for i, state in enumerate(frame["market"]):
                if isinstance(state, dict):
                    market[i] = [np.nan if state.get(name) is None else state[name] for name in MARKET_FEATURES]
        timeframe = frame["timeframe"] if "timeframe" in frame.columns else pd.Series(np.nan, index=frame.index)
        symbol = frame["symbol"] if "symbol" in frame.columns else pd.Series(np.nan, index=frame.index)
        return cls(time=pd.to_datetime(frame["time"], utc=True).dt.tz_localize(None).to_numpy("datetime64[ns]"),
                   embeddings=np.asarray(frame["embedding"].tolist(), dtype=np.float32),
                   embedding_id=frame["embedding_id"].to_numpy(object),
                   timeframe=timeframe.fillna(UNKNOWN_TIMEFRAME).to_numpy(object),
                   segment=frame["input"].map(SEGMENT_OF_INPUT).to_numpy(object),
                   probabilities=probabilities, latency_ms=frame["latency_ms"].to_numpy(float),
                   endpoint=frame["endpoint"].to_numpy(object), model_version=frame["model_version"].to_numpy(object),
                   symbol=symbol.fillna("").astype(str).to_numpy(object), market=market)

    @classmethod
    def empty(cls, dim: int = 0) -> LogWindow:
        none = np.array([], dtype=object)
        return cls(np.array([], dtype="datetime64[ns]"), np.zeros((0, dim), np.float32), none, none, none,
                   np.zeros((0, len(CORE_PATTERNS))), np.array([]), none, none, none,
                   np.zeros((0, len(MARKET_FEATURES))))

    def select(self, mask) -> LogWindow:
        return LogWindow(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    @classmethod
    def concat(cls, parts: list[LogWindow]) -> LogWindow:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def distinct(self, by_segment: bool = False) -> np.ndarray:
        """Row mask keeping the first record of each chart (of each chart and input kind)."""
        keys = pd.Series(self.embedding_id) if not by_segment else \
            pd.Series(self.embedding_id).astype(str) + "|" + pd.Series(self.segment).astype(str)
        return ~keys.duplicated().to_numpy()

    def clusters(self) -> np.ndarray:
        """Sampling units: the symbol, or the chart itself for requests without one."""
        return np.where(self.symbol != "", "s:" + self.symbol.astype(str), "e:" + self.embedding_id.astype(str))


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, q: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order]) - 0.5 * weights[order]
    return np.interp(q, cumulative / weights.sum(), values[order])


def psi(reference: np.ndarray, weights: np.ndarray, current: np.ndarray,
        clusters: np.ndarray | None = None, bins: int = PSI_BINS,
        confidence: float = PSI_CONFIDENCE) -> tuple[float, float]:
    """Population stability index of `current` against the weighted `reference`, over the reference's quantile bins
    (ties and bins narrower than PSI_MIN_BIN merged) and a bin on either side of its range: sum over bins of
    (c - r) ln(c / r); and its sampling noise at `confidence`: that of two samples of one distribution
    (`_psi_null_moments`, `_scaled_quantile`), large for small samples, and larger when answers come in `clusters` (a
    symbol's charts share its market): the design effect deff is the jackknife variance of the bin shares (leave one
    cluster out) over their variance for independent answers, and the noise is that of n / deff independent answers,
    widened for deff's own estimation error."""
    weights = weights / weights.sum()
    # Probabilities 0.001 apart are the same answer: without this, a near-constant distribution gets bins narrower
    # than float noise (batched vs single-chart encoding) and any two samples of it look shifted.
    reference, current = np.round(reference, PSI_DECIMALS), np.round(current, PSI_DECIMALS)
    # Answers more than a probability point beyond the reference's range get bins of their own (reference share
    # PSI_FLOOR): without them, a pattern answered alike for every reference chart has a single bin, and no shift of
    # its answers would show.
    held = reference[weights > 0]
    low, high = held.min() - PSI_MIN_BIN, held.max() + PSI_MIN_BIN
    edges = [low]
    for edge in np.unique(_weighted_quantiles(reference, weights, np.linspace(0, 1, bins + 1)[1:-1])):
        if edge - edges[-1] >= PSI_MIN_BIN and high - edge >= PSI_MIN_BIN:  # a move within one point is not a shift
            edges.append(edge)
    edges = np.asarray([*edges, high])
    ref_share = np.maximum(np.bincount(np.searchsorted(edges, reference, side="right"), weights, len(edges) + 1),
                           PSI_FLOOR)
    in_bin = np.eye(len(edges) + 1)[np.searchsorted(edges, current, side="right")]
    shares = in_bin.mean(axis=0)
    index = float(_psi_index(shares, ref_share))
    deff, deff_dof = 1.0, math.inf
    groups = len(np.unique(clusters)) if clusters is not None else len(current)
    if groups > 1 and groups < len(current):
        independent = float((shares * (1 - shares)).sum()) / len(current)
        if independent > 0:
            replicates = _jackknife(in_bin, clusters)
            deff = min(max(_jackknife_variance(replicates) / independent, 1.0), len(current))
            deff_dof = _jackknife_dof(replicates)
        else:  # every answer in one bin: nothing tells how alike a cluster's answers are, so one per cluster
            deff = len(current) / groups
    share = ref_share / ref_share.sum()
    mean, variance = _psi_null_moments(tuple(share.round(12)), max(round(len(current) / deff), 1),
                                       max(round(1.0 / float(weights @ weights)), 1))
    return index, _scaled_quantile(mean, variance, deff_dof, confidence)


def _psi_index(current_share: np.ndarray, reference_share: np.ndarray) -> np.ndarray:
    """PSI over the last axis, an empty bin counted as a share of PSI_FLOOR."""
    current_share, reference_share = np.maximum(current_share, PSI_FLOOR), np.maximum(reference_share, PSI_FLOOR)
    return np.sum((current_share - reference_share) * np.log(current_share / reference_share), axis=-1)


@functools.lru_cache(maxsize=4096)  # hourly checks of a steady stream ask for the same bins and sample sizes
def _psi_null_moments(share: tuple[float, ...], answers: int, reference_answers: int) -> tuple[float, float]:
    """Mean and variance of the PSI between two independent samples of one distribution over the bins (`share`),
    of `answers` and `reference_answers` draws, simulated (PSI_NULL_DRAWS seeded draws, so deterministic). Not the
    chi-square divergence's own (1/n + 1/m) x chi-square(bins - 1): an empty bin weighs r ln(r / PSI_FLOOR), about
    0.7 for r = 0.1, so small samples have a far heavier tail than that (with 56 answers, 5% of drift-free samples
    exceeded its 99.9% level)."""
    rng, share = np.random.default_rng(0), np.asarray(share) / sum(share)
    draws = [rng.multinomial(n, share, size=PSI_NULL_DRAWS) / n for n in (answers, reference_answers)]
    null = _psi_index(*draws)
    return float(null.mean()), float(null.var())


def _scaled_quantile(mean: float, variance: float, scale_dof: float, confidence: float) -> float:
    """The `confidence` quantile of a * chi-square(nu) with this mean and variance (Satterthwaite; the quantile is
    beyond what the simulated draws resolve). Its scale carries the design effect, itself estimated with `scale_dof`
    degrees of freedom, so the quantile is that of a * nu * F(nu, scale_dof), as for the centroid shift."""
    from scipy.stats import chi2, f

    if variance == 0:
        return mean
    scale, dof = variance / (2 * mean), 2 * mean**2 / variance
    if math.isinf(scale_dof):
        return scale * float(chi2.ppf(confidence, dof))
    return scale * dof * float(f.ppf(confidence, dof, scale_dof))


def _jackknife_dof(estimates: np.ndarray) -> float:
    """Degrees of freedom of the jackknife variance (summed over columns) from leave-one-cluster-out estimates
    (clusters, k): g - 1 per effective dimension (`_jackknife_spectrum`)."""
    total, squares = _jackknife_spectrum(estimates)
    return (len(estimates) - 1) * (total**2 / squares) if squares > 0 else math.inf


def _metric(value, threshold: float, breached: bool | None = None, **details) -> dict:
    if value is None:
        return {"value": None, "threshold": threshold, "breached": False, "sufficient": False, **details}
    return {"value": float(value), "threshold": threshold,
            "breached": bool(value > threshold if breached is None else breached), "sufficient": True, **details}


def _jackknife(values: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Leave-one-cluster-out means of the rows of `values` (n, k): (clusters, k)."""
    codes, index = np.unique(clusters, return_inverse=True)
    sums = np.zeros((len(codes), values.shape[1]))
    np.add.at(sums, index, values)
    counts = np.bincount(index, minlength=len(codes))[:, None]
    return (values.sum(axis=0) - sums) / np.maximum(len(values) - counts, 1)


def _jackknife_variance(estimates: np.ndarray) -> float:
    """Jackknife variance (summed over columns) from leave-one-out estimates (clusters, k)."""
    g = len(estimates)
    return float((g - 1) / g * ((estimates - estimates.mean(axis=0)) ** 2).sum()) if g > 1 else 0.0


def _noise_quantile(estimates: np.ndarray, q: float) -> float:
    """The q-quantile of the squared norm of the error of a mean vector whose jackknife replicates are `estimates`
    (clusters, d): a sum of scaled chi-square(1) terms, one per eigenvalue of the jackknife covariance, taken as
    a * chi-square(nu) with the same mean and variance (Satterthwaite). That covariance is itself estimated from g
    clusters, with g - 1 degrees of freedom, so the quantile is that of a * nu * F(nu, g - 1), as Hotelling's T^2
    becomes an F: with few symbols the noise is wide, as it should be. Infinite with fewer than two clusters."""
    from scipy.stats import f

    if len(estimates) < 2:
        return math.inf
    total, squares = _jackknife_spectrum(estimates)
    return 0.0 if squares == 0 else total * float(f.ppf(q, total**2 / squares, len(estimates) - 1))


def _jackknife_spectrum(estimates: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares of the eigenvalues of the jackknife covariance of leave-one-cluster-out estimates
    (clusters, k); (sum)^2 / (sum of squares) is its effective number of dimensions (Satterthwaite)."""
    g = len(estimates)
    eigen = (g - 1) / g * np.linalg.svd(estimates - estimates.mean(axis=0), compute_uv=False) ** 2
    return float(eigen.sum()), float((eigen**2).sum())


def _t_quantile(clusters: int) -> float:
    """Student's t at CONFIDENCE with clusters - 1 degrees of freedom: a jackknife standard error from g clusters."""
    from scipy.stats import t

    return float(t.ppf(CONFIDENCE, clusters - 1))


def embedding_statistics(reference: Reference, window: LogWindow, minimums: Minimums = Minimums()) -> dict:
    """Centroid shift and cosine variance of the window's distinct charts against the timeframe-matched reference,
    raw and net of the window's sampling noise (leave-one-symbol-out jackknife)."""
    charts = window.select(window.distinct())
    clusters = charts.clusters()
    if len(charts) < minimums.charts or len(np.unique(clusters)) < 2:  # one symbol: its own market is all we see
        return {"charts": len(charts), "clusters": int(len(np.unique(clusters))), "sufficient": False}
    if charts.embeddings.shape[1] != reference.embeddings.shape[1]:
        raise ValueError(f"embedding: the log's are {charts.embeddings.shape[1]}-d, the reference's "
                         f"{reference.embeddings.shape[1]}-d (another model?)")
    weights, uncovered = reference.weights_for(charts.timeframe, charts.time)
    ref_emb = reference.embeddings.astype(np.float64)
    centroid = weights @ ref_emb
    norm = float(np.linalg.norm(centroid))
    current = charts.embeddings.astype(np.float64)
    shift = float(np.linalg.norm(current.mean(axis=0) - centroid) / norm)
    replicates = _jackknife(current, clusters)
    reference_error = float(weights**2 @ ((ref_emb - centroid) ** 2).sum(axis=1))  # the reference centroid's own
    noise = _jackknife_variance(replicates) + reference_error
    noise_quantile = _noise_quantile(replicates, CONFIDENCE) + reference_error
    judged = math.sqrt(max(0.0, shift**2 - noise_quantile / norm**2))
    ref_cos = ref_emb @ centroid / norm
    ref_mean = float(weights @ ref_cos)
    ref_var = max(float(weights @ (ref_cos - ref_mean) ** 2), COSINE_VARIANCE_FLOOR)
    cos = current @ centroid / norm
    increase = float(cos.var() / ref_var - 1)
    moments = _jackknife(np.column_stack([cos, cos**2]), clusters)
    increase_se = math.sqrt(_jackknife_variance((moments[:, 1] - moments[:, 0] ** 2)[:, None] / ref_var))
    return {"charts": len(charts), "sufficient": True, "clusters": int(len(np.unique(clusters))),
            "uncovered_timeframes": uncovered, "centroid_shift": shift, "centroid_shift_judged": judged,
            "centroid_shift_noise": math.sqrt(noise) / norm,
            "centroid_shift_noise_quantile": math.sqrt(noise_quantile) / norm,
            "cosine_variance_increase": increase, "cosine_variance_increase_se": increase_se,
            "cosine_variance_increase_judged": increase - _t_quantile(len(replicates)) * increase_se,
            "cosine_mean": float(cos.mean()), "reference_cosine_mean": ref_mean,
            "cosine_variance": float(cos.var()), "reference_cosine_variance": ref_var}


def prediction_shift(reference: Reference, window: LogWindow, minimums: Minimums = Minimums()) -> dict:
    """PSI of every trained pattern's probability per input kind, against the timeframe-matched reference."""
    answered = window.select(window.distinct(by_segment=True) & np.isfinite(window.probabilities).all(axis=1))
    out = {}
    for segment in SEGMENTS:
        part = answered.select(answered.segment == segment)
        if len(part) < minimums.segment:
            out[segment] = {"answers": len(part), "sufficient": False}
            continue
        weights, _ = reference.weights_for(part.timeframe, part.time)
        ref = reference.probabilities(segment)
        clusters = part.clusters()
        scored = {p: psi(ref[:, j], weights, part.probabilities[:, j], clusters) for j, p in enumerate(CORE_PATTERNS)}
        out[segment] = {"answers": len(part), "sufficient": True,
                        "psi": {p: index for p, (index, _) in scored.items()},
                        "psi_judged": {p: max(0.0, index - noise) for p, (index, noise) in scored.items()},
                        "mean": {p: float(part.probabilities[:, j].mean()) for j, p in enumerate(CORE_PATTERNS)},
                        "reference_mean": {p: float(weights @ ref[:, j]) for j, p in enumerate(CORE_PATTERNS)}}
    return out


def market_shift(reference: Reference, window: LogWindow, minimums: Minimums = Minimums()) -> dict:
    """PSI of every market-state feature (its log) of the distinct charts of requests with bars, against the
    timeframe- and hour-matched reference (a 1m chart at the open moves more than a 1h chart at noon)."""
    ref = reference.market()
    if ref is None:
        return {"answers": 0, "sufficient": False, "reason": "the reference predates the market state: rebuild "
                "embedding_reference"}
    known = np.isfinite(window.market).all(axis=1) & (window.market > 0).all(axis=1)
    answered = window.select(window.distinct(by_segment=True) & (window.segment == "bars") & known)
    if len(answered) < minimums.segment:
        return {"answers": len(answered), "sufficient": False}
    weights, _ = reference.weights_for(answered.timeframe, answered.time)
    clusters = answered.clusters()
    scored, medians = {}, {}
    for j, name in enumerate(MARKET_FEATURES):
        usable = np.isfinite(ref[:, j]) & (ref[:, j] > 0) & (weights > 0)
        if not usable.any():
            return {"answers": len(answered), "sufficient": False,
                    "reason": f"no reference chart of this traffic's mix has a {name}"}
        scored[name] = psi(np.log(ref[usable, j]), weights[usable], np.log(answered.market[:, j]), clusters,
                           confidence=MARKET_CONFIDENCE)
        medians[name] = (float(np.median(answered.market[:, j])),
                         float(_weighted_quantiles(ref[usable, j], weights[usable], np.array([0.5]))[0]))
    return {"answers": len(answered), "sufficient": True,
            "psi": {n: index for n, (index, _) in scored.items()},
            "psi_judged": {n: max(0.0, index - noise) for n, (index, noise) in scored.items()},
            "median": {n: current for n, (current, _) in medians.items()},
            "reference_median": {n: ref_median for n, (_, ref_median) in medians.items()}}


def latency(reference: Reference, window: LogWindow, minimums: Minimums = Minimums()) -> dict:
    """P50/P95 of the logged serving time of /predict/patterns requests with bars (what the reference times)."""
    served = window.latency_ms[(window.endpoint == "predict_patterns") & (window.segment == "bars")]
    baseline = reference.info["latency_ms"]["p95"]
    if len(served) < minimums.latency:
        return {"requests": int(len(served)), "sufficient": False, "baseline_p95_ms": baseline}
    from scipy.stats import binom

    p95 = float(np.percentile(served, 95))
    # The lower confidence bound of the P95: the order statistic that at most 1 - CONFIDENCE of samples exceed it
    rank = max(int(binom.ppf(1 - CONFIDENCE, len(served), 0.95)) - 1, 0)
    lower = float(np.sort(served)[rank])
    return {"requests": int(len(served)), "sufficient": True, "p50_ms": float(np.percentile(served, 50)),
            "p95_ms": p95, "p95_lower_ms": lower, "baseline_p95_ms": baseline, "ratio": p95 / baseline,
            "ratio_judged": lower / baseline}


def recall_metric(entries: list[dict], threshold: float) -> dict:
    """Relative drop of the spot-check macro recall (mean over `entries`, the rolling window) from its baseline at
    promotion; a drop of `threshold` or more is a breach."""
    if not entries:
        return _metric(None, threshold, scorings=0)
    baseline = entries[-1]["baseline_macro_recall"]
    recall = float(np.mean([e["macro_recall"] for e in entries]))
    drop = (baseline - recall) / baseline if baseline > 0 else 0.0
    return _metric(drop, threshold, drop >= threshold, scorings=len(entries), macro_recall=recall,
                   baseline_macro_recall=baseline, worst_pattern=_worst_pattern(entries[-1]))


def _worst_pattern(entry: dict) -> str | None:
    drops = {p: entry["baseline_recall"][p] - r for p, r in entry["recall"].items()
             if r is not None and entry["baseline_recall"].get(p) is not None}
    return max(drops, key=drops.get) if drops else None


def drift_metrics(reference: Reference, window: LogWindow, thresholds: Thresholds = Thresholds(),
                  minimums: Minimums = Minimums()) -> dict:
    """Every log-based statistic of the window with its threshold and verdict (the recall metric is added by the
    caller, from the spot-check scorings of the period)."""
    embedding = embedding_statistics(reference, window, minimums)
    predictions = prediction_shift(reference, window, minimums)
    market = market_shift(reference, window, minimums)
    served = latency(reference, window, minimums)
    market_worst = max(market["psi"], key=lambda n: (market["psi_judged"][n], market["psi"][n])) \
        if market["sufficient"] else None
    scored = {(s, p): v for s, part in predictions.items() for p, v in part.get("psi", {}).items()}
    judged = {(s, p): v for s, part in predictions.items() for p, v in part.get("psi_judged", {}).items()}
    worst = max(scored, key=lambda k: (judged[k], scored[k])) if scored else None
    sufficient = embedding["sufficient"]
    return {
        "records": len(window), "charts": embedding["charts"],
        "timeframes": pd.Series(window.timeframe, dtype=object).value_counts().sort_index().to_dict(),
        "inputs": pd.Series(window.segment, dtype=object).value_counts().sort_index().to_dict(),
        "embedding": embedding, "predictions": predictions, "market": market, "latency": served,
        "metrics": {
            **{name: _metric(embedding[name] if sufficient else None, getattr(thresholds, name),
                             sufficient and embedding[f"{name}_judged"] > getattr(thresholds, name),
                             **({"judged": embedding[f"{name}_judged"]} if sufficient else {}))
               for name in ("centroid_shift", "cosine_variance_increase")},
            "prediction_psi": _metric(scored[worst] if worst else None, thresholds.prediction_psi,
                                      bool(worst) and judged[worst] > thresholds.prediction_psi,
                                      **({"judged": judged[worst], "worst": f"{worst[0]}:{worst[1]}"}
                                         if worst else {})),
            "market_psi": _metric(market["psi"][market_worst] if market_worst else None, thresholds.market_psi,
                                  bool(market_worst) and market["psi_judged"][market_worst] > thresholds.market_psi,
                                  **({"judged": market["psi_judged"][market_worst], "worst": market_worst}
                                     if market_worst else {})),
            "latency_p95_ratio": _metric(served.get("ratio"), thresholds.latency_p95_ratio,
                                         served.get("ratio_judged", 0.0) > thresholds.latency_p95_ratio,
                                         **({"judged": served["ratio_judged"]} if served["sufficient"] else {})),
        },
    }
