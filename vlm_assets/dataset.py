"""Dataset v1: choosing chart windows, splitting them by time blocks, and assembling image/text pairs.

Leakage rule: every symbol's calendar is cut into blocks of `block_days` trading days, a window (including its
higher-timeframe panel) must lie inside one block, and whole blocks go to train, val or test. So no bar of a test
window appears in a train window, whatever the timeframe: a 1h bar and the 1m bars it is made of share a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from vlm_assets.labeling import ALL_PATTERNS, CORE_PATTERNS, NEUTRAL, ZERO_SHOT_PATTERNS
from vlm_assets.market.timeframes import HIGHER_TIMEFRAME, TIMEFRAMES, bar_end, resample
from vlm_assets.versioning import stable_json, stable_rng

SPLITS = ("train", "val", "test")
LABEL_COLUMNS = (*ALL_PATTERNS, NEUTRAL)
# A kaleido export that times out on a loaded machine usually passes on the restarted worker; a raster fallback
# changes the dataset's bytes, so it is the last resort.
KALEIDO_ATTEMPTS = 3


@dataclass(frozen=True)
class WindowSamplingConfig:
    n_windows: int = 6000
    min_bars: int = 50
    max_bars: int = 120
    per_core_pattern: int = 420
    per_zero_shot_pattern: int = 150
    near_miss_windows: int = 450
    neutral_share: float = 0.2
    block_days: int = 150
    htf_panel_bars: int = 30
    timeframes: tuple[str, ...] = TIMEFRAMES
    seed: int = 5

    def __post_init__(self):
        if not 20 <= self.min_bars <= self.max_bars:
            raise ValueError(f"window bars: need 20 <= min_bars <= max_bars, got {self.min_bars}..{self.max_bars}")
        if not 0 <= self.neutral_share < 1:
            raise ValueError("neutral_share must be within [0, 1)")
        unknown = set(self.timeframes) - set(TIMEFRAMES)
        if unknown:
            raise ValueError(f"timeframes: unknown {sorted(unknown)}; expected some of {TIMEFRAMES}")


@dataclass(frozen=True)
class SplitConfig:
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 3
    attempts: int = 400

    def __post_init__(self):
        if len(self.fractions) != 3 or any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"split fractions must be three positive numbers summing to 1, got {self.fractions}")


def calendar_blocks(index: pd.DatetimeIndex, origin: pd.Timestamp, block_days: int) -> np.ndarray:
    days = np.busday_count(origin.date(), index.normalize().values.astype("datetime64[D]"))
    return days // block_days


def candidate_ends(bars: pd.DataFrame, labels: pd.DataFrame, origin: pd.Timestamp, config: WindowSamplingConfig,
                   htf_bars: pd.DataFrame | None, timeframe: str) -> pd.DataFrame:
    """Bars of one series that can end a window: a full max-length window and its panel fit inside one block,
    and the labels at that bar are defined."""
    index = pd.DatetimeIndex(bars.index)
    blocks = calendar_blocks(index, origin, config.block_days)
    positions = np.arange(config.max_bars - 1, len(bars))
    if positions.size == 0:
        return pd.DataFrame()
    ok = blocks[positions] == blocks[positions - config.max_bars + 1]
    defined = (labels[list(ALL_PATTERNS)].any(axis=1) | labels[NEUTRAL]).to_numpy()
    ok &= defined[positions]
    positions = positions[ok]
    frame = pd.DataFrame({"pos": positions, "block": blocks[positions]})
    frame["end"] = index[positions]
    for name in LABEL_COLUMNS:
        frame[name] = labels[name].to_numpy()[positions]
    if htf_bars is not None and len(htf_bars):
        frame["htf_available"] = _htf_counts(index[positions], timeframe, htf_bars, origin, config) >= 5
    else:
        frame["htf_available"] = False
    return frame


def _htf_counts(ends: pd.DatetimeIndex, timeframe: str, htf_bars: pd.DataFrame, origin, config) -> np.ndarray:
    panel = htf_panel_positions(ends, timeframe, htf_bars, origin, config)
    return panel[1] - panel[0]


def htf_panel_positions(ends: pd.DatetimeIndex, timeframe: str, htf_bars: pd.DataFrame, origin: pd.Timestamp,
                        config: WindowSamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """[first, last) positions in `htf_bars` of the higher-timeframe panel for windows ending at `ends`: only bars
    complete when the window's last bar closes (no look-ahead), inside the same block, at most htf_panel_bars."""
    htf = HIGHER_TIMEFRAME[timeframe]
    htf_index = pd.DatetimeIndex(htf_bars.index).as_unit("ns")
    close_time = bar_end(pd.DatetimeIndex(ends).as_unit("ns"), timeframe)
    last = np.searchsorted(bar_end(htf_index, htf).asi8, close_time.asi8, side="right")
    block_of_end = calendar_blocks(ends, origin, config.block_days)
    htf_blocks = calendar_blocks(htf_index, origin, config.block_days)
    first_in_block = np.searchsorted(htf_blocks, block_of_end, side="left")
    first = np.maximum(last - config.htf_panel_bars, first_in_block)
    return first, np.maximum(last, first)


def _take(pool: pd.DataFrame, need: int, rng: np.random.Generator) -> pd.Index:
    """Up to `need` rows of `pool`, spread evenly over timeframes (then topped up from whatever is left)."""
    if need <= 0 or pool.empty:
        return pool.index[:0]
    groups = {tf: g.index.to_numpy() for tf, g in pool.groupby("timeframe", sort=True)}
    share = int(np.ceil(need / len(groups)))
    picked = []
    for tf in sorted(groups):
        ids = groups[tf]
        picked.extend(rng.choice(ids, size=min(share, ids.size), replace=False).tolist())
    picked = picked[:need] if len(picked) >= need else picked
    if len(picked) < need:
        rest = pool.index.difference(pd.Index(picked)).to_numpy()
        picked.extend(rng.choice(rest, size=min(need - len(picked), rest.size), replace=False).tolist())
    return pd.Index(sorted(picked))


def select_windows(candidates: pd.DataFrame, config: WindowSamplingConfig, near_miss: pd.DataFrame | None = None) -> pd.DataFrame:
    """Pick windows to meet the per-pattern, near-miss and neutral quotas, then fill up to n_windows at random.

    `candidates` has one row per possible window end (symbol, timeframe, pos, end, block, label columns);
    `near_miss` (optional) lists planted look-alikes as symbol, timeframe, timestamp, pattern."""
    rng = np.random.default_rng(config.seed)
    candidates = candidates.reset_index(drop=True)
    chosen = pd.Series("", index=candidates.index, dtype=object)

    def counts(name: str) -> int:
        return int(candidates.loc[chosen != "", name].sum())

    quotas = {p: config.per_core_pattern for p in CORE_PATTERNS} | {p: config.per_zero_shot_pattern for p in ZERO_SHOT_PATTERNS}
    for pattern in sorted(quotas, key=lambda p: (int(candidates[p].sum()), p)):  # rarest first
        pool = candidates[candidates[pattern] & (chosen == "")]
        chosen[_take(pool, quotas[pattern] - counts(pattern), rng)] = pattern

    candidates["near_miss_of"] = ""
    if near_miss is not None and len(near_miss):
        keyed = near_miss.rename(columns={"timestamp": "end", "pattern": "near_miss_of"})
        merged = candidates[["symbol", "timeframe", "end"]].reset_index().merge(
            keyed[["symbol", "timeframe", "end", "near_miss_of"]], on=["symbol", "timeframe", "end"], how="inner")
        merged = merged.drop_duplicates("index").set_index("index")
        candidates.loc[merged.index, "near_miss_of"] = merged["near_miss_of"]
        pool = candidates[(candidates["near_miss_of"] != "") & (chosen == "")]
        already = int((candidates.loc[chosen != "", "near_miss_of"] != "").sum())
        chosen[_take(pool, config.near_miss_windows - already, rng)] = "near_miss"

    neutral_target = int(round(config.neutral_share * config.n_windows))
    pool = candidates[candidates[NEUTRAL] & (chosen == "")]
    chosen[_take(pool, neutral_target - counts(NEUTRAL), rng)] = NEUTRAL

    pool = candidates[chosen == ""]
    chosen[_take(pool, config.n_windows - int((chosen != "").sum()), rng)] = "random"

    picked = candidates[chosen != ""].copy()
    picked["selected_for"] = chosen[chosen != ""]
    lengths = rng.integers(config.min_bars, config.max_bars + 1, size=len(picked))
    picked["n_bars"] = lengths
    picked["window_id"] = [f"{s}-{tf}-{e:%Y%m%dT%H%M}" for s, tf, e in zip(picked["symbol"], picked["timeframe"], picked["end"])]
    return picked.sort_values(["symbol", "timeframe", "end"]).reset_index(drop=True)


def assign_splits(windows: pd.DataFrame, config: SplitConfig) -> pd.Series:
    """Whole (symbol, block) groups go to one split; among seeded random assignments keep the one whose per-label
    shares best match the target fractions (stratified by time blocks)."""
    groups = windows.groupby(["symbol", "block"], sort=True)
    keys = list(groups.groups)
    if len(keys) < 3:
        raise ValueError(f"need at least 3 time blocks to make train/val/test splits, got {len(keys)}: "
                         "use more trading days or a smaller block_days")
    label_matrix = np.stack([groups[name].sum().to_numpy(dtype=float) for name in LABEL_COLUMNS], axis=1)
    sizes = groups.size().to_numpy(dtype=float)
    totals = label_matrix.sum(axis=0)
    target = np.asarray(config.fractions)
    rng = np.random.default_rng(config.seed)
    best, best_score = None, np.inf
    for _ in range(config.attempts):
        order = rng.permutation(len(keys))
        bounds = np.cumsum(sizes[order]) / sizes.sum()
        split_of = np.empty(len(keys), dtype=int)
        split_of[order] = np.searchsorted(np.cumsum(target)[:-1], bounds - sizes[order] / sizes.sum() / 2, side="right")
        if len(set(split_of)) < 3:
            continue
        shares = np.stack([label_matrix[split_of == s].sum(axis=0) for s in range(3)]) / np.maximum(totals, 1)
        size_shares = np.array([sizes[split_of == s].sum() for s in range(3)]) / sizes.sum()
        missing = np.sum((np.stack([label_matrix[split_of == s].sum(axis=0) for s in range(3)]) == 0) & (totals > 0))
        score = np.abs(shares - target[:, None]).sum() + 3 * np.abs(size_shares - target).sum() + 10 * missing
        if score < best_score:
            best, best_score = split_of, score
    if best is None:
        raise ValueError("could not form three non-empty splits from the time blocks")
    by_key = {key: SPLITS[s] for key, s in zip(keys, best)}
    return pd.Series([by_key[(s, b)] for s, b in zip(windows["symbol"], windows["block"])], index=windows.index)


def leakage_violations(windows: pd.DataFrame) -> pd.DataFrame:
    """Pairs of windows of one symbol in different splits whose time spans overlap (must be empty)."""
    found = []
    for symbol, group in windows.groupby("symbol", sort=True):
        spans = group.sort_values("span_start")
        starts, ends = spans["span_start"].to_numpy(), spans["span_end"].to_numpy()
        splits, ids = spans["split"].to_numpy(), spans["window_id"].to_numpy()
        running_end = {s: np.datetime64("NaT") for s in SPLITS}
        running_id = {s: "" for s in SPLITS}
        for start, end, split, wid in zip(starts, ends, splits, ids):
            for other in SPLITS:
                if other != split and not np.isnat(running_end[other]) and running_end[other] > start:
                    found.append((symbol, wid, split, running_id[other], other))
            if np.isnat(running_end[split]) or end > running_end[split]:
                running_end[split], running_id[split] = end, wid
    return pd.DataFrame(found, columns=["symbol", "window_id", "split", "overlaps_window_id", "overlaps_split"])


def label_counts(windows: pd.DataFrame) -> pd.DataFrame:
    """Windows per label (rows) and split (columns), with a total column."""
    table = windows.groupby("split")[list(LABEL_COLUMNS)].sum().T.reindex(columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    return table.astype(int)


@dataclass(frozen=True)
class ImageConfig:
    width: int = 224
    height: int = 224
    style_mode: str = "randomized"  # "randomized": seeded per-window style; "fixed": style_preset for all
    style_preset: str = "classic_light"
    composite_share: float = 0.2  # windows drawn with a higher-timeframe panel (when one is available)
    plotly_share: float = 0.03  # windows drawn by plotly+kaleido instead of the raster renderer, for style diversity
    kaleido_timeout: float = 30.0
    seed: int = 9

    def __post_init__(self):
        if self.style_mode not in ("randomized", "fixed"):
            raise ValueError(f"style_mode must be 'randomized' or 'fixed', got {self.style_mode!r}")
        if self.width < 64 or self.height < 64:
            raise ValueError(f"image size {self.width}x{self.height} is too small (min 64x64)")


def series_key(symbol: str, timeframe: str) -> str:
    return f"{symbol}/{timeframe}"


def window_slices(windows: pd.DataFrame, bars: dict[tuple[str, str], pd.DataFrame],
                  origins: dict[str, pd.Timestamp], config: WindowSamplingConfig | None):
    """Yield (row, window bars, higher-timeframe panel bars) for every window, in table order.
    Without a sampling config no panel is computed (the third item is None)."""
    for (symbol, timeframe), group in windows.groupby(["symbol", "timeframe"], sort=False):
        series = bars[(symbol, timeframe)]
        htf_series = higher_timeframe_series(bars, symbol, timeframe) if config is not None else None
        ends = pd.DatetimeIndex(series.index[group["pos"].to_numpy()])
        if htf_series is not None and len(htf_series):
            first, last = htf_panel_positions(ends, timeframe, htf_series, origins[symbol], config)
        else:
            first = last = np.zeros(len(group), dtype=int)
        for (_, row), lo, hi in zip(group.iterrows(), first, last):
            pos = int(row["pos"])
            window = series.iloc[pos - int(row["n_bars"]) + 1: pos + 1]
            panel = htf_series.iloc[lo:hi] if htf_series is not None and hi > lo else None
            yield row, window, panel


def higher_timeframe_series(bars: dict[tuple[str, str], pd.DataFrame], symbol: str, timeframe: str) -> pd.DataFrame | None:
    """The series drawn in a window's higher-timeframe panel (weekly bars are resampled from daily on demand)."""
    htf = HIGHER_TIMEFRAME[timeframe]
    if htf == "1w":
        daily = bars.get((symbol, "1d"))
        return resample(daily, "1w") if daily is not None else None
    return bars.get((symbol, htf))


def span_of(window: pd.DataFrame, panel: pd.DataFrame | None, timeframe: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    """[first instant, last instant) of market time a sample shows, panel included."""
    start = window.index[0] if panel is None else min(window.index[0], panel.index[0])
    return start, bar_end(pd.DatetimeIndex(window.index[-1:]), timeframe)[0]


def symbol_origins(bars: dict[tuple[str, str], pd.DataFrame]) -> dict[str, pd.Timestamp]:
    """Each symbol's first trading day: block 0 starts there."""
    origins: dict[str, pd.Timestamp] = {}
    for (symbol, _), frame in bars.items():
        if len(frame):
            first = pd.Timestamp(frame.index[0]).normalize()
            origins[symbol] = min(origins.get(symbol, first), first)
    return origins


def all_candidates(bars: dict[tuple[str, str], pd.DataFrame], labels: dict[tuple[str, str], pd.DataFrame],
                   config: WindowSamplingConfig) -> pd.DataFrame:
    """Possible window ends over every series of the configured timeframes."""
    origins = symbol_origins(bars)
    parts = []
    for (symbol, timeframe), series in sorted(bars.items()):
        if timeframe not in config.timeframes or (symbol, timeframe) not in labels:
            continue
        htf_series = higher_timeframe_series(bars, symbol, timeframe)
        part = candidate_ends(series, labels[(symbol, timeframe)], origins[symbol], config, htf_series, timeframe)
        if part.empty:
            continue
        part.insert(0, "timeframe", timeframe)
        part.insert(0, "symbol", symbol)
        parts.append(part)
    if not parts:
        raise ValueError(f"no series has room for a {config.max_bars}-bar window inside one {config.block_days}-day "
                         "block: provide more history or lower max_bars/block_days")
    return pd.concat(parts, ignore_index=True)


def render_windows(windows: pd.DataFrame, bars: dict[tuple[str, str], pd.DataFrame], sampling: WindowSamplingConfig,
                   config: ImageConfig, progress=None, logger=None) -> pd.DataFrame:
    """Render every window (seeded style, optional higher-timeframe panel, a plotly share); one row per window."""
    import hashlib

    from vlm_assets.rendering import PRESETS, KaleidoExporter, plotly_figure, randomize_style, render_png

    origins = symbol_origins(bars)
    rows = []
    exporter = None
    try:
        for done, (row, window, panel) in enumerate(window_slices(windows, bars, origins, sampling), start=1):
            rng = stable_rng(config.seed, row["window_id"])
            style = randomize_style(rng) if config.style_mode == "randomized" else PRESETS[config.style_preset]
            drawn_panel = panel if panel is not None and len(panel) >= 5 and rng.random() < config.composite_share else None
            renderer = "plotly" if rng.random() < config.plotly_share else "raster"
            png = None
            if renderer == "plotly":
                exporter = exporter or KaleidoExporter(timeout=config.kaleido_timeout)
                figure = plotly_figure(window, style, htf_bars=drawn_panel)
                for attempt in range(1, KALEIDO_ATTEMPTS + 1):
                    try:
                        png = exporter.to_png(figure, config.width, config.height)
                        break
                    except Exception as exc:  # kaleido can hang or die; the exporter restarts its worker
                        if logger is not None:
                            logger.warning(f"plotly export {attempt}/{KALEIDO_ATTEMPTS} failed for {row['window_id']}: "
                                           f"{exc}")
                if png is None:  # keep the window, and say which renderer drew it
                    renderer = "raster_fallback"
            if png is None:
                png = render_png(window, style, config.width, config.height, htf_bars=drawn_panel)
            start, end = span_of(window, drawn_panel, row["timeframe"])
            rows.append({
                "window_id": row["window_id"], "png": png, "image_sha256": hashlib.sha256(png).hexdigest(),
                "style_id": style.style_id(), "style_json": stable_style_json(style), "renderer": renderer,
                "composite": drawn_panel is not None, "span_start": start, "span_end": end,
            })
            if progress is not None:
                progress(done, len(windows))
    finally:
        if exporter is not None:
            exporter.close()
    return pd.DataFrame(rows)


def stable_style_json(style) -> str:
    return stable_json(style.to_dict())
