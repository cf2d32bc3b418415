"""Bars for `/embeddings`: the latest bars of a symbol from the market-data store, which is the pipeline's
`ohlcv_bars` artifact (re-read when a new version is published) or a directory of the user's files."""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd

from vlm_assets.market.io import read_table, validate_bars
from vlm_assets.market.tables import from_table
from vlm_assets.serving.requests import RequestError
from vlm_assets.storage import ArtifactStore


class MarketStore:
    def __init__(self, artifact_root: str | None = None, directory: str | None = None):
        if (artifact_root is None) == (directory is None):
            raise ValueError("the market store needs exactly one of artifact_root or directory")
        self.artifacts = ArtifactStore(artifact_root) if artifact_root is not None else None
        self.directory = Path(directory) if directory is not None else None
        self._cache: dict = {}
        self._lock = threading.Lock()

    def _artifact_series(self, symbol: str, timeframe: str) -> pd.DataFrame | None:
        try:
            version = self.artifacts.current_version("ohlcv_bars")
        except FileNotFoundError:
            raise RequestError("the market-data store is empty: materialize ohlcv_bars first", 404) from None
        key = (version, timeframe)
        with self._lock:
            if key not in self._cache:
                rel = f"ohlcv_bars/{version}/bars_{timeframe}.parquet"
                self._cache = {k: v for k, v in self._cache.items() if k[0] == version}
                self._cache[key] = from_table(self.artifacts.read_parquet(rel), timeframe) \
                    if self.artifacts.exists(rel) else {}
            return self._cache[key].get((symbol, timeframe))

    def _directory_series(self, symbol: str, timeframe: str) -> pd.DataFrame | None:
        for suffix in (".parquet", ".csv"):
            path = self.directory / f"{symbol}_{timeframe}{suffix}"
            if path.exists():
                key = (str(path), path.stat().st_mtime_ns)
                with self._lock:
                    if key not in self._cache:
                        self._cache[key] = validate_bars(read_table(path), path.name)
                    return self._cache[key]
        return None

    def latest(self, symbol: str, timeframe: str, lookback: int) -> pd.DataFrame:
        """The last `lookback` bars; an unknown symbol or timeframe is a 404."""
        series = self._artifact_series(symbol, timeframe) if self.artifacts is not None \
            else self._directory_series(symbol, timeframe)
        if series is None or series.empty:
            raise RequestError(f"no bars for symbol {symbol!r} at timeframe {timeframe!r} in the market-data store", 404)
        return series.iloc[-lookback:]
