"""Data assets: ohlcv_bars -> pattern_labels -> chart_images -> captions -> vlm_dataset."""


import json

import pandas as pd
from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from vlm_assets.captions import CaptionConfig, OfflineParaphraser, OpenAICompatibleAugmenter, build_pairs
from vlm_assets.dataset import (
    LABEL_COLUMNS, SPLITS, ImageConfig, SplitConfig, WindowSamplingConfig, all_candidates, assign_splits,
    label_counts, leakage_violations, render_windows, select_windows, window_slices, symbol_origins,
)
from vlm_assets.labeling import ALL_PATTERNS, CORE_PATTERNS, NEUTRAL, label_bars
from vlm_assets.market.timeframes import TIMEFRAMES
from vlm_assets.pipeline import metadata as md
from vlm_assets.pipeline.artifacts import (
    bars_files, load_bars, load_labels, load_plants, read_frame, write_version,
)
from vlm_assets.storage import parquet_bytes
from vlm_assets.versioning import content_hash, stable_json
from vlm_resources import ArtifactStoreResource, ComputeResource, MarketDataResource

DATA_GROUP = "data"
DATASET_SCHEMA_VERSION = "v1"
DATASET_CODE_VERSION = "1"


@asset(group_name=DATA_GROUP, code_version="1", kinds={"pandas"})
def ohlcv_bars(context: AssetExecutionContext, market: MarketDataResource, store: ArtifactStoreResource) -> MaterializeResult:
    """OHLCV bars for every symbol at 1m/5m/15m/1h/1d (the embedded synthetic market, or the user's files)."""
    artifacts = store.store()
    bars, plants = market.load(progress=md.Progress(context.log, "symbols generated", len(market.symbols), every=0).start())
    files = bars_files(bars)
    if plants is not None:
        files["plants.parquet"] = parquet_bytes(plants)
    version = write_version(artifacts, "ohlcv_bars", files)
    rows = pd.DataFrame(
        [(tf, sum(len(f) for (s, t), f in bars.items() if t == tf)) for tf in TIMEFRAMES], columns=["timeframe", "bars"]
    )
    first = min(f.index[0] for f in bars.values() if len(f))
    last = max(f.index[-1] for f in bars.values() if len(f))
    meta = {
        "version": version,
        "path": MetadataValue.path(str(artifacts.path("ohlcv_bars", version))),
        "source": market.source,
        "symbols": MetadataValue.json(sorted({s for s, _ in bars})),
        "bars_per_timeframe": md.table(rows),
        "first_bar": str(first), "last_bar": str(last),
        "daily_chart": _daily_chart(bars),
    }
    if plants is not None:
        planted = plants.pivot_table(index="pattern", columns="near_miss", values="symbol", aggfunc="count", fill_value=0)
        planted = planted.rename(columns={False: "planted", True: "near_miss"}).reset_index()
        meta["planted_patterns"] = md.table(planted)
    return MaterializeResult(metadata=meta, data_version=DataVersion(version))


def _daily_chart(bars) -> MetadataValue:
    from vlm_assets.rendering import PRESETS, plotly_figure

    symbol = sorted({s for s, t in bars if t == "1d"})[0]
    window = bars[(symbol, "1d")].iloc[-120:]
    figure = plotly_figure(window, PRESETS["grid_light"], title=f"{symbol} daily, last {len(window)} bars")
    return md.plot_markdown(figure, f"{symbol} 1d")


@asset(group_name=DATA_GROUP, code_version="1", deps=[ohlcv_bars], kinds={"pandas"})
def pattern_labels(context: AssetExecutionContext, store: ArtifactStoreResource) -> MaterializeResult:
    """Multi-label candlestick patterns at every bar from the rule engine (docs/pattern_taxonomy.md)."""
    artifacts = store.store()
    bars = load_bars(artifacts)
    files, rates = {}, []
    progress = md.Progress(context.log, "series labelled", len(bars)).start()
    done = 0
    for tf in TIMEFRAMES:
        parts = []
        for (symbol, t), frame in sorted(bars.items()):
            if t != tf:
                continue
            labels = compact_labels(label_bars(frame))
            rates.append(labels[list(LABEL_COLUMNS)].mean().rename(f"{symbol} {tf}"))
            part = labels.reset_index(names="timestamp")
            part.insert(0, "symbol", symbol)
            parts.append(part)
            done += 1
            progress(done)
        if parts:
            files[f"labels_{tf}.parquet"] = parquet_bytes(pd.concat(parts, ignore_index=True))
    upstream = artifacts.current_version("ohlcv_bars")
    version = write_version(artifacts, "pattern_labels", files, extra_hash=upstream)
    rate_table = pd.DataFrame(rates)
    by_tf = rate_table.groupby(rate_table.index.str.split(" ").str[-1]).mean().T.reindex(columns=list(TIMEFRAMES))
    return MaterializeResult(
        metadata={
            "version": version, "ohlcv_version": upstream,
            "path": MetadataValue.path(str(artifacts.path("pattern_labels", version))),
            "firing_rate_percent": md.table((by_tf * 100).round(3), index_name="pattern"),
        },
        data_version=DataVersion(version),
    )


def compact_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """Smaller storage: float32 margins and measures, categorical tiers."""
    out = labels.copy()
    for column in out.columns:
        if out[column].dtype == object or str(out[column].dtype) in ("string", "str"):
            out[column] = out[column].astype("category")
        elif out[column].dtype.kind == "f":
            out[column] = out[column].astype("float32")
    return out


class ChartImagesConfig(Config):
    n_windows: int = WindowSamplingConfig.n_windows
    min_bars: int = Field(default=WindowSamplingConfig.min_bars, description="shortest window (bars)")
    max_bars: int = Field(default=WindowSamplingConfig.max_bars, description="longest window (bars)")
    per_core_pattern: int = WindowSamplingConfig.per_core_pattern
    per_zero_shot_pattern: int = WindowSamplingConfig.per_zero_shot_pattern
    near_miss_windows: int = WindowSamplingConfig.near_miss_windows
    neutral_share: float = WindowSamplingConfig.neutral_share
    block_days: int = Field(default=WindowSamplingConfig.block_days, description="trading days per split block")
    timeframes: list[str] = Field(default_factory=lambda: list(TIMEFRAMES))
    sampling_seed: int = WindowSamplingConfig.seed
    width: int = ImageConfig.width
    height: int = ImageConfig.height
    style_mode: str = ImageConfig.style_mode
    style_preset: str = ImageConfig.style_preset
    composite_share: float = ImageConfig.composite_share
    plotly_share: float = ImageConfig.plotly_share
    kaleido_timeout: float = ImageConfig.kaleido_timeout
    style_seed: int = ImageConfig.seed

    def sampling(self) -> WindowSamplingConfig:
        return WindowSamplingConfig(
            n_windows=self.n_windows, min_bars=self.min_bars, max_bars=self.max_bars,
            per_core_pattern=self.per_core_pattern, per_zero_shot_pattern=self.per_zero_shot_pattern,
            near_miss_windows=self.near_miss_windows, neutral_share=self.neutral_share, block_days=self.block_days,
            timeframes=tuple(self.timeframes), seed=self.sampling_seed,
        )

    def images(self) -> ImageConfig:
        return ImageConfig(
            width=self.width, height=self.height, style_mode=self.style_mode, style_preset=self.style_preset,
            composite_share=self.composite_share, plotly_share=self.plotly_share,
            kaleido_timeout=self.kaleido_timeout, seed=self.style_seed,
        )


@asset(group_name=DATA_GROUP, code_version="2", deps=[pattern_labels], kinds={"pillow"})
def chart_images(context: AssetExecutionContext, config: ChartImagesConfig, store: ArtifactStoreResource) -> MaterializeResult:
    """Chart windows chosen to meet per-pattern quotas, rendered to PNG (seeded styles, composites, a plotly share)."""
    artifacts = store.store()
    sampling, images_config = config.sampling(), config.images()
    bars = load_bars(artifacts)
    labels = load_labels(artifacts)
    plants = load_plants(artifacts)
    candidates = all_candidates(bars, labels, sampling)
    near_miss = plants[plants["near_miss"]] if plants is not None else None
    windows = select_windows(candidates, sampling, near_miss)
    context.log.info(f"selected {len(windows)} windows from {len(candidates):,} candidate ends")
    images = render_windows(windows, bars, sampling, images_config,
                            progress=md.Progress(context.log, "charts rendered", len(windows)).start(), logger=context.log)
    table = windows.merge(images, on="window_id", validate="one_to_one")
    upstream = artifacts.current_version("pattern_labels")
    settings = stable_json({"sampling": sampling, "images": images_config})
    # settings.json lets training render more windows exactly like these (same sampling and image settings).
    version = write_version(artifacts, "chart_images", {"windows.parquet": parquet_bytes(table), "settings.json": settings.encode()},
                            extra_hash=upstream)
    reasons = table["selected_for"].value_counts().rename_axis("selected_for").reset_index(name="windows")
    sample = table.groupby("selected_for", sort=True).head(1).head(12)
    return MaterializeResult(
        metadata={
            "version": version, "labels_version": upstream,
            "path": MetadataValue.path(str(artifacts.path("chart_images", version))),
            "windows": len(table), "candidate_ends": len(candidates),
            "distinct_styles": int(table["style_id"].nunique()),
            "renderers": MetadataValue.json(table["renderer"].value_counts().to_dict()),
            "composites": int(table["composite"].sum()),
            "selected_for": md.table(reasons),
            "samples": md.png_markdown(md.contact_sheet(sample["png"].tolist(),
                                                        [f"{r.window_id}: {r.selected_for}" for r in sample.itertuples()]),
                                       "sample charts"),
        },
        data_version=DataVersion(version),
    )


class CaptionsConfig(Config):
    seed: int = CaptionConfig.seed
    name_trend_share: float = CaptionConfig.name_trend_share
    augmented_per_window: int = CaptionConfig.augmented_per_window
    dedupe_threshold: float = Field(default=CaptionConfig.dedupe_threshold, description="cosine above which a variant is a duplicate")
    near_miss_margin: float = CaptionConfig.near_miss_margin
    augmenter: str = Field(default="offline", description="'offline' or 'llm' (any OpenAI-compatible chat endpoint)")
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key_env: str = "OPENAI_API_KEY"
    llm_timeout: float = 20.0

    def captions(self) -> CaptionConfig:
        return CaptionConfig(seed=self.seed, name_trend_share=self.name_trend_share,
                             augmented_per_window=self.augmented_per_window,
                             dedupe_threshold=self.dedupe_threshold, near_miss_margin=self.near_miss_margin)

    def build_augmenter(self):
        import os

        if self.augmenter == "offline":
            return OfflineParaphraser()
        if self.augmenter == "llm":
            if not (self.llm_base_url and self.llm_model):
                raise ValueError("captions: augmenter='llm' needs llm_base_url and llm_model")
            return OpenAICompatibleAugmenter(base_url=self.llm_base_url, model=self.llm_model,
                                             api_key=os.environ.get(self.llm_api_key_env), timeout=self.llm_timeout)
        raise ValueError(f"captions: unknown augmenter {self.augmenter!r} (expected 'offline' or 'llm')")


@asset(group_name=DATA_GROUP, code_version="1", deps=[chart_images], kinds={"pytorch"})
def captions(context: AssetExecutionContext, config: CaptionsConfig, store: ArtifactStoreResource,
             compute: ComputeResource) -> MaterializeResult:
    """Captions per chart: named and anatomy templates, augmented variants, MiniLM embedding dedupe."""
    from vlm_assets.text_encoder import MiniLMEncoder

    artifacts = store.store()
    compute.apply_threads()
    windows = read_frame(artifacts, "chart_images", "windows.parquet",
                         columns=["window_id", "symbol", "timeframe", "pos", "n_bars", "end", "block"])
    bars = load_bars(artifacts, timeframes=tuple(sorted(windows["timeframe"].unique())))
    labels = load_labels(artifacts, timeframes=tuple(sorted(windows["timeframe"].unique())))

    def items():
        for row, window, _ in window_slices(windows, bars, symbol_origins(bars), None):
            pos = int(row["pos"])
            yield row["window_id"], window, labels[(row["symbol"], row["timeframe"])].iloc[pos - 2: pos + 1], row["timeframe"]

    caption_config = config.captions()
    pairs, stats = build_pairs(items(), caption_config, MiniLMEncoder(device=compute.resolved_device()),
                               config.build_augmenter(),
                               progress=md.Progress(context.log, "windows captioned", len(windows)).start(), total=len(windows),
                               embed_progress=md.Progress(context.log, "captions embedded for dedupe", 0))
    upstream = artifacts.current_version("chart_images")
    settings = stable_json({"captions": caption_config, "augmenter": config.augmenter, "model": config.llm_model})
    version = write_version(artifacts, "captions", {"pairs.parquet": parquet_bytes(pairs)}, extra_hash=upstream + settings)
    by_kind = pairs.groupby(["detail", "tier", "source"]).size().rename("pairs").reset_index()
    examples = pairs.groupby("detail").head(3)[["window_id", "detail", "tier", "caption"]]
    return MaterializeResult(
        metadata={
            "version": version, "images_version": upstream,
            "path": MetadataValue.path(str(artifacts.path("captions", version))),
            "pairs": len(pairs), "distinct_captions": int(pairs["caption"].nunique()),
            "pairs_by_kind": md.table(by_kind), "examples": md.table(examples),
            "augmentation": MetadataValue.json(stats),
        },
        data_version=DataVersion(version),
    )


class DatasetConfig(Config):
    train_fraction: float = SplitConfig.fractions[0]
    val_fraction: float = SplitConfig.fractions[1]
    test_fraction: float = SplitConfig.fractions[2]
    split_seed: int = SplitConfig.seed
    min_per_core_pattern: int = Field(default=300, description="the min-count asset check fails below this")
    sample_grid: int = 12

    def split(self) -> SplitConfig:
        return SplitConfig(fractions=(self.train_fraction, self.val_fraction, self.test_fraction), seed=self.split_seed)


@asset(group_name=DATA_GROUP, code_version=DATASET_CODE_VERSION, deps=[chart_images, captions], kinds={"parquet"})
def vlm_dataset(context: AssetExecutionContext, config: DatasetConfig, store: ArtifactStoreResource) -> MaterializeResult:
    """Dataset v1: image/text pairs with multi-hot labels, split train/val/test by time blocks, with a card."""
    artifacts = store.store()
    windows = read_frame(artifacts, "chart_images", "windows.parquet")
    pairs = read_frame(artifacts, "captions", "pairs.parquet")
    windows["split"] = assign_splits(windows, config.split())
    windows["labels"] = [",".join(p for p in LABEL_COLUMNS if row[p]) for _, row in windows[list(LABEL_COLUMNS)].iterrows()]
    tiers = pairs[pairs["source"] == "template"].groupby("window_id")["tier"].first()
    windows["tier"] = windows["window_id"].map(tiers).fillna("rule_high")
    pairs = pairs.merge(windows[["window_id", "split"]], on="window_id", validate="many_to_one")
    leaks = leakage_violations(windows)
    if len(leaks):
        raise RuntimeError(f"split leakage: {len(leaks)} overlapping windows, e.g. {leaks.iloc[0].to_dict()}")

    sources = {name: artifacts.current_version(name) for name in ("ohlcv_bars", "pattern_labels", "chart_images", "captions")}
    settings = {"split": config.split(), "min_per_core_pattern": config.min_per_core_pattern}
    tag = f"{DATASET_SCHEMA_VERSION}-" + content_hash(stable_json(settings), DATASET_CODE_VERSION, stable_json(sources))
    counts = label_counts(windows)
    card = {
        "version": tag, "schema": DATASET_SCHEMA_VERSION, "sources": sources, "settings": json.loads(stable_json(settings)),
        "windows": len(windows), "pairs": len(pairs),
        "splits": windows["split"].value_counts().reindex(list(SPLITS), fill_value=0).to_dict(),
        "label_counts": counts.to_dict(orient="index"),
        "core_patterns": list(CORE_PATTERNS), "zero_shot_patterns": [p for p in ALL_PATTERNS if p not in CORE_PATTERNS],
        "neutral_share": float(windows[NEUTRAL].mean()),
        "min_per_core_pattern": config.min_per_core_pattern,
    }
    windows_bytes = parquet_bytes(windows.sort_values("window_id").reset_index(drop=True))
    pairs_bytes = parquet_bytes(pairs.sort_values("pair_id").reset_index(drop=True))
    card["content_sha256"] = {"windows.parquet": content_hash(windows_bytes, length=64),
                              "pairs.parquet": content_hash(pairs_bytes, length=64)}
    for name, data in (("windows.parquet", windows_bytes), ("pairs.parquet", pairs_bytes),
                       ("card.json", json.dumps(card, indent=2, sort_keys=True).encode())):
        artifacts.write_bytes(f"vlm_dataset/{tag}/{name}", data)
    artifacts.publish("vlm_dataset", tag)

    grid = windows.sample(n=min(config.sample_grid, len(windows)), random_state=0)
    first_caption = pairs.groupby("window_id")["caption"].first()
    balance = counts["total"].rename_axis("label").reset_index(name="windows")
    return MaterializeResult(
        metadata={
            "dataset_version": tag,
            "path": MetadataValue.path(str(artifacts.path("vlm_dataset", tag))),
            "windows": len(windows), "pairs": len(pairs),
            "neutral_share": float(windows[NEUTRAL].mean()),
            "counts_per_label_and_split": md.table(counts, index_name="label"),
            "sample_charts": md.png_markdown(
                md.contact_sheet(grid["png"].tolist(), [f"[{r.split}] {first_caption.get(r.window_id, '')}"
                                                         for r in grid.itertuples()]), "sample charts"),
            "class_balance": md.plot_markdown(_balance_figure(balance), "class balance"),
        },
        data_version=DataVersion(tag),
    )


def _balance_figure(balance: pd.DataFrame):
    import plotly.graph_objects as go

    figure = go.Figure(go.Bar(x=balance["label"], y=balance["windows"], marker_color="#2a7ab9"))
    figure.update_layout(title="Windows per label", template="plotly_white", margin=dict(l=40, r=20, t=50, b=120))
    return figure
