"""Model promotion: assemble the candidate bundle from the pipeline's current artifacts, score it and the promoted
bundle on the same test split through the serving path, and save the candidate into the BentoML model store only
if the rule allows. Every promoted version stays in the store; a rollback makes an earlier one current again.

BentoML is imported only by the functions that touch its model store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vlm_assets import evaluation as ev
from vlm_assets.fusion import load_fuser
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.model import CHECKPOINT_FILE as CHECKPOINT
from vlm_assets.serving import encoders
from vlm_assets.serving.predictor import BUNDLE_FORMAT, Predictor
from vlm_assets.storage import ArtifactStore

MODEL_NAME = "candle_vlm"
BUNDLE_PARTS = ("chart_clip_finetuned", "model_evaluation", "calibrator", "fuser", "feature_model", "resnet_baseline")


def _version_files(artifacts: ArtifactStore, asset: str, names: list[str]) -> tuple[str, dict[str, bytes]]:
    version = artifacts.current_version(asset)
    return version, {n: artifacts.read_bytes(f"{asset}/{version}/{n}") for n in names
                     if artifacts.exists(f"{asset}/{version}/{n}")}


def assemble_bundle(artifacts: ArtifactStore, directory: str | os.PathLike, code_version: str,
                    render_bars: int = 120, include_gate: bool = False) -> dict:
    """Write the candidate bundle (the current version of every part) into `directory`; returns its manifest. With
    `include_gate`, also the trading signal gate of `gated_signals` (which itself scores a bundle without one)."""
    from vlm_assets.prompts import load_prompt_library
    from vlm_assets.rendering import DEFAULT_STYLE, STYLE_VERSION

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    versions, files = {}, {}
    versions["chart_clip_finetuned"], model = _version_files(artifacts, "chart_clip_finetuned",
                                                             [CHECKPOINT, f"{CHECKPOINT}.json"])
    files["model.safetensors"], files["model.safetensors.json"] = model[CHECKPOINT], model[f"{CHECKPOINT}.json"]
    versions["model_evaluation"], evaluation = _version_files(artifacts, "model_evaluation", ["evaluation.json"])
    evaluation = json.loads(evaluation["evaluation.json"])
    library = load_prompt_library()
    if evaluation["prompt_library"] != library.tag:
        raise ValueError(f"model_evaluation used prompt library {evaluation['prompt_library']}, this code has "
                         f"{library.tag}: re-materialize model_evaluation")
    files["prompt_library.json"] = library.to_json()
    versions["calibrator"], calibrator = _version_files(artifacts, "calibrator", ["calibrator.json"])
    files |= calibrator
    versions["fuser"], fuser_files = _version_files(artifacts, "fuser", ["fuser.json", "learned.safetensors"])
    files |= fuser_files
    versions["feature_model"], feature = _version_files(artifacts, "feature_model", ["feature_model.json"])
    files |= feature
    fuser = load_fuser(fuser_files)
    # A request always has the chart, so only availabilities with the VLM matter.
    uses_resnet = fuser.active == "learned" or any(
        "resnet" in fuser.late.sources_for(available) for available in (["vlm", "resnet"], ["vlm", "resnet", "features"]))
    if uses_resnet:
        versions["resnet_baseline"], resnet = _version_files(artifacts, "resnet_baseline",
                                                             [CHECKPOINT, f"{CHECKPOINT}.json"])
        files["resnet.safetensors"], files["resnet.safetensors.json"] = resnet[CHECKPOINT], resnet[f"{CHECKPOINT}.json"]
    if include_gate:
        from vlm_assets.trading import GATE_FILES

        versions["gated_signals"], gate = _version_files(artifacts, "gated_signals", list(GATE_FILES))
        missing = [name for name in GATE_FILES if name not in gate]
        if missing:
            raise ValueError(f"gated_signals/{versions['gated_signals']} lacks {', '.join(missing)}: re-materialize it")
        files |= gate
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    manifest = {
        "format": BUNDLE_FORMAT, "bundle_id": digest.hexdigest()[:16], "code_version": code_version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "parts": versions, "dataset_version": artifacts.current_version("vlm_dataset"),
        "prompt_library": library.tag, "prompt_selection": evaluation["prompt_selection"],
        "render": {"style": DEFAULT_STYLE.to_dict(), "style_version": STYLE_VERSION, "bars": render_bars},
        "classes": list(CORE_PATTERNS), "fusion": {"active": fuser.active, "reason": fuser.reason},
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / "bundle.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    # Prompt embeddings once per model version, so a server starts without encoding the library.
    predictor = Predictor(directory)
    with open(directory / "prompt_embeddings.npy", "wb") as handle:
        np.save(handle, predictor.prompt_embeddings.flat().astype(np.float32), allow_pickle=False)
    return manifest


@dataclass(frozen=True)
class TestSplit:
    """The dataset's test windows, their stored charts and engineered features, and the truth."""

    windows: pd.DataFrame
    pngs: list[bytes]
    features: pd.DataFrame
    truth: np.ndarray


GUARDED = ("macro_f1", "macro_recall", "image_only_macro_f1", "image_only_macro_recall")


def score(predictor: Predictor, split: TestSplit) -> dict:
    """Test-split detection metrics of a bundle through the serving path: requests with bars (the promotion metric)
    and requests with the chart image only."""
    with_bars, image_only = predictor.evaluate(split.pngs, split.features)
    report = ev.multilabel_report(split.truth, with_bars.detected, CORE_PATTERNS)
    images = ev.multilabel_report(split.truth, image_only.detected, CORE_PATTERNS)
    return {"macro_f1": float(report.loc["macro", "f1"]), "macro_precision": float(report.loc["macro", "precision"]),
            "macro_recall": float(report.loc["macro", "recall"]), "sources": with_bars.sources,
            "fusion": with_bars.fusion, "windows": int(len(split.truth)), "encoder": predictor.backend,
            "image_only_macro_f1": float(images.loc["macro", "f1"]),
            "image_only_macro_recall": float(images.loc["macro", "recall"]),
            "per_pattern_f1": {c: float(report.loc[c, "f1"]) for c in CORE_PATTERNS}}


def accuracy_guard(reference: dict, candidate: dict, max_drop: float) -> tuple[bool, str]:
    """A faster image encoder (bf16, ONNX, int8) is accepted when no served figure (macro F1 and recall, with bars and
    image only) drops more than `max_drop` below the torch fp32 reference on the test split."""
    drops = {k: reference[k] - candidate[k] for k in GUARDED}
    worst = max(drops, key=drops.get)
    ok = drops[worst] <= max_drop
    return ok, (f"{candidate['encoder']}: largest drop against {reference['encoder']} is {drops[worst]:+.4f} in "
                f"{worst} ({'within' if ok else 'beyond'} {max_drop:.4f})")


def encode_latency_ms(predictor: Predictor, image, runs: int = 30) -> float:
    """Median time to encode one chart (batch 1) after a warm-up."""
    for _ in range(3):
        predictor.encode([image])
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        predictor.encode([image])
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def choose_encoder(manifest: dict, reference: Predictor, split: TestSplit, reference_scores: dict,
                   candidates: list[str], max_drop: float, threads: int = 0,
                   calibration: list[bytes] = ()) -> dict:
    """Export the ONNX encoders into the bundle beside `reference` (the torch fp32 predictor), score every candidate
    backend on the test split through the serving path, and rank those that pass the accuracy guard by their
    measured batch-1 latency. Records the result as `manifest["serving"]` (the service runs the fastest accepted
    backend it can run) and the exported files in `manifest["files"]`. `calibration`: charts (PNG) outside the test
    split whose activation ranges `onnx-int8-static` is quantized with."""
    from PIL import Image

    directory = reference.directory
    image = Image.open(io.BytesIO(split.pngs[0])).convert("RGB")
    report = {"torch-fp32": {"accepted": True, "reason": "the reference",
                             "encode_ms": encode_latency_ms(reference, image),
                             **{k: reference_scores[k] for k in GUARDED}}}
    for backend in candidates:
        encoders.check_backend(backend)
        if backend == "torch-fp32":
            continue
        try:
            if backend in encoders.ONNX_FILES:
                _export(reference, backend, calibration)
        except Exception as error:  # noqa: BLE001  an exotic open_clip model the exporter cannot trace: serve torch
            report[backend] = {"accepted": False, "reason": f"export failed: {type(error).__name__}: {error}"}
            continue
        unavailable = encoders.runnable(backend, reference._device, directory)
        if unavailable:
            report[backend] = {"accepted": False, "reason": f"{unavailable}: not measured"}
            continue
        predictor = Predictor(directory, reference._device, backend=backend, threads=threads)
        scores = score(predictor, split)
        accepted, reason = accuracy_guard(reference_scores, scores, max_drop)
        report[backend] = {"accepted": accepted, "reason": reason, "encode_ms": encode_latency_ms(predictor, image),
                           **{k: scores[k] for k in GUARDED}}
    ranking = sorted((b for b, r in report.items() if r["accepted"]), key=lambda b: report[b]["encode_ms"])
    chosen = ranking[0]
    manifest["serving"] = {
        "encoder": chosen, "ranking": ranking, "candidates": report, "max_drop": max_drop,
        "calibration_charts": len(calibration),
        "reason": f"fastest backend within {max_drop:.4f} of torch-fp32 on the test split "
                  f"({report[chosen]['encode_ms']:.1f} ms per chart at batch 1 here)"}
    for name in encoders.ONNX_FILES.values():
        if (directory / name).exists():
            manifest["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    return manifest["serving"]


def _export(reference: Predictor, backend: str, calibration: list[bytes]) -> None:
    from PIL import Image

    fp32 = reference.directory / encoders.ONNX_FILES["onnx-fp32"]
    if not fp32.exists():
        encoders.export_onnx(reference.clip, fp32)
    target = reference.directory / encoders.ONNX_FILES[backend]
    if backend == "onnx-int8":
        encoders.quantize_int8(fp32, target)
    elif backend == "onnx-int8-static":
        if not calibration:
            raise ValueError("no calibration charts: static int8 needs charts to measure activation ranges on")
        charts = [reference.chart_image(Image.open(io.BytesIO(png))) for png in calibration]
        encoders.quantize_int8_static(fp32, target, encoders.pixel_batch(charts))


@dataclass(frozen=True)
class PromotionRule:
    """Promote when candidate macro F1 >= incumbent macro F1 - tolerance (0: not worse); `force` skips the test."""

    tolerance: float = 0.0
    force: bool = False

    def decide(self, candidate: dict, incumbent: dict | None, unscorable: str | None = None) -> tuple[bool, str]:
        """`unscorable`: why a promoted model exists but could not be scored; it then counts as absent."""
        noted = f"{unscorable}; " if unscorable else ""
        if self.force:
            return True, noted + "forced by config"
        if incumbent is None:
            return True, noted + ("promoted without a comparison" if unscorable else "no model is promoted yet")
        margin = candidate["macro_f1"] - incumbent["macro_f1"]
        verdict = margin >= -self.tolerance
        return verdict, (f"candidate test macro F1 {candidate['macro_f1']:.4f} vs promoted {incumbent['macro_f1']:.4f} "
                         f"({margin:+.4f}; tolerance {self.tolerance:.4f}): "
                         f"{'promoted' if verdict else 'kept the promoted model'}")


# ---- the BentoML model store -----------------------------------------------------------------------------------

def promoted(name: str = MODEL_NAME):
    """The current promoted model (`name:latest`) or None."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(f"{name}:latest")
    except NotFound:
        return None


def save_to_store(directory: str | os.PathLike, manifest: dict, metrics: dict, name: str = MODEL_NAME,
                  extra_labels: dict | None = None) -> str:
    """Copy a bundle into a new version of `name`; it becomes `name:latest`. Returns the tag."""
    import bentoml

    labels = {"bundle_id": manifest["bundle_id"], "dataset_version": manifest["dataset_version"],
              "code_version": manifest["code_version"], "macro_f1": f"{metrics['macro_f1']:.4f}"} | (extra_labels or {})
    # The manifest travels as bundle.json; metadata holds the test metrics as JSON (BentoML refuses None values,
    # which undefined per-pattern scores become).
    metadata = {"parts": manifest["parts"], "test_metrics": json.dumps(ev.to_jsonable(metrics))}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for item in Path(directory).iterdir():
            shutil.copy2(item, model.path_of(item.name))
    return str(model.tag)


def history(name: str = MODEL_NAME) -> list:
    """Every stored version of `name`, oldest first."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return sorted(bentoml.models.list(name), key=lambda m: m.info.creation_time)
    except NotFound:
        return []


def rollback(to: str | None = None, name: str = MODEL_NAME) -> str:
    """Make an earlier version current again: a new version with its files (history is never rewritten). `to` is a
    tag; by default the version promoted before the current one. Refused (ValueError) when this code cannot load
    that version's bundle. Returns the new tag."""
    import bentoml

    versions = history(name)
    if not versions:
        raise ValueError(f"no {name} model is stored: nothing to roll back")
    if to is None:
        if len(versions) < 2:
            raise ValueError(f"{name} has a single version: nothing to roll back to")
        target = versions[-2]
    else:
        target = bentoml.models.get(to if ":" in to else f"{name}:{to}")
    current = versions[-1]
    try:  # a version this code cannot serve (another rendering or architecture) must not become current
        Predictor(target.path, device="cpu")
    except ValueError as error:
        raise ValueError(f"{target.tag} cannot be served by this version of candle-vlm: {error}") from None
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "bundle"
        shutil.copytree(target.path, copy, ignore=shutil.ignore_patterns("model.yaml"))
        manifest = json.loads((copy / "bundle.json").read_text())
        metrics = json.loads(target.info.metadata["test_metrics"])
        return save_to_store(copy, manifest, metrics, name,
                             {"rollback_of": str(target.tag.version), "replaces": str(current.tag.version)})
