"""Can an image tower learn candles from the training stream? A supervised probe, no text involved.

    python bench/learnability.py [--root artifacts] [--tower hybrid|convstem|...] [--steps 1000] [--style-share 1.0]
                                 [--margin-weight 1.0] [--seed 0]

Trains the image tower plus one linear head on the training stream of `vlm_assets.training` (charts rendered from
the train split, randomized styles unless --style-share < 1): multi-label BCE on the 9 core patterns plus the
anatomy regression targets (with --margin-weight, also the core rules' margins, as fine-tuning regresses them).
Every --eval-every steps it prints the validation split's mean average precision over the core patterns (stored
dataset images). At the end it scores issue 3's detection floors as model_evaluation does (max-F1 thresholds chosen
on validation, applied to the test split): macro and lowest recall, macro precision, neutral precision. `hybrid` is
the tower of the default, ChartCLIP-S-hybrid, and `convstem` ChartCLIP-S's (vlm_assets.image_tower); the others are
towers they were compared with: `plain` (a ViT with one 32x32 linear patch embedding), `cnn`, `columns`, `profile`
and two other trunk widths of the hybrid. Needs the data assets in --root (`candle-vlm run` or bench/dataset.py).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

from bench.common import machine_info  # noqa: E402


# (in, out, convolutions) per stride-2 stage, as vlm_assets.image_tower.TRUNK_STAGES
CNN_STAGES = ((3, 32, 1), (32, 64, 2), (64, 128, 2), (128, 256, 2), (256, 256, 1))
HYBRID_STAGES = {"hybrid-wide": CNN_STAGES,
                 "hybrid-slim": ((3, 24, 1), (24, 48, 2), (48, 96, 2), (96, 192, 2), (192, 256, 1))}


def _plain_cnn():
    """A position-aware CNN: the standardized input, two 3x3 convolutions per stage down to 7x7x256 (CNN_STAGES),
    flattened into a 256-d embedding (no global pooling, which would forget that patterns live at the right edge)."""
    import torch

    from vlm_assets.image_tower import conv_trunk

    return torch.nn.Sequential(*conv_trunk(CNN_STAGES), torch.nn.Flatten(), torch.nn.Linear(7 * 7 * 256, 256))


def _hybrid_tower(stages):
    """ChartCLIP-S-hybrid's tower (two transformer blocks over a convolutional trunk) with other trunk widths."""
    import functools

    from vlm_assets.image_tower import ConvTrunkPatchEmbed, chart_vit_s32_hybrid

    return chart_vit_s32_hybrid(embed_layer=functools.partial(ConvTrunkPatchEmbed, stages=stages))


def _strided_stem(stages):
    """The standardized input and one 3x3 convolution (BatchNorm, ReLU) per (in, out, (stride_h, stride_w)) stage."""
    import torch

    layers = [torch.nn.InstanceNorm2d(3)]
    for c_in, c_out, stride in stages:
        layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                   torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(inplace=True)]
    return torch.nn.Sequential(*layers)


def _column_readout(width: int, depth: int, heads: int, columns: int = 56):
    """Column tokens (n, columns, width) -> a 256-d embedding: class token, learned positions, a 1-D transformer."""
    import torch

    class ColumnReadout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = torch.nn.Parameter(torch.zeros(1, 1, width))
            self.position = torch.nn.Parameter(torch.randn(1, columns + 1, width) * 0.02)
            block = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                     batch_first=True, norm_first=True)
            self.blocks = torch.nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
            self.norm = torch.nn.LayerNorm(width)
            self.head = torch.nn.Linear(width, 256)

        def forward(self, tokens):
            x = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.position
            return self.head(self.norm(self.blocks(x))[:, 0])

    return ColumnReadout()


def _column_tower(width: int = 192, depth: int = 4, heads: int = 4):
    """Columns as tokens: a conv stem that halves the height four times but the width only twice, each of the 56
    column strips (full chart height, 4 px wide) flattened into one token, and a 1-D transformer across the columns
    (class-token readout), so attention compares whole candles side by side."""
    import torch

    class ColumnTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = _strided_stem(((3, 16, (2, 2)), (16, 32, (2, 1)), (32, 64, (2, 2)), (64, 64, (2, 1))))
            self.token = torch.nn.Linear(64 * 14, width)  # the stem gives (n, 64, 14, 56)
            self.readout = _column_readout(width, depth, heads)

        def forward(self, pixels):
            x = self.stem(pixels)
            n, c, h, w = x.shape
            return self.readout(self.token(x.permute(0, 3, 1, 2).reshape(n, w, c * h)))

    return ColumnTower()


def _profile_tower(width: int = 192, depth: int = 4, heads: int = 4, readers: int = 12):
    """Columns read as coordinates: a conv stem that halves the height once and the width twice, then per 4-px
    column `readers` soft-argmax heads, each a softmax over the 112 rows (2 px each) of a learned score (features
    plus a learned per-row bias, so a head can learn "topmost ink" or "lowest body pixel"). Each head gives a
    sub-pixel row coordinate, its spread and the features it attends to; these make the column's token, and a 1-D
    transformer compares the columns (class-token readout)."""
    import torch

    class ProfileTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = _strided_stem(((3, 16, (2, 2)), (16, 32, (1, 2))))  # (n, 32, 112, 56)
            self.score = torch.nn.Conv2d(32, readers, 1)
            self.row_bias = torch.nn.Parameter(torch.zeros(1, readers, 112, 1))
            self.register_buffer("rows", torch.linspace(0.0, 1.0, 112).view(1, 1, 112, 1), persistent=False)
            self.token = torch.nn.Linear(readers * (2 + 32) + 32, width)
            self.readout = _column_readout(width, depth, heads)

        def forward(self, pixels):
            features = self.stem(pixels)  # (n, c, h, w)
            attention = torch.softmax((self.score(features) + self.row_bias).float(), dim=2)  # (n, k, h, w)
            where = (attention * self.rows).sum(2)  # (n, k, w)
            spread = ((attention * (self.rows - where.unsqueeze(2)) ** 2).sum(2) + 1e-6).sqrt()
            read = torch.einsum("nkhw,nchw->nwkc", attention.to(features.dtype), features)
            n, c, h, w = features.shape
            column = torch.cat([where.transpose(1, 2).to(read.dtype), spread.transpose(1, 2).to(read.dtype),
                                read.reshape(n, w, -1), features.mean(2).transpose(1, 2)], dim=2)
            return self.readout(self.token(column))

    return ProfileTower()


TOWERS = ("convstem", "hybrid", "plain", "cnn", "columns", "profile", *HYBRID_STAGES)


def build_tower(kind: str):
    from timm.models.vision_transformer import VisionTransformer

    from vlm_assets.image_tower import chart_vit_s32_convstem, chart_vit_s32_hybrid

    if kind == "convstem":
        return chart_vit_s32_convstem()
    if kind == "hybrid":
        return chart_vit_s32_hybrid()
    if kind == "cnn":
        return _plain_cnn()
    if kind == "columns":
        return _column_tower()
    if kind == "profile":
        return _profile_tower()
    if kind in HYBRID_STAGES:
        return _hybrid_tower(HYBRID_STAGES[kind])
    return VisionTransformer(img_size=224, patch_size=32, embed_dim=256, depth=6, num_heads=4, class_token=True,
                             global_pool="token", pre_norm=True, num_classes=0)


def run(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from sklearn.metrics import average_precision_score

    from vlm_assets import evaluation as ev
    from vlm_assets import model as chart_model
    from vlm_assets import training
    from vlm_assets.labeling import CORE_PATTERNS
    from vlm_assets.pipeline.model import dataset_windows, training_windows
    from vlm_assets.storage import ArtifactStore

    torch.manual_seed(args.seed)
    artifacts = ArtifactStore(args.root)
    windows = training_windows(artifacts, training.StreamConfig())
    stored = dataset_windows(artifacts)
    val = stored[stored["split"] == "val"].reset_index(drop=True)
    test = stored[stored["split"] == "test"].reset_index(drop=True)
    preprocess = chart_model.create(device="cpu").preprocess
    tower = build_tower(args.tower)
    n_core, n_anatomy = len(CORE_PATTERNS), len(training.ANATOMY_TARGETS)
    margins = args.margin_weight > 0  # a third head: the core rules' margins, as chart_clip_finetuned regresses them
    head = torch.nn.Linear(256, n_core + n_anatomy + (n_core if margins else 0))
    params = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    schedule = training.OptimConfig(steps=args.steps, warmup_steps=50)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: training._schedule(s, schedule))
    def pixels_of(frame):
        return torch.stack([preprocess(Image.open(io.BytesIO(png)).convert("RGB")) for png in frame["png"]])

    val_pixels = pixels_of(val)
    val_truth = val[list(CORE_PATTERNS)].to_numpy(bool)
    rng = np.random.default_rng(1 + args.seed)
    dataset = training._RenderedWindows(windows, preprocess, captions=False)

    def core_scores(pixels) -> np.ndarray:
        tower.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            scores = torch.cat([head(tower(pixels[i:i + 128]))[:, :n_core].float()
                                for i in range(0, len(pixels), 128)]).numpy()
        tower.train()
        return scores

    def mean_ap(scores) -> float:
        return float(np.mean([average_precision_score(val_truth[:, j], scores[:, j]) for j in range(n_core)]))

    curve, started = [], time.perf_counter()
    tower.train()
    for step in range(args.steps):
        plans = windows.plan(rng, args.batch_size, args.style_share)
        items = [dataset[(i, plan)] for i, plan in enumerate(plans)]
        pixels = torch.stack([it["pixels"] for it in items])
        labels = torch.stack([it["labels"] for it in items])
        anatomy = torch.stack([it["anatomy"] for it in items])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(tower(pixels)).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out[:, :n_core], labels) + \
            torch.nn.functional.smooth_l1_loss(out[:, n_core:n_core + n_anatomy], anatomy)
        if margins:
            candidates = np.array([plan.candidate for plan in plans])
            loss = loss + args.margin_weight * training.margin_loss(out[:, n_core + n_anatomy:], windows, candidates,
                                                                    training.FinetuneConfig.margin_scale)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_scores = core_scores(val_pixels)  # the last step always lands here: the floors reuse them
            curve.append({"step": step + 1, "val_map": round(mean_ap(val_scores), 4),
                          "loss": round(float(loss.detach()), 4), "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(curve[-1]), flush=True)
    # issue 3's detection floors for the probe's head, by model_evaluation's protocol (max-F1 thresholds from val);
    # the test charts are decoded only now, not held in memory through training
    _, detection, neutral = ev.detection_on_test(val_truth, val_scores, test[list(CORE_PATTERNS)].to_numpy(bool),
                                                 core_scores(pixels_of(test)), CORE_PATTERNS)
    per_pattern = detection.drop(index=["macro", "micro"])
    floors = {"test_charts": len(test), "macro_recall": round(float(detection.loc["macro", "recall"]), 4),
              "macro_precision": round(float(detection.loc["macro", "precision"]), 4),
              "min_recall": round(float(per_pattern["recall"].min()), 4),
              "min_recall_pattern": str(per_pattern["recall"].idxmin()),
              "neutral_precision": round(neutral["precision"], 4), "neutral_predicted": neutral["predicted"]}
    base_rate = float(val_truth.mean())
    return {"tower": args.tower, "style_share": args.style_share, "lr": args.lr, "steps": args.steps,
            "margin_weight": args.margin_weight,
            "val_base_rate": round(base_rate, 4), "curve": curve, "test_floors": floors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("artifacts"))
    parser.add_argument("--tower", choices=TOWERS, default="hybrid")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--style-share", type=float, default=1.0, help="share of randomized styles (rest: fixed preset)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="initialization and stream seed")
    parser.add_argument("--margin-weight", type=float, default=0.0,
                        help="weight of the core rules' margin regression (training.FinetuneConfig.margin_weight)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1: the floors are scored on the last step's model")
    report = {"machine": machine_info(), "command": " ".join(sys.argv)} | run(args)
    print(json.dumps(report, indent=2))
    print("| step | val mean AP | loss | seconds |\n|---|---|---|---|")
    for row in report["curve"]:
        print(f"| {row['step']} | {row['val_map']:.3f} | {row['loss']:.3f} | {row['seconds']} |")
    floors = report["test_floors"]
    print("\n| test (val max-F1 thresholds) | macro recall | lowest recall | macro precision | neutral precision |\n"
          "|---|---|---|---|---|\n"
          f"| probe | {floors['macro_recall']:.3f} | {floors['min_recall']:.3f} ({floors['min_recall_pattern']}) | "
          f"{floors['macro_precision']:.3f} | "
          f"{floors['neutral_precision']:.3f} ({floors['neutral_predicted']} predicted) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
