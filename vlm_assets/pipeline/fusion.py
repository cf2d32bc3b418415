"""Calibration and fusion assets (group `fusion`): calibrator, feature_model."""

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from vlm_assets import calibration as cal
from vlm_assets import evaluation as ev
from vlm_assets import features as feat
from vlm_assets.labeling import CORE_PATTERNS, NEUTRAL
from vlm_assets.pipeline import metadata as md
from vlm_assets.pipeline.artifacts import load_bars, read_frame, write_version
from vlm_assets.pipeline.data import ohlcv_bars, vlm_dataset
from vlm_assets.pipeline.model import embed_split, load_model_asset, model_evaluation
from vlm_assets.prompts import load_prompt_library
from vlm_assets.zero_shot import PromptEmbeddings
from vlm_resources import ArtifactStoreResource, ComputeResource

FUSION_GROUP = "fusion"
WINDOW_COLUMNS = ["window_id", "symbol", "timeframe", "pos", "n_bars", "split", *CORE_PATTERNS]


class FeatureModelConfig(Config):
    n_estimators: int = Field(default=feat.BoostingConfig.n_estimators, description="boosting rounds per pattern")
    learning_rate: float = feat.BoostingConfig.learning_rate
    num_leaves: int = feat.BoostingConfig.num_leaves
    min_child_samples: int = feat.BoostingConfig.min_child_samples
    seed: int = feat.BoostingConfig.seed

    def boosting(self) -> feat.BoostingConfig:
        return feat.BoostingConfig(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                                   num_leaves=self.num_leaves, min_child_samples=self.min_child_samples, seed=self.seed)


def dataset_features(artifacts) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The dataset's windows (without images) and their engineered features, row-aligned."""
    windows = read_frame(artifacts, "vlm_dataset", "windows.parquet", columns=WINDOW_COLUMNS)
    return windows, feat.feature_frame(windows, load_bars(artifacts))


def _importance_figure(importances: pd.DataFrame, top: int = 15) -> go.Figure:
    total = importances.sum(axis=1).sort_values(ascending=True).tail(top)
    share = total / max(float(importances.to_numpy().sum()), 1e-12)
    figure = go.Figure(go.Bar(x=share.to_numpy(), y=share.index.tolist(), orientation="h"))
    figure.update_layout(title=f"feature model: top {top} features by split gain (all patterns)",
                         xaxis_title="share of total gain", margin=dict(l=140, r=20, t=50, b=40))
    return figure


@asset(group_name=FUSION_GROUP, code_version="1", deps=[vlm_dataset, ohlcv_bars], kinds={"lightgbm"})
def feature_model(context: AssetExecutionContext, config: FeatureModelConfig, store: ArtifactStoreResource) -> MaterializeResult:
    """LightGBM per core pattern on engineered OHLCV features of each window (train split); thresholds chosen on
    validation, metrics on test."""
    artifacts = store.store()
    windows, features = dataset_features(artifacts)
    context.log.info(f"{len(features):,} windows x {features.shape[1]} features")
    split = {name: (windows["split"] == name).to_numpy() for name in ("train", "val", "test")}
    truth = windows[list(CORE_PATTERNS)].astype(bool)
    model = feat.train_feature_model(features[split["train"]], truth[split["train"]], config.boosting())
    scores = {name: model.predict(features[mask]) for name, mask in split.items()}
    thresholds, report, neutral = ev.detection_on_test(truth[split["val"]].to_numpy(), scores["val"],
                                                       truth[split["test"]].to_numpy(), scores["test"], CORE_PATTERNS)
    importances = model.importances()
    summary = {"core_macro_f1": float(report.loc["macro", "f1"]), "core_macro_recall": float(report.loc["macro", "recall"]),
               "core_macro_precision": float(report.loc["macro", "precision"]),
               "neutral_precision": float(neutral["precision"]) if neutral["precision"] is not None else float("nan")}
    report_json = json.dumps(ev.to_jsonable({"summary": summary, "thresholds": thresholds, "detection": report,
                                             "neutral": neutral}), indent=2, sort_keys=True, allow_nan=False)
    version = write_version(artifacts, "feature_model", {"feature_model.json": model.to_json().encode(),
                                                         "evaluation.json": report_json.encode()})
    return MaterializeResult(
        metadata={"version": version, "path": MetadataValue.path(str(artifacts.path("feature_model", version))),
                  **{k: MetadataValue.float(v) for k, v in summary.items()},
                  "detection_test": md.table(report.reset_index(names="class")),
                  "feature_importance": md.table(importances.round(1), index_name="feature"),
                  "importance_plot": md.plot_markdown(_importance_figure(importances), "feature importance")},
        data_version=DataVersion(version))


CALIBRATED_CLASSES = (*CORE_PATTERNS, NEUTRAL)


class CalibratorConfig(Config):
    min_precision: float = Field(default=0.9, description="precision floor of the recall-lift measure")


def _truth(windows: pd.DataFrame) -> np.ndarray:
    """Core patterns, and neutral meaning no core pattern (the fine-tuned model's decision set)."""
    core = windows[list(CORE_PATTERNS)].to_numpy(dtype=bool)
    return np.column_stack([core, ~core.any(axis=1)])


def vlm_scores(clip, artifacts, context) -> tuple[dict[str, np.ndarray], dict[str, pd.DataFrame], float]:
    """Cosine scores of the val and test charts against the class ensembles that model_evaluation selected."""
    evaluation = artifacts.read_json(f"model_evaluation/{artifacts.current_version('model_evaluation')}/evaluation.json")
    library = load_prompt_library()
    if evaluation["prompt_library"] != library.tag:
        raise ValueError(f"model_evaluation used prompt library {evaluation['prompt_library']}, this code has "
                         f"{library.tag}: re-materialize model_evaluation")
    prompts = PromptEmbeddings.of(clip, library)
    ensemble = prompts.ensemble(prompts.selection_of(evaluation["prompt_selection"]))
    rows = [prompts.classes.index(c) for c in CALIBRATED_CLASSES]
    scores, windows = {}, {}
    for split in ("val", "test"):
        images, windows[split] = embed_split(clip, artifacts, split, context)
        scores[split] = images @ ensemble[rows].T
    return scores, windows, float(clip.model.logit_scale.detach().exp())


@asset(group_name=FUSION_GROUP, code_version="1", deps=[model_evaluation], kinds={"pytorch", "scikitlearn"})
def calibrator(context: AssetExecutionContext, config: CalibratorConfig, store: ArtifactStoreResource,
               compute: ComputeResource) -> MaterializeResult:
    """Temperature scaling (softmax over core patterns + neutral) and per-pattern Platt scaling of the fine-tuned
    model's scores, fitted on validation; ECE, Brier, reliability and the recall lift measured on test."""
    artifacts = store.store()
    compute.apply_threads()
    clip, _, model_version = load_model_asset(artifacts, "chart_clip_finetuned", compute.resolved_device())
    scores, windows, logit_scale = vlm_scores(clip, artifacts, context)
    truth = {split: _truth(frame) for split, frame in windows.items()}
    fitted = cal.fit(scores["val"], logit_scale * scores["val"], truth["val"], CALIBRATED_CLASSES)
    report = cal.evaluate(fitted, logit_scale, scores["val"], truth["val"], scores["test"], truth["test"],
                          config.min_precision, report_classes=CORE_PATTERNS)
    document = fitted.to_dict() | {"model_version": model_version, "logit_scale": logit_scale}
    report_json = ev.to_jsonable({"summary": report.summary, "per_class": report.per_class,
                                  "reliability_before": report.reliability_before,
                                  "reliability_after": report.reliability_after})
    version = write_version(artifacts, "calibrator", {
        "calibrator.json": json.dumps(document, indent=2, sort_keys=True).encode(),
        "report.json": json.dumps(report_json, indent=2, sort_keys=True, allow_nan=False).encode()})
    return MaterializeResult(
        metadata={"version": version, "path": MetadataValue.path(str(artifacts.path("calibrator", version))),
                  "model_version": model_version,
                  **{k: MetadataValue.float(float(v)) for k, v in report.summary.items()},
                  "recall_at_precision": md.table(report.per_class.reset_index()),
                  "platt": md.table(pd.DataFrame(fitted.platt, index=["slope", "intercept"]).T, index_name="class"),
                  "reliability_diagram": md.plot_markdown(cal.reliability_figure(
                      report.reliability_before, report.reliability_after, "reliability on test (all classes)"),
                      "reliability diagram", width=700, height=600)},
        data_version=DataVersion(version))


FUSION_ASSETS = [calibrator, feature_model]
