"""Calibration of pattern scores: temperature scaling of the softmax over the pattern set and per-pattern Platt
scaling of the multi-label probabilities, both fitted on the validation split; plus the measures that judge them
(ECE, Brier score, reliability bins, recall at a precision floor).

The fitted calibrator is a few numbers per pattern, stored as JSON and loaded by the service.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression

ECE_BINS = 15
CALIBRATOR_FORMAT = "candle-vlm/calibrator-1"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _check(scores: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"{name}: scores {scores.shape} and labels {labels.shape} must be the same (n, classes) shape")
    if not np.isfinite(scores).all():
        row = int(np.argwhere(~np.isfinite(scores))[0][0])
        raise ValueError(f"{name}: row {row} has a non-finite score")
    return scores, labels


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimizing the validation NLL of softmax(logits / T); a window showing several classes
    spreads its target evenly over them, windows showing none of the classes are left out."""
    logits, labels = _check(logits, labels, "temperature scaling")
    keep = labels.any(axis=1)
    if not keep.any():
        raise ValueError("temperature scaling: no validation window shows any of the classes")
    logits, targets = logits[keep], labels[keep] / labels[keep].sum(axis=1, keepdims=True)

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-(targets * log_p).sum(axis=1).mean())

    return float(math.exp(minimize_scalar(nll, bounds=(-6.0, 6.0), method="bounded").x))


def fit_platt(scores: np.ndarray, positives: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of a logistic fit of one pattern's labels on its score. A pattern without both classes
    in validation gets the smoothed base rate (slope 0): there is nothing to fit, and no reason to trust the score."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    if positives.all() or not positives.any():
        rate = (positives.sum() + 0.5) / (positives.size + 1.0)
        return 0.0, float(math.log(rate / (1 - rate)))
    model = LogisticRegression(C=1e4, max_iter=1000).fit(scores.reshape(-1, 1), positives)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


@dataclass(frozen=True)
class Calibrator:
    """Per-pattern Platt scaling of scores and one softmax temperature, over a fixed class list."""

    classes: tuple[str, ...]
    temperature: float
    platt: dict[str, tuple[float, float]]

    def __post_init__(self):
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        missing = [c for c in self.classes if c not in self.platt]
        if missing:
            raise ValueError(f"no Platt parameters for class(es) {missing}")

    def _columns(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[1] != len(self.classes):
            raise ValueError(f"scores must be (n, {len(self.classes)}) in the order {list(self.classes)}, got {scores.shape}")
        return scores

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated per-pattern probabilities (multi-label)."""
        scores = self._columns(scores)
        slope = np.array([self.platt[c][0] for c in self.classes])
        intercept = np.array([self.platt[c][1] for c in self.classes])
        return 1.0 / (1.0 + np.exp(-(scores * slope + intercept)))

    def softmax(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated distribution over the classes."""
        return softmax(self._columns(logits) / self.temperature)

    def to_dict(self) -> dict:
        return {"format": CALIBRATOR_FORMAT, "classes": list(self.classes), "temperature": self.temperature,
                "platt": {c: {"slope": self.platt[c][0], "intercept": self.platt[c][1]} for c in self.classes}}

    @classmethod
    def from_dict(cls, data: dict) -> Calibrator:
        if data.get("format") != CALIBRATOR_FORMAT:
            raise ValueError(f"not a calibrator file: format {data.get('format')!r}, expected {CALIBRATOR_FORMAT!r}")
        try:
            platt = {c: (float(p["slope"]), float(p["intercept"])) for c, p in data["platt"].items()}
            return cls(tuple(data["classes"]), float(data["temperature"]), platt)
        except (KeyError, TypeError) as error:
            raise ValueError(f"calibrator file is missing field {error}") from None

    def version(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fit(scores: np.ndarray, logits: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> Calibrator:
    """Fit on validation: Platt per class on `scores`, one temperature on `logits` (same columns as `classes`)."""
    scores, labels = _check(scores, labels, "Platt scaling")
    if scores.shape[1] != len(classes):
        raise ValueError(f"{scores.shape[1]} score columns for {len(classes)} classes")
    platt = {c: fit_platt(scores[:, j], labels[:, j]) for j, c in enumerate(classes)}
    return Calibrator(tuple(classes), fit_temperature(logits, labels), platt)


# ---- measures ----------------------------------------------------------------------------------------------

def reliability(probabilities: np.ndarray, outcomes: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Equal-width confidence bins: mean predicted probability, observed frequency and count per non-empty bin."""
    p, y = np.ravel(probabilities).astype(np.float64), np.ravel(outcomes).astype(np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    rows = [{"bin": b, "low": b / bins, "high": (b + 1) / bins, "confidence": p[index == b].mean(),
             "frequency": y[index == b].mean(), "count": int((index == b).sum())}
            for b in range(bins) if (index == b).any()]
    return pd.DataFrame(rows, columns=["bin", "low", "high", "confidence", "frequency", "count"])


def expected_calibration_error(probabilities: np.ndarray, outcomes: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over every (window, pattern) probability: the count-weighted gap between confidence and frequency."""
    table = reliability(probabilities, outcomes, bins)
    total = table["count"].sum()
    return float((table["count"] * (table["confidence"] - table["frequency"]).abs()).sum() / total) if total else 0.0


def top_label_ece(distribution: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the softmax's top class: its probability against whether the window shows that class."""
    top = distribution.argmax(axis=1)
    rows = np.arange(len(top))
    return expected_calibration_error(distribution[rows, top], np.asarray(labels, dtype=bool)[rows, top], bins)


def brier_score(probabilities: np.ndarray, outcomes: np.ndarray) -> float:
    return float(np.mean((np.asarray(probabilities, dtype=np.float64) - np.asarray(outcomes, dtype=np.float64)) ** 2))


def precision_threshold(scores: np.ndarray, positives: np.ndarray, min_precision: float) -> float:
    """The lowest threshold whose precision (score >= threshold) reaches `min_precision`; inf when none does."""
    scores, positives = np.ravel(scores), np.ravel(positives).astype(bool)
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(positives[order])
    precision = hits / np.arange(1, len(order) + 1)
    # A threshold must take every window with an equal score: only the last of a run of ties is a cut point.
    last_of_tie = np.r_[scores[order][1:] != scores[order][:-1], True]
    ok = np.flatnonzero((precision >= min_precision) & last_of_tie & (hits > 0))
    return float(scores[order][ok[-1]]) if ok.size else math.inf


def recall_at(scores: np.ndarray, positives: np.ndarray, threshold: float) -> float:
    positives = np.asarray(positives, dtype=bool)
    return float((np.asarray(scores)[positives] >= threshold).mean()) if positives.any() else math.nan


# ---- before / after ----------------------------------------------------------------------------------------

@dataclass
class CalibrationReport:
    summary: dict
    per_class: pd.DataFrame  # test recall at the precision floor, uncalibrated global vs calibrated per-class thresholds
    reliability_before: pd.DataFrame
    reliability_after: pd.DataFrame


def evaluate(calibrator: Calibrator, logit_scale: float, val_scores: np.ndarray, val_labels: np.ndarray,
             test_scores: np.ndarray, test_labels: np.ndarray, min_precision: float = 0.9,
             report_classes: tuple[str, ...] | None = None) -> CalibrationReport:
    """Test-split measures before and after calibration; every threshold is chosen on validation.

    "Before" is the model's own probability, softmax(logit_scale * score) over the classes, the CLIP reading;
    "after" is the Platt probability per class (ECE, Brier) and the tempered softmax (top-label ECE). The recall
    lift compares recall at `min_precision` with per-class thresholds on calibrated probabilities against one
    global threshold on the uncalibrated ones (pooled over `report_classes`, default all)."""
    val_scores, val_labels = _check(val_scores, val_labels, "validation")
    test_scores, test_labels = _check(test_scores, test_labels, "test")
    classes = calibrator.classes
    report_classes = report_classes or classes
    cols = [classes.index(c) for c in report_classes]
    raw = {"val": softmax(logit_scale * val_scores), "test": softmax(logit_scale * test_scores)}
    cal = {"val": calibrator.probabilities(val_scores), "test": calibrator.probabilities(test_scores)}
    global_cut = precision_threshold(raw["val"][:, cols], val_labels[:, cols], min_precision)
    rows = []
    for j, name in zip(cols, report_classes):
        cut = precision_threshold(cal["val"][:, j], val_labels[:, j], min_precision)
        rows.append({"class": name, "support": int(test_labels[:, j].sum()),
                     "recall_uncalibrated_global": recall_at(raw["test"][:, j], test_labels[:, j], global_cut),
                     "recall_calibrated": recall_at(cal["test"][:, j], test_labels[:, j], cut),
                     "threshold_calibrated": cut})
    per_class = pd.DataFrame(rows).set_index("class")
    before = float(per_class["recall_uncalibrated_global"].mean())
    after = float(per_class["recall_calibrated"].mean())
    summary = {
        "ece_before": expected_calibration_error(raw["test"], test_labels),
        "ece_after": expected_calibration_error(cal["test"], test_labels),
        "brier_before": brier_score(raw["test"], test_labels),
        "brier_after": brier_score(cal["test"], test_labels),
        "top_label_ece_before": top_label_ece(raw["test"], test_labels),
        "top_label_ece_after": top_label_ece(calibrator.softmax(logit_scale * test_scores), test_labels),
        "temperature": calibrator.temperature,
        "min_precision": min_precision,
        "global_threshold_uncalibrated": global_cut,
        "recall_at_precision_before": before,
        "recall_at_precision_after": after,
        "recall_lift": after - before,
    }
    return CalibrationReport(summary, per_class, reliability(raw["test"], test_labels), reliability(cal["test"], test_labels))


def reliability_figure(before: pd.DataFrame, after: pd.DataFrame, title: str):
    """Reliability diagram: observed frequency against mean confidence per bin, before and after."""
    import plotly.graph_objects as go

    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dash", color="gray")))
    for name, table in (("before", before), ("after", after)):
        figure.add_trace(go.Scatter(x=table["confidence"], y=table["frequency"], mode="lines+markers", name=name,
                                    text=[f"n={n}" for n in table["count"]]))
    figure.update_layout(title=title, xaxis_title="mean predicted probability", yaxis_title="observed frequency",
                         xaxis_range=[0, 1], yaxis_range=[0, 1])
    return figure
