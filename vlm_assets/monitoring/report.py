"""The weekly drift report: the period's statistics day by day, an Evidently HTML report, and plots for people.

Evidently compares the period's charts with a reference drawn to the same mix: for each current chart (at most
`rows`, seeded), a reference chart of its timeframe and session hour, with the probabilities its input kind gets.
Columns: the embedding (`EmbeddingsDrift`), and through `DataDriftPreset` the cosine similarity to the reference
centroid, the serving latency, timeframe, input kind, every trained pattern's probability and, for requests with bars,
the market state (`vlm_assets.features.MARKET_FEATURES`; empty for screenshots, left out for a reference without it)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vlm_assets.features import MARKET_FEATURES
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.monitoring.drift import LogWindow, Minimums, Thresholds, drift_metrics
from vlm_assets.monitoring.reference import SEGMENTS, Reference
from vlm_assets.versioning import stable_rng

LOG_METRICS = ("centroid_shift", "cosine_variance_increase", "prediction_psi", "market_psi", "latency_p95_ratio")
EMBEDDING = "chart"
EVIDENTLY_DECIMALS = 6


def daily(reference: Reference, window: LogWindow, thresholds: Thresholds, minimums: Minimums) -> pd.DataFrame:
    """One row per UTC day with records: the log statistics of that day alone (None where it had too little)."""
    days = pd.DatetimeIndex(window.time).normalize()
    rows = []
    for day in sorted(set(days)):
        metrics = drift_metrics(reference, window.select(days == day), thresholds, minimums)
        rows.append({"day": day.date().isoformat(), "records": metrics["records"], "charts": metrics["charts"],
                     **{name: metrics["metrics"][name]["value"] for name in LOG_METRICS}})
    return pd.DataFrame(rows, columns=["day", "records", "charts", *LOG_METRICS])


def evidently_frames(reference: Reference, window: LogWindow, rows: int,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference, current) frames for Evidently, the reference matched to the current rows' timeframe and input."""
    charts = window.select(window.distinct(by_segment=True))
    rng = stable_rng(seed, "evidently")
    if len(charts) > rows:
        charts = charts.select(np.sort(rng.choice(len(charts), rows, replace=False)))
    picks = np.array([rng.choice(np.flatnonzero(reference.rows_like(key)))
                      for key in reference.current_strata(charts.timeframe, charts.time)], dtype=int)
    ref_emb = reference.embeddings[picks]
    centroid = ref_emb.mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    bars = (charts.segment == "bars")[:, None]
    ref_probabilities = np.where(bars, reference.probabilities("bars")[picks], reference.probabilities("image")[picks])
    ref_market = None if reference.market() is None else np.where(bars, reference.market()[picks], np.nan)
    # A column without a value on either side has no distribution to compare (a screenshot-only week).
    with_market = ref_market is not None and bool(np.isfinite(ref_market).any(axis=0).all()
                                                  and np.isfinite(charts.market).any(axis=0).all())

    def frame(embeddings, latency, probabilities, market) -> pd.DataFrame:
        out = pd.DataFrame(embeddings, columns=[f"e{j:03d}" for j in range(embeddings.shape[1])])
        # Rounded: a near-constant column (a pattern the model answers alike for every chart) whose values differ
        # only in float noise breaks Evidently's histograms ("Cannot create 10 finite-sized bins").
        out["cosine_to_reference"] = np.round(embeddings @ centroid, EVIDENTLY_DECIMALS)
        out["latency_ms"] = np.round(latency, 3)
        out["timeframe"] = charts.timeframe
        out["input"] = charts.segment
        for j, pattern in enumerate(CORE_PATTERNS):
            out[pattern] = np.round(probabilities[:, j], EVIDENTLY_DECIMALS)
        if with_market:
            out[list(MARKET_FEATURES)] = market
        return out

    return (frame(ref_emb, reference.table["latency_ms"].to_numpy()[picks], ref_probabilities, ref_market),
            frame(charts.embeddings, charts.latency_ms, charts.probabilities, charts.market))


def evidently_report(reference: Reference, window: LogWindow, html_path: str, rows: int = 1000, seed: int = 0) -> dict:
    """Write the Evidently report to `html_path` (a local file) and return its figures."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset

    ref, cur = evidently_frames(reference, window, rows, seed)
    numerical = ["cosine_to_reference", "latency_ms", *CORE_PATTERNS, *(c for c in MARKET_FEATURES if c in cur)]
    categorical = ["timeframe", "input"]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical,
                                embeddings={EMBEDDING: [c for c in ref.columns if c.startswith("e")]})
    report = Report([EmbeddingsDrift(embeddings_name=EMBEDDING), DataDriftPreset(columns=numerical + categorical)])
    snapshot = report.run(current_data=Dataset.from_pandas(cur, data_definition=definition),
                          reference_data=Dataset.from_pandas(ref, data_definition=definition))
    snapshot.save_html(str(html_path))  # Evidently writes only when given a str
    values = {m["metric_name"]: m["value"] for m in snapshot.dict()["metrics"]}
    embedding = next(v for k, v in values.items() if k.startswith("EmbeddingsDrift"))
    drifted = next(v for k, v in values.items() if k.startswith("DriftedColumnsCount"))
    columns = {k.split("column=")[1].split(",")[0]: v for k, v in values.items() if k.startswith("ValueDrift")}
    return {"rows": len(cur), "embedding_drift_score": float(embedding), "drifted_columns": drifted,
            "column_drift_scores": columns, "methods": sorted({k.split("method=")[1].split(",")[0]
                                                               for k in values if k.startswith("ValueDrift")})}


# ---- figures -------------------------------------------------------------------------------------------------

def histogram_figure(series: dict, title: str, xaxis: str, lines: dict | None = None):
    """Overlaid normalized histograms of named value arrays, with dashed vertical lines {label: x}."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for name, values in series.items():
        figure.add_histogram(x=np.asarray(values), name=name, opacity=0.6, histnorm="probability")
    for label, x in (lines or {}).items():
        figure.add_vline(x=float(x), line_dash="dash", annotation_text=label)
    figure.update_layout(barmode="overlay", title=title, template="plotly_white", xaxis_title=xaxis,
                         yaxis_title="share")
    return figure


def latency_figure(window: LogWindow, reference: Reference):
    served = window.latency_ms[(window.endpoint == "predict_patterns") & (window.segment == "bars")]
    lines = {"baseline P95": reference.info["latency_ms"]["p95"]}
    if len(served):
        lines["P95"] = np.percentile(served, 95)
    return histogram_figure({"reference (at promotion)": reference.table["latency_ms"],
                             "logged (requests with bars)": served}, "Serving latency (ms)", "ms", lines)


def daily_figure(days: pd.DataFrame, thresholds: Thresholds):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=len(LOG_METRICS), cols=1, shared_xaxes=True, subplot_titles=LOG_METRICS)
    for row, name in enumerate(LOG_METRICS, start=1):
        figure.add_trace(go.Scatter(x=days["day"], y=days[name], mode="lines+markers", name=name), row=row, col=1)
        figure.add_hline(y=getattr(thresholds, name), line_dash="dash", line_color="#d62728", row=row, col=1)
    figure.update_layout(title="Drift statistics per day (dashed: warn threshold)", template="plotly_white",
                         showlegend=False, height=200 * len(LOG_METRICS))
    return figure


def psi_figure(predictions: dict, threshold: float):
    import plotly.graph_objects as go

    figure = go.Figure()
    for segment in SEGMENTS:
        psi = predictions.get(segment, {}).get("psi")
        if psi:
            figure.add_bar(x=list(psi), y=list(psi.values()), name=f"requests with {segment}")
    figure.add_hline(y=threshold, line_dash="dash", line_color="#d62728", annotation_text="warn")
    figure.update_layout(title="Prediction distribution shift per pattern (PSI)", barmode="group",
                         template="plotly_white", yaxis_title="PSI")
    return figure


def metrics_figure(metrics: dict):
    """Each metric as a share of its threshold (1 = the warn level)."""
    import plotly.graph_objects as go

    names = [n for n, m in metrics.items() if isinstance(m.get("value"), (int, float)) and m.get("threshold")]
    ratios = [metrics[n]["value"] / metrics[n]["threshold"] for n in names]
    figure = go.Figure(go.Bar(x=names, y=ratios, marker_color=["#d62728" if metrics[n]["breached"] else "#2a7ab9"
                                                               for n in names]))
    figure.add_hline(y=1.0, line_dash="dash", line_color="#d62728", annotation_text="warn")
    figure.update_layout(title="Drift statistics against their thresholds", template="plotly_white",
                         yaxis_title="value / threshold")
    return figure

