"""Serving assets (group `serving`): promoted_model, the bundle the BentoML service loads."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from vlm_assets import __version__
from vlm_assets import evaluation as ev
from vlm_assets import promotion
from vlm_assets.features import feature_frame
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.pipeline import metadata as md
from vlm_assets.pipeline.artifacts import load_bars, write_version
from vlm_assets.pipeline.fusion import fuser
from vlm_assets.pipeline.trading import gated_signals
from vlm_assets.pipeline.model import dataset_windows
from vlm_assets.serving.predictor import Predictor
from vlm_resources import ArtifactStoreResource, ComputeResource

SERVING_GROUP = "serving"
PROMOTION_CODE_VERSION = "4"


class PromotionConfig(Config):
    tolerance: float = Field(default=0.0, description="promote when candidate test macro F1 >= promoted - tolerance")
    force: bool = Field(default=False, description="promote without comparing (e.g. after a breaking change)")
    model_name: str = Field(default=promotion.MODEL_NAME, description="name in the BentoML model store")
    render_bars: int = Field(default=120, description="bars a served chart shows (training windows: 50-120)")
    encoders: list[str] = Field(default=["torch-bf16", "onnx-fp32", "onnx-int8", "onnx-int8-static"],
                                description="image-encoder backends measured against torch-fp32; the fastest one the "
                                "accuracy guard accepts is served (torch-bf16 only where bf16 is native)")
    calibration_charts: int = Field(default=256, ge=1, description="validation charts, evenly spaced over the split, "
                                    "that onnx-int8-static's activation ranges are calibrated on")
    max_accuracy_drop: float = Field(default=0.005, description="largest drop of test macro F1 / recall (with bars "
                                     "and image only) a backend may cause against torch-fp32 (0.005 = 0.5 points)")


def _calibration_charts(artifacts, count: int) -> list[bytes]:
    """`count` validation charts spread evenly over the split (the test split is the accuracy guard's)."""
    windows = dataset_windows(artifacts)
    val = windows[windows["split"] == "val"].reset_index(drop=True)
    rows = np.unique(np.linspace(0, len(val) - 1, min(count, len(val))).round().astype(int)) if len(val) else []
    return val["png"].iloc[rows].tolist()


def _test_split(artifacts) -> promotion.TestSplit:
    windows = dataset_windows(artifacts)
    test = windows[windows["split"] == "test"].reset_index(drop=True)
    return promotion.TestSplit(test.drop(columns=["png"]), test["png"].tolist(),
                               feature_frame(test, load_bars(artifacts)), test[list(CORE_PATTERNS)].to_numpy(bool))


@asset(group_name=SERVING_GROUP, code_version=PROMOTION_CODE_VERSION, deps=[fuser, gated_signals], kinds={"bentoml"})
def promoted_model(context: AssetExecutionContext, config: PromotionConfig, store: ArtifactStoreResource,
                   compute: ComputeResource) -> MaterializeResult:
    """Assemble the candidate bundle (fine-tuned model, calibrator, fuser, feature model, prompt library, renderer
    style), score it and the promoted bundle on the test split through the serving path, and save it to the BentoML
    model store if it is not worse (the rule is config). Earlier versions stay: `candle-vlm rollback`."""
    artifacts = store.store()
    compute.apply_threads()
    split = _test_split(artifacts)
    incumbent = promotion.promoted(config.model_name)
    rule = promotion.PromotionRule(config.tolerance, config.force)
    with tempfile.TemporaryDirectory(prefix="candle-vlm-bundle-") as scratch:
        manifest = promotion.assemble_bundle(artifacts, scratch, f"{__version__}+{PROMOTION_CODE_VERSION}",
                                             config.render_bars, include_gate=True)
        device = compute.resolved_device()
        reference = Predictor(scratch, device)
        candidate = promotion.score(reference, split)
        context.log.info(f"candidate {manifest['bundle_id']}: test macro F1 {candidate['macro_f1']:.4f}")
        serving = promotion.choose_encoder(manifest, reference, split, candidate, config.encoders,
                                           config.max_accuracy_drop, compute.threads,
                                           _calibration_charts(artifacts, config.calibration_charts))
        context.log.info(f"image encoder {serving['encoder']}: {serving['reason']}")
        (Path(scratch) / "bundle.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        incumbent_metrics, incumbent_note = None, None
        if incumbent is not None:
            try:
                incumbent_metrics = promotion.score(Predictor(incumbent.path, device), split)
            except (ValueError, KeyError, FileNotFoundError) as error:  # written by incompatible code
                incumbent_note = f"promoted {incumbent.tag} cannot be scored by this code ({error})"
                context.log.warning(incumbent_note)
        promote, reason = rule.decide(candidate, incumbent_metrics, incumbent_note)
        tag = promotion.save_to_store(scratch, manifest, candidate, config.model_name) if promote \
            else str(incumbent.tag)
    context.log.info(f"{'promoted' if promote else 'kept'} {tag}: {reason}")
    record = {"promoted": promote, "reason": reason, "tag": tag, "candidate": candidate,
              "incumbent": incumbent_metrics, "incumbent_tag": None if incumbent is None else str(incumbent.tag),
              "manifest": manifest}
    version = write_version(artifacts, "promoted_model", {
        "promotion.json": json.dumps(ev.to_jsonable(record), indent=2, sort_keys=True).encode()})
    rows = [{"bundle": "candidate " + manifest["bundle_id"], **{k: candidate[k] for k in
                                                                ("macro_f1", "macro_precision", "macro_recall")}}]
    if incumbent_metrics is not None:
        rows.append({"bundle": f"promoted {incumbent.tag}", **{k: incumbent_metrics[k] for k in
                                                               ("macro_f1", "macro_precision", "macro_recall")}})
    per_pattern = pd.DataFrame({"candidate": candidate["per_pattern_f1"]} | (
        {"promoted": incumbent_metrics["per_pattern_f1"]} if incumbent_metrics else {}))
    return MaterializeResult(
        metadata={"decision": "promoted" if promote else "kept", "reason": reason, "model_tag": tag,
                  "bundle_id": manifest["bundle_id"], "parts": MetadataValue.json(manifest["parts"]),
                  "test_macro_f1": MetadataValue.float(candidate["macro_f1"]),
                  "sources": ", ".join(candidate["sources"]),
                  "image_encoder": manifest["serving"]["encoder"],
                  "image_encoder_reason": manifest["serving"]["reason"],
                  "image_encoders": md.table(pd.DataFrame.from_dict(manifest["serving"]["candidates"], orient="index"),
                                             index_name="backend"),
                  "comparison": md.table(pd.DataFrame(rows)),
                  "per_pattern_f1": md.table(per_pattern, index_name="pattern"),
                  "serve": MetadataValue.md(f"`bentoml serve` serves `{config.model_name}:latest` (= `{tag}`); "
                                            "roll back with `candle-vlm rollback`."),
                  "path": MetadataValue.path(str(artifacts.path("promoted_model", version)))},
        data_version=DataVersion(tag))


SERVING_ASSETS = [promoted_model]
