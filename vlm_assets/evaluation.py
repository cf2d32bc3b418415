"""Metrics for the pattern detector and zero-shot scoring: thresholds, per-class reports, confusion, figures.

Pure functions over prediction arrays (numpy and pandas; plotly is imported inside the figure functions), so
evaluation runs and is tested without torch, Dagster or BentoML.

Conventions: ``y_true`` / ``y_pred`` are bool arrays (n_samples, n_classes) and multi-label (a chart can show
several patterns, or none); ``scores`` is a float array of the same shape; ``classes`` names the columns. A class
is predicted when its score is >= its threshold. Undefined ratios are NaN: precision when nothing was predicted,
recall when the class has no support, F1 only when both are undefined (otherwise 2·tp / (support + predicted)).
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import plotly.graph_objects as go

SUMMARY_ROWS = ("macro", "micro")
RATIOS = ("precision", "recall", "f1")


# ---------------------------------------------------------------- validation
def _class_names(classes: Sequence[str], argument: str = "classes") -> list[str]:
    if isinstance(classes, str):  # a lone string would otherwise read as one class per character
        raise ValueError(f"{argument} must be a sequence of class names, not a single string")
    names = list(classes)
    if not names:
        raise ValueError(f"{argument} is empty")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ValueError(f"{argument}[{i}] is {name!r}; class names must be strings")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"{argument} has duplicate names {duplicates}")
    reserved = [name for name in names if name in SUMMARY_ROWS]
    if reserved:
        raise ValueError(f"{argument} may not contain {reserved}: reports use those names for their summary rows")
    return names


def _matrix(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_classes), got shape {array.shape}")
    if array.shape[1] == 0:
        raise ValueError(f"{name} has no columns")
    return array


def _labels(name: str, values, classes: list[str] | None = None) -> np.ndarray:
    array = _matrix(name, values)
    if array.dtype.kind in "iu":  # 0/1 integers are unambiguous labels; anything else is a mix-up
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1 integers), got {array.dtype} values other than 0 and 1")
        array = array.astype(bool)
    if array.dtype != bool:
        raise ValueError(f"{name} must be boolean (or 0/1 integers), got dtype {array.dtype}")
    if classes is not None:
        _check_columns(name, array, classes)
    return array


def _scores(name: str, values, classes: list[str] | None = None) -> np.ndarray:
    array = _matrix(name, values)
    if array.dtype.kind not in "iuf":  # bools here are usually y_pred passed by mistake
        raise ValueError(f"{name} must be a numeric array of scores, got dtype {array.dtype}")
    array = array.astype(float)
    if classes is not None:
        _check_columns(name, array, classes)
    bad = ~np.isfinite(array)
    if bad.any():
        column = int(np.flatnonzero(bad.any(axis=0))[0])
        row = int(np.flatnonzero(bad[:, column])[0])
        what = "NaN" if np.isnan(array[row, column]) else "an infinite value"
        label = repr(classes[column]) if classes is not None else column
        raise ValueError(f"{name} contains {what} in column {label} (first at row {row})")
    return array


def _check_columns(name: str, array: np.ndarray, classes: list[str]) -> None:
    if array.shape[1] != len(classes):
        raise ValueError(f"{name} has {array.shape[1]} columns but classes has {len(classes)}")


def _check_rows(name: str, array: np.ndarray, reference_name: str, reference: np.ndarray) -> None:
    if len(array) != len(reference):
        raise ValueError(f"{name} has {len(array)} rows but {reference_name} has {len(reference)}")


def _check_same_shape(name: str, array: np.ndarray, reference_name: str, reference: np.ndarray) -> None:
    if array.shape != reference.shape:
        raise ValueError(f"{name} has shape {array.shape} but {reference_name} has shape {reference.shape}")


def _ratios(tp, predicted, support) -> dict[str, np.ndarray]:
    tp, predicted, support = (np.asarray(x, dtype=float) for x in (tp, predicted, support))
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 is the NaN we want; tp > 0 implies both > 0
        return {"precision": tp / predicted, "recall": tp / support, "f1": 2 * tp / (predicted + support)}


def _per_class(names: list[str], counts: dict[str, np.ndarray]) -> pd.DataFrame:
    frame = pd.DataFrame(counts, index=pd.Index(names, name="class"))
    return frame.assign(**_ratios(frame["tp"], frame["predicted"], frame["support"]))


def _macro_row(per_class: pd.DataFrame) -> pd.DataFrame:
    """Count columns hold totals; ratios are nan-aware means over the classes that occur (support > 0)."""
    counts = per_class.drop(columns=list(RATIOS)).sum()
    means = per_class.loc[per_class["support"] > 0, list(RATIOS)].mean()
    return pd.DataFrame([{**counts, **means}], index=["macro"])


# ---------------------------------------------------------------- thresholds
def best_f1_thresholds(y_true, scores, classes: Sequence[str], min_precision: float | None = None) -> dict[str, float]:
    """Per class, the score threshold (predict when score >= threshold) that maximizes F1 on this data.

    With ``min_precision``, the threshold with the highest recall among those whose precision reaches it, or the
    max-F1 threshold when none does. Ties go to the higher threshold (fewer predictions). A class without
    positives gets +inf: it is never predicted. Choose thresholds on validation data and apply them to test.
    """
    names = _class_names(classes)
    truth = _labels("y_true", y_true, names)
    score = _scores("scores", scores, names)
    _check_rows("scores", score, "y_true", truth)
    if min_precision is not None and not 0.0 <= min_precision <= 1.0:
        raise ValueError(f"min_precision must be in [0, 1], got {min_precision}")
    return {name: _best_threshold(truth[:, j], score[:, j], min_precision) for j, name in enumerate(names)}


def _best_threshold(truth: np.ndarray, score: np.ndarray, min_precision: float | None) -> float:
    positives = int(truth.sum())
    if positives == 0:
        return math.inf
    order = np.argsort(-score, kind="stable")
    ranked = score[order]
    # One candidate per distinct score, highest first: "score >= candidate" takes all tied samples at once.
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]
    tp = np.cumsum(truth[order])[last_of_tie]
    predicted = last_of_tie + 1
    best = int(np.argmax(2 * tp / (predicted + positives)))  # first maximum = highest threshold
    if min_precision is not None:
        reaching = np.flatnonzero(tp / predicted >= min_precision)
        if reaching.size:  # the first of equal recalls predicts least, so it has the best precision
            best = int(reaching[np.argmax(tp[reaching])])
    return float(ranked[last_of_tie[best]])


def apply_thresholds(scores, thresholds: Mapping[str, float], classes: Sequence[str]) -> np.ndarray:
    """Bool predictions (n_samples, n_classes): score >= the class's threshold, the rule best_f1_thresholds uses."""
    names = _class_names(classes)
    score = _scores("scores", scores, names)
    missing = [name for name in names if name not in thresholds]
    if missing:
        raise ValueError(f"thresholds has no entry for {missing}")
    cut = np.array([thresholds[name] for name in names], dtype=float)
    if np.isnan(cut).any():
        raise ValueError(f"thresholds is NaN for {[n for n, c in zip(names, cut) if np.isnan(c)]}")
    return score >= cut


# ---------------------------------------------------------------- reports
def detection_on_test(val_truth, val_scores, test_truth, test_scores, classes: Sequence[str]) -> tuple[dict, pd.DataFrame, dict]:
    """The detection protocol: max-F1 thresholds chosen on validation, applied to test. Returns the thresholds, the
    test multi-label report and the test "no pattern" report."""
    thresholds = best_f1_thresholds(val_truth, val_scores, classes)
    predicted = apply_thresholds(test_scores, thresholds, classes)
    return thresholds, multilabel_report(test_truth, predicted, classes), neutral_report(test_truth, predicted)


def multilabel_report(y_true, y_pred, classes: Sequence[str]) -> pd.DataFrame:
    """One row per class (support, predicted, tp, fp, fn, precision, recall, f1), then ``macro`` and ``micro``.

    macro averages the ratios over the classes with support > 0, skipping NaN; micro pools the counts. The count
    columns of both summary rows are the totals over all classes.
    """
    names = _class_names(classes)
    truth = _labels("y_true", y_true, names)
    pred = _labels("y_pred", y_pred, names)
    _check_rows("y_pred", pred, "y_true", truth)
    per_class = _per_class(names, {
        "support": truth.sum(axis=0),
        "predicted": pred.sum(axis=0),
        "tp": (truth & pred).sum(axis=0),
        "fp": (~truth & pred).sum(axis=0),
        "fn": (truth & ~pred).sum(axis=0),
    })
    totals = per_class.drop(columns=list(RATIOS)).sum()
    pooled = {key: float(value) for key, value in _ratios(totals["tp"], totals["predicted"], totals["support"]).items()}
    micro = pd.DataFrame([{**totals, **pooled}], index=["micro"])
    return pd.concat([per_class, _macro_row(per_class), micro]).rename_axis("class")


def neutral_report(y_true, y_pred) -> dict:
    """Scores the "no pattern" decision: a sample is truly neutral when no class is true, predicted neutral when
    no class is predicted. Returns support, predicted, tp, precision, recall, f1."""
    truth = _labels("y_true", y_true)
    pred = _labels("y_pred", y_pred)
    _check_same_shape("y_pred", pred, "y_true", truth)
    truly, predicted = ~truth.any(axis=1), ~pred.any(axis=1)
    counts = {"support": int(truly.sum()), "predicted": int(predicted.sum()), "tp": int((truly & predicted).sum())}
    ratios = _ratios(counts["tp"], counts["predicted"], counts["support"])
    return counts | {key: float(value) for key, value in ratios.items()}


def top1_report(y_true, scores, classes: Sequence[str], report_classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Single-label scoring: each sample predicts its argmax over *all* classes (ties: first in ``classes``).

    The prediction is correct for class c when y_true[i, c], so a sample with several true classes is right
    for at most one of them. Rows for ``report_classes`` (default all): support, predicted, tp, precision,
    recall, f1, then a ``macro`` row (ratios averaged over report classes with support > 0, counts totalled).
    """
    names = _class_names(classes)
    truth = _labels("y_true", y_true, names)
    score = _scores("scores", scores, names)
    _check_rows("scores", score, "y_true", truth)
    report = names if report_classes is None else _class_names(report_classes, "report_classes")
    unknown = [name for name in report if name not in names]
    if unknown:
        raise ValueError(f"report_classes has {unknown}, which are not in classes")
    columns = [names.index(name) for name in report]
    top1 = np.eye(len(names), dtype=bool)[score.argmax(axis=1)]
    per_class = _per_class(report, {
        "support": truth.sum(axis=0)[columns],
        "predicted": top1.sum(axis=0)[columns],
        "tp": (truth & top1).sum(axis=0)[columns],
    })
    return pd.concat([per_class, _macro_row(per_class)]).rename_axis("class")


def success_rate(y_true, scores) -> float:
    """Share of samples with at least one true class whose top-1 class is one of them; NaN when there are none."""
    truth = _labels("y_true", y_true)
    score = _scores("scores", scores)
    _check_same_shape("scores", score, "y_true", truth)
    labelled = truth.any(axis=1)
    if not labelled.any():
        return math.nan
    hit = truth[np.arange(len(truth)), score.argmax(axis=1)]
    return float(hit[labelled].mean())


# ---------------------------------------------------------------- confusion
def confusion_matrix(y_true, predicted_index, classes: Sequence[str]) -> pd.DataFrame:
    """Counts with rows = true class, columns = predicted (top-1) class.

    A sample adds one count to the row of each of its true classes; samples with no true class are skipped
    (include a neutral column in y_true to count them).
    """
    names = _class_names(classes)
    truth = _labels("y_true", y_true, names)
    index = np.asarray(predicted_index)
    if index.ndim != 1:
        raise ValueError(f"predicted_index must be 1-D (n_samples,), got shape {index.shape}")
    if index.dtype.kind not in "iu":
        raise ValueError(f"predicted_index must hold integer class indices, got dtype {index.dtype}")
    _check_rows("predicted_index", index, "y_true", truth)
    outside = (index < 0) | (index >= len(names))
    if outside.any():
        row = int(np.argmax(outside))
        raise ValueError(f"predicted_index has {index[row]} at row {row}, outside 0..{len(names) - 1}")
    counts = truth.T.astype(np.int64) @ np.eye(len(names), dtype=np.int64)[index]
    return pd.DataFrame(counts, index=pd.Index(names, name="true"), columns=pd.Index(names, name="predicted"))


def row_normalized(matrix: pd.DataFrame) -> pd.DataFrame:
    """Each row divided by its sum (share of that true class's samples); rows without samples are NaN."""
    sums = matrix.sum(axis=1)
    return matrix.div(sums.where(sums != 0), axis=0)


# ---------------------------------------------------------------- tables and JSON
def side_by_side(reports: Mapping[str, pd.DataFrame], metrics: Sequence[str] = RATIOS) -> pd.DataFrame:
    """The rows all reports share (in the first report's order, incl. macro), with columns ``<model>_<metric>``
    grouped by metric, e.g. baseline_recall, finetuned_recall."""
    if not reports:
        raise ValueError("reports is empty")
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    for name, report in reports.items():
        missing = [metric for metric in metrics if metric not in report.columns]
        if missing:
            raise ValueError(f"reports[{name!r}] has no column {missing}")
    first = next(iter(reports.values()))
    shared = [row for row in first.index if all(row in report.index for report in reports.values())]
    if not shared:
        raise ValueError(f"reports {list(reports)} share no rows")
    columns = {f"{name}_{metric}": report.loc[shared, metric] for metric in metrics for name, report in reports.items()}
    return pd.DataFrame(columns, index=pd.Index(shared, name=first.index.name))


def to_jsonable(obj):
    """Plain JSON types for json.dumps(..., allow_nan=False): NaN/NA -> None, ±inf -> "inf"/"-inf" (float()
    reads them back), numpy scalars/arrays -> Python, dict keys -> str. A DataFrame becomes {row: {column: value}},
    or a list of records when its index is a plain RangeIndex."""
    if isinstance(obj, pd.DataFrame):
        if isinstance(obj.index, pd.RangeIndex):
            return to_jsonable(obj.to_dict(orient="records"))
        if not obj.index.is_unique:
            raise ValueError(f"to_jsonable needs a unique DataFrame index, got duplicates in {list(obj.index)}")
        return to_jsonable(obj.to_dict(orient="index"))
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (np.ndarray, list, tuple)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        return ("inf" if obj > 0 else "-inf") if math.isinf(obj) else obj
    if isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, datetime.date):  # also datetime and pd.Timestamp
        return obj.isoformat()
    raise TypeError(f"to_jsonable cannot convert {type(obj).__name__}")


# ---------------------------------------------------------------- figures
def _cell_text(value) -> str:
    if pd.isna(value):
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def confusion_figure(matrix: pd.DataFrame, title: str) -> go.Figure:
    """Heatmap of a confusion matrix, labelled with its values and coloured by row share, so rare true classes
    read as clearly as common ones (counts or an already normalized matrix both work)."""
    import plotly.graph_objects as go

    shares = row_normalized(matrix).to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(
        z=shares,
        x=[str(column) for column in matrix.columns],
        y=[str(row) for row in matrix.index],
        text=[[_cell_text(value) for value in row] for row in matrix.to_numpy()],
        texttemplate="%{text}",
        colorscale="Blues",
        zmin=0.0,
        zmax=1.0,
        colorbar=dict(title="row share"),
        hovertemplate="true %{y}<br>predicted %{x}<br>%{text} (%{z:.0%} of the row)<extra></extra>",
    ))
    fig.update_layout(title=title, template="plotly_white")
    fig.update_xaxes(title="predicted", tickangle=-45)
    fig.update_yaxes(title="true", autorange="reversed")  # first class on top, like the table
    return fig


def comparison_figure(frame: pd.DataFrame, metric: str, title: str) -> go.Figure:
    """Grouped bars per class (row), one bar per model: the ``<model>_<metric>`` columns of a side_by_side frame."""
    import plotly.graph_objects as go

    suffix = f"_{metric}"
    columns = [str(c) for c in frame.columns if str(c).endswith(suffix) and len(str(c)) > len(suffix)]
    if not columns:
        raise ValueError(f"frame has no '<model>{suffix}' column; columns are {list(frame.columns)}")
    x = [str(row) for row in frame.index]
    fig = go.Figure([go.Bar(name=column.removesuffix(suffix), x=x, y=frame[column]) for column in columns])
    fig.update_layout(title=title, barmode="group", template="plotly_white")
    fig.update_xaxes(title="class", tickangle=-45)
    fig.update_yaxes(title=metric)
    return fig


def curves_figure(history: pd.DataFrame, title: str) -> go.Figure:
    """Training curves: x = ``step``, one line per other numeric column; loss columns on the left axis and, when
    there are both kinds, the other metrics on a right axis."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    if "step" not in history.columns:
        raise ValueError(f"history has no 'step' column; columns are {list(history.columns)}")
    series = [column for column in history.select_dtypes("number").columns if column != "step"]
    if not series:
        raise ValueError("history has no numeric column besides 'step'")
    losses = [column for column in series if "loss" in str(column).lower()]
    two_axes = bool(losses) and len(losses) < len(series)
    fig = make_subplots(specs=[[{"secondary_y": two_axes}]])
    for column in series:
        points = history[["step", column]].dropna()  # evaluation columns are filled only every few steps
        sparse = len(points) < len(history)  # markers keep a lone evaluation point visible
        fig.add_trace(
            go.Scatter(x=points["step"], y=points[column], name=str(column), mode="lines+markers" if sparse else "lines"),
            secondary_y=two_axes and column not in losses,
        )
    fig.update_layout(title=title, template="plotly_white", hovermode="x unified",
                      legend=dict(orientation="h", x=0, y=1.02, yanchor="bottom"))  # clear of the right axis title
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss" if losses else "metric", secondary_y=False)
    if two_axes:
        fig.update_yaxes(title="metric", secondary_y=True)
    return fig
