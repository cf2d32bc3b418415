"""The model and fusion assets materialized for real (tiny market, a few training steps) and checked end to end."""

import json

import numpy as np
import pandas as pd
import pytest

from vlm_assets import evaluation as ev
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets import baselines
from vlm_assets.calibration import Calibrator
from vlm_assets.features import FeatureModel, feature_frame
from vlm_assets.fusion import load_fuser
from vlm_assets.pipeline.artifacts import load_bars
from vlm_assets.pipeline.fusion import CALIBRATED_CLASSES, FUSION_ASSETS
from vlm_assets.pipeline.model import CHECKPOINT, MODEL_ASSETS, load_model_asset
from vlm_assets.prompts import load_prompt_library
from vlm_assets.storage import ArtifactStore
from vlm_assets.zero_shot import PromptEmbeddings, embed_images
from bench.common import check_outcomes
from tests.conftest import run_model_pipeline

MODEL_NAMES = [a.key.to_user_string() for a in MODEL_ASSETS + FUSION_ASSETS]


@pytest.fixture(scope="module")
def run(model_run):
    return model_run


def test_model_assets_materialize_with_checkpoints_and_metadata(run):
    root, result = run
    assert result.success
    store = ArtifactStore(root)
    for name in MODEL_NAMES:
        assert store.current_version(name)
    for name in ("chart_clip_pretrained", "chart_clip_finetuned"):
        version = store.current_version(name)
        sidecar = store.read_json(f"{name}/{version}/{CHECKPOINT}.json")
        assert sidecar["format"] == "candle-vlm/chartclip-1"
        assert sidecar["dataset_version"] == store.current_version("vlm_dataset")
        assert sidecar["training"]["images_seen"] == 3 * 8 and "seconds" not in sidecar["training"]
        history = store.read_parquet(f"{name}/{version}/history.parquet")
        assert list(history["step"]) == [1, 2, 3] and np.isfinite(history["loss"]).all()
    finetuned = store.read_json(f"chart_clip_finetuned/{store.current_version('chart_clip_finetuned')}/{CHECKPOINT}.json")
    assert finetuned["prompt_library"] == load_prompt_library().tag
    assert {"multilabel", "contrastive", "anatomy"} <= set(
        store.read_parquet(f"chart_clip_finetuned/{store.current_version('chart_clip_finetuned')}/history.parquet").columns)
    materialized = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    for name in ("chart_clip_pretrained", "chart_clip_finetuned"):
        assert materialized[name]["training_curves"].value.startswith("![")
    evaluation_meta = materialized["model_evaluation"]
    assert {"baseline_vs_finetuned", "confusion_matrix", "detection_test", "zero_shot_test", "recall_lift"} <= set(evaluation_meta)


def test_integrity_checks_pass(run):
    _, result = run
    checks = check_outcomes(result)
    assert {"checkpoint_round_trip", "metrics_from_test_split", "acceptance_kpis", "prompt_regression_suite"} <= set(checks)
    assert checks["checkpoint_round_trip"] and checks["metrics_from_test_split"], checks


def test_metrics_are_recomputed_from_the_models_test_predictions(run):
    """Re-score the test split with the stored checkpoint, prompt selection and thresholds: same report."""
    root, _ = run
    store = ArtifactStore(root)
    report = store.read_json(f"model_evaluation/{store.current_version('model_evaluation')}/evaluation.json")
    clip, _, _ = load_model_asset(store, "chart_clip_finetuned", "cpu")
    windows = store.read_parquet(f"vlm_dataset/{store.current_version('vlm_dataset')}/windows.parquet")
    test = windows[windows["split"] == "test"].reset_index(drop=True)
    images = embed_images(clip, test["png"].tolist())
    library = load_prompt_library()
    prompts = PromptEmbeddings.of(clip, library)
    ensemble = prompts.ensemble(prompts.selection_of(report["prompt_selection"]))
    core_index = [library.class_names.index(c) for c in CORE_PATTERNS]
    thresholds = {c: float(v) for c, v in report["thresholds"].items()}
    predicted = ev.apply_thresholds(images @ ensemble[core_index].T, thresholds, CORE_PATTERNS)
    recomputed = ev.multilabel_report(test[list(CORE_PATTERNS)].to_numpy(bool), predicted, CORE_PATTERNS)
    stored = pd.DataFrame(report["detection"]).T.loc[list(CORE_PATTERNS)]
    for column in ("support", "predicted", "tp"):
        assert stored[column].astype(int).tolist() == recomputed.loc[list(CORE_PATTERNS), column].astype(int).tolist()
    summary = report["summary"]
    assert summary["recall_lift"] == pytest.approx(summary["core_macro_recall"] - summary["baseline_core_macro_recall"])
    assert json.loads(json.dumps(report)) == report


def test_same_config_and_seed_give_identical_checkpoints_and_metrics(run, tmp_path):
    root, _ = run
    again = run_model_pipeline(tmp_path)
    assert again.success
    first, second = ArtifactStore(root), ArtifactStore(tmp_path)
    for name in MODEL_NAMES:
        assert first.current_version(name) == second.current_version(name), name
    version = first.current_version("chart_clip_finetuned")
    assert first.read_bytes(f"chart_clip_finetuned/{version}/{CHECKPOINT}") == \
        second.read_bytes(f"chart_clip_finetuned/{version}/{CHECKPOINT}")


def test_calibrator_is_stored_loads_and_reports_before_and_after(run):
    root, result = run
    store = ArtifactStore(root)
    version = store.current_version("calibrator")
    fitted = Calibrator.from_dict(store.read_json(f"calibrator/{version}/calibrator.json"))
    assert fitted.classes == CALIBRATED_CLASSES and fitted.temperature > 0
    report = store.read_json(f"calibrator/{version}/report.json")
    summary = report["summary"]
    assert summary["recall_lift"] == pytest.approx(summary["recall_at_precision_after"] - summary["recall_at_precision_before"])
    windows = store.read_parquet(f"vlm_dataset/{store.current_version('vlm_dataset')}/windows.parquet", columns=["split", *CORE_PATTERNS])
    n_test = int((windows["split"] == "test").sum())
    assert sum(row["count"] for row in report["reliability_after"]) == n_test * len(CALIBRATED_CLASSES)
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert meta["calibrator"]["reliability_diagram"].value.startswith("![")
    checks = check_outcomes(result)
    assert checks["calibrator_loads"] and "calibration_kpis" in checks


def test_feature_model_metrics_are_recomputed_from_its_predictions(run):
    root, result = run
    store = ArtifactStore(root)
    version = store.current_version("feature_model")
    model = FeatureModel.from_json(store.read_bytes(f"feature_model/{version}/feature_model.json").decode())
    report = store.read_json(f"feature_model/{version}/evaluation.json")
    windows = store.read_parquet(f"vlm_dataset/{store.current_version('vlm_dataset')}/windows.parquet",
                                 columns=["symbol", "timeframe", "pos", "n_bars", "split", *CORE_PATTERNS])
    test = windows[windows["split"] == "test"]
    scores = model.predict(feature_frame(test, load_bars(store)))
    thresholds = {c: float(v) for c, v in report["thresholds"].items()}
    recomputed = ev.multilabel_report(test[list(CORE_PATTERNS)].to_numpy(bool),
                                      ev.apply_thresholds(scores, thresholds, CORE_PATTERNS), CORE_PATTERNS)
    for pattern in CORE_PATTERNS:
        assert int(report["detection"][pattern]["tp"]) == int(recomputed.loc[pattern, "tp"])
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert {"feature_importance", "importance_plot", "detection_test"} <= set(meta["feature_model"])


def test_resnet_baseline_round_trips_and_its_metrics_come_from_its_predictions(run):
    root, result = run
    store = ArtifactStore(root)
    version = store.current_version("resnet_baseline")
    baseline, sidecar = baselines.from_bytes(store.read_bytes(f"resnet_baseline/{version}/{CHECKPOINT}"),
                                             store.read_bytes(f"resnet_baseline/{version}/{CHECKPOINT}.json"))
    assert sidecar["arch"] == "resnet18" and baseline.classes == CORE_PATTERNS
    assert sidecar["training"]["images_seen"] == 3 * 8
    weights, _ = baselines.checkpoint_bytes(baseline, sidecar)
    assert weights == store.read_bytes(f"resnet_baseline/{version}/{CHECKPOINT}")
    windows = store.read_parquet(f"vlm_dataset/{store.current_version('vlm_dataset')}/windows.parquet",
                                 columns=["split", "png", *CORE_PATTERNS])
    test = windows[windows["split"] == "test"]
    probabilities, features = baseline.predict(test["png"].tolist())
    assert probabilities.shape == (len(test), len(CORE_PATTERNS)) and features.shape == (len(test), 512)
    report = store.read_json(f"resnet_baseline/{version}/evaluation.json")
    thresholds = {c: float(v) for c, v in report["thresholds"].items()}
    recomputed = ev.multilabel_report(test[list(CORE_PATTERNS)].to_numpy(bool),
                                      ev.apply_thresholds(probabilities, thresholds, CORE_PATTERNS), CORE_PATTERNS)
    for pattern in CORE_PATTERNS:
        assert int(report["detection"][pattern]["predicted"]) == int(recomputed.loc[pattern, "predicted"])
    with pytest.raises(ValueError, match="not a ResNet baseline"):
        baselines.from_bytes(store.read_bytes(f"resnet_baseline/{version}/{CHECKPOINT}"), b'{"format": "other"}')


def test_fuser_falls_back_to_late_fusion_and_says_why(run):
    root, result = run
    store = ArtifactStore(root)
    version = store.current_version("fuser")
    files = {n: store.read_bytes(f"fuser/{version}/{n}") for n in ("fuser.json", "learned.safetensors", "report.json")}
    fuser = load_fuser(files)
    assert fuser.active == "late" and fuser.learned is not None  # trained, considered, rejected
    assert "exceeds the bound" in fuser.reason or "does not beat" in fuser.reason
    assert set(fuser.late.weights) == {"vlm", "resnet", "features", "vlm+resnet", "vlm+features", "resnet+features",
                                       "vlm+resnet+features"}
    assert all(sum(w.values()) == pytest.approx(1.0) for w in fuser.late.weights.values())
    assert set(fuser.calibrators) == {"resnet", "features"}
    report = json.loads(files["report.json"])
    models = {row["model"] for row in report["test"]}
    assert {"vlm", "resnet", "features", "late fusion", "late fusion, image only (no bars)", "learned fusion"} <= models
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert meta["fuser"]["active"].value == "late" and meta["fuser"]["reason"].value == fuser.reason
    checks = check_outcomes(result)
    assert checks["fuser_loads"] and "fusion_beats_single_models" in checks


def test_finetune_ablation_bench_trains_from_the_stored_model_and_writes_nothing(run):
    import argparse

    from bench import finetune as finetune_bench

    root, _ = run
    before = sorted(str(p) for p in root.rglob("*") if p.is_file())
    args = argparse.Namespace(root=root, steps=2, batch_size=6, lr=None, device="cpu", contrastive_weight=0.0,
                              multilabel_weight=None, anatomy_weight=None, margin_weight=None, hard_negative_share=0.5,
                              logit_speed=None, pretrain_steps=None, text_whitening=None, caption_pool=None)
    report = finetune_bench.run(args)
    store = ArtifactStore(root)
    assert report["pretrained_version"] == store.current_version("chart_clip_pretrained") and "pretrained" not in report
    assert (report["steps"], report["batch_size"]) == (2, 6)
    assert report["contrastive_weight"] == 0.0 and report["hard_negative_share"] == 0.5
    assert report["anatomy_weight"] == 0.5 and report["logit_speed"] == 20.0  # unset: FinetuneConfig's defaults
    assert 0.0 <= report["val_mean_ap"] <= 1.0 and "core_macro_f1" in report["test"] and report["pattern_logit_scale"] > 0
    assert "contrastive" not in report["final_losses"] or report["final_losses"]["contrastive"] == 0.0
    assert sorted(str(p) for p in root.rglob("*") if p.is_file()) == before


def test_finetune_ablation_bench_can_pretrain_afresh_with_its_own_settings(run):
    import argparse

    from bench import finetune as finetune_bench

    root, _ = run
    before = sorted(str(p) for p in root.rglob("*") if p.is_file())
    args = argparse.Namespace(root=root, steps=1, batch_size=6, lr=None, device="cpu", contrastive_weight=None,
                              multilabel_weight=None, anatomy_weight=None, margin_weight=None, hard_negative_share=None,
                              logit_speed=None, pretrain_steps=2, text_whitening="1.5", caption_pool=32)
    report = finetune_bench.run(args)
    pretrained = report["pretrained"]
    assert report["pretrained_version"] == "fresh (this run)" and pretrained["steps"] == 2
    # 32 windows' captions are too few to whiten 256 directions: the run says so instead of whitening noise
    assert pretrained["text_whitening"].startswith("off: ") and "256 directions" in pretrained["text_whitening"]
    assert 0.0 <= pretrained["val_mean_ap"] <= 1.0 and "core_macro_f1" in pretrained["test"]
    assert report["steps"] == 1 and 0.0 <= report["val_mean_ap"] <= 1.0
    assert sorted(str(p) for p in root.rglob("*") if p.is_file()) == before
    assert finetune_bench.whitening("off") is None and finetune_bench.whitening("4") == 4.0


def test_learnability_probe_scores_the_issue_floors_on_the_test_split(run):
    import argparse

    from bench import learnability

    root, _ = run
    dataset_dir = root / "vlm_dataset" / ArtifactStore(root).current_version("vlm_dataset")
    windows = pd.read_parquet(dataset_dir / "windows.parquet")
    args = argparse.Namespace(root=root, tower="hybrid", steps=2, batch_size=6, lr=1e-3, style_share=1.0,
                              eval_every=1, seed=0, margin_weight=0.0)
    report = learnability.run(args)
    assert [row["step"] for row in report["curve"]] == [1, 2]
    floors = report["test_floors"]
    assert floors["test_charts"] == int((windows["split"] == "test").sum()) > 0
    assert floors["min_recall_pattern"] in CORE_PATTERNS
    assert 0 <= floors["neutral_predicted"] <= floors["test_charts"]
    assert 0.0 <= floors["min_recall"] <= floors["macro_recall"] <= 1.0 and 0.0 <= floors["macro_precision"] <= 1.0
