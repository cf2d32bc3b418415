"""Dagster resources: where market data comes from, where artifacts go, and what hardware runs the work.

Each wraps a plain library object so the same objects serve tests, the BentoML service and scripts.
"""


import datetime as dt
import os

import pandas as pd
from dagster import ConfigurableResource
from pydantic import Field

from vlm_assets.market.io import load_directory
from vlm_assets.market.synthetic import SyntheticMarketConfig, generate_market
from vlm_assets.market.timeframes import TIMEFRAMES
from vlm_assets.model import resolve_device
from vlm_assets.storage import ArtifactStore

DEFAULT_ARTIFACT_ROOT = "artifacts"


class MarketDataResource(ConfigurableResource):
    """The embedded seeded synthetic market (default) or a directory of the user's CSV/Parquet files."""

    source: str = Field(default="synthetic", description="'synthetic' or 'directory'")
    directory: str | None = Field(default=None, description="with source='directory': folder of <SYMBOL>_<TF>.csv|parquet")
    base_timeframe: str | None = Field(default=None, description="with source='directory': resample <SYMBOL>.csv from this timeframe")
    timezone: str | None = Field(default=None, description="exchange timezone for tz-aware timestamps (default UTC)")
    session_start: str = Field(default="09:30", description="intraday bucket alignment (HH:MM)")
    symbols: list[str] = Field(default_factory=lambda: list(SyntheticMarketConfig.symbols))
    trading_days: int = SyntheticMarketConfig.trading_days
    start: str = SyntheticMarketConfig.start
    seed: int = SyntheticMarketConfig.seed
    plants_per_timeframe: int = SyntheticMarketConfig.plants_per_timeframe
    near_miss_share: float = SyntheticMarketConfig.near_miss_share

    def synthetic_config(self) -> SyntheticMarketConfig:
        return SyntheticMarketConfig(
            symbols=tuple(self.symbols), trading_days=self.trading_days, start=self.start, seed=self.seed,
            session_start=self.session_start, plants_per_timeframe=self.plants_per_timeframe,
            near_miss_share=self.near_miss_share,
        )

    def load(self, progress=None) -> tuple[dict[tuple[str, str], pd.DataFrame], pd.DataFrame | None]:
        """All (symbol, timeframe) series, plus the planted-pattern log for synthetic data (None for user data)."""
        if self.source == "synthetic":
            market = generate_market(self.synthetic_config(), progress=progress)
            return market.bars, market.plants
        if self.source == "directory":
            if not self.directory:
                raise ValueError("market data: source='directory' needs `directory`")
            bars = load_directory(self.directory, self.base_timeframe, self.timezone,
                                  dt.time.fromisoformat(self.session_start))
            unknown = {tf for _, tf in bars} - set(TIMEFRAMES)
            if unknown:
                raise ValueError(f"market data: unsupported timeframe(s) {sorted(unknown)}")
            return bars, None
        raise ValueError(f"market data: unknown source {self.source!r} (expected 'synthetic' or 'directory')")


class ArtifactStoreResource(ConfigurableResource):
    """Root of every artifact: a local path (default ./artifacts, git-ignored) or an fsspec URL (s3://, gs://, ...)."""

    root: str = Field(default_factory=lambda: os.environ.get("CANDLE_VLM_ARTIFACT_ROOT", DEFAULT_ARTIFACT_ROOT))

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root)


class ComputeResource(ConfigurableResource):
    """CPU threads, torch device and the global seed. device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."""

    threads: int = Field(default=0, description="torch intra-op threads; 0 = every available core")
    device: str = "auto"
    seed: int = 0

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def apply_threads(self) -> int:
        import torch

        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, self.threads or available))
        return torch.get_num_threads()
