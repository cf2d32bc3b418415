"""The promoted bundle at inference time: one object that renders bars, encodes charts, scores trained patterns
(calibrated and fused) and free-text queries (zero-shot). The BentoML service and the promotion step both use it,
so what is measured at promotion is what is served.

A bundle is a directory:
  bundle.json                 manifest: format, versions of every part, prompt selection, render settings, metrics
  model.safetensors(.json)    the fine-tuned ChartCLIP
  calibrator.json             the VLM's temperature + Platt scaling
  fuser.json (+ learned.safetensors)   late/learned fusion and the other sources' Platt scaling
  feature_model.json          the LightGBM feature model
  resnet.safetensors(.json)   the ResNet baseline, only when fusion uses it
  prompt_library.json         the prompt library the evaluation selected from
  prompt_embeddings.npy       that library's prompt embeddings (computed once per model version)
  image_encoder(.int8|.int8-static).onnx   the image tower for ONNX Runtime: fp32, dynamic int8, static int8
                              (vlm_assets.serving.encoders)
  gate.json, direction_model.json   the trading signal gate (vlm_assets.trading), when promoted with one
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vlm_assets import fusion
from vlm_assets.calibration import Calibrator
from vlm_assets.features import FEATURE_NAMES, FeatureModel, window_features
from vlm_assets.labeling import CORE_PATTERNS, NEUTRAL
from vlm_assets.rendering import STYLE_VERSION, ChartStyle, OhlcvArrays, render_chart, validate_bars
from vlm_assets.serving import encoders
from vlm_assets.serving.requests import CHART_SIZE, pattern_key

BUNDLE_FORMAT = "candle-vlm/bundle-1"
CALIBRATED_CLASSES = (*CORE_PATTERNS, NEUTRAL)  # the calibrator's columns
TEXT_CACHE_SIZE = 4096


def embedding_id(embedding: np.ndarray) -> str:
    """Content id of an embedding: the same chart under the same model gets the same id."""
    return hashlib.sha256(np.ascontiguousarray(embedding, dtype=np.float32).tobytes()).hexdigest()[:16]


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


@dataclass(frozen=True)
class TrainedScores:
    """Fused, calibrated probabilities of the core patterns for n charts."""

    probabilities: np.ndarray  # (n, len(CORE_PATTERNS))
    detected: np.ndarray  # (n, len(CORE_PATTERNS)) bool, at the thresholds chosen on validation
    sources: list[str]
    fusion: str  # "late" or "learned"


class Predictor:
    def __init__(self, directory: str | os.PathLike, device: str = "cpu", version: str | None = None,
                 backend: str = "torch-fp32", threads: int = 0):
        from vlm_assets.baselines import from_bytes
        from vlm_assets.model import load_checkpoint
        from vlm_assets.prompts import load_prompt_library
        from vlm_assets.zero_shot import PromptEmbeddings

        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / "bundle.json").read_text())
        if self.manifest.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{self.directory}: not a candle-vlm bundle (format {self.manifest.get('format')!r})")
        if self.manifest["render"]["style_version"] != STYLE_VERSION:
            raise ValueError(f"bundle rendered with style version {self.manifest['render']['style_version']}, this "
                             f"code draws version {STYLE_VERSION}: promote a model trained with this code")
        self.version = version or self.manifest["bundle_id"]
        self.clip, _ = load_checkpoint(self.directory / "model.safetensors", device)
        self.clip.model.eval()
        self.logit_scale = float(self.clip.model.logit_scale.detach().exp())
        self.style = ChartStyle.from_dict(self.manifest["render"]["style"])
        self.render_bars = int(self.manifest["render"]["bars"])
        self.calibrator = Calibrator.from_dict(json.loads((self.directory / "calibrator.json").read_text()))
        self.fuser = fusion.load_fuser({p.name: p.read_bytes() for p in self.directory.glob("*")
                                        if p.name in ("fuser.json", "learned.safetensors")})
        self.feature_model = FeatureModel.from_json((self.directory / "feature_model.json").read_text())
        resnet = self.directory / "resnet.safetensors"
        self.resnet = from_bytes(resnet.read_bytes(), Path(f"{resnet}.json").read_bytes(), device)[0] \
            if resnet.exists() else None
        library = load_prompt_library(self.directory / "prompt_library.json")
        cached = self.directory / "prompt_embeddings.npy"
        if cached.exists():
            prompts = PromptEmbeddings.from_flat(library, np.load(cached, allow_pickle=False))
        else:
            prompts = PromptEmbeddings.of(self.clip, library)
        self.prompt_embeddings = prompts
        self.library_classes = prompts.classes
        self.class_ensemble = prompts.ensemble(prompts.selection_of(self.manifest["prompt_selection"]))
        self._calibrated_rows = [self.library_classes.index(c) for c in CALIBRATED_CLASSES]
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._device = device
        self.backend = encoders.check_backend(backend)  # of the image encoder; the text tower stays fp32 in torch
        unavailable = encoders.runnable(backend, device, self.directory)
        if backend in encoders.ONNX_FILES and unavailable:
            raise ValueError(f"image encoder backend {backend}: {unavailable}")
        from vlm_assets.trading import GATE_FILES, load_signal_gate

        self.signal_gate = load_signal_gate(self.directory) if all(
            (self.directory / name).exists() for name in GATE_FILES) else None
        self._onnx = encoders.OnnxEncoder(self.directory / encoders.ONNX_FILES[backend], device, threads) \
            if backend in encoders.ONNX_FILES else None

    # ---- inputs ------------------------------------------------------------------------------------------

    def window(self, bars: pd.DataFrame | OhlcvArrays) -> OhlcvArrays:
        """The bars a chart shows, as checked columns: the last `render_bars` (training windows are 50-120 bars)."""
        return OhlcvArrays(*(column[-self.render_bars:] for column in validate_bars(bars)))

    def render(self, window: pd.DataFrame | OhlcvArrays):
        return render_chart(window, self.style)

    def features(self, windows: list[pd.DataFrame | OhlcvArrays]) -> np.ndarray:
        return np.vstack([window_features(w) for w in windows]) if windows else np.zeros((0, len(FEATURE_NAMES)))

    @staticmethod
    def chart_image(image):
        """An RGB image at the size charts are drawn (screenshots are resized, not cropped: a chart's edges matter)."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        return image if image.size == CHART_SIZE else image.resize(CHART_SIZE)

    def encode(self, images: list) -> np.ndarray:
        """(n, d) L2-normalized float32 embeddings of PIL images."""
        import torch

        images = [self.chart_image(i) for i in images]
        if self._onnx is not None:
            return self._onnx(encoders.pixel_batch(images))
        device_type = "cuda" if self._device.startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(device_type, torch.bfloat16, enabled=self.backend == "torch-bf16"):
            return self.clip.encode_images(images).float().cpu().numpy()

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        """Normalized embeddings of free-text prompts; each text is encoded once (LRU cache)."""
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            with torch.inference_mode():
                encoded = self.clip.encode_texts(missing).float().cpu().numpy()
            for text, vector in zip(missing, encoded):
                self._text_cache[text] = vector / np.linalg.norm(vector)
        for text in texts:
            self._text_cache.move_to_end(text)
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return np.stack([self._text_cache[t] for t in texts])

    # ---- scoring -----------------------------------------------------------------------------------------

    def sources_for(self, has_bars: bool) -> list[str]:
        """The models a request needs: the learned fuser needs every input, late fusion only those it weighs."""
        available = ["vlm"] + (["resnet"] if self.resnet is not None else []) + (["features"] if has_bars else [])
        if self.fuser.active == "learned" and self.fuser.learned is not None and len(available) == 3:
            return available
        return self.fuser.late.sources_for(available)

    def resnet_outputs(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        if self.resnet is None:
            raise ValueError("this bundle has no ResNet baseline")
        return self.resnet.predict(images)

    def trained(self, embeddings: np.ndarray, features: np.ndarray | None = None,
                resnet: tuple[np.ndarray, np.ndarray] | None = None) -> TrainedScores:
        """Fused, calibrated probabilities of the core patterns. `features` (n, 36) needs bars; `resnet` is the
        ResNet's (probabilities, pooled features), needed when `sources_for` lists it."""
        vlm = self.calibrator.probabilities(embeddings @ self.class_ensemble[self._calibrated_rows].T)
        vlm = vlm[:, :len(CORE_PATTERNS)]
        parts = {"vlm": vlm, "resnet": None, "features": None}
        if features is not None:
            parts["features"] = self.fuser.calibrated("features", self.feature_model.predict(features))
        if resnet is not None:
            parts["resnet"] = self.fuser.calibrated("resnet", resnet[0])
        learned = self.fuser.learned
        if self.fuser.active == "learned" and learned is not None and features is not None and resnet is not None:
            inputs = fusion.fusion_inputs({"vlm": embeddings, "resnet": resnet[1], "features": features})
            probabilities = learned.probabilities(inputs)
            detected = probabilities >= np.array([learned.thresholds[c] for c in CORE_PATTERNS])
            return TrainedScores(probabilities, detected, list(fusion.SOURCES), "learned")
        probabilities, detected, used = self.fuser.late.predict(parts)
        return TrainedScores(probabilities, detected, used, "late")

    def zero_shot_classes(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, library classes): softmax over every class ensemble of the prompt library at the model's logit
        scale (the evaluation's zero-shot protocol)."""
        logits = self.logit_scale * embeddings @ self.class_ensemble.T
        return np.exp(logits - _logsumexp(logits, axis=1)[:, None])

    def zero_shot_text(self, embeddings: np.ndarray, texts: list[str]) -> np.ndarray:
        """(n, len(texts)): for each text alone, its softmax share against every class of the library: how much
        better it describes the chart than the library's own vocabulary."""
        library = self.logit_scale * embeddings @ self.class_ensemble.T  # (n, classes)
        query = self.logit_scale * embeddings @ self.text_embeddings(texts).T  # (n, texts)
        rest = _logsumexp(library, axis=1)[:, None]
        return 1.0 / (1.0 + np.exp(rest - query))

    def prompt_probabilities(self, embeddings: np.ndarray, prompts: list[str]) -> np.ndarray:
        """(n, len(prompts)): softmax over the given prompts only (CLIP's zero-shot classification)."""
        logits = self.logit_scale * embeddings @ self.text_embeddings(prompts).T
        return np.exp(logits - _logsumexp(logits, axis=1)[:, None])

    def score_patterns(self, embedding: np.ndarray, patterns: list[str], features: np.ndarray | None = None,
                       resnet: tuple[np.ndarray, np.ndarray] | None = None, timeframe: str | None = None) -> dict:
        """One chart's answer: per requested pattern its probability, whether it is calibrated, and for trained
        patterns whether it is detected. Trained patterns are fused; library and free-text patterns are zero-shot.
        With bars (`features`) and their `timeframe`, and a bundle with a signal gate, also the trading `signal`
        (vlm_assets.trading.SignalGate.signal over every trained pattern, asked for or not)."""
        embeddings = embedding[None, :]
        keys = [pattern_key(p) for p in patterns]
        result = {"probabilities": {}, "calibrated": {}, "detected": {}, "kind": {}}
        trained = None
        signal = self.signal_gate is not None and features is not None and timeframe is not None
        if signal or any(k in CORE_PATTERNS for k in keys):
            trained = self.trained(embeddings, None if features is None else features[None, :], resnet)
        library = self.zero_shot_classes(embeddings)[0] if any(
            k in self.library_classes and k not in CORE_PATTERNS for k in keys) else None
        free = [p for p, k in zip(patterns, keys) if k not in CORE_PATTERNS and k not in self.library_classes]
        free_p = dict(zip(free, self.zero_shot_text(embeddings, free)[0])) if free else {}
        for pattern, key in zip(patterns, keys):
            if key in CORE_PATTERNS:
                j = CORE_PATTERNS.index(key)
                result["probabilities"][pattern] = float(trained.probabilities[0, j])
                result["calibrated"][pattern] = True
                result["detected"][pattern] = bool(trained.detected[0, j])
                result["kind"][pattern] = "trained"
            elif key in self.library_classes:
                result["probabilities"][pattern] = float(library[self.library_classes.index(key)])
                result["calibrated"][pattern] = False
                result["kind"][pattern] = "zero_shot_library"
            else:
                result["probabilities"][pattern] = float(free_p[pattern])
                result["calibrated"][pattern] = False
                result["kind"][pattern] = "zero_shot_text"
        if trained is not None:
            result["sources"] = trained.sources
            result["fusion"] = trained.fusion
        if signal:
            result["signal"] = self.signal_gate.signal(dict(zip(CORE_PATTERNS, trained.probabilities[0])), features,
                                                       timeframe)
        return result

    def evaluate(self, pngs: list[bytes], features: pd.DataFrame) -> tuple[TrainedScores, TrainedScores]:
        """Scores of stored dataset charts through the serving path: as requests with bars, and as requests with the
        chart image only (no engineered features)."""
        from PIL import Image

        images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
        embeddings = np.concatenate([self.encode(images[i:i + 64]) for i in range(0, len(images), 64)]) \
            if images else np.zeros((0, self.clip.embed_dim), np.float32)
        answers = []
        for has_bars in (True, False):
            resnet = self.resnet_outputs(images) if "resnet" in self.sources_for(has_bars) else None
            answers.append(self.trained(embeddings, features[list(FEATURE_NAMES)].to_numpy() if has_bars else None,
                                        resnet))
        return answers[0], answers[1]
