"""How much of the pattern labels can a chart image carry? The ceiling of a pixel-exact reader.

    python bench/label_ceiling.py [--root artifacts] [--split test] [--draws 16] [--json out.json]

A pixel-exact reader sees, for every open, high, low and close of a window, the pixel row `render_chart` draws it
on (with the window's own style, chart height and panels), knows the price axis, and sees each candle's colour.
`rendering.read_back` gives the prices it can recover. Two readers of the split's windows, scored against the
dataset's labels of the last bar:

* **rule at row centres**: the rule engine on the prices at the centres of their rows;
* **max-F1 threshold on P**: P(pattern | pixels) estimated as the share of `--draws` draws, each price anywhere in
  its row (exactly equal prices, such as an open at the previous close, move together), in which the rule engine
  fires; per pattern, the threshold with the best F1 on the validation split (`evaluation.best_f1_thresholds`, as
  `model_evaluation` picks its thresholds). This is close to the best any image model can do under the
  evaluation's protocol.

`clear_*` counts only the positives of tier rule_high (every condition holds by at least `tier_margin` average
ranges). Each reader runs on the charts as rendered, on the same styles in the uniform layout (no focus zoom), at
twice the chart height, with the weaker focus zoom rendered before 2026-12-03 (the focus candles' range at least
30-50% of the price panel, up to 4x magnified, instead of today's 60-80% and 10x) and with a fixed 85% zoom (charts
in the uniform layout stay uniform).
Relabelling the exact windows must reproduce the dataset's labels (checked: it guards the harness). Needs the data
assets in --root (`candle-vlm run` or bench/dataset.py). Issue 3's floors: macro recall >= 0.95, every core pattern
>= 0.90, neutral precision >= 0.90.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

from bench.common import machine_info  # noqa: E402

FLOORS = {"macro_recall": 0.95, "min_recall": 0.90, "neutral_precision": 0.90}


def _style_variants():
    """name -> (style transform, chart height factor)."""
    return {
        "as rendered": (lambda style: style, 1),
        "uniform layout": (lambda style: dataclasses.replace(style, focus_bars=0), 1),
        "twice the height": (lambda style: style, 2),
        "weaker focus zoom (before 2026-12-03)": (
            lambda style: dataclasses.replace(style, focus_min_span=style.focus_min_span - 0.3, focus_max_zoom=4.0), 1),
        "focus zoom 85%": (lambda style: dataclasses.replace(style, focus_min_span=0.85), 1),
    }


def read_window(window, style, height: int, composite: bool, within_row=None):
    """The read-back window as a frame the rule engine takes; a candle's colour keeps its direction when its open and
    close share a row."""
    import numpy as np
    import pandas as pd

    from vlm_assets.rendering import read_back

    read = read_back(window, style, height, with_htf_panel=composite, within_row=within_row)
    opened, closed = window["open"].to_numpy(), window["close"].to_numpy()
    close = read.close.copy()
    flipped = np.sign(close - read.open) != np.sign(closed - opened)
    close[flipped] = np.nextafter(read.open[flipped], np.where(closed > opened, np.inf, -np.inf)[flipped])
    high = np.maximum.reduce([read.high, read.open, close])
    low = np.minimum.reduce([read.low, read.open, close])
    return pd.DataFrame({"open": read.open, "high": high, "low": low, "close": close, "volume": read.volume})


def within_row_draw(window, rng):
    """Offsets in [-0.5, 0.5) rows for the four prices of every bar; prices that are exactly equal (an open at the
    previous close) share one offset, since the reader cannot tell equal from close but equal is common."""
    import numpy as np

    values = window[["open", "high", "low", "close"]].to_numpy().T
    unique, inverse = np.unique(values, return_inverse=True)
    return (rng.random(unique.size) - 0.5)[inverse.reshape(values.shape)]


def scores(truth, predicted, clear) -> dict:
    """Recall and precision per core pattern; `clear` marks the positives of tier rule_high."""
    import numpy as np

    from vlm_assets.labeling import CORE_PATTERNS

    hits = (truth & predicted).sum(axis=0)
    recall = hits / np.maximum(truth.sum(axis=0), 1)
    precision = np.where(predicted.sum(axis=0) > 0, hits / np.maximum(predicted.sum(axis=0), 1), 1.0)
    clear_recall = (clear & predicted).sum(axis=0) / np.maximum(clear.sum(axis=0), 1)
    none_predicted = ~predicted.any(axis=1)
    neutral_precision = float((~truth.any(axis=1))[none_predicted].mean()) if none_predicted.any() else 1.0
    return {
        "macro_recall": round(float(recall.mean()), 4),
        "min_recall": round(float(recall.min()), 4),
        "macro_precision": round(float(precision.mean()), 4),
        "neutral_precision": round(neutral_precision, 4),
        "clear_macro_recall": round(float(clear_recall.mean()), 4),
        "clear_min_recall": round(float(clear_recall.min()), 4),
        "per_pattern": {name: {"recall": round(float(r), 4), "precision": round(float(p), 4),
                               "clear_recall": round(float(c), 4)}
                        for name, r, p, c in zip(CORE_PATTERNS, recall, precision, clear_recall)},
    }


class _Split:
    def __init__(self, artifacts, bars, labels, split: str):
        import numpy as np

        from vlm_assets.labeling import CORE_PATTERNS
        from vlm_assets.pipeline.model import dataset_windows

        windows = dataset_windows(artifacts, ["symbol", "timeframe", "pos", "n_bars", "split", "style_json",
                                              "composite", *CORE_PATTERNS])
        self.windows = windows[windows["split"] == split].reset_index(drop=True)
        if self.windows.empty:
            raise ValueError(f"the dataset has no {split!r} windows")
        self.bars = [bars[(r.symbol, r.timeframe)].iloc[r.pos - r.n_bars + 1: r.pos + 1].reset_index(drop=True)
                     for r in self.windows.itertuples(index=False)]
        self.truth = self.windows[list(CORE_PATTERNS)].to_numpy(bool)
        tiers = [f"{name}_tier" for name in CORE_PATTERNS]
        self.clear = np.stack([labels[(r.symbol, r.timeframe)][tiers].iloc[r.pos].to_numpy() == "rule_high"
                               for r in self.windows.itertuples(index=False)]) & self.truth


def read_labels(split: _Split, height: int, transform, draws: int, seed: int):
    """(labels read at the row centres, share of `draws` within-row draws in which each pattern fires)."""
    import numpy as np

    from vlm_assets.labeling import CORE_PATTERNS, label_bars
    from vlm_assets.rendering import ChartStyle

    centre = np.zeros_like(split.truth)
    probability = np.zeros(split.truth.shape)
    for i, (row, window) in enumerate(zip(split.windows.itertuples(index=False), split.bars)):
        style = transform(ChartStyle.from_dict(json.loads(row.style_json)))
        composite = bool(row.composite)
        centre[i] = label_bars(read_window(window, style, height, composite))[list(CORE_PATTERNS)].to_numpy(bool)[-1]
        rng = np.random.default_rng([seed, i])
        for _ in range(draws):
            offsets = within_row_draw(window, rng)
            probability[i] += label_bars(read_window(window, style, height, composite, offsets))[
                list(CORE_PATTERNS)].to_numpy(float)[-1]
    return centre, probability / max(draws, 1)


def run(root: Path, split: str, draws: int) -> dict:
    from vlm_assets import evaluation as ev
    from vlm_assets.labeling import CORE_PATTERNS, label_bars
    from vlm_assets.pipeline.artifacts import load_bars, load_labels
    from vlm_assets.storage import ArtifactStore

    artifacts = ArtifactStore(root)
    settings = artifacts.read_json(f"chart_images/{artifacts.current_version('chart_images')}/settings.json")
    height = int(settings["images"]["height"])
    bars, labels = load_bars(artifacts), load_labels(artifacts)
    evaluated, tuning = _Split(artifacts, bars, labels, split), _Split(artifacts, bars, labels, "val")
    exact = [label_bars(window)[list(CORE_PATTERNS)].to_numpy(bool)[-1] for window in evaluated.bars]
    if not (exact == evaluated.truth).all():
        raise RuntimeError("relabelling the exact windows did not reproduce the dataset's labels: the harness is wrong")
    report = {"split": split, "threshold_split": "val", "windows": len(evaluated.windows), "chart_height": height,
              "within_row_draws": draws, "positives": int(evaluated.truth.sum()),
              "clear_positives": int(evaluated.clear.sum()),
              "clear_share": dict(zip(CORE_PATTERNS, (evaluated.clear.sum(axis=0) / evaluated.truth.sum(axis=0))
                                      .round(3).tolist())),
              "floors": FLOORS, "readers": {}}
    for name, (transform, factor) in _style_variants().items():
        started = time.perf_counter()
        centre, probability = read_labels(evaluated, height * factor, transform, draws, seed=1)
        _, tuning_probability = read_labels(tuning, height * factor, transform, draws, seed=2)
        thresholds = ev.best_f1_thresholds(tuning.truth, tuning_probability, CORE_PATTERNS)
        report["readers"][f"{name}: rule at row centres"] = scores(evaluated.truth, centre, evaluated.clear)
        report["readers"][f"{name}: max-F1 threshold on P"] = scores(
            evaluated.truth, ev.apply_thresholds(probability, thresholds, CORE_PATTERNS), evaluated.clear) | {
            "thresholds": {k: round(v, 4) for k, v in thresholds.items()}}
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return report


def main() -> int:
    from vlm_assets.labeling import CORE_PATTERNS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("artifacts"))
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--draws", type=int, default=16, help="within-row draws per window for P(pattern | pixels)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = {"machine": machine_info(), "command": " ".join(sys.argv)} | run(args.root, args.split, args.draws)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    variants = report["readers"]
    print(f"\n{report['split']} split, {report['windows']} windows, charts {report['chart_height']} px high; share of "
          "positives in tier rule_high: " + ", ".join(f"{k} {v:.2f}" for k, v in report["clear_share"].items()) + "\n")
    print("| | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
    for key in ("macro_recall", "min_recall", "macro_precision", "neutral_precision", "clear_macro_recall",
                "clear_min_recall"):
        print(f"| {key} | " + " | ".join(f"{v[key]:.3f}" for v in variants.values()) + " |")
    for name in CORE_PATTERNS:
        print(f"| {name} recall / precision | " + " | ".join(
            f"{v['per_pattern'][name]['recall']:.2f} / {v['per_pattern'][name]['precision']:.2f}"
            for v in variants.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
