"""Fusing the pattern scores of several models.

* Late fusion: a weighted sum of calibrated per-pattern probabilities, fitted on validation (grid over the
  simplex, best validation macro F1, max-F1 thresholds). Weights and thresholds are fitted for every subset of
  sources a request may have, so a request without bars (no engineered features) gets the image models' own
  fusion instead of failing. A source joins only when it adds at least `min_gain` validation macro F1, so a weak
  or expensive model is not kept for noise.
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
import pandas as pd

from vlm_assets import evaluation as ev

SOURCES = ("vlm", "resnet", "features")
FUSION_FORMAT = "candle-vlm/fuser-2"


def subset_key(sources) -> str:
    sources = set(sources)
    return "+".join(s for s in SOURCES if s in sources)


def macro_f1(truth: np.ndarray, scores: np.ndarray, thresholds: dict[str, float], classes) -> float:
    report = ev.multilabel_report(truth, ev.apply_thresholds(scores, thresholds, classes), classes)
    return float(report.loc["macro", "f1"])


def _simplex(n: int, step: float) -> list[tuple[float, ...]]:
    units = int(round(1 / step))
    return [tuple(k / units for k in combo) for combo in itertools.product(range(units + 1), repeat=n)
            if sum(combo) == units]


def subsets(sources) -> list[tuple[str, ...]]:
    """Every non-empty subset of `sources`, in SOURCES order."""
    present = [s for s in SOURCES if s in sources]
    return [c for size in range(1, len(present) + 1) for c in itertools.combinations(present, size)]


@dataclass(frozen=True)
class LateFusion:
    classes: tuple[str, ...]
    weights: dict[str, dict[str, float]]  # per subset of available sources ("vlm+features"): weight per source
    thresholds: dict[str, dict[str, float]]  # per subset of available sources: threshold per class

    def sources_for(self, available) -> list[str]:
        """The sources a request with `available` inputs is fused from (positive weight): the others need not run."""
        key = subset_key(available)
        if key not in self.weights:
            raise ValueError(f"no usable input: given {sorted(available)}, fitted for {sorted(self.weights)}")
        return [s for s in SOURCES if self.weights[key].get(s, 0.0) > 0]

    def fuse(self, probabilities: dict[str, np.ndarray | None]) -> tuple[np.ndarray, list[str], str]:
        """Fused probabilities, the sources used and the availability key whose weights applied."""
        key = subset_key(s for s, p in probabilities.items() if p is not None)
        used = self.sources_for(key.split("+"))
        fused = sum(self.weights[key][s] * np.asarray(probabilities[s], dtype=np.float64) for s in used)
        return fused, used, key

    def predict(self, probabilities: dict[str, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(fused probabilities, bool predictions with that availability's thresholds, sources used)."""
        fused, used, key = self.fuse(probabilities)
        return fused, ev.apply_thresholds(fused, self.thresholds[key], self.classes), used

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "weights": self.weights, "thresholds": self.thresholds}

    @classmethod
    def from_dict(cls, data: dict) -> LateFusion:
        weights = {k: {s: float(w) for s, w in v.items()} for k, v in data["weights"].items()}
        thresholds = {k: {c: float(v) for c, v in t.items()} for k, t in data["thresholds"].items()}
        return cls(tuple(data["classes"]), weights, thresholds)


def fit_late_fusion(val_probabilities: dict[str, np.ndarray], val_truth: np.ndarray, classes: tuple[str, ...],
                    step: float = 0.1, min_gain: float = 0.0) -> tuple[LateFusion, pd.DataFrame]:
    """Weights on a simplex grid and max-F1 thresholds, per subset of available sources, maximizing validation
    macro F1; a combination with more sources must beat the best with fewer by `min_gain`. Returns the fusion and a
    validation table (availability, sources used, weights, macro F1)."""
    sources = [s for s in SOURCES if s in val_probabilities]
    if not sources:
        raise ValueError("late fusion needs at least one source")
    trials = []  # (support, weights, thresholds, score): each grid point once
    for point in _simplex(len(sources), step):
        weights = {s: w for s, w in zip(sources, point) if w > 0}
        fused = sum(w * val_probabilities[s] for s, w in weights.items())
        thresholds = ev.best_f1_thresholds(val_truth, fused, classes)
        trials.append((tuple(weights), weights, thresholds, macro_f1(val_truth, fused, thresholds, classes)))
    chosen_weights, chosen_thresholds, rows = {}, {}, []
    for available in subsets(sources):
        best = None  # first best wins within a support size: deterministic
        for size in range(1, len(available) + 1):
            candidates = [t for t in trials if len(t[0]) == size and set(t[0]) <= set(available)]
            top = max(candidates, key=lambda t: t[3])
            if best is None or top[3] > best[3] + min_gain:
                best = top
        key = subset_key(available)
        chosen_weights[key], chosen_thresholds[key] = best[1], best[2]
        rows.append({"available": key, "used": subset_key(best[0]), "weights": best[1], "val_macro_f1": best[3]})
    return LateFusion(tuple(classes), chosen_weights, chosen_thresholds), pd.DataFrame(rows)


def fit_source_calibrator(val_probabilities: np.ndarray, val_truth: np.ndarray, classes: tuple[str, ...]):
    """Platt scaling of a model's probabilities on their logits, fitted on validation."""
    from vlm_assets import calibration as cal

    logits = logit(val_probabilities)
    return cal.fit(logits, logits, val_truth, classes)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


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


@dataclass
class Fuser:
    """What the `fuser` asset stores: the active fusion and why, late fusion, the learned fuser if one was trained,
    and the Platt scaling of the raw ResNet and feature-model probabilities (the VLM's is the `calibrator`)."""

    active: str
    reason: str
    late: LateFusion
    learned: LearnedFusion | None
    calibrators: dict = field(default_factory=dict)  # source -> calibration.Calibrator

    def calibrated(self, source: str, probabilities: np.ndarray) -> np.ndarray:
        return self.calibrators[source].probabilities(logit(probabilities))


def fuser_files(fuser: Fuser) -> dict[str, bytes]:
    """`fuser.json` (late fusion, the choice and why, source calibrators, the learned fuser's scaling) and, when
    there is a learned fuser, `learned.safetensors` (its weights)."""
    document = {"format": FUSION_FORMAT, "active": fuser.active, "reason": fuser.reason, "late": fuser.late.to_dict(),
                "calibrators": {s: c.to_dict() for s, c in fuser.calibrators.items()}}
    files = {}
    learned = fuser.learned
    if learned is not None:
        from safetensors.torch import save

        document["learned"] = {"classes": list(learned.classes), "thresholds": learned.thresholds,
                               "hidden": int(learned.model[0].out_features),
                               "mean": learned.mean.tolist(), "std": learned.std.tolist()}
        files["learned.safetensors"] = save({k: v.contiguous() for k, v in learned.model.state_dict().items()})
    # thresholds may be inf (a pattern never positive in validation): stored as "inf", which float() reads back
    files["fuser.json"] = json.dumps(ev.to_jsonable(document), indent=2, sort_keys=True, allow_nan=False).encode()
    return files


def load_fuser(files: dict[str, bytes]) -> Fuser:
    """The `Fuser` stored by `fuser_files`."""
    from safetensors.torch import load

    from vlm_assets.calibration import Calibrator

    document = json.loads(files["fuser.json"])
    if document.get("format") != FUSION_FORMAT:
        raise ValueError(f"not a fuser: format {document.get('format')!r}, expected {FUSION_FORMAT!r}")
    learned = None
    if "learned" in document:
        spec = document["learned"]
        mean, std = np.asarray(spec["mean"]), np.asarray(spec["std"])
        model = _mlp(len(mean), len(spec["classes"]), LearnedFusionConfig(hidden=spec["hidden"]))
        model.load_state_dict(load(files["learned.safetensors"]))
        learned = LearnedFusion(tuple(spec["classes"]), model, mean, std,
                                {c: float(v) for c, v in spec["thresholds"].items()})
    calibrators = {s: Calibrator.from_dict(c) for s, c in document.get("calibrators", {}).items()}
    return Fuser(document["active"], document["reason"], LateFusion.from_dict(document["late"]), learned, calibrators)
