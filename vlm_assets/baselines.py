"""The ResNet baseline: a ResNet-18 (timm) trained from scratch, multi-label on the core patterns.

It sees exactly what ChartCLIP sees: the same on-the-fly training stream (train-split windows, randomized styles,
class-balanced sampling) and the same image preprocessing, and it is scored on the same stored val/test charts.
Its pooled features are one input of the learned fuser.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.training import OptimConfig, StreamConfig, TrainingWindows, TrainResult, _train

RESNET_FORMAT = "candle-vlm/resnet-baseline-1"
RESNET_ARCH = "resnet18"


@dataclass(frozen=True)
class ResNetConfig:
    optim: OptimConfig = OptimConfig(steps=250, batch_size=32, lr=1e-3, warmup_steps=25)
    stream: StreamConfig = StreamConfig(seed=31)
    arch: str = RESNET_ARCH


@dataclass
class ResNetBaseline:
    model: Any  # a timm ResNet whose classifier has one logit per class
    preprocess: Any
    device: str
    classes: tuple[str, ...]
    arch: str

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)

    def predict(self, charts: list, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, classes), pooled features (n, feature_dim)) of charts (PNG bytes or PIL images), in
        order."""
        from PIL import Image

        probabilities, features = [], []
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(charts), batch_size):
                pixels = torch.stack([self.preprocess((Image.open(io.BytesIO(c)) if isinstance(c, bytes) else c)
                                                      .convert("RGB"))
                                      for c in charts[start:start + batch_size]]).to(self.device)
                pooled = self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)
                probabilities.append(torch.sigmoid(self.model.get_classifier()(pooled)).float().cpu().numpy())
                features.append(pooled.float().cpu().numpy())
        if not probabilities:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, self.feature_dim), np.float32)
        return np.concatenate(probabilities), np.concatenate(features)


def create(arch: str = RESNET_ARCH, classes: tuple[str, ...] = CORE_PATTERNS, device: str = "cpu",
           seed: int = 0) -> ResNetBaseline:
    """A randomly initialized ResNet (seeded, without touching the caller's random state) with ChartCLIP's
    preprocessing at 224 px."""
    import open_clip
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, num_classes=len(classes)).to(device)
    preprocess = open_clip.image_transform(224, is_train=False)
    return ResNetBaseline(model.eval(), preprocess, device, tuple(classes), arch)


def train(baseline: ResNetBaseline, windows: TrainingWindows, config: ResNetConfig,
          progress: Callable | None = None) -> TrainResult:
    """Multi-label BCE on the core patterns over the training stream."""
    columns = [CORE_PATTERNS.index(c) for c in baseline.classes]

    def step_loss(batch):
        logits = baseline.model(batch["pixels"].to(baseline.device)).float()
        labels = batch["labels"][:, columns].to(baseline.device)
        return {"multilabel": torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)}

    def draw(rng, step):
        share = config.stream.randomized_share(step, config.optim.steps)
        return list(enumerate(windows.plan(rng, config.optim.batch_size, share)))

    return _train(baseline, list(baseline.model.parameters()), windows, config.optim, step_loss,
                  torch.nn.ModuleDict(), draw, progress, captions=False)


def checkpoint_bytes(baseline: ResNetBaseline, sidecar: dict | None = None) -> tuple[bytes, bytes]:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in baseline.model.state_dict().items()}
    meta = {"format": RESNET_FORMAT, "arch": baseline.arch, "classes": list(baseline.classes)} | (sidecar or {})
    return save(state), json.dumps(meta, indent=2, sort_keys=True).encode()


def from_bytes(weights: bytes, meta: bytes | str, device: str = "cpu") -> tuple[ResNetBaseline, dict]:
    """The baseline stored by `checkpoint_bytes` (safetensors: no pickle), and its sidecar."""
    from safetensors.torch import load

    sidecar = json.loads(meta)
    if sidecar.get("format") != RESNET_FORMAT:
        raise ValueError(f"not a ResNet baseline checkpoint: format {sidecar.get('format')!r}, expected {RESNET_FORMAT!r}")
    baseline = create(sidecar["arch"], tuple(sidecar["classes"]), device)
    baseline.model.load_state_dict({k: v.to(device) for k, v in load(weights).items()})
    return baseline, sidecar
