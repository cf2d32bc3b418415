"""Calibration and fusion assets (group `fusion`): calibrator, resnet_baseline, feature_model, fuser."""

import dataclasses
import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from vlm_assets import baselines
from vlm_assets import calibration as cal
from vlm_assets import evaluation as ev
from vlm_assets import features as feat
from vlm_assets import fusion
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.pipeline import metadata as md
from vlm_assets.pipeline.artifacts import load_bars, read_frame, write_version
from vlm_assets.pipeline.data import chart_images, ohlcv_bars, pattern_labels, vlm_dataset
from vlm_assets.pipeline.model import (
    CHECKPOINT, dataset_windows, embed_split, load_model_asset, loss_curves, model_evaluation, save_trained, timing,
    train_progress, train_summary, training_windows,
)
from vlm_assets.prompts import load_prompt_library
from vlm_assets.serving.predictor import CALIBRATED_CLASSES
from vlm_assets.zero_shot import PromptEmbeddings
from vlm_assets.training import OptimConfig
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




class CalibratorConfig(Config):
    min_precision: float = Field(default=0.9, description="precision floor of the recall-lift measure")


def _truth(windows: pd.DataFrame) -> np.ndarray:
    """Core patterns, and neutral meaning no core pattern (the fine-tuned model's decision set)."""
    core = windows[list(CORE_PATTERNS)].to_numpy(dtype=bool)
    return np.column_stack([core, ~core.any(axis=1)])


def vlm_outputs(clip, artifacts, context, splits=("val", "test")) -> tuple[dict, dict, dict, float]:
    """Per split: cosine scores against the class ensembles that model_evaluation selected (CALIBRATED_CLASSES
    columns), image embeddings and windows (without images); and the model's logit scale."""
    evaluation = artifacts.read_json(f"model_evaluation/{artifacts.current_version('model_evaluation')}/evaluation.json")
    library = load_prompt_library()
    if evaluation["prompt_library"] != library.tag:
        raise ValueError(f"model_evaluation used prompt library {evaluation['prompt_library']}, this code has "
                         f"{library.tag}: re-materialize model_evaluation")
    prompts = PromptEmbeddings.of(clip, library)
    ensemble = prompts.ensemble(prompts.selection_of(evaluation["prompt_selection"]))
    rows = [prompts.classes.index(c) for c in CALIBRATED_CLASSES]
    scores, embeddings, windows = {}, {}, {}
    for split in splits:
        embeddings[split], windows[split] = embed_split(clip, artifacts, split, context)
        scores[split] = embeddings[split] @ ensemble[rows].T
    return scores, embeddings, windows, float(clip.model.logit_scale.detach().exp())


@asset(group_name=FUSION_GROUP, code_version="1", deps=[model_evaluation], kinds={"pytorch", "scikitlearn"})
def calibrator(context: AssetExecutionContext, config: CalibratorConfig, store: ArtifactStoreResource,
               compute: ComputeResource) -> MaterializeResult:
    """Temperature scaling (softmax over core patterns + neutral) and per-pattern Platt scaling of the fine-tuned
    model's scores, fitted on validation; ECE, Brier, reliability and the recall lift measured on test."""
    artifacts = store.store()
    compute.apply_threads()
    clip, _, model_version = load_model_asset(artifacts, "chart_clip_finetuned", compute.resolved_device())
    scores, _, windows, logit_scale = vlm_outputs(clip, artifacts, context)
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


_RESNET = baselines.ResNetConfig()


class ResNetAssetConfig(Config):
    steps: int = Field(default=_RESNET.optim.steps, description="optimizer steps (batches)")
    batch_size: int = _RESNET.optim.batch_size
    lr: float = _RESNET.optim.lr
    warmup_steps: int = _RESNET.optim.warmup_steps
    precision: str = Field(default="auto", description="auto (bf16 autocast on CPU, AMP on CUDA) or fp32")
    workers: int = Field(default=_RESNET.optim.workers, description="DataLoader processes rendering charts")
    arch: str = Field(default=_RESNET.arch, description="timm ResNet name, trained from scratch")
    seed: int = _RESNET.optim.seed
    stream_seed: int = _RESNET.stream.seed

    def training(self) -> baselines.ResNetConfig:
        optim = OptimConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                            precision=self.precision, workers=self.workers, seed=self.seed)
        return baselines.ResNetConfig(optim=optim, stream=dataclasses.replace(_RESNET.stream, seed=self.stream_seed),
                                      arch=self.arch)


def resnet_predictions(baseline, artifacts, splits=("val", "test")) -> tuple[dict, dict, dict]:
    """Per split: probabilities, pooled features and the windows (without images)."""
    windows = dataset_windows(artifacts)
    probabilities, features, parts = {}, {}, {}
    for split in splits:
        part = windows[windows["split"] == split].reset_index(drop=True)
        probabilities[split], features[split] = baseline.predict(part["png"].tolist())
        parts[split] = part.drop(columns=["png"])
    return probabilities, features, parts


@asset(group_name=FUSION_GROUP, code_version="1", deps=[vlm_dataset, pattern_labels, chart_images], kinds={"pytorch"})
def resnet_baseline(context: AssetExecutionContext, config: ResNetAssetConfig, store: ArtifactStoreResource,
                    compute: ComputeResource) -> MaterializeResult:
    """A ResNet-18 from scratch, multi-label on the core patterns, trained on ChartCLIP's training stream; thresholds
    chosen on validation, metrics on test."""
    artifacts = store.store()
    compute.apply_threads()
    device = compute.resolved_device()
    cfg = config.training()
    windows = training_windows(artifacts, cfg.stream)
    baseline = baselines.create(cfg.arch, CORE_PATTERNS, device, seed=config.seed)
    result = baselines.train(baseline, windows, cfg, train_progress(context, "ResNet training"))
    probabilities, _, parts = resnet_predictions(baseline, artifacts)
    truth = {split: parts[split][list(CORE_PATTERNS)].to_numpy(bool) for split in parts}
    thresholds, report, neutral = ev.detection_on_test(truth["val"], probabilities["val"], truth["test"],
                                                       probabilities["test"], CORE_PATTERNS)
    summary = {"core_macro_f1": float(report.loc["macro", "f1"]), "core_macro_recall": float(report.loc["macro", "recall"]),
               "core_macro_precision": float(report.loc["macro", "precision"])}
    sidecar = {"dataset_version": artifacts.current_version("vlm_dataset"), "training": train_summary(result),
               "config": json.loads(config.model_dump_json())}
    evaluation = json.dumps(ev.to_jsonable({"summary": summary, "thresholds": thresholds, "detection": report,
                                            "neutral": neutral}), indent=2, sort_keys=True, allow_nan=False)
    version = save_trained(artifacts, "resnet_baseline", baselines.checkpoint_bytes(baseline, sidecar), result,
                           {"evaluation.json": evaluation.encode()})
    return MaterializeResult(
        metadata={"version": version, "path": MetadataValue.path(str(artifacts.path("resnet_baseline", version))),
                  "arch": cfg.arch, **train_summary(result), **timing(result),
                  **{k: MetadataValue.float(v) for k, v in summary.items()},
                  "detection_test": md.table(report.reset_index(names="class")),
                  "training_curves": loss_curves(result, "ResNet baseline loss")},
        data_version=DataVersion(version))


class FuserConfig(Config):
    grid_step: float = Field(default=0.1, description="late-fusion weight grid on the simplex")
    min_gain: float = Field(default=0.005, description="validation macro F1 a source must add to join late fusion")
    learned: bool = Field(default=True, description="train the learned (MLP) fuser and consider it")
    max_train_val_gap: float = Field(default=0.10, description="largest train-minus-validation macro F1 gap for "
                                     "the learned fuser to be used")
    hidden: int = fusion.LearnedFusionConfig.hidden
    epochs: int = fusion.LearnedFusionConfig.epochs
    seed: int = fusion.LearnedFusionConfig.seed


def _load_resnet(artifacts, device: str):
    version = artifacts.current_version("resnet_baseline")
    baseline, _ = baselines.from_bytes(artifacts.read_bytes(f"resnet_baseline/{version}/{CHECKPOINT}"),
                                       artifacts.read_bytes(f"resnet_baseline/{version}/{CHECKPOINT}.json"), device)
    return baseline


@asset(group_name=FUSION_GROUP, code_version="2", deps=[calibrator, resnet_baseline, feature_model],
       kinds={"pytorch", "lightgbm"})
def fuser(context: AssetExecutionContext, config: FuserConfig, store: ArtifactStoreResource,
          compute: ComputeResource) -> MaterializeResult:
    """Late fusion of calibrated probabilities (VLM, ResNet, feature model; weights on validation) and a learned MLP
    fuser over [VLM embedding, ResNet features, engineered features]; the learned one is active only when it beats
    late fusion on validation with a bounded train/validation gap."""
    artifacts = store.store()
    compute.apply_threads()
    device = compute.resolved_device()
    splits = ("train", "val", "test")
    clip, _, _ = load_model_asset(artifacts, "chart_clip_finetuned", device)
    scores, embeddings, windows, _ = vlm_outputs(clip, artifacts, context, splits)
    calibrator_version = artifacts.current_version("calibrator")
    fitted = cal.Calibrator.from_dict(artifacts.read_json(f"calibrator/{calibrator_version}/calibrator.json"))
    core = [CALIBRATED_CLASSES.index(c) for c in CORE_PATTERNS]
    truth = {split: windows[split][list(CORE_PATTERNS)].to_numpy(bool) for split in splits}
    vlm = {split: fitted.probabilities(scores[split])[:, core] for split in splits}
    resnet_p, resnet_features, _ = resnet_predictions(_load_resnet(artifacts, device), artifacts, splits)
    context.log.info("ResNet and VLM outputs ready; computing engineered features")
    bars = load_bars(artifacts)
    features = {split: feat.feature_frame(windows[split], bars) for split in splits}
    model_version = artifacts.current_version("feature_model")
    boosted = feat.FeatureModel.from_json(
        artifacts.read_bytes(f"feature_model/{model_version}/feature_model.json").decode())
    feature_p = {split: boosted.predict(features[split]) for split in splits}
    raw = {"resnet": resnet_p, "features": feature_p}
    calibrators = {s: fusion.fit_source_calibrator(p["val"], truth["val"], CORE_PATTERNS) for s, p in raw.items()}
    probabilities = {"vlm": vlm} | {s: {split: calibrators[s].probabilities(fusion.logit(p)) for split, p in
                                        raw[s].items()} for s in raw}

    late, validation = fusion.fit_late_fusion({s: probabilities[s]["val"] for s in fusion.SOURCES}, truth["val"],
                                              CORE_PATTERNS, config.grid_step, config.min_gain)
    late_val_f1 = float(validation["val_macro_f1"].iloc[-1])  # every source available
    learned, learned_stats = None, None
    if config.learned:
        inputs = {split: fusion.fusion_inputs({"vlm": embeddings[split], "resnet": resnet_features[split],
                                               "features": features[split].to_numpy()}) for split in splits}
        learned, learned_stats = fusion.train_learned_fusion(
            inputs["train"], truth["train"], inputs["val"], truth["val"], CORE_PATTERNS,
            fusion.LearnedFusionConfig(hidden=config.hidden, epochs=config.epochs, seed=config.seed))
    active, reason = fusion.choose(late_val_f1, learned_stats, config.max_train_val_gap)
    context.log.info(f"active fuser: {active} ({reason})")

    rows = []
    for source in fusion.SOURCES:  # each model alone, thresholds on validation
        predicted = late.predict({source: probabilities[source]["test"]})[1]  # that source alone
        rows.append({"model": source, "test_macro_f1": _test_f1(truth["test"], predicted)})
    for name, sources in (("late fusion", fusion.SOURCES), ("late fusion, image only (no bars)", ("vlm", "resnet"))):
        predicted = late.predict({s: probabilities[s]["test"] for s in sources})[1]
        rows.append({"model": name, "test_macro_f1": _test_f1(truth["test"], predicted)})
    if learned is not None:
        predicted = ev.apply_thresholds(learned.probabilities(inputs["test"]), learned.thresholds, CORE_PATTERNS)
        rows.append({"model": "learned fusion", "test_macro_f1": _test_f1(truth["test"], predicted)})
    table = pd.DataFrame(rows)
    singles = table[table["model"].isin(fusion.SOURCES)]
    active_f1 = float(table.loc[table["model"] == ("learned fusion" if active == "learned" else "late fusion"),
                                "test_macro_f1"].iloc[0])
    summary = {"active": active, "reason": reason, "late_val_macro_f1": late_val_f1,
               "weights": late.weights[fusion.subset_key(fusion.SOURCES)], "fused_test_macro_f1": active_f1,
               "best_single_test_macro_f1": float(singles["test_macro_f1"].max()),
               "best_single_model": str(singles.loc[singles["test_macro_f1"].idxmax(), "model"])}
    if learned_stats is not None:
        summary |= {"learned_train_macro_f1": learned_stats["train_macro_f1"],
                    "learned_val_macro_f1": learned_stats["val_macro_f1"], "learned_epochs": learned_stats["epochs"]}
    files = fusion.fuser_files(fusion.Fuser(active, reason, late, learned, calibrators))
    files["report.json"] = json.dumps(ev.to_jsonable({"summary": summary, "test": table, "validation": validation}),
                                      indent=2, sort_keys=True, allow_nan=False).encode()
    version = write_version(artifacts, "fuser", files)
    figure = go.Figure(go.Bar(x=table["test_macro_f1"], y=table["model"], orientation="h"))
    figure.update_layout(title="test macro F1 over the core patterns", margin=dict(l=220, r=20, t=50, b=40))
    return MaterializeResult(
        metadata={"version": version, "path": MetadataValue.path(str(artifacts.path("fuser", version))),
                  "active": active, "reason": reason, "weights": MetadataValue.json(summary["weights"]),
                  "late_fusion_by_input": md.table(validation.assign(weights=validation["weights"].map(json.dumps))),
                  "fused_test_macro_f1": MetadataValue.float(active_f1),
                  "best_single_test_macro_f1": MetadataValue.float(summary["best_single_test_macro_f1"]),
                  "models_on_test": md.table(table), "comparison": md.plot_markdown(figure, "macro F1 per model")},
        data_version=DataVersion(version))


def _test_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(ev.multilabel_report(truth, predicted, CORE_PATTERNS).loc["macro", "f1"])


FUSION_ASSETS = [calibrator, resnet_baseline, feature_model, fuser]
