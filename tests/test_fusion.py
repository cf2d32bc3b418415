import numpy as np
import pytest

from vlm_assets import fusion

CLASSES = ("a", "b")


def _world(rng, n):
    truth = rng.random((n, 2)) < 0.3
    strong = np.clip(0.45 * truth + 0.55 * rng.random((n, 2)), 0, 1)
    weak = np.clip(0.35 * truth + 0.65 * rng.random((n, 2)), 0, 1)
    return truth, strong, weak


def test_late_fusion_beats_each_source_and_degrades_to_the_sources_it_has():
    rng = np.random.default_rng(0)
    truth, strong, weak = _world(rng, 600)
    late, validation = fusion.fit_late_fusion({"vlm": strong, "features": weak}, truth, CLASSES)
    both = late.weights["vlm+features"]
    assert 0 < both["features"] < both["vlm"] and sum(both.values()) == pytest.approx(1.0)
    f1 = validation.set_index("available")["val_macro_f1"]
    assert f1["vlm+features"] >= max(f1["vlm"], f1["features"])
    assert set(late.thresholds) == set(late.weights) == {"vlm", "features", "vlm+features"}
    fused, predicted, used = late.predict({"vlm": strong, "features": weak})
    assert used == ["vlm", "features"] and predicted.shape == truth.shape
    assert np.allclose(fused, both["vlm"] * strong + both["features"] * weak)
    # An image-only request has no engineered features: the VLM alone, with its own thresholds.
    fused, predicted, used = late.predict({"vlm": strong, "features": None})
    assert used == ["vlm"] and np.allclose(fused, strong)
    assert np.array_equal(predicted, strong >= np.array([late.thresholds["vlm"][c] for c in CLASSES]))
    with pytest.raises(ValueError, match="no usable input"):
        late.predict({"vlm": None})
    again = fusion.LateFusion.from_dict(late.to_dict())
    assert np.array_equal(again.predict({"vlm": strong, "features": weak})[1],
                          late.predict({"vlm": strong, "features": weak})[1])


def test_a_source_joins_late_fusion_only_when_it_adds_the_minimum_gain():
    rng = np.random.default_rng(2)
    truth, strong, weak = _world(rng, 600)
    noise = rng.random(truth.shape)  # carries no signal: it may win a grid point by chance, never by min_gain
    late, validation = fusion.fit_late_fusion({"vlm": strong, "resnet": noise, "features": weak}, truth, CLASSES,
                                              min_gain=0.02)
    assert late.sources_for(["vlm", "resnet", "features"]) in (["vlm"], ["vlm", "features"])
    assert "resnet" not in late.sources_for(["vlm", "resnet"])  # the expensive model need not even run
    assert late.sources_for(["resnet"]) == ["resnet"]  # alone, it is all there is
    rows = validation.set_index("available")
    assert rows.loc["vlm+resnet+features", "val_macro_f1"] >= rows.loc["vlm", "val_macro_f1"]
    strict, _ = fusion.fit_late_fusion({"vlm": strong, "features": weak}, truth, CLASSES, min_gain=1.0)
    assert strict.sources_for(["vlm", "features"]) == ["vlm"]  # nothing can add a whole point of F1


def test_learned_fusion_trains_round_trips_and_the_choice_says_why():
    rng = np.random.default_rng(1)
    truth, good, _ = _world(rng, 800)
    good = np.clip(0.7 * truth + 0.3 * rng.random(truth.shape), 0, 1)

    def parts(t, g):
        n = len(t)
        features = np.concatenate([g, rng.normal(size=(n, 3))], axis=1)
        features[::7, 0] = np.nan  # missing engineered features are masked, not zero
        return {"vlm": rng.normal(size=(n, 4)), "resnet": rng.normal(size=(n, 5)), "features": features}

    train_x = fusion.fusion_inputs(parts(truth[:500], good[:500]))
    val_x = fusion.fusion_inputs(parts(truth[500:], good[500:]))
    assert train_x.shape[1] == 4 + 5 + 5 + 5 and np.isfinite(train_x).all()
    learned, stats = fusion.train_learned_fusion(train_x, truth[:500], val_x, truth[500:], CLASSES,
                                                 fusion.LearnedFusionConfig(epochs=30))
    assert stats["val_macro_f1"] > 0.7
    active, why = fusion.choose(0.5, stats, max_gap=1.0)
    assert active == "learned" and "beats" in why
    active, why = fusion.choose(0.99, stats, max_gap=1.0)
    assert active == "late" and "does not beat" in why
    active, why = fusion.choose(0.0, stats, max_gap=-1.0)
    assert active == "late" and "exceeds the bound" in why
    late, _ = fusion.fit_late_fusion({"features": good[500:]}, truth[500:], CLASSES)
    learned.thresholds["b"] = float("inf")  # a pattern never seen in validation is never predicted, and survives JSON
    platt = fusion.fit_source_calibrator(good[500:], truth[500:], CLASSES)
    stored = fusion.load_fuser(fusion.fuser_files(fusion.Fuser(active, why, late, learned, {"features": platt})))
    assert stored.active == "late" and stored.reason == why
    assert np.allclose(stored.learned.probabilities(val_x), learned.probabilities(val_x))
    assert stored.learned.thresholds == learned.thresholds
    assert np.allclose(stored.calibrated("features", good[:5]), platt.probabilities(fusion.logit(good[:5])))
    with pytest.raises(ValueError, match="needs every input"):
        fusion.fusion_inputs({"vlm": np.zeros((1, 4)), "resnet": None, "features": np.zeros((1, 5))})
