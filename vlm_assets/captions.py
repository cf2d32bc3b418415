"""Captions for chart windows: a seeded template grammar, pluggable augmenters, and embedding dedupe.

Detail levels: `name` (pattern names only), `name_trend` (names with trend and timeframe context) and
`anatomy` (what the last candles look like, with no pattern name at all). Zero-shot pattern names never appear in
any caption: `FORBIDDEN_TERMS` is enforced on every text, generated or augmented.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from vlm_assets.labeling import ALL_PATTERNS, CORE_PATTERNS, PATTERN_CANDLES, ZERO_SHOT_PATTERNS, RuleParams

log = logging.getLogger(__name__)

DISPLAY_NAMES: dict[str, tuple[str, ...]] = {
    "bullish_engulfing": ("bullish engulfing", "bullish engulfing pattern"),
    "bearish_engulfing": ("bearish engulfing", "bearish engulfing pattern"),
    "hammer": ("hammer", "hammer candle"),
    "inverted_hammer": ("inverted hammer", "inverted hammer candle"),
    "doji": ("doji", "doji candle"),
    "morning_star": ("morning star", "morning star formation"),
    "evening_star": ("evening star", "evening star formation"),
    "inside_bar": ("inside bar", "inside candle"),
    "outside_bar": ("outside bar", "outside candle"),
}
# Names (and their usual fragments) of the patterns held out for zero-shot evaluation.
FORBIDDEN_TERMS: tuple[str, ...] = tuple(sorted(
    {p.replace("_", " ") for p in ZERO_SHOT_PATTERNS} | {"shooting", "hanging", "dragonfly", "gravestone"}
))
CORE_NAME_TERMS: tuple[str, ...] = tuple(sorted({n for names in DISPLAY_NAMES.values() for n in names} | {"engulfing", "doji", "star"}))
TIMEFRAME_WORDS = {"1m": "1-minute", "5m": "5-minute", "15m": "15-minute", "1h": "hourly", "1d": "daily"}
DETAILS = ("name", "name_trend", "anatomy")


def contains_forbidden(text: str) -> bool:
    lowered = text.lower()
    return any(term in lowered for term in FORBIDDEN_TERMS)


def names_a_pattern(text: str) -> bool:
    lowered = text.lower()
    return any(re.search(rf"\b{re.escape(term)}\b", lowered) for term in CORE_NAME_TERMS) or contains_forbidden(text)


@dataclass(frozen=True)
class Candle:
    """One candle relative to the recent average range (ratios are scale- and shift-free)."""

    direction: int  # +1 closes above open, -1 below, 0 (almost) flat
    body: float  # body / average range
    range: float  # range / average range
    upper: float  # upper shadow / own range
    lower: float  # lower shadow / own range
    body_center: float  # 0 = body at the low, 1 = at the high
    gap: float  # (open - previous close) / average range


@dataclass(frozen=True)
class ChartContext:
    timeframe: str
    trend: float  # the labeling engine's normalized trend before the described candles
    volatility_ratio: float  # recent average range / the window's average range
    candles: tuple[Candle, ...]  # the described candles, oldest first (1 to 3)
    inside_previous: bool
    engulfs_previous_range: bool
    body_covers_previous: bool
    patterns: tuple[str, ...]  # core patterns at the last bar
    zero_shot_patterns: tuple[str, ...]


def describe_window(window: pd.DataFrame, label_tail: pd.DataFrame, timeframe: str) -> ChartContext:
    """Build the caption context for a window (oldest bar first). `label_tail` holds the labels of its last three
    bars: the described candles are those of the longest pattern at the last bar (one for neutral), and trend and
    average range are read where the rule engine reads them, before the first described candle."""
    labels_at_end = label_tail.iloc[-1]
    fired = [p for p in ALL_PATTERNS if bool(labels_at_end.get(p, False))]
    span = min(max([PATTERN_CANDLES[p] for p in fired] or [1]), len(label_tail))
    reference = label_tail.iloc[-span]
    o, h, l, c = (window[k].to_numpy(dtype=float) for k in ("open", "high", "low", "close"))
    ranges = h - l
    avg_range = float(reference.get("avg_range", np.nan))
    if not np.isfinite(avg_range) or avg_range <= 0:
        avg_range = float(np.mean(ranges[-11:-1])) if len(ranges) > 1 else float(ranges[-1])
    avg_range = max(avg_range, 1e-12)
    candles = []
    for i in range(len(c) - span, len(c)):
        rng_i = max(ranges[i], 1e-12)
        body = abs(c[i] - o[i])
        flat = body < 0.1 * avg_range
        candles.append(Candle(
            direction=0 if flat else int(np.sign(c[i] - o[i])),
            body=body / avg_range,
            range=ranges[i] / avg_range,
            upper=(h[i] - max(o[i], c[i])) / rng_i,
            lower=(min(o[i], c[i]) - l[i]) / rng_i,
            body_center=((o[i] + c[i]) / 2 - l[i]) / rng_i,
            gap=(o[i] - c[i - 1]) / avg_range if i > 0 else 0.0,
        ))
    recent = float(np.mean(ranges[-10:]))
    overall = float(np.mean(ranges)) or 1e-12
    return ChartContext(
        timeframe=timeframe,
        trend=float(reference.get("trend", 0.0)),
        volatility_ratio=recent / overall,
        candles=tuple(candles),
        inside_previous=bool(h[-1] < h[-2] and l[-1] > l[-2]),
        engulfs_previous_range=bool(h[-1] > h[-2] and l[-1] < l[-2]),
        body_covers_previous=bool(max(o[-1], c[-1]) >= max(o[-2], c[-2]) and min(o[-1], c[-1]) <= min(o[-2], c[-2])
                                  and abs(c[-2] - o[-2]) > 0.1 * avg_range),
        patterns=tuple(p for p in CORE_PATTERNS if p in fired),
        zero_shot_patterns=tuple(p for p in ZERO_SHOT_PATTERNS if p in fired),
    )


# ---- the grammar -------------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def trend_phrase(trend: float, threshold: float, rng: np.random.Generator) -> str:
    if trend <= -2 * threshold:
        return _pick(rng, ("after a sharp decline", "after a steep drop", "following a strong downtrend"))
    if trend <= -threshold:
        return _pick(rng, ("after a decline", "following a downtrend", "after prices fell"))
    if trend >= 2 * threshold:
        return _pick(rng, ("after a strong rally", "after a steep rise", "following a strong uptrend"))
    if trend >= threshold:
        return _pick(rng, ("after a rise", "following an uptrend", "after prices rose"))
    return _pick(rng, ("after sideways trading", "in a flat market", "after a range-bound stretch"))


def _times(ratio: float) -> str:
    if ratio >= 4.5:
        return "many times"
    if ratio >= 3.5:
        return "about four times"
    if ratio >= 2.5:
        return "about three times"
    return "about twice"


def _body_words(candle: Candle, rng) -> str:
    if candle.body < 0.1:
        return _pick(rng, ("almost no body", "open and close nearly equal", "a hairline body"))
    size = ("a small" if candle.body < 0.3 else "a medium" if candle.body < 0.7
            else "a large" if candle.body < 1.2 else "a very large")
    return f"{size} {_pick(rng, ('up', 'rising')) if candle.direction > 0 else _pick(rng, ('down', 'falling'))} body"


def _shadow_words(candle: Candle, side: str, rng) -> str | None:
    share = candle.upper if side == "upper" else candle.lower
    body_share = max(candle.body / max(candle.range, 1e-12), 1e-6)
    wick = _pick(rng, ("shadow", "wick"))
    if share < 0.05:
        return f"no {side} {wick}"
    if share >= 0.5 and share >= 2 * body_share:
        return f"a long {side} {wick} {_times(share / body_share)} the body" if candle.body >= 0.1 else f"a long {side} {wick}"
    if share >= 0.3:
        return f"a clear {side} {wick}"
    return None


def _position_words(candle: Candle, rng) -> str | None:
    if candle.body >= 0.7 * candle.range:
        return None
    if candle.body_center >= 0.7:
        return _pick(rng, ("body near the top of the range", "body at the high end"))
    if candle.body_center <= 0.3:
        return _pick(rng, ("body near the bottom of the range", "body at the low end"))
    return _pick(rng, ("body in the middle of the range", "body centred in the range"))


def candle_phrase(candle: Candle, rng: np.random.Generator) -> str:
    parts = [_body_words(candle, rng)]
    shadows = [w for w in (_shadow_words(candle, "upper", rng), _shadow_words(candle, "lower", rng)) if w]
    rng.shuffle(shadows)
    parts += shadows
    position = _position_words(candle, rng)
    if position:
        parts.append(position)
    if abs(candle.gap) >= 0.15:
        parts.append("opening with a gap " + ("up" if candle.gap > 0 else "down"))
    return "a candle with " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def anatomy_caption(ctx: ChartContext, rng: np.random.Generator, trend_threshold: float) -> str:
    """What the chart shows, with no pattern name: trend, volatility, and the last one to three candles."""
    candles = [candle_phrase(c, rng) for c in ctx.candles]
    if len(candles) == 1:
        body = "the last bar is " + candles[0]
    else:
        ordinal = ("first", "second", "third")
        body = f"the last {len(candles)} bars: " + ", then ".join(
            f"{ordinal[i]} {text[2:] if text.startswith('a ') else text}" for i, text in enumerate(candles))
    relations = []
    if ctx.inside_previous:
        relations.append(_pick(rng, ("its whole range sits inside the previous candle's range",
                                     "its high and low stay within the previous candle")))
    if ctx.engulfs_previous_range:
        relations.append(_pick(rng, ("its range extends past both the previous high and low",
                                     "it trades above the previous high and below the previous low")))
    if ctx.body_covers_previous and ctx.candles[-1].body >= 0.1:
        relations.append("its body covers the previous body")
    trend = trend_phrase(ctx.trend, trend_threshold, rng)
    volatility = ""
    if ctx.volatility_ratio >= 1.4:
        volatility = _pick(rng, ("volatility expanding", "ranges widening"))
    elif ctx.volatility_ratio <= 0.7:
        volatility = _pick(rng, ("volatility contracting", "quiet, narrow ranges"))
    # Top-level clauses are joined by "; " so augmenters can reorder them without splitting a candle's description.
    text = "; ".join([body] + relations)
    if rng.random() < 0.5:
        lead = f"{TIMEFRAME_WORDS[ctx.timeframe]} chart {trend}" + (f", {volatility}" if volatility else "")
        return f"{lead}: {text}"
    return "; ".join([text, trend] + ([volatility] if volatility else []))


def named_caption(ctx: ChartContext, rng: np.random.Generator, with_trend: bool, trend_threshold: float) -> str | None:
    """The pattern names at the last bar, or the neutral caption; None when only held-out patterns fire."""
    if not ctx.patterns:
        if ctx.zero_shot_patterns:
            return None
        text = _pick(rng, ("no candlestick pattern", "an ordinary candle with no pattern",
                           "no recognizable candlestick pattern at the last bar"))
    else:
        names = [_pick(rng, DISPLAY_NAMES[p]) for p in ctx.patterns]
        joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        article = "an" if joined[0] in "aeiou" else "a"
        text = _pick(rng, ("{n}", "{a} {n}", "{n} on the last candle", "candlestick chart showing {a} {n}")).format(n=joined, a=article)
    if with_trend:
        text += f" {trend_phrase(ctx.trend, trend_threshold, rng)} on the {TIMEFRAME_WORDS[ctx.timeframe]} chart"
    return text


# ---- augmenters --------------------------------------------------------------------------------------------

class Augmenter(Protocol):
    name: str

    def variants(self, caption: str, n: int, rng: np.random.Generator) -> list[str]:
        """Up to n rewordings of `caption` that keep its facts. Must not raise for a bad backend response."""


_SYNONYMS: dict[str, tuple[str, ...]] = {
    "candle": ("bar", "candlestick"),
    "bar": ("candle",),
    "shadow": ("wick", "tail"),
    "wick": ("shadow", "tail"),
    "decline": ("selloff", "downswing", "drop"),
    "rise": ("rally", "advance", "upswing"),
    "small": ("little", "modest"),
    "large": ("big", "tall"),
    "long": ("extended", "lengthy"),
    "previous": ("prior", "preceding"),
    "chart": ("graph",),
    "near": ("close to",),
}


@dataclass
class OfflineParaphraser:
    """Synonym swaps and reordering of top-level ("; "-separated) clauses: deterministic for a seeded rng, offline."""

    name: str = "offline"
    max_swaps: int = 3

    def variants(self, caption: str, n: int, rng: np.random.Generator) -> list[str]:
        out = []
        for _ in range(n):
            words = caption.split(" ")
            positions = [i for i, w in enumerate(words) if w.strip(",;:") in _SYNONYMS]
            rng.shuffle(positions)
            for i in positions[: self.max_swaps]:
                core = words[i].strip(",;:")
                words[i] = words[i].replace(core, _pick(rng, _SYNONYMS[core]))
            text = " ".join(words)
            clauses = text.split("; ")
            if len(clauses) > 2 and rng.random() < 0.5:
                head, *tail = clauses
                rng.shuffle(tail)
                text = "; ".join([head, *tail])
            out.append(text)
        return out


@dataclass
class OpenAICompatibleAugmenter:
    """Rewordings from any OpenAI-compatible chat endpoint (`<base_url>/chat/completions`). Off by default.

    Failures (network, HTTP, malformed answers) are logged and yield no variants; after `max_failures` in a row
    the backend is skipped for the rest of the run so a dead endpoint cannot stall the pipeline."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 20.0
    max_failures: int = 3
    name: str = "llm"
    _failures: int = field(default=0, repr=False)

    def variants(self, caption: str, n: int, rng: np.random.Generator) -> list[str]:
        if self._failures >= self.max_failures:
            return []
        prompt = (f"Rewrite this description of a candlestick chart in {n} different ways, one per line, keeping every "
                  f"fact and adding none. Do not name any candlestick pattern.\n\n{caption}")
        body = json.dumps({"model": self.model, "temperature": 0.7,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        request = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                content = json.loads(response.read())["choices"][0]["message"]["content"]
            lines = [re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).strip() for line in str(content).splitlines()]
        except Exception as exc:  # any backend failure must leave the run intact
            self._failures += 1
            log.warning("LLM augmenter failed (%d/%d): %s", self._failures, self.max_failures, exc)
            return []
        self._failures = 0
        return [line for line in lines if line][:n]


# ---- dedupe and assembly -----------------------------------------------------------------------------------

def dedupe_by_embedding(embeddings: np.ndarray, threshold: float, keep_first: int = 0) -> list[int]:
    """Greedy leader clustering on cosine similarity: keep a text unless it is within `threshold` of a kept one.
    The first `keep_first` rows (the rule-derived captions) are always kept."""
    kept: list[int] = list(range(min(keep_first, len(embeddings))))
    for i in range(keep_first, len(embeddings)):
        if not kept or float(np.max(embeddings[kept] @ embeddings[i])) < threshold:
            kept.append(i)
    return kept


@dataclass(frozen=True)
class CaptionConfig:
    seed: int = 11
    name_trend_share: float = 0.5  # share of named captions that also carry trend and timeframe
    augmented_per_window: int = 2
    dedupe_threshold: float = 0.95
    near_miss_margin: float = 0.05  # a neutral bar this close to firing a pattern is only `rule_medium`


def window_tier(labels_at_end: pd.Series, near_miss_margin: float) -> str:
    """rule_medium if any fired pattern is rule_medium, or (neutral) if some pattern nearly fired."""
    fired = [p for p in ALL_PATTERNS if bool(labels_at_end.get(p, False))]
    if fired:
        return "rule_medium" if any(labels_at_end.get(f"{p}_tier") == "rule_medium" for p in fired) else "rule_high"
    margins = [float(labels_at_end.get(f"{p}_margin", np.nan)) for p in ALL_PATTERNS]
    close_call = any(np.isfinite(m) and m > -near_miss_margin for m in margins)
    return "rule_medium" if close_call else "rule_high"


def draft_captions(ctx: ChartContext, tier: str, config: CaptionConfig, rng: np.random.Generator,
                   params: RuleParams = RuleParams()) -> list[dict]:
    """The rule-derived captions of one window: an anatomy caption and, unless only held-out patterns fire,
    a named one."""
    threshold = params.trend_threshold
    rows = [{"caption": anatomy_caption(ctx, rng, threshold), "detail": "anatomy", "tier": tier, "source": "template"}]
    with_trend = bool(rng.random() < config.name_trend_share)
    named = named_caption(ctx, rng, with_trend, threshold)
    if named is not None:
        rows.append({"caption": named, "detail": "name_trend" if with_trend else "name", "tier": tier,
                     "source": "template"})
    return rows


def build_pairs(items, config: CaptionConfig, encoder, augmenter: Augmenter, params: RuleParams = RuleParams(),
                progress=None, total: int | None = None, embed_progress=None) -> tuple[pd.DataFrame, dict]:
    """Captions for every window: rule-derived drafts, augmented variants, then per-window embedding dedupe.

    `items` yields (window_id, window bars, labels of its last three bars, timeframe). Returns the pairs table
    (pair_id, window_id, caption, detail, tier, source) and counts for the report."""
    from vlm_assets.versioning import stable_rng

    drafted = []
    stats = {"windows": 0, "drafts": 0, "variants_proposed": 0, "variants_rejected_terms": 0}
    for done, (window_id, window, label_tail, timeframe) in enumerate(items, start=1):
        rng = stable_rng(config.seed, window_id)
        ctx = describe_window(window, label_tail, timeframe)
        rows = draft_captions(ctx, window_tier(label_tail.iloc[-1], config.near_miss_margin), config, rng, params)
        variants = []
        if config.augmented_per_window > 0:
            base = rows[int(rng.integers(len(rows)))]
            for text in augmenter.variants(base["caption"], config.augmented_per_window, rng):
                stats["variants_proposed"] += 1
                # An anatomy caption's rewording must stay nameless; no text may name a held-out pattern.
                if contains_forbidden(text) or (base["detail"] == "anatomy" and names_a_pattern(text)):
                    stats["variants_rejected_terms"] += 1
                    continue
                variants.append({"caption": text, "detail": base["detail"], "tier": "augmented", "source": augmenter.name})
        for row in rows:
            if contains_forbidden(row["caption"]):
                raise AssertionError(f"template produced a held-out pattern name: {row['caption']!r}")
        drafted.append((window_id, rows, variants))
        stats["windows"] += 1
        stats["drafts"] += len(rows)
        if progress is not None:
            progress(done, total or done)

    texts = sorted({r["caption"] for _, rows, variants in drafted for r in rows + variants})
    position = {t: i for i, t in enumerate(texts)}
    embeddings = encoder.encode(texts, progress=embed_progress) if texts else np.zeros((0, 1), dtype=np.float32)
    out = []
    kept_variants = 0
    for window_id, rows, variants in drafted:
        candidates = rows + [v for v in variants if v["caption"] not in {r["caption"] for r in rows}]
        keep = dedupe_by_embedding(embeddings[[position[c["caption"]] for c in candidates]],
                                   config.dedupe_threshold, keep_first=len(rows))
        for k, i in enumerate(keep):
            out.append({"pair_id": f"{window_id}#{k}", "window_id": window_id, **candidates[i]})
        kept_variants += len(keep) - len(rows)
    stats["variants_kept"] = kept_variants
    stats["variants_dropped_as_duplicates"] = stats["variants_proposed"] - stats["variants_rejected_terms"] - kept_variants
    return pd.DataFrame(out, columns=["pair_id", "window_id", "caption", "detail", "tier", "source"]), stats
