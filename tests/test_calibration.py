import json
import math

import numpy as np
import pytest

from vlm_assets import calibration as cal


def _overconfident(rng, n=4000, classes=3):
    """Scores whose true probability is sigmoid(score / 4): a model 4x overconfident on the logit scale."""
    scores = rng.normal(0, 4, size=(n, classes))
    labels = rng.random((n, classes)) < 1 / (1 + np.exp(-scores / 4))
    return scores, labels


def test_platt_scaling_recovers_the_true_probabilities_and_lowers_ece():
    rng = np.random.default_rng(0)
    val_scores, val_labels = _overconfident(rng)
    test_scores, test_labels = _overconfident(rng)
    calibrator = cal.fit(val_scores, val_scores, val_labels, ("a", "b", "c"))
    for slope, _ in calibrator.platt.values():
        assert slope == pytest.approx(0.25, abs=0.03)
    raw = 1 / (1 + np.exp(-test_scores))
    calibrated = calibrator.probabilities(test_scores)
    before, after = cal.expected_calibration_error(raw, test_labels), cal.expected_calibration_error(calibrated, test_labels)
    assert after < 0.03 < before
    assert cal.brier_score(calibrated, test_labels) < cal.brier_score(raw, test_labels)


def test_temperature_scaling_undoes_a_known_sharpening():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 1.5, size=(6000, 4))
    p = cal.softmax(true_logits)
    picks = np.array([rng.choice(4, p=row) for row in p])
    labels = np.eye(4, dtype=bool)[picks]
    assert cal.fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)


def test_calibrator_round_trips_through_json_and_rejects_bad_files():
    calibrator = cal.Calibrator(("hammer", "doji"), 1.7, {"hammer": (2.0, -1.0), "doji": (0.5, 0.25)})
    again = cal.Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    assert again == calibrator and again.version() == calibrator.version()
    scores = np.array([[0.1, 0.9], [0.4, -0.2]])
    assert np.array_equal(again.probabilities(scores), calibrator.probabilities(scores))
    with pytest.raises(ValueError, match="format"):
        cal.Calibrator.from_dict({"classes": []})
    with pytest.raises(ValueError, match="no Platt parameters"):
        cal.Calibrator(("hammer",), 1.0, {})
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        calibrator.probabilities(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="row 1"):
        cal.fit(np.array([[0.0], [math.nan]]), np.zeros((2, 1)), np.array([[True], [False]]), ("hammer",))


def test_a_class_without_both_outcomes_gets_its_smoothed_base_rate():
    slope, intercept = cal.fit_platt(np.array([0.1, 0.5, 0.9]), np.array([False, False, False]))
    assert slope == 0.0 and 1 / (1 + math.exp(-intercept)) == pytest.approx(0.5 / 4)


def test_precision_threshold_takes_whole_ties_and_reports_unreachable_floors():
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.1])
    positives = np.array([True, True, False, True, False])
    # Cutting between the two 0.8s is impossible: 0.8 gives precision 2/3, 0.9 gives 1.
    assert cal.precision_threshold(scores, positives, 0.9) == 0.9
    assert cal.precision_threshold(scores, positives, 0.7) == 0.7
    assert cal.precision_threshold(scores, np.zeros(5, bool), 0.5) == math.inf
    assert cal.recall_at(scores, positives, 0.8) == pytest.approx(2 / 3)


def test_reliability_bins_and_top_label_ece():
    table = cal.reliability(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0, 0, 1, 0]))
    assert table["count"].tolist() == [2, 2] and table["frequency"].tolist() == [0.0, 0.5]
    assert cal.expected_calibration_error(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0, 0, 1, 0])) == pytest.approx(
        0.5 * 0.05 + 0.5 * 0.45)
    dist = np.array([[0.8, 0.2], [0.6, 0.4]])
    assert cal.top_label_ece(dist, np.array([[True, False], [False, True]])) == pytest.approx(0.5 * 0.2 + 0.5 * 0.6)


def test_evaluate_reports_before_and_after_with_thresholds_from_validation():
    rng = np.random.default_rng(4)
    classes = ("a", "b", "c")

    def split(n):  # multi-label: each class shows independently
        labels = rng.random((n, 3)) < 0.2
        scores = 0.1 * rng.normal(size=(n, 3)) + 0.25 * labels  # cosine-like scores, informative but squashed
        return scores, labels

    val_scores, val_labels = split(3000)
    test_scores, test_labels = split(3000)
    calibrator = cal.fit(val_scores, 100 * val_scores, val_labels, classes)
    report = cal.evaluate(calibrator, 100.0, val_scores, val_labels, test_scores, test_labels)
    s = report.summary
    assert s["ece_after"] < s["ece_before"] and s["ece_after"] < 0.03
    assert s["brier_after"] < s["brier_before"]
    assert s["recall_lift"] == pytest.approx(s["recall_at_precision_after"] - s["recall_at_precision_before"])
    assert list(report.per_class.index) == list(classes) and report.per_class["support"].sum() == test_labels.sum()
    assert report.reliability_before["count"].sum() == report.reliability_after["count"].sum() == 9000
