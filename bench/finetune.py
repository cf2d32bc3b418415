"""Fine-tuning ablations: `training.finetune` from the store's pre-trained model with some settings changed, then the
evaluation protocol of `model_evaluation` (validation-chosen prompts and thresholds, test figures).

    python bench/finetune.py [--root artifacts] [--steps 250] [--batch-size 64] [--lr 1e-3] [--contrastive-weight 0.1]
                             [--multilabel-weight 1.0] [--anatomy-weight 0.5] [--margin-weight 0.0]
                             [--hard-negative-share 0.25] [--logit-speed 20]
                             [--pretrain-steps 300] [--text-whitening 4.0|off] [--caption-pool 12000]

Unset options keep `training.FinetuneConfig`'s defaults. Reads the current `chart_clip_pretrained` and the data assets
in --root (after `candle-vlm run`) and writes nothing there. With --pretrain-steps, --text-whitening or --caption-pool
it pre-trains afresh instead, as `chart_clip_pretrained` does with those settings (and --batch-size) changed, and
reports the pre-trained model too. Besides the test summary it prints the validation mean average precision of the
core patterns' cosine scores against their whole prompt ensembles (no prompt selection, no threshold): a
threshold-free figure to compare settings by.
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
from vlm_assets.storage import atomic_write  # noqa: E402

OVERRIDES = ("contrastive_weight", "multilabel_weight", "anatomy_weight", "margin_weight", "hard_negative_share",
             "logit_speed")
PRETRAIN_OPTIONS = ("pretrain_steps", "text_whitening", "caption_pool")


def whitening(value: str) -> float | None:
    return None if value == "off" else float(value)


def pretrain(artifacts, args) -> tuple[object, dict]:
    """A fresh pre-training run, configured as `chart_clip_pretrained` is, with the pre-training options changed."""
    from vlm_assets import model as chart_model
    from vlm_assets import training
    from vlm_assets.pipeline.model import PretrainAssetConfig, training_windows

    given = {"steps": args.pretrain_steps, "batch_size": args.batch_size, "caption_pool": args.caption_pool}
    changed = {name: value for name, value in given.items() if value is not None}
    if args.text_whitening is not None:  # "off" is None, a setting of its own
        changed["text_whitening"] = whitening(args.text_whitening)
    asset_config = PretrainAssetConfig(**changed)
    config = asset_config.training()
    clip = chart_model.create(chart_model.ModelSpec(asset_config.model_name, asset_config.pretrained or None),
                              args.device, seed=asset_config.seed)
    started = time.perf_counter()
    result = training.pretrain(clip, training_windows(artifacts, config.stream), config)
    return clip, {"steps": config.optim.steps, "text_whitening": result.extra["text_whitening"],
                  "train_seconds": round(time.perf_counter() - started, 1)}


def run(args) -> dict:
    import numpy as np
    from sklearn.metrics import average_precision_score

    from vlm_assets import training
    from vlm_assets.labeling import CORE_PATTERNS
    from vlm_assets.pipeline.model import dataset_windows, load_model_asset, training_windows
    from vlm_assets.prompts import load_prompt_library
    from vlm_assets.storage import ArtifactStore
    from vlm_assets.zero_shot import PromptEmbeddings, embed_images, evaluate

    artifacts = ArtifactStore(args.root)
    windows = dataset_windows(artifacts)
    val = windows[windows["split"] == "val"].reset_index(drop=True)
    test = windows[windows["split"] == "test"].reset_index(drop=True)
    library = load_prompt_library()

    def evaluated(clip) -> dict:
        val_images, test_images = embed_images(clip, val["png"].tolist()), embed_images(clip, test["png"].tolist())
        prompts = PromptEmbeddings.of(clip, library)
        ensemble = prompts.ensemble(None)[[prompts.classes.index(p) for p in CORE_PATTERNS]]
        val_scores = val_images @ ensemble.T
        val_map = float(np.mean([average_precision_score(val[p].to_numpy(bool), val_scores[:, j])
                                 for j, p in enumerate(CORE_PATTERNS)]))
        evaluation = evaluate(val_images, val.drop(columns=["png"]), test_images, test.drop(columns=["png"]), prompts,
                              PromptEmbeddings.of(clip, library.with_paraphrases()))
        return {"val_mean_ap": round(val_map, 4), "test": {k: round(v, 4) for k, v in evaluation.summary().items()}}

    pretrained = {}
    if any(getattr(args, name) is not None for name in PRETRAIN_OPTIONS):
        clip, pretrained = pretrain(artifacts, args)
        pretrained_version = "fresh (this run)"
        pretrained |= evaluated(clip)
    else:
        clip, _, pretrained_version = load_model_asset(artifacts, "chart_clip_pretrained", args.device)
    default = training.FinetuneConfig()
    optim = dataclasses.replace(default.optim, steps=args.steps or default.optim.steps, lr=args.lr or default.optim.lr,
                                batch_size=args.batch_size or default.optim.batch_size)
    changed = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    config = dataclasses.replace(default, optim=optim, **changed)
    started = time.perf_counter()
    result = training.finetune(clip, training_windows(artifacts, config.stream), config,
                               {p: list(library.classes[p]) for p in CORE_PATTERNS})
    seconds = time.perf_counter() - started
    final = result.history.iloc[-1]
    return {"pretrained_version": pretrained_version, **({"pretrained": pretrained} if pretrained else {}),
            "steps": optim.steps, "batch_size": optim.batch_size,
            "lr": optim.lr,
            **{name: getattr(config, name) for name in OVERRIDES},
            "train_seconds": round(seconds, 1), "images_per_s": round(result.images_seen / seconds, 1),
            "final_losses": {k: round(float(final[k]), 4) for k in result.history.columns if k not in ("step", "lr")},
            "pattern_logit_scale": result.extra["pattern_logit_scale"], **evaluated(clip)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("artifacts"))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=None, help="charts per step (default: the pipeline's)")
    parser.add_argument("--lr", type=float, default=None)
    for name in OVERRIDES:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=None)
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="pre-train afresh with this many steps instead of reading the store's pre-trained model")
    parser.add_argument("--text-whitening", default=None,
                        help="pre-train afresh with this text-whitening shrinkage ('off': none)")
    parser.add_argument("--caption-pool", type=int, default=None,
                        help="pre-train afresh with a caption pool of this many windows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    report = {"machine": machine_info(), "command": " ".join(sys.argv)} | run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        atomic_write(args.json, text.encode())
    test = report["test"]
    print("| steps | batch | lr | contrastive | val mean AP | test F1 | precision | recall | neutral P | paraphrase P "
          "| seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {report['steps']} | {report['batch_size']} | {report['lr']:g} | {report['contrastive_weight']:g} | "
          f"{report['val_mean_ap']:.3f} | "
          f"{test['core_macro_f1']:.3f} | {test['core_macro_precision']:.3f} | {test['core_macro_recall']:.3f} | "
          f"{test['neutral_precision']:.3f} | {test['paraphrase_macro_precision']:.3f} | {report['train_seconds']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
