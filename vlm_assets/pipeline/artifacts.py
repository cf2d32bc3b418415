"""Reading and writing the data assets' artifacts (shared by assets and checks)."""

from __future__ import annotations

import pandas as pd

from vlm_assets.market.tables import from_table, to_table
from vlm_assets.market.timeframes import TIMEFRAMES
from vlm_assets.storage import ArtifactStore, parquet_bytes
from vlm_assets.versioning import content_hash


def write_version(store: ArtifactStore, name: str, files: dict[str, bytes], extra_hash: str = "") -> str:
    """Write files under <name>/<content hash>/ and publish that version; returns it."""
    version = content_hash(extra_hash, *[part for key in sorted(files) for part in (key, files[key])])
    for key, data in files.items():
        store.write_bytes(f"{name}/{version}/{key}", data)
    store.publish(name, version)
    return version


def read_frame(store: ArtifactStore, name: str, file: str, columns: list[str] | None = None) -> pd.DataFrame:
    return store.read_parquet(f"{name}/{store.current_version(name)}/{file}", columns=columns)


def bars_files(bars: dict[tuple[str, str], pd.DataFrame]) -> dict[str, bytes]:
    return {f"bars_{tf}.parquet": parquet_bytes(to_table(bars, tf)) for tf in TIMEFRAMES if any(t == tf for _, t in bars)}


def load_bars(store: ArtifactStore, timeframes=TIMEFRAMES) -> dict[tuple[str, str], pd.DataFrame]:
    return _load_series(store, "ohlcv_bars", "bars", timeframes)


def load_plants(store: ArtifactStore) -> pd.DataFrame | None:
    rel = f"ohlcv_bars/{store.current_version('ohlcv_bars')}/plants.parquet"
    return store.read_parquet(rel) if store.exists(rel) else None


def load_labels(store: ArtifactStore, timeframes=TIMEFRAMES) -> dict[tuple[str, str], pd.DataFrame]:
    return _load_series(store, "pattern_labels", "labels", timeframes)


def _load_series(store: ArtifactStore, name: str, prefix: str, timeframes) -> dict[tuple[str, str], pd.DataFrame]:
    """{(symbol, timeframe): frame} from the current version's `<prefix>_<timeframe>.parquet` tables."""
    version = store.current_version(name)
    out = {}
    for tf in timeframes:
        rel = f"{name}/{version}/{prefix}_{tf}.parquet"
        if store.exists(rel):
            out.update(from_table(store.read_parquet(rel), tf))
    return out
