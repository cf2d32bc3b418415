"""Scoring charts against text: prompt-ensemble class embeddings, prompt selection on validation, and the full
evaluation protocol (core detection, zero-shot top-1, paraphrase robustness, regression suite).

The protocol, used for the frozen baseline and the fine-tuned model alike:
- core detection: per core pattern the cosine score between image and class ensemble; thresholds maximizing F1
  on the validation split, applied once to the test split; neutral = no core pattern predicted.
- zero-shot: top-1 over every class of the library (core + zero-shot + neutral); a prediction is correct when the
  window shows that class (labels are multi-label).
- paraphrases: the same top-1 scoring with the core classes prompted only by held-out wordings.
Validation data chooses prompts and thresholds; the test split is only ever scored.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vlm_assets import evaluation as ev
from vlm_assets.labeling import CORE_PATTERNS, NEUTRAL
from vlm_assets.prompts import PromptLibrary


def embed_images(clip, pngs, batch_size: int = 64, progress=None) -> np.ndarray:
    """(n, d) L2-normalized float32 image embeddings of PNG bytes, in order."""
    import torch
    from PIL import Image

    out = []
    with torch.no_grad():
        for start in range(0, len(pngs), batch_size):
            images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs[start:start + batch_size]]
            out.append(clip.encode_images(images).float().cpu().numpy())
            if progress is not None:
                progress(min(start + batch_size, len(pngs)), len(pngs))
    return np.concatenate(out) if out else np.zeros((0, clip.embed_dim), dtype=np.float32)


def encode_texts(clip, texts: list[str], batch_size: int = 128) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([clip.encode_texts(texts[i:i + batch_size]).float().cpu().numpy()
                               for i in range(0, len(texts), batch_size)])


@dataclass(frozen=True)
class PromptEmbeddings:
    """Every prompt of a library embedded once; `selection` picks which prompts form each class ensemble."""

    classes: tuple[str, ...]
    prompts: dict[str, tuple[str, ...]]
    embeddings: dict[str, np.ndarray]  # class -> (n_prompts, d), normalized

    @classmethod
    def of(cls, clip, library: PromptLibrary) -> "PromptEmbeddings":
        texts = [t for c in library.class_names for t in library.classes[c]]
        flat = encode_texts(clip, texts)
        return cls.from_flat(library, flat / np.linalg.norm(flat, axis=1, keepdims=True))

    @classmethod
    def from_flat(cls, library: PromptLibrary, flat: np.ndarray) -> "PromptEmbeddings":
        """From every prompt's normalized embedding in library order (as `flat()` gives, e.g. cached on disk)."""
        bounds = np.cumsum([0] + [len(library.classes[c]) for c in library.class_names])
        if len(flat) != bounds[-1]:
            raise ValueError(f"{len(flat)} prompt embeddings for a library of {bounds[-1]} prompts")
        return cls(
            classes=library.class_names,
            prompts={c: library.classes[c] for c in library.class_names},
            embeddings={c: flat[a:b] for c, a, b in zip(library.class_names, bounds[:-1], bounds[1:])},
        )

    def flat(self) -> np.ndarray:
        """Every prompt's embedding in library order."""
        return np.concatenate([self.embeddings[c] for c in self.classes])

    def selection_of(self, texts: dict[str, list[str]]) -> dict[str, list[int]]:
        """Indices of stored prompt texts (e.g. an evaluation's selection); a text not in the library is an error."""
        try:
            return {c: [self.prompts[c].index(t) for t in texts[c]] for c in self.classes}
        except (KeyError, ValueError) as error:
            raise ValueError(f"the prompt selection does not match this prompt library: {error}") from None

    def ensemble(self, selection: dict[str, list[int]] | None = None) -> np.ndarray:
        rows = []
        for c in self.classes:
            chosen = self.embeddings[c] if selection is None else self.embeddings[c][selection[c]]
            mean = chosen.mean(axis=0)
            rows.append(mean / np.linalg.norm(mean))
        return np.stack(rows)


def select_prompts(images: np.ndarray, truth: pd.DataFrame, prompts: PromptEmbeddings, max_prompts: int = 6) -> dict[str, list[int]]:
    """Per class, greedy forward selection of the prompts whose ensemble best ranks that class's validation windows
    (average precision, one-vs-rest). `truth` has one bool column per class. Ties keep the earlier prompt."""
    from sklearn.metrics import average_precision_score

    selection = {}
    for c in prompts.classes:
        y = truth[c].to_numpy(dtype=bool)
        candidates = prompts.embeddings[c]
        if not y.any() or y.all():
            selection[c] = list(range(len(candidates)))
            continue
        chosen: list[int] = []
        best = -np.inf
        while len(chosen) < min(max_prompts, len(candidates)):
            trials = []
            for k in range(len(candidates)):
                if k in chosen:
                    continue
                mean = candidates[chosen + [k]].mean(axis=0)
                trials.append((average_precision_score(y, images @ (mean / np.linalg.norm(mean))), -k, k))
            score, _, k = max(trials)
            if score <= best:
                break
            chosen.append(k)
            best = score
        selection[c] = sorted(chosen)
    return selection


def truth_frame(windows: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """Bool truth per class; `neutral` means no pattern of any kind (the dataset's neutral column)."""
    return windows[list(classes)].astype(bool).reset_index(drop=True)


@dataclass
class Evaluation:
    """Everything one model's evaluation produced (reports are DataFrames from vlm_assets.evaluation)."""

    thresholds: dict[str, float]
    selection: dict[str, list[str]]
    detection: pd.DataFrame  # core multi-label report on test
    neutral: dict  # "no core pattern" decision on test
    zero_shot: pd.DataFrame  # top-1 over all classes, rows: zero-shot patterns + macro
    all_classes: pd.DataFrame  # top-1 over all classes, every class
    paraphrase: pd.DataFrame  # top-1 with paraphrased core prompts, rows: core patterns + macro
    success_rate: float
    confusion: pd.DataFrame  # top-1 among core + neutral on test

    def summary(self) -> dict:
        zero = self.zero_shot.drop(index="macro")
        return {
            "core_macro_recall": float(self.detection.loc["macro", "recall"]),
            "core_macro_precision": float(self.detection.loc["macro", "precision"]),
            "core_macro_f1": float(self.detection.loc["macro", "f1"]),
            "core_min_recall": float(self.detection.drop(index=["macro", "micro"])["recall"].min()),
            "neutral_precision": float(self.neutral["precision"]) if self.neutral["precision"] is not None else float("nan"),
            "zero_shot_min_precision": float(zero["precision"].min()),
            "zero_shot_macro_precision": float(self.zero_shot.loc["macro", "precision"]),
            "zero_shot_macro_recall": float(self.zero_shot.loc["macro", "recall"]),
            "paraphrase_macro_precision": float(self.paraphrase.loc["macro", "precision"]),
            "success_rate": float(self.success_rate),
        }


def evaluate(val_images: np.ndarray, val_windows: pd.DataFrame, test_images: np.ndarray, test_windows: pd.DataFrame,
             prompts: PromptEmbeddings, paraphrases: PromptEmbeddings, tune_prompts: bool = True) -> Evaluation:
    """The protocol of the module docstring. Prompts (when `tune_prompts`) and thresholds come from validation."""
    classes = prompts.classes
    core = [c for c in classes if c in CORE_PATTERNS]
    zero = [c for c in classes if c not in CORE_PATTERNS and c != NEUTRAL]
    val_truth = truth_frame(val_windows, classes)
    selection = select_prompts(val_images, val_truth, prompts) if tune_prompts else None
    ensemble = prompts.ensemble(selection)
    core_index = [classes.index(c) for c in core]

    val_scores = val_images @ ensemble.T
    test_truth = truth_frame(test_windows, classes)
    test_scores = test_images @ ensemble.T
    thresholds, detection, neutral = ev.detection_on_test(val_truth[core].to_numpy(), val_scores[:, core_index],
                                                          test_truth[core].to_numpy(), test_scores[:, core_index], core)

    all_truth = test_truth.to_numpy()
    all_classes = ev.top1_report(all_truth, test_scores, classes)
    zero_shot = ev.top1_report(all_truth, test_scores, classes, report_classes=zero)
    paraphrase_scores = test_images @ paraphrases.ensemble(None).T
    paraphrase = ev.top1_report(all_truth, paraphrase_scores, paraphrases.classes, report_classes=core)

    core_and_neutral = core + [NEUTRAL]
    truth_cn = test_truth[core].copy()
    truth_cn[NEUTRAL] = ~truth_cn.any(axis=1)
    cn_scores = np.concatenate([test_scores[:, core_index], test_scores[:, [classes.index(NEUTRAL)]]], axis=1)
    confusion = ev.confusion_matrix(truth_cn.to_numpy(), cn_scores.argmax(axis=1), core_and_neutral)
    return Evaluation(
        thresholds=thresholds,
        selection={c: [prompts.prompts[c][k] for k in (selection or {}).get(c, range(len(prompts.prompts[c])))]
                   for c in classes},
        detection=detection, neutral=neutral, zero_shot=zero_shot, all_classes=all_classes, paraphrase=paraphrase,
        success_rate=ev.success_rate(all_truth, test_scores), confusion=confusion,
    )
