"""Fusing the pattern scores of several models.

* Late fusion: a weighted sum of calibrated per-pattern probabilities, one weight per source, fitted on validation
  (grid over the simplex, best validation macro F1). Any subset of sources works: the weights of the sources at
  hand are renormalized and each subset has its own validation thresholds, so a request without bars (no
  engineered features) degrades to the image models instead of failing.
* Learned fusion: a small MLP over the concatenated inputs (VLM image embedding, ResNet features, engineered
  features with a missing-value mask) giving per-pattern logits, trained on the train split with early stopping
  on validation. It needs every input.
* `choose`: the learned fuser is used only when it beats late fusion on validation macro F1 and its train/validation
  gap stays under a bound; otherwise late fusion, with the reason.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import numpy as np

from vlm_assets import evaluation as ev

SOURCES = ("vlm", "resnet", "features")
FUSION_FORMAT = "candle-vlm/fuser-1"


def _key(sources) -> str:
    return "+".join(s for s in SOURCES if s in sources)


def macro_f1(truth: np.ndarray, scores: np.ndarray, thresholds: dict[str, float], classes) -> float:
    report = ev.multilabel_report(truth, ev.apply_thresholds(scores, thresholds, classes), classes)
    return float(report.loc["macro", "f1"])


def _simplex(n: int, step: float) -> list[tuple[float, ...]]:
    units = int(round(1 / step))
    return [tuple(k / units for k in combo) for combo in itertools.product(range(units + 1), repeat=n)
            if sum(combo) == units]


@dataclass(frozen=True)
class LateFusion:
    classes: tuple[str, ...]
    weights: dict[str, float]  # per source; the sources at hand are renormalized
    thresholds: dict[str, dict[str, float]]  # per subset of sources ("vlm+features"), per class

    def fuse(self, probabilities: dict[str, np.ndarray | None]) -> tuple[np.ndarray, list[str]]:
        """Fused probabilities and the sources used (those given, not None, with a positive weight)."""
        used = [s for s in SOURCES if probabilities.get(s) is not None and self.weights.get(s, 0.0) > 0]
        if not used:
            given = sorted(k for k, v in probabilities.items() if v is not None)
            raise ValueError(f"no usable input: given {given}, weighted sources {[s for s in SOURCES if self.weights.get(s, 0) > 0]}")
        total = sum(self.weights[s] for s in used)
        fused = sum(self.weights[s] / total * np.asarray(probabilities[s], dtype=np.float64) for s in used)
        return fused, used

    def predict(self, probabilities: dict[str, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(fused probabilities, bool predictions with the used subset's thresholds, sources used)."""
        fused, used = self.fuse(probabilities)
        return fused, ev.apply_thresholds(fused, self.thresholds[_key(used)], self.classes), used

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "weights": self.weights, "thresholds": self.thresholds}

    @classmethod
    def from_dict(cls, data: dict) -> LateFusion:
        thresholds = {k: {c: float(v) for c, v in t.items()} for k, t in data["thresholds"].items()}
        return cls(tuple(data["classes"]), {k: float(v) for k, v in data["weights"].items()}, thresholds)


def fit_late_fusion(val_probabilities: dict[str, np.ndarray], val_truth: np.ndarray, classes: tuple[str, ...],
                    step: float = 0.1) -> tuple[LateFusion, float]:
    """Weights on a simplex grid maximizing validation macro F1 (max-F1 thresholds per class); then thresholds for
    every subset of the sources. Returns the fusion and its validation macro F1 with all sources."""
    sources = [s for s in SOURCES if s in val_probabilities]
    if not sources:
        raise ValueError("late fusion needs at least one source")
    best, best_f1 = None, -1.0
    for weights in _simplex(len(sources), step):
        if max(weights) == 0:
            continue
        fused = sum(w * val_probabilities[s] for w, s in zip(weights, sources))
        thresholds = ev.best_f1_thresholds(val_truth, fused, classes)
        score = macro_f1(val_truth, fused, thresholds, classes)
        if score > best_f1 + 1e-12:  # first best wins: deterministic
            best, best_f1 = dict(zip(sources, weights)), score
    thresholds = {}
    for size in range(1, len(sources) + 1):
        for subset in itertools.combinations(sources, size):
            if sum(best[s] for s in subset) == 0:
                continue
            fused, used = LateFusion(classes, best, {}).fuse({s: val_probabilities[s] for s in subset})
            thresholds.setdefault(_key(used), ev.best_f1_thresholds(val_truth, fused, classes))
    return LateFusion(classes, best, thresholds), best_f1


# ---- learned fusion ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LearnedFusionConfig:
    hidden: int = 128
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 60
    batch_size: int = 128
    patience: int = 10
    seed: int = 13


def fusion_inputs(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Concatenate the learned fuser's inputs in SOURCES order; engineered features get a missing mask, NaN -> 0."""
    missing = [s for s in SOURCES if s not in parts or parts[s] is None]
    if missing:
        raise ValueError(f"the learned fuser needs every input; missing {missing}")
    features = np.asarray(parts["features"], dtype=np.float32)
    mask = np.isnan(features).astype(np.float32)
    return np.concatenate([np.asarray(parts["vlm"], np.float32), np.asarray(parts["resnet"], np.float32),
                           np.nan_to_num(features), mask], axis=1)


@dataclass
class LearnedFusion:
    classes: tuple[str, ...]
    model: object  # torch.nn.Sequential over standardized inputs
    mean: np.ndarray
    std: np.ndarray
    thresholds: dict[str, float] = field(default_factory=dict)

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(((inputs - self.mean) / self.std).astype(np.float32))
        self.model.eval()
        with torch.no_grad():
            return torch.sigmoid(self.model(x)).numpy().astype(np.float64)


def _mlp(n_in: int, n_out: int, config: LearnedFusionConfig):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(n_in, config.hidden), torch.nn.ReLU(), torch.nn.Dropout(config.dropout),
                               torch.nn.Linear(config.hidden, n_out))


def train_learned_fusion(train_inputs: np.ndarray, train_truth: np.ndarray, val_inputs: np.ndarray,
                         val_truth: np.ndarray, classes: tuple[str, ...],
                         config: LearnedFusionConfig = LearnedFusionConfig()) -> tuple[LearnedFusion, dict]:
    """Minibatch Adam with early stopping on validation loss; thresholds max-F1 on validation. Returns the model and
    its train/validation macro F1 (at the validation thresholds) and history."""
    import torch

    mean = train_inputs.mean(axis=0)
    std = train_inputs.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = _mlp(train_inputs.shape[1], len(classes), config)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        x = torch.from_numpy(((train_inputs - mean) / std).astype(np.float32))
        y = torch.from_numpy(train_truth.astype(np.float32))
        xv = torch.from_numpy(((val_inputs - mean) / std).astype(np.float32))
        yv = torch.from_numpy(val_truth.astype(np.float32))
        generator = torch.Generator().manual_seed(config.seed)
        best_state, best_loss, stale, history = None, float("inf"), 0, []
        for epoch in range(config.epochs):
            model.train()
            for batch in torch.randperm(len(x), generator=generator).split(config.batch_size):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                val_loss = float(torch.nn.functional.binary_cross_entropy_with_logits(model(xv), yv))
                train_loss = float(torch.nn.functional.binary_cross_entropy_with_logits(model(x), y))
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
            if val_loss < best_loss - 1e-6:
                best_loss, stale = val_loss, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= config.patience:
                    break
        model.load_state_dict(best_state)
    fusion = LearnedFusion(tuple(classes), model, mean, std)
    val_scores = fusion.probabilities(val_inputs)
    fusion.thresholds = ev.best_f1_thresholds(val_truth, val_scores, classes)
    train_f1 = macro_f1(train_truth, fusion.probabilities(train_inputs), fusion.thresholds, classes)
    val_f1 = macro_f1(val_truth, val_scores, fusion.thresholds, classes)
    return fusion, {"train_macro_f1": train_f1, "val_macro_f1": val_f1, "epochs": len(history), "history": history}


def choose(late_val_f1: float, learned: dict | None, max_gap: float) -> tuple[str, str]:
    """("learned" | "late", why)."""
    if learned is None:
        return "late", "no learned fuser was trained"
    gap = learned["train_macro_f1"] - learned["val_macro_f1"]
    if learned["val_macro_f1"] <= late_val_f1:
        return "late", (f"learned validation macro F1 {learned['val_macro_f1']:.4f} does not beat late fusion's "
                        f"{late_val_f1:.4f}")
    if gap > max_gap:
        return "late", f"learned train/validation gap {gap:.4f} exceeds the bound {max_gap:.4f}"
    return "learned", (f"learned validation macro F1 {learned['val_macro_f1']:.4f} beats late fusion's "
                       f"{late_val_f1:.4f} with a train/validation gap of {gap:.4f} <= {max_gap:.4f}")


def fuser_files(late: LateFusion, active: str, reason: str, learned: LearnedFusion | None) -> dict[str, bytes]:
    """`fuser.json` (late fusion, the choice and why, the learned fuser's scaling) and, when there is a learned
    fuser, `learned.safetensors` (its weights)."""
    document = {"format": FUSION_FORMAT, "active": active, "reason": reason, "late": late.to_dict()}
    files = {}
    if learned is not None:
        from safetensors.torch import save

        document["learned"] = {"classes": list(learned.classes), "thresholds": learned.thresholds,
                               "hidden": int(learned.model[0].out_features),
                               "mean": learned.mean.tolist(), "std": learned.std.tolist()}
        files["learned.safetensors"] = save({k: v.contiguous() for k, v in learned.model.state_dict().items()})
    # thresholds may be inf (a pattern never positive in validation): stored as "inf", which float() reads back
    files["fuser.json"] = json.dumps(ev.to_jsonable(document), indent=2, sort_keys=True, allow_nan=False).encode()
    return files


def load_fuser(files: dict[str, bytes]) -> tuple[dict, LateFusion, LearnedFusion | None]:
    """(document, late fusion, learned fusion or None) from `fuser_files` output."""
    from safetensors.torch import load

    document = json.loads(files["fuser.json"])
    if document.get("format") != FUSION_FORMAT:
        raise ValueError(f"not a fuser: format {document.get('format')!r}, expected {FUSION_FORMAT!r}")
    late = LateFusion.from_dict(document["late"])
    learned = None
    if "learned" in document:
        spec = document["learned"]
        mean, std = np.asarray(spec["mean"]), np.asarray(spec["std"])
        model = _mlp(len(mean), len(spec["classes"]), LearnedFusionConfig(hidden=spec["hidden"]))
        model.load_state_dict(load(files["learned.safetensors"]))
        learned = LearnedFusion(tuple(spec["classes"]), model, mean, std,
                                {c: float(v) for c, v in spec["thresholds"].items()})
    return document, late, learned
