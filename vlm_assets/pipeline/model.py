"""Model assets: chart_clip_pretrained -> zero_shot_baseline, chart_clip_finetuned -> model_evaluation."""


import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from vlm_assets import evaluation as ev
from vlm_assets import model as chart_model
from vlm_assets import training
from vlm_assets.dataset import ImageConfig, WindowSamplingConfig
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.pipeline import metadata as md
from vlm_assets.pipeline.artifacts import load_bars, load_labels, read_frame, write_version
from vlm_assets.pipeline.data import chart_images, pattern_labels, vlm_dataset
from vlm_assets.prompts import image_regression, load_prompt_library
from vlm_assets.storage import ArtifactStore, parquet_bytes
from vlm_assets.zero_shot import PromptEmbeddings, embed_images, encode_texts, evaluate
from vlm_resources import ArtifactStoreResource, ComputeResource

MODEL_GROUP = "model"
CHECKPOINT = chart_model.CHECKPOINT_FILE


class TrainConfig(Config):
    steps: int = Field(default=training.PretrainConfig.optim.steps, description="optimizer steps (batches)")
    batch_size: int = training.OptimConfig.batch_size
    lr: float = training.OptimConfig.lr
    warmup_steps: int = training.OptimConfig.warmup_steps
    weight_decay: float = training.OptimConfig.weight_decay
    precision: str = Field(default="auto", description="auto (bf16 autocast on CPU, AMP on CUDA) or fp32")
    workers: int = Field(default=training.OptimConfig.workers, description="DataLoader processes rendering charts")
    image_layers: int = Field(default=-1, description="trainable image blocks from the top (-1 all, 0 none)")
    text_layers: int = Field(default=0, description="trainable text blocks from the top (-1 all, 0 none)")
    anatomy_weight: float = training.PretrainConfig.anatomy_weight
    seed: int = training.OptimConfig.seed
    stream_seed: int = training.StreamConfig.seed

    def optim(self) -> training.OptimConfig:
        return training.OptimConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                                    warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                                    precision=self.precision, workers=self.workers, seed=self.seed)


class PretrainAssetConfig(TrainConfig):
    caption_pool: int = Field(default=training.PretrainConfig.caption_pool,
                              description="windows whose anatomy captions are embedded once (locked text tower)")
    lock_text: bool = Field(default=training.PretrainConfig.lock_text,
                            description="freeze the whole text tower (captions from the pool); false: train text_layers")
    text_whitening: float | None = Field(
        default=training.PretrainConfig.text_whitening,
        description="whiten the text space on the caption pool with this shrinkage (null: off); only an untrained "
                    "text projection is whitened (the ChartCLIP configs, lock_text, >= 256 distinct captions)")
    model_name: str = Field(default=chart_model.DEFAULT_MODEL, description="open_clip model name")
    pretrained: str = Field(default="", description="open_clip pretrained tag or a local checkpoint path (empty: none)")

    def training(self) -> training.PretrainConfig:
        return training.PretrainConfig(optim=self.optim(), stream=dataclasses.replace(training.PretrainConfig.stream, seed=self.stream_seed),
                                       unfreeze=training.Unfreeze(self.image_layers, self.text_layers),
                                       anatomy_weight=self.anatomy_weight, lock_text=self.lock_text,
                                       caption_pool=self.caption_pool, text_whitening=self.text_whitening)


class FinetuneAssetConfig(TrainConfig):
    steps: int = Field(default=training.FinetuneConfig.optim.steps, description="optimizer steps (batches)")
    lr: float = training.FinetuneConfig.optim.lr
    text_layers: int = training.FinetuneConfig.unfreeze.text_layers
    anatomy_weight: float = training.FinetuneConfig.anatomy_weight
    stream_seed: int = training.FinetuneConfig.stream.seed
    contrastive_weight: float = training.FinetuneConfig.contrastive_weight
    multilabel_weight: float = training.FinetuneConfig.multilabel_weight
    logit_speed: float = Field(default=training.FinetuneConfig.logit_speed,
                               description="how much faster than the tower the multi-label head's scale and biases learn")
    margin_weight: float = Field(default=training.FinetuneConfig.margin_weight,
                                 description="weight of the core rules' margin regression (0: off)")
    hard_negative_share: float = Field(default=training.FinetuneConfig.hard_negative_share,
                                       description="share of each batch re-fed from the hard-negative buffer")
    lock_text: bool = Field(default=training.FinetuneConfig.lock_text,
                            description="freeze the whole text tower (captions embedded once); false: train text_layers")

    def training(self) -> training.FinetuneConfig:
        return training.FinetuneConfig(
            optim=self.optim(), stream=dataclasses.replace(training.FinetuneConfig.stream, seed=self.stream_seed),
            unfreeze=training.Unfreeze(self.image_layers, self.text_layers), anatomy_weight=self.anatomy_weight,
            contrastive_weight=self.contrastive_weight, multilabel_weight=self.multilabel_weight,
            logit_speed=self.logit_speed, margin_weight=self.margin_weight, hard_negative_share=self.hard_negative_share,
            lock_text=self.lock_text)


def dataset_windows(artifacts: ArtifactStore, columns=None) -> pd.DataFrame:
    return read_frame(artifacts, "vlm_dataset", "windows.parquet", columns=columns)


def training_windows(artifacts: ArtifactStore, stream: training.StreamConfig) -> training.TrainingWindows:
    settings = artifacts.read_json(f"chart_images/{artifacts.current_version('chart_images')}/settings.json")
    sampling = WindowSamplingConfig(**_tuples(settings["sampling"]))
    image = ImageConfig(**settings["images"])
    return training.TrainingWindows(load_bars(artifacts), load_labels(artifacts),
                                    dataset_windows(artifacts, ["symbol", "block", "split"]), sampling, image, stream)


def _tuples(values: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def load_model_asset(artifacts: ArtifactStore, name: str, device: str):
    """A model asset's current checkpoint (through a local temp dir, removed once loaded: the store may be remote)."""
    version = artifacts.current_version(name)
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as scratch:
        folder = Path(scratch)
        for file in (CHECKPOINT, f"{CHECKPOINT}.json"):
            (folder / file).write_bytes(artifacts.read_bytes(f"{name}/{version}/{file}"))
        clip, sidecar = chart_model.load_checkpoint(folder / CHECKPOINT, device)
    return clip, sidecar, version


def train_progress(context: AssetExecutionContext, what: str):
    def report(done: int, total: int, row: dict) -> None:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("step", "lr", "images_per_s"))
        context.log.info(f"{what}: step {done}/{total}, {losses}, {row['images_per_s']:.1f} images/s")
    return report


def loss_curves(result: training.TrainResult, title: str) -> MetadataValue:
    columns = [c for c in result.history.columns if c not in ("lr", "images_per_s")]
    smoothed = result.history[columns].copy()
    window = max(1, len(smoothed) // 50)
    smoothed[[c for c in columns if c != "step"]] = smoothed[[c for c in columns if c != "step"]].rolling(window, min_periods=1).mean()
    return md.plot_markdown(ev.curves_figure(smoothed, title), title)


def save_trained(artifacts: ArtifactStore, name: str, checkpoint: tuple[bytes, bytes], result: training.TrainResult,
                 extra: dict[str, bytes] | None = None) -> str:
    """Weights, sidecar, loss history (and `extra` files) as one version; wall-clock figures stay out so a version
    is a pure function of config."""
    weights, meta = checkpoint
    history = result.history.drop(columns=["images_per_s"])
    files = {CHECKPOINT: weights, f"{CHECKPOINT}.json": meta, "history.parquet": parquet_bytes(history)} | (extra or {})
    return write_version(artifacts, name, files)


def train_summary(result: training.TrainResult) -> dict:
    last = result.history.tail(max(1, len(result.history) // 10)).mean(numeric_only=True)
    return {"steps": len(result.history), "images_seen": result.images_seen,
            "final_loss": round(float(last["loss"]), 4)} | dict(result.extra)


def timing(result: training.TrainResult) -> dict:
    return {"seconds": round(result.seconds, 1), "images_per_s": round(result.images_seen / max(result.seconds, 1e-9), 1)}


@asset(group_name=MODEL_GROUP, code_version="4", deps=[vlm_dataset, pattern_labels], kinds={"pytorch"})
def chart_clip_pretrained(context: AssetExecutionContext, config: PretrainAssetConfig, store: ArtifactStoreResource,
                          compute: ComputeResource) -> MaterializeResult:
    """Domain pre-training: image-text contrastive on anatomy captions (no pattern names) + an anatomy head."""
    artifacts = store.store()
    threads = compute.apply_threads()
    device = compute.resolved_device()
    cfg = config.training()
    windows = training_windows(artifacts, cfg.stream)
    context.log.info(f"{len(windows.candidates):,} train-split window ends; {cfg.optim.steps} steps of "
                     f"{cfg.optim.batch_size} on {device} ({threads} threads)")
    clip = chart_model.create(chart_model.ModelSpec(config.model_name, config.pretrained or None), device, seed=config.seed)
    result = training.pretrain(clip, windows, cfg, train_progress(context, "pre-training"),
                               caption_progress=md.Progress(context.log, "caption pool embedded", cfg.caption_pool))
    dataset_version = artifacts.current_version("vlm_dataset")
    summary = train_summary(result)
    sidecar = {"stage": "pretrained", "dataset_version": dataset_version, "training": summary,
               "config": json.loads(config.model_dump_json())}
    version = save_trained(artifacts, "chart_clip_pretrained", chart_model.checkpoint_bytes(clip, sidecar), result)
    return MaterializeResult(
        metadata={"version": version, "path": MetadataValue.path(str(artifacts.path("chart_clip_pretrained", version))),
                  "dataset_version": dataset_version, "model": config.model_name, "device": device,
                  **summary, **timing(result),
                  "training_curves": loss_curves(result, "pre-training losses")},
        data_version=DataVersion(version))


def embed_split(clip, artifacts: ArtifactStore, split: str, context) -> tuple[np.ndarray, pd.DataFrame]:
    windows = dataset_windows(artifacts)
    part = windows[windows["split"] == split].reset_index(drop=True)
    images = embed_images(clip, part["png"].tolist(), progress=md.Progress(context.log, f"{split} charts embedded", len(part)))
    return images, part.drop(columns=["png"])


def _evaluate(clip, artifacts: ArtifactStore, context):
    library = load_prompt_library()
    val_images, val = embed_split(clip, artifacts, "val", context)
    test_images, test = embed_split(clip, artifacts, "test", context)
    prompts = PromptEmbeddings.of(clip, library)
    paraphrases = PromptEmbeddings.of(clip, library.with_paraphrases())
    result = evaluate(val_images, val, test_images, test, prompts, paraphrases)
    regression = image_regression(library, lambda pngs: embed_images(clip, pngs), lambda texts: encode_texts(clip, list(texts)))
    return library, result, regression


def _report_files(library, result, regression, extra: dict) -> dict[str, bytes]:
    document = ev.to_jsonable({
        "prompt_library": library.tag, "summary": result.summary(), "thresholds": result.thresholds,
        "prompt_selection": result.selection, "detection": result.detection, "neutral": result.neutral,
        "zero_shot": result.zero_shot, "all_classes": result.all_classes, "paraphrase": result.paraphrase,
        "confusion": result.confusion, "regression_suite": regression,
    } | extra)
    return {"evaluation.json": json.dumps(document, indent=2, sort_keys=True, allow_nan=False).encode()}


@asset(group_name=MODEL_GROUP, code_version="1", deps=[chart_clip_pretrained], kinds={"pytorch"})
def zero_shot_baseline(context: AssetExecutionContext, store: ArtifactStoreResource, compute: ComputeResource) -> MaterializeResult:
    """The pre-trained model, frozen, scored with the prompt library; prompts and thresholds chosen on validation,
    metrics on test. Recorded before any fine-tuning."""
    artifacts = store.store()
    compute.apply_threads()
    clip, sidecar, model_version = load_model_asset(artifacts, "chart_clip_pretrained", compute.resolved_device())
    library, result, regression = _evaluate(clip, artifacts, context)
    version = write_version(artifacts, "zero_shot_baseline",
                            _report_files(library, result, regression, {"model_version": model_version}))
    return MaterializeResult(metadata=_evaluation_metadata(artifacts, "zero_shot_baseline", version, library, result, regression)
                             | {"model_version": model_version},
                             data_version=DataVersion(version))


def _evaluation_metadata(artifacts, name, version, library, result, regression) -> dict:
    return {
        "version": version, "path": MetadataValue.path(str(artifacts.path(name, version))),
        "prompt_library": library.tag,
        **{k: MetadataValue.float(float(v)) for k, v in result.summary().items()},
        "detection_test": md.table(result.detection.reset_index(names="class")),
        "zero_shot_test": md.table(result.zero_shot.reset_index(names="class")),
        "paraphrase_test": md.table(result.paraphrase.reset_index(names="class")),
        "regression_suite": md.table(regression.astype({c: str for c in regression.columns if regression[c].dtype == object})),
        "confusion_matrix": md.plot_markdown(ev.confusion_figure(result.confusion, f"{name}: top-1 on test"),
                                             "confusion matrix", width=700, height=600),
    }


@asset(group_name=MODEL_GROUP, code_version="6", deps=[chart_clip_pretrained, zero_shot_baseline], kinds={"pytorch"})
def chart_clip_finetuned(context: AssetExecutionContext, config: FinetuneAssetConfig, store: ArtifactStoreResource,
                         compute: ComputeResource) -> MaterializeResult:
    """Fine-tuning on the core patterns: partial unfreezing, mixed precision, hard-negative buffer; CLIP loss plus
    multi-label BCE against the pattern prompt embeddings."""
    artifacts = store.store()
    compute.apply_threads()
    clip, pre_sidecar, pretrained_version = load_model_asset(artifacts, "chart_clip_pretrained", compute.resolved_device())
    cfg = config.training()
    windows = training_windows(artifacts, cfg.stream)
    library = load_prompt_library()
    result = training.finetune(clip, windows, cfg, {p: list(library.classes[p]) for p in CORE_PATTERNS},
                               train_progress(context, "fine-tuning"))
    dataset_version = artifacts.current_version("vlm_dataset")
    summary = train_summary(result)
    sidecar = {"stage": "finetuned", "dataset_version": dataset_version, "pretrained_version": pretrained_version,
               "prompt_library": library.tag, "training": summary,
               "pretraining": pre_sidecar.get("training", {}), "config": json.loads(config.model_dump_json())}
    version = save_trained(artifacts, "chart_clip_finetuned", chart_model.checkpoint_bytes(clip, sidecar), result)
    return MaterializeResult(
        metadata={"version": version, "path": MetadataValue.path(str(artifacts.path("chart_clip_finetuned", version))),
                  "pretrained_version": pretrained_version, "dataset_version": dataset_version, **summary,
                  **timing(result),
                  "training_curves": loss_curves(result, "fine-tuning losses")},
        data_version=DataVersion(version))


@asset(group_name=MODEL_GROUP, code_version="1", deps=[chart_clip_finetuned, zero_shot_baseline, chart_images],
       kinds={"pytorch"})
def model_evaluation(context: AssetExecutionContext, store: ArtifactStoreResource, compute: ComputeResource) -> MaterializeResult:
    """Test-split evaluation of the fine-tuned model beside the zero-shot baseline (same protocol)."""
    artifacts = store.store()
    compute.apply_threads()
    clip, sidecar, model_version = load_model_asset(artifacts, "chart_clip_finetuned", compute.resolved_device())
    library, result, regression = _evaluate(clip, artifacts, context)
    baseline = artifacts.read_json(f"zero_shot_baseline/{artifacts.current_version('zero_shot_baseline')}/evaluation.json")
    baseline_detection = pd.DataFrame(baseline["detection"]).T
    side = ev.side_by_side({"baseline": baseline_detection.astype(float), "finetuned": result.detection.astype(float)},
                           metrics=("precision", "recall", "f1"))
    summary = result.summary()
    summary["baseline_core_macro_recall"] = float(baseline["summary"]["core_macro_recall"])
    summary["recall_lift"] = summary["core_macro_recall"] - summary["baseline_core_macro_recall"]
    files = _report_files(library, result, regression, {
        "model_version": model_version, "baseline_summary": baseline["summary"], "side_by_side": side,
        "training": sidecar.get("training"), "pretraining": sidecar.get("pretraining")})
    files["evaluation.json"] = json.dumps(json.loads(files["evaluation.json"]) | {"summary": ev.to_jsonable(summary)},
                                          indent=2, sort_keys=True, allow_nan=False).encode()
    version = write_version(artifacts, "model_evaluation", files)
    meta = _evaluation_metadata(artifacts, "model_evaluation", version, library, result, regression)
    meta |= {"model_version": model_version, "recall_lift": MetadataValue.float(float(summary["recall_lift"])),
             "baseline_core_macro_recall": MetadataValue.float(summary["baseline_core_macro_recall"]),
             "baseline_vs_finetuned": md.table(side.reset_index(names="class")),
             "recall_comparison": md.plot_markdown(ev.comparison_figure(side, "recall", "test recall: baseline vs fine-tuned"),
                                                   "recall comparison")}
    return MaterializeResult(metadata=meta, data_version=DataVersion(version))


MODEL_ASSETS = [chart_clip_pretrained, zero_shot_baseline, chart_clip_finetuned, model_evaluation]
