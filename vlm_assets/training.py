"""ChartCLIP training: chart pre-training on anatomy captions and fine-tuning on the core patterns.

Training images are rendered on the fly from the bars of the train split's time blocks (the dataset's splits are
whole (symbol, block) groups, so no val/test market time is ever drawn). A batch is planned in the main process
(window, window length, style seed) and rendered by DataLoader workers, so the plan, and with it the run, is
deterministic for a seed; the hard-negative buffer feeds the planner. Labels and captions come from the rule
engine's labels of the same bars, exactly as in the dataset.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vlm_assets.captions import anatomy_caption, describe_window, named_caption
from vlm_assets.dataset import (
    ImageConfig, WindowSamplingConfig, all_candidates, higher_timeframe_series, htf_panel_positions, symbol_origins,
)
from vlm_assets.labeling import CORE_PATTERNS, NEUTRAL, RuleParams

log = logging.getLogger(__name__)

# Confusable pairs the hard-negative buffer targets: a window near-missing the first pattern, or scored high for it
# while being the second, is a hard negative for the first.
CONFUSABLE_PAIRS: tuple[tuple[str, str], ...] = (
    ("hammer", "inverted_hammer"),
    ("inverted_hammer", "hammer"),
    ("doji", "inside_bar"),
    ("bullish_engulfing", "outside_bar"),
    ("bearish_engulfing", "outside_bar"),
    ("inside_bar", "doji"),
    ("morning_star", "bullish_engulfing"),
    ("evening_star", "bearish_engulfing"),
    ("outside_bar", "bullish_engulfing"),
)
ANATOMY_TARGETS: tuple[str, ...] = tuple(
    f"c{i}_{part}" for i in (1, 2, 3) for part in ("body", "upper", "lower", "direction", "gap")
) + ("trend", "inside", "outside")


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class StreamConfig:
    """What the on-the-fly training windows look like."""

    pattern_share: float = 0.7  # windows drawn class-balanced over core patterns + neutral; the rest uniformly
    near_miss_share: float = 0.1  # windows that just miss a core pattern (margin within near_miss_margin)
    near_miss_margin: float = 0.1
    composite_share: float = 0.2  # windows drawn with their higher-timeframe panel
    # Style curriculum: the share of randomized styles (the rest use the dataset's fixed preset) moves linearly from
    # `randomized_start` to `randomized_end` over the first `style_ramp` of the run. Off by default: the dataset's
    # charts are all randomized, and the standardized convolutional tower learns on all of them from the first step.
    randomized_start: float = 1.0
    randomized_end: float = 1.0
    style_ramp: float = 0.0
    seed: int = 17

    def randomized_share(self, step: int, steps: int) -> float:
        progress = min(1.0, step / max(1.0, self.style_ramp * steps)) if self.style_ramp > 0 else 1.0
        return self.randomized_start + (self.randomized_end - self.randomized_start) * progress


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 autocast on CPU, fp16 AMP on CUDA; "fp32" disables mixed precision
    workers: int = 0  # DataLoader processes rendering charts; 0 renders in-process (faster on 2 cores: no contention)
    log_every: int = 25
    seed: int = 23

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"steps must be >= 1 and batch_size >= 2 (contrastive pairs), got {self.steps}, {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.workers < 0:
            raise ValueError("lr must be > 0 and weight_decay, warmup_steps, workers >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass(frozen=True)
class Unfreeze:
    """Which blocks train: -1 = all, 0 = none (projections, heads and norms after the trunk still train)."""

    image_layers: int = -1
    text_layers: int = 0


@dataclass(frozen=True)
class PretrainConfig:
    # The 1,150-step budget leans to fine-tuning: labels teach the tower more per step than anatomy captions
    # (docs/model.md, "Rebalancing the step budget").
    optim: OptimConfig = OptimConfig(steps=300)
    stream: StreamConfig = StreamConfig()
    unfreeze: Unfreeze = Unfreeze()
    anatomy_weight: float = 1.0
    lock_text: bool = True  # freeze the whole text tower and embed a fixed caption pool once (see pretrain)
    caption_pool: int = 12000
    # Whiten the text space on the caption pool with this shrinkage (see whitening_projection); None keeps the
    # projection as created. Applies with `lock_text` to an untrained projection (the ChartCLIP configs) and a pool
    # of at least as many distinct captions as the projection has outputs, never to pretrained weights. Validation
    # mean AP after fine-tuning (ablation runs): 0.519 without, 0.537 at 1.0, 0.558 at 4.0.
    text_whitening: float | None = 4.0


@dataclass(frozen=True)
class FinetuneConfig:
    optim: OptimConfig = OptimConfig(steps=850, lr=5e-4)
    stream: StreamConfig = StreamConfig(seed=29)
    unfreeze: Unfreeze = Unfreeze(image_layers=-1, text_layers=1)
    # Keep the whole text tower frozen (as in pre-training): `unfreeze.text_layers` is then ignored, caption and
    # prompt embeddings are computed once per distinct text, and the zero-shot prompts keep the space they were
    # written for.
    lock_text: bool = True
    # The caption contrastive term stays small: named captions embed almost alike in the locked MiniLM space, and
    # their pull fights the labels (validation mean AP after 250 steps: 0.242 at weight 1.0, 0.299 at 0.03, measured
    # before the text space was whitened; docs/model.md).
    contrastive_weight: float = 0.03
    multilabel_weight: float = 1.0
    # How much faster than the tower the multi-label head's scale and biases learn (see PatternLogits).
    logit_speed: float = 20.0
    anatomy_weight: float = 0.5
    # Regression of every core rule's margin (tanh(margin / margin_scale)): how far each chart is from firing each
    # pattern, a dense target beside the labels' 0/1. Off by default: it lifts the supervised probe
    # (bench/learnability.py --margin-weight) but at weight 1.0 not the fine-tuned model's test F1 (docs/model.md).
    margin_weight: float = 0.0
    margin_scale: float = 0.3
    hard_negative_share: float = 0.25  # of each batch, re-fed from the hard-negative buffer once it has entries
    hard_negative_capacity: int = 2048
    class_embedding_refresh: int = 25  # steps between recomputing the (detached) pattern prompt embeddings

    def __post_init__(self):
        weights = {name: getattr(self, name) for name in
                   ("contrastive_weight", "multilabel_weight", "anatomy_weight", "margin_weight")}
        negative = [f"{name}={value}" for name, value in weights.items() if not value >= 0]
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {', '.join(negative)}")
        if not self.margin_scale > 0:
            raise ValueError(f"margin_scale must be > 0 (average ranges), got {self.margin_scale}")
        if not self.logit_speed > 0:
            raise ValueError(f"logit_speed must be > 0, got {self.logit_speed}")


# ---- training windows --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WindowPlan:
    candidate: int
    n_bars: int
    seed: int
    randomized: bool = True  # a randomized style, or the dataset's fixed preset


class TrainingWindows:
    """Every window end in the train split's (symbol, block) groups, with pools for balanced sampling."""

    def __init__(self, bars: dict, labels: dict, dataset_windows: pd.DataFrame, sampling: WindowSamplingConfig,
                 image: ImageConfig, stream: StreamConfig, params: RuleParams = RuleParams()):
        train_groups = dataset_windows.loc[dataset_windows["split"] == "train", ["symbol", "block"]].drop_duplicates()
        if train_groups.empty:
            raise ValueError("the dataset has no train windows: cannot train")
        candidates = all_candidates(bars, labels, sampling).merge(train_groups, on=["symbol", "block"], how="inner")
        self.candidates = candidates.reset_index(drop=True)
        # Plain arrays for the per-window lookups in render(): pandas row access costs more than drawing the chart.
        self._keys = list(zip(self.candidates["symbol"], self.candidates["timeframe"]))
        self._positions = self.candidates["pos"].to_numpy()
        self._core = self.candidates[list(CORE_PATTERNS)].to_numpy(dtype=np.float32)
        self.bars, self.labels, self.sampling, self.image, self.stream, self.params = bars, labels, sampling, image, stream, params
        self.origins = symbol_origins(bars)
        self.htf = {key: higher_timeframe_series(bars, *key) for key in bars}
        self.pools = {name: np.flatnonzero(self.candidates[name].to_numpy()) for name in (*CORE_PATTERNS, NEUTRAL)}
        self.pools = {name: pool for name, pool in self.pools.items() if pool.size}
        self.margins = self._core_margins()
        self.near_miss = self._near_miss_pool()
        if not self.pools:
            raise ValueError("no labelled train windows to sample from")

    def _core_margins(self) -> np.ndarray:
        """(candidates, core patterns): each rule's margin at the window end, in average ranges (NaN: not evaluable)."""
        margins = np.full(self._core.shape, np.nan, dtype=np.float32)  # the label frames store float32
        columns = [f"{p}_margin" for p in CORE_PATTERNS]
        for key, group in self.candidates.groupby(["symbol", "timeframe"], sort=False):
            margins[group.index.to_numpy()] = self.labels[key][columns].to_numpy()[group["pos"].to_numpy()]
        return margins

    def _near_miss_pool(self) -> np.ndarray:
        """Candidates where some core pattern misses firing by at most `near_miss_margin` average ranges."""
        near = np.any((self.margins < 0) & (self.margins >= -self.stream.near_miss_margin) & (self._core == 0), axis=1)
        return np.flatnonzero(near)

    def margin_targets(self, candidates: np.ndarray, scale: float) -> np.ndarray:
        """(n, core patterns) tanh(margin / scale) of every core rule at the candidates; a rule that cannot be
        evaluated counts as far from firing."""
        return np.tanh(np.nan_to_num(self.margins[candidates], nan=-10.0 * scale) / scale).astype(np.float32)

    def plan(self, rng: np.random.Generator, size: int, randomized_share: float = 1.0) -> list[WindowPlan]:
        plans = []
        names = sorted(self.pools)
        for _ in range(size):
            draw = rng.random()
            if draw < self.stream.pattern_share:
                pool = self.pools[names[int(rng.integers(len(names)))]]
                candidate = int(pool[int(rng.integers(pool.size))])
            elif draw < self.stream.pattern_share + self.stream.near_miss_share and self.near_miss.size:
                candidate = int(self.near_miss[int(rng.integers(self.near_miss.size))])
            else:
                candidate = int(rng.integers(len(self.candidates)))
            plans.append(self.plan_for(candidate, rng, randomized_share=randomized_share))
        return plans

    def plan_for(self, candidate: int, rng: np.random.Generator, n_bars: int | None = None,
                 randomized_share: float = 1.0) -> WindowPlan:
        if n_bars is None:
            n_bars = int(rng.integers(self.sampling.min_bars, self.sampling.max_bars + 1))
        return WindowPlan(candidate, n_bars, int(rng.integers(2**31)), bool(rng.random() < randomized_share))

    def core_labels(self, candidates: np.ndarray) -> np.ndarray:
        return self.candidates.loc[candidates, list(CORE_PATTERNS)].to_numpy(dtype=bool)

    def _window(self, plan: WindowPlan):
        key = self._keys[plan.candidate]
        pos = int(self._positions[plan.candidate])
        window = self.bars[key].iloc[max(0, pos - plan.n_bars + 1): pos + 1]
        return key, pos, window, self.labels[key].iloc[pos - 2: pos + 1]

    def anatomy_caption(self, plan: WindowPlan) -> str:
        """The caption grammar's anatomy caption of a planned window (no pattern names)."""
        key, _, window, label_tail = self._window(plan)
        context = describe_window(window, label_tail, key[1])
        return anatomy_caption(context, np.random.default_rng(plan.seed), self.params.trend_threshold)

    def render(self, plan: WindowPlan, captions: bool = True) -> dict:
        """The chart image, core labels, anatomy targets and (unless `captions` is false) captions of a planned
        window; captions come last from the plan's generator, so skipping them changes nothing else."""
        from vlm_assets.rendering import PRESETS, randomize_style, render_chart

        key, pos, window, label_tail = self._window(plan)
        rng = np.random.default_rng(plan.seed)
        style = randomize_style(rng) if plan.randomized else PRESETS[self.image.style_preset]
        panel = None
        htf = self.htf.get(key)
        if htf is not None and len(htf) and rng.random() < self.stream.composite_share:
            series = self.bars[key]
            first, last = htf_panel_positions(pd.DatetimeIndex(series.index[pos:pos + 1]), key[1], htf,
                                              self.origins[key[0]], self.sampling)
            if last[0] - first[0] >= 5:
                panel = htf.iloc[first[0]:last[0]]
        sample = {
            "image": render_chart(window, style, self.image.width, self.image.height, htf_bars=panel),
            "labels": self._core[plan.candidate].copy(),
            "anatomy": anatomy_targets(window, label_tail.iloc[-1]),
            "anatomy_caption": "",
            "named_caption": "",
        }
        if captions:
            context = describe_window(window, label_tail, key[1])
            threshold = self.params.trend_threshold
            named = named_caption(context, rng, with_trend=bool(rng.random() < 0.5), trend_threshold=threshold)
            sample["named_caption"] = named or ""
            sample["anatomy_caption"] = anatomy_caption(context, rng, threshold)
        return sample


def anatomy_targets(window: pd.DataFrame, label_row: pd.Series) -> np.ndarray:
    """What the last three candles look like, in the rule engine's units (average ranges before the last bar):
    body, shadows, direction, gap; plus the trend and the inside/outside relation of the last two bars."""
    o, h, l, c = (window[k].to_numpy(dtype=float) for k in ("open", "high", "low", "close"))
    avg_range = float(label_row.get("avg_range", np.nan))
    if not np.isfinite(avg_range) or avg_range <= 0:
        avg_range = float(np.mean(h - l)) or 1.0
    values = []
    for i in (-3, -2, -1):
        if len(c) + i < 0:  # shorter than three bars: nothing to measure
            values += [0.0] * 5
            continue
        top, bottom = max(o[i], c[i]), min(o[i], c[i])
        gap = (o[i] - c[i - 1]) / avg_range if len(c) + i > 0 else 0.0
        values += [(top - bottom) / avg_range, (h[i] - top) / avg_range, (bottom - l[i]) / avg_range,
                   float(np.sign(c[i] - o[i])), gap]
    trend = float(label_row.get("trend", 0.0))
    values += [trend / 3.0 if np.isfinite(trend) else 0.0, float(h[-1] < h[-2] and l[-1] > l[-2]),
               float(h[-1] > h[-2] and l[-1] < l[-2])]
    return np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), -3.0, 3.0)


class _RenderedWindows:
    """Map-style dataset over plans: workers render, the main process plans (see module docstring)."""

    def __init__(self, windows: TrainingWindows, preprocess, captions: bool):
        self.windows, self.preprocess, self.captions = windows, preprocess, captions

    def __getitem__(self, item: tuple[int, WindowPlan]):
        slot, plan = item
        sample = self.windows.render(plan, captions=self.captions)
        return {
            "slot": slot,
            "candidate": plan.candidate,
            "pixels": self.preprocess(sample["image"]),
            "labels": torch.from_numpy(sample["labels"]),
            "anatomy": torch.from_numpy(sample["anatomy"]),
            "anatomy_caption": sample["anatomy_caption"],
            "named_caption": sample["named_caption"],
        }


class HardNegativeBuffer:
    """Bounded set of train windows the model confuses: near misses of a confusable partner and windows whose
    wrong-pattern score was highest. Entries keep their loss; the hardest are kept, sampling is uniform."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.hardness: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.hardness)

    def add(self, candidates: np.ndarray, hardness: np.ndarray) -> None:
        for candidate, value in zip(candidates.tolist(), hardness.tolist()):
            self.hardness[candidate] = max(value, self.hardness.get(candidate, -math.inf))
        if len(self.hardness) > self.capacity:
            keep = sorted(self.hardness.items(), key=lambda kv: (-kv[1], kv[0]))[: self.capacity]
            self.hardness = dict(keep)

    def sample(self, rng: np.random.Generator, size: int) -> list[int]:
        keys = sorted(self.hardness)
        return [keys[int(i)] for i in rng.integers(len(keys), size=size)] if keys else []


def confusable_mask(labels: np.ndarray) -> np.ndarray:
    """(n, n_core) True where the window shows the confusable partner of a core pattern but not the pattern."""
    index = {p: i for i, p in enumerate(CORE_PATTERNS)}
    mask = np.zeros_like(labels, dtype=bool)
    for pattern, partner in CONFUSABLE_PAIRS:
        mask[:, index[pattern]] |= labels[:, index[partner]] & ~labels[:, index[pattern]]
    return mask


# ---- the loop ----------------------------------------------------------------------------------------------

def autocast_dtype(device: str, precision: str):
    """None for fp32; bf16 on CPU; on CUDA bf16 where supported ("auto"), else fp16 (trained with a grad scaler)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if device.startswith("cuda"):
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16


def autocast_context(device: str, precision: str):
    import contextlib

    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def set_trainable(model, unfreeze: Unfreeze) -> list:
    """Freeze each tower's embeddings and blocks except its last `image_layers` / `text_layers` blocks (-1: train
    everything); what follows the blocks (final norm, pooling, projection) always trains. Returns trainable params."""
    for parameter in model.parameters():
        parameter.requires_grad = True
    visual = list(model.visual.parameters())
    visual_ids = {id(p) for p in visual}
    text_tower = getattr(model, "text", model)  # CustomTextCLIP has .text; classic CLIP keeps the text tower inline
    text = [p for p in text_tower.parameters() if id(p) not in visual_ids and p is not getattr(model, "logit_scale", None)
            and p is not getattr(model, "logit_bias", None)]
    for tower, params, keep in ((model.visual, visual, unfreeze.image_layers), (text_tower, text, unfreeze.text_layers)):
        if keep < 0:
            continue
        blocks = _blocks(tower)
        trainable = {id(p) for block in blocks[len(blocks) - keep:] if keep for p in block.parameters()}
        trainable |= _head_parameter_ids(tower)
        for parameter in params:
            if id(parameter) not in trainable:
                parameter.requires_grad = False
    return [p for p in model.parameters() if p.requires_grad]


def _blocks(tower) -> list:
    """The transformer blocks of an open_clip tower (ViT resblocks, an HF encoder's layers, a timm trunk's blocks)."""
    for path in ("transformer.resblocks", "transformer.encoder.layer", "trunk.blocks"):
        node = tower
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return list(node)
    return []


def _head_parameter_ids(tower) -> set[int]:
    ids = set()
    trunk = getattr(tower, "trunk", None)  # a timm tower's final norms sit on its trunk
    for node in [getattr(tower, name, None) for name in ("ln_post", "proj", "pooler", "head", "attn_pool", "ln_final",
                                                         "text_projection")] + \
                [getattr(trunk, name, None) for name in ("norm", "fc_norm", "attn_pool")]:
        if isinstance(node, torch.nn.Module):
            ids |= {id(p) for p in node.parameters()}
        elif isinstance(node, torch.nn.Parameter):
            ids.add(id(node))
    return ids


def _freeze_batch_norm_statistics(model) -> None:
    """BatchNorm layers whose parameters are frozen also keep their running statistics (eval mode)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and \
                not any(p.requires_grad for p in module.parameters()):
            module.eval()


def _schedule(step: int, config: OptimConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / max(1, config.steps)))


@dataclass
class TrainResult:
    history: pd.DataFrame
    seconds: float
    images_seen: int
    extra: dict = field(default_factory=dict)


def _loader(windows: TrainingWindows, preprocess, plans, optim: OptimConfig, captions: bool):
    def collate(items):
        batch = {k: torch.stack([it[k] for it in items]) for k in ("pixels", "labels", "anatomy")}
        batch["candidate"] = np.array([it["candidate"] for it in items])
        batch["slot"] = np.array([it["slot"] for it in items])
        batch["anatomy_caption"] = [it["anatomy_caption"] for it in items]
        batch["named_caption"] = [it["named_caption"] for it in items]
        return batch

    return torch.utils.data.DataLoader(
        _RenderedWindows(windows, preprocess, captions), batch_sampler=plans, collate_fn=collate,
        num_workers=optim.workers, persistent_workers=False,
        multiprocessing_context="fork" if optim.workers else None,
    )


class _Planner:
    """Batch sampler yielding lists of (slot, plan); iterated lazily by the DataLoader, so state such as the
    hard-negative buffer steers later batches."""

    def __init__(self, steps: int, draw: Callable[[np.random.Generator, int], list[tuple[int, WindowPlan]]], seed: int):
        self.steps, self.draw = steps, draw
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            yield self.draw(self.rng, step)


def _contrastive(image_features, text_features, logit_scale, caption_ids: list):
    """CLIP loss where identical captions in a batch count as positives of each other (no false negatives)."""
    logits = logit_scale * image_features @ text_features.T
    same = np.array([[a == b for b in caption_ids] for a in caption_ids])
    target = torch.from_numpy(same / same.sum(axis=1, keepdims=True)).to(logits.device, logits.dtype)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target.T))


def _train(trainee, params: list, windows: TrainingWindows, optim: OptimConfig, step_loss: Callable,
           heads, draw: Callable, progress: Callable | None = None, frozen: list | None = None,
           captions: bool = True) -> TrainResult:
    """The training loop for any `trainee` with .model, .preprocess and .device (ChartCLIP, the ResNet baseline);
    `params` are the model's trainable parameters, the heads' are added."""
    torch.manual_seed(optim.seed)
    model = trainee.model
    params = list(params) + list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, optim))
    planner = _Planner(optim.steps, draw, optim.seed)
    model.train()
    heads.train()
    _freeze_batch_norm_statistics(model)
    for module in frozen or []:
        module.eval()  # a locked tower keeps dropout off
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(trainee.device, optim.precision) == torch.float16)
    rows = []
    started = time.perf_counter()
    images = 0
    bar = tqdm(total=optim.steps, unit="step", mininterval=2.0, disable=None)  # a bar on terminals, silent in logs
    for step, batch in enumerate(_loader(windows, trainee.preprocess, planner, optim, captions)):
        with autocast_context(trainee.device, optim.precision):
            losses = step_loss(batch)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        images += len(batch["candidate"])
        elapsed = time.perf_counter() - started
        row = {"step": step + 1, "loss": float(total.detach())} | {k: float(v.detach()) for k, v in losses.items()}
        row |= {"lr": scheduler.get_last_lr()[0], "images_per_s": images / elapsed}
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.0f}", refresh=False)
        bar.update()
        if progress is not None and ((step + 1) % optim.log_every == 0 or step + 1 == optim.steps):
            progress(step + 1, optim.steps, row)
    bar.close()
    model.eval()
    return TrainResult(history=pd.DataFrame(rows), seconds=time.perf_counter() - started, images_seen=images)


class PatternLogits(torch.nn.Module):
    """Multi-label logits against the pattern prompt embeddings: learned scale and per-pattern bias (training only;
    both are monotonic per pattern, so thresholds on the plain cosine score are equivalent at inference).

    The scale and biases are stored divided by `speed`, so Adam, whose steps are about the learning rate in a
    parameter's own units, moves them `speed` times as fast as the tower's weights. At the tower's pace the scale
    could only grow from 10 to about 13 in fine-tuning, and the closest prompt ensembles (cosine 0.97 in the
    unwhitened text space) then cap the logit gap between their patterns at about 3 (docs/model.md)."""

    def __init__(self, n_patterns: int, speed: float = 1.0):
        super().__init__()
        self.speed = float(speed)  # FinetuneConfig checks logit_speed > 0
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0) / self.speed))
        self.bias = torch.nn.Parameter(torch.full((n_patterns,), -2.0 / self.speed))

    @property
    def scale(self) -> torch.Tensor:
        return (self.speed * self.log_scale).exp()

    def forward(self, image, class_embeddings):
        return self.scale * image @ class_embeddings.T + self.speed * self.bias


def margin_loss(predicted: torch.Tensor, windows: TrainingWindows, candidates: np.ndarray,
                scale: float) -> torch.Tensor:
    """Smooth L1 of predicted margins against `windows.margin_targets` of the charts' candidates."""
    target = torch.from_numpy(windows.margin_targets(candidates, scale)).to(predicted.device)
    return torch.nn.functional.smooth_l1_loss(predicted.float(), target, beta=0.1)


def _anatomy_head(clip):
    return torch.nn.Linear(clip.embed_dim, len(ANATOMY_TARGETS)).to(clip.device)


def pretrain(clip, windows: TrainingWindows, config: PretrainConfig, progress: Callable | None = None,
             caption_progress: Callable | None = None) -> TrainResult:
    """Contrastive image-text training on anatomy captions (no pattern names) plus an anatomy regression head.

    With `lock_text` (the default) the text tower is frozen whole, LiT-style with the roles swapped: the image tower
    learns into the pretrained sentence space. Captions then come from a fixed pool of windows whose caption
    embeddings are computed once; each draw re-renders a pool window in a fresh random style."""
    torch.manual_seed(config.optim.seed)
    heads = torch.nn.ModuleDict({"anatomy": _anatomy_head(clip)})
    model = clip.model
    rng = np.random.default_rng(config.stream.seed)
    pool = windows.plan(rng, config.caption_pool) if config.lock_text else []
    texts = [windows.anatomy_caption(plan) for plan in pool]
    unique, caption_ids = np.unique(np.asarray(texts, dtype=object), return_inverse=True) if texts else ([], [])
    projection, whitening = _text_whitening(clip, config, len(unique))
    if projection is not None:
        pooled = _encode_locked(clip, list(unique), caption_progress, features=clip.pooled_text_features)
        weight = whitening_projection(pooled.double().numpy(), projection.out_features, config.text_whitening)
        with torch.no_grad():
            projection.weight.copy_(torch.from_numpy(weight).to(projection.weight))
            bank = torch.nn.functional.normalize(pooled @ projection.weight.detach().cpu().float().T, dim=-1)
    else:
        bank = _encode_locked(clip, list(unique), caption_progress) if config.lock_text else None

    def draw(draw_rng, step):
        share = config.stream.randomized_share(step, config.optim.steps)
        if not config.lock_text:
            return list(enumerate(windows.plan(draw_rng, config.optim.batch_size, share)))
        picks = draw_rng.integers(len(pool), size=config.optim.batch_size)
        return [(int(i), windows.plan_for(pool[i].candidate, draw_rng, pool[i].n_bars, share)) for i in picks]

    def step_loss(batch):
        pixels = batch["pixels"].to(clip.device)
        image_raw = model.encode_image(pixels, normalize=False)
        image = torch.nn.functional.normalize(image_raw.float(), dim=-1)
        if config.lock_text:
            ids = caption_ids[batch["slot"]]
            text = bank[torch.from_numpy(ids)].to(clip.device)
        else:
            ids = batch["anatomy_caption"]
            text = clip.encode_texts(ids).float()
        losses = {"contrastive": _contrastive(image, text, model.logit_scale.exp().float(), list(ids))}
        anatomy = heads["anatomy"](image_raw).float()
        losses["anatomy"] = config.anatomy_weight * torch.nn.functional.smooth_l1_loss(anatomy, batch["anatomy"].to(clip.device))
        return losses

    unfreeze = Unfreeze(config.unfreeze.image_layers, 0) if config.lock_text else config.unfreeze
    result = _train(clip, set_trainable(model, unfreeze), windows, config.optim, step_loss, heads, draw, progress,
                    frozen=[model.text] if config.lock_text and hasattr(model, "text") else [],
                    captions=not config.lock_text)  # a locked tower's captions come from the embedded pool
    result.extra["caption_pool"] = len(pool)
    result.extra["distinct_captions"] = len(unique)
    result.extra["text_whitening"] = whitening
    return result


def _text_whitening(clip, config: PretrainConfig, distinct_captions: int):
    """The text projection pre-training whitens (or None), and what the result records: the shrinkage, or why not."""
    if config.text_whitening is None:
        return None, "off"
    if not config.lock_text:
        return None, "off: the text tower is not locked"
    projection = clip.whitenable_text_projection()
    if projection is None:
        return None, "off: the text projection is pretrained or not an HF tower's linear map"
    if distinct_captions < projection.out_features:  # fewer samples than directions: the map would be noise
        return None, f"off: {distinct_captions} distinct captions cannot estimate {projection.out_features} directions"
    return projection, config.text_whitening


def whitening_projection(features: np.ndarray, out_dim: int, shrinkage: float) -> np.ndarray:
    """(out_dim, width) map whitening `features` (n, width), BERT-whitening with shrinkage (Su et al., 2021).

    The locked MiniLM tower embeds the templated captions almost alike (pairwise cosine 0.67 on average; the core
    prompt ensembles up to 0.97), so a chart's caption is hard to tell from the others and the pattern prompts hard
    to tell apart. This map keeps the `out_dim` principal directions of the features' second moment, each scaled by
    1 / sqrt(eigenvalue + shrinkage * the kept eigenvalues' mean): the common direction all captions share shrinks, the
    directions captions differ along grow, and the shrinkage keeps near-empty directions from being blown up. The
    moment is uncentred because open_clip's projection has no bias. Scale is irrelevant after normalization; the
    map has the Frobenius norm of a unit row per output."""
    if features.ndim != 2 or len(features) < 2 or out_dim > features.shape[1] or shrinkage < 0:
        raise ValueError(f"whitening: need (n >= 2, width >= {out_dim}) features and shrinkage >= 0, got "
                         f"{features.shape} and {shrinkage}")
    eigenvalues, vectors = np.linalg.eigh(features.T @ features / len(features))
    keep = np.argsort(eigenvalues)[::-1][:out_dim]
    eigenvalues, vectors = np.clip(eigenvalues[keep], 0.0, None), vectors[:, keep]
    weight = (vectors / np.sqrt(eigenvalues + shrinkage * eigenvalues.mean())).T
    return (weight * np.sqrt(out_dim) / np.linalg.norm(weight)).astype(np.float32)


def _encode_locked(clip, texts: list[str], progress: Callable | None, batch_size: int = 256, features=None):
    """Normalized text embeddings of a frozen text tower (or other `features` of the texts), computed once. The caller
    keeps the tower in eval mode (no dropout): models come from `create`/`load_checkpoint` in eval mode, and `_train`
    keeps `frozen` towers there."""
    features = features or clip.encode_texts
    rows = []
    with torch.no_grad(), autocast_context(clip.device, "auto"):
        for start in range(0, len(texts), batch_size):
            rows.append(features(texts[start:start + batch_size]).float().cpu())
            if progress is not None:
                progress(min(start + batch_size, len(texts)), len(texts))
    return torch.cat(rows) if rows else torch.zeros(0)


def finetune(clip, windows: TrainingWindows, config: FinetuneConfig, class_texts: dict[str, list[str]],
             progress: Callable | None = None) -> TrainResult:
    """Core-pattern fine-tuning: CLIP loss on named captions, multi-label BCE of the image against the core
    patterns' prompt-ensemble embeddings, optionally a regression of the core rules' margins (`margin_weight`), the
    anatomy head as a regularizer, and a hard-negative buffer."""
    missing = [p for p in CORE_PATTERNS if not class_texts.get(p)]
    if missing:
        raise ValueError(f"class_texts has no prompts for core pattern(s) {missing}")
    torch.manual_seed(config.optim.seed)
    heads = {"anatomy": _anatomy_head(clip), "patterns": PatternLogits(len(CORE_PATTERNS), config.logit_speed)}
    if config.margin_weight:
        heads["margins"] = torch.nn.Linear(clip.embed_dim, len(CORE_PATTERNS))
    heads = torch.nn.ModuleDict(heads).to(clip.device)
    buffer = HardNegativeBuffer(config.hard_negative_capacity)
    # Seed the buffer with near misses of confusable patterns, mined from the rule engine's margins.
    if windows.near_miss.size:
        seed_rng = np.random.default_rng(config.stream.seed)
        seeds = seed_rng.choice(windows.near_miss, size=min(config.hard_negative_capacity // 2, windows.near_miss.size),
                                replace=False)
        buffer.add(np.sort(seeds), np.zeros(len(seeds)))
    model = clip.model
    state = {"class_embeddings": None, "step": 0}
    locked: dict[str, torch.Tensor] = {}  # caption -> embedding, when the text tower is locked

    def class_embeddings():
        with torch.no_grad():
            rows = [torch.nn.functional.normalize(clip.encode_texts(class_texts[p]).float().mean(0), dim=-1)
                    for p in CORE_PATTERNS]
        return torch.stack(rows)

    def caption_embeddings(texts: list[str]):
        if not config.lock_text:
            return clip.encode_texts(texts).float()
        new = sorted({t for t in texts if t not in locked})
        if new:
            locked.update(zip(new, _encode_locked(clip, new, None)))
        return torch.stack([locked[t] for t in texts]).to(clip.device)

    def step_loss(batch):
        if state["step"] == 0 or (not config.lock_text and state["step"] % config.class_embedding_refresh == 0):
            state["class_embeddings"] = class_embeddings()
        state["step"] += 1
        pixels = batch["pixels"].to(clip.device)
        labels = batch["labels"].to(clip.device)
        image_raw = model.encode_image(pixels, normalize=False)
        image = torch.nn.functional.normalize(image_raw.float(), dim=-1)
        losses = {}
        named = [i for i, text in enumerate(batch["named_caption"]) if text]
        if len(named) > 1:
            texts = [batch["named_caption"][i] for i in named]
            text = caption_embeddings(texts)
            losses["contrastive"] = config.contrastive_weight * _contrastive(
                image[named], text, model.logit_scale.exp().float(), texts)
        logits = heads["patterns"](image, state["class_embeddings"])
        per_item = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        losses["multilabel"] = config.multilabel_weight * per_item.mean()
        anatomy = heads["anatomy"](image_raw).float()
        losses["anatomy"] = config.anatomy_weight * torch.nn.functional.smooth_l1_loss(anatomy, batch["anatomy"].to(clip.device))
        if config.margin_weight:
            losses["margins"] = config.margin_weight * margin_loss(heads["margins"](image_raw), windows,
                                                                   batch["candidate"], config.margin_scale)
        # Mine: windows scored high for a pattern whose confusable partner they show.
        with torch.no_grad():
            confusable = torch.from_numpy(confusable_mask(labels.bool().cpu().numpy())).to(logits.device)
            hardness = torch.where(confusable, torch.sigmoid(logits), torch.zeros_like(logits)).max(dim=1).values
        hard = hardness.cpu().numpy() > 0.5
        if hard.any():
            buffer.add(batch["candidate"][hard], hardness.cpu().numpy()[hard])
        return losses

    def draw(draw_rng, step):
        share = config.stream.randomized_share(step, config.optim.steps)
        n_hard = int(round(config.hard_negative_share * config.optim.batch_size)) if len(buffer) else 0
        plans = [windows.plan_for(c, draw_rng, randomized_share=share) for c in buffer.sample(draw_rng, n_hard)]
        plans += windows.plan(draw_rng, config.optim.batch_size - len(plans), share)
        return list(enumerate(plans))

    unfreeze = Unfreeze(config.unfreeze.image_layers, 0) if config.lock_text else config.unfreeze
    result = _train(clip, set_trainable(model, unfreeze), windows, config.optim, step_loss, heads, draw, progress,
                    frozen=[model.text] if config.lock_text and hasattr(model, "text") else [])
    result.extra["hard_negative_buffer"] = len(buffer)
    result.extra["pattern_logit_scale"] = round(float(heads["patterns"].scale), 3)
    result.extra["distinct_captions"] = len(locked)
    return result
