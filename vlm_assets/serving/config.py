"""Service settings, read from `CANDLE_VLM_*` environment variables at start-up (a bad value names the variable)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from vlm_assets.serving.encoders import BACKENDS
from vlm_assets.serving.requests import Limits

PREFIX = "CANDLE_VLM_"
MAX_AUTO_WORKERS = 4  # each worker holds a model copy (~1.4 GB resident with the default model)


@dataclass(frozen=True)
class ServingConfig:
    model: str = "candle_vlm:latest"  # BentoML model tag (a rollback changes what :latest is)
    artifact_root: str = "artifacts"  # the market-data store for /embeddings (ohlcv_bars) and the default log place
    market_directory: str = ""  # instead of ohlcv_bars: a directory of <SYMBOL>_<TF>.csv|parquet files
    prediction_log: str = ""  # directory of the prediction log; default <artifact_root>/predictions
    log_fsync: bool = True  # fsync every group commit: a machine crash loses no acknowledged prediction
    # Server processes, each with its own copy of the model (they share nothing but the port). 0 = one per core
    # on CPU, at most MAX_AUTO_WORKERS; one on CUDA. On 2 cores two 1-thread workers answered ~1.9x the requests per
    # second of one 2-thread worker at concurrency 32: a single process is capped by its GIL (docs/serving.md).
    workers: int = 0
    threads: int = 0  # intra-op threads of each worker's encoder (torch or ONNX Runtime); 0 = cores / workers
    device: str = "cpu"
    encoder: str = "auto"  # image-encoder backend; auto = the fastest one promotion accepted that runs here
    access_log: bool = False  # BentoML's access log (answers are in the prediction log, refusals in /metrics)
    # BentoML's OpenTelemetry spans: recorded for every request even when nothing exports them, on CPU the encoder
    # needs (docs/serving.md). Turn on together with a tracing exporter in BENTOML_CONFIG.
    tracing: bool = False
    max_batch_size: int = 32  # adaptive batching of image encoding
    max_latency_ms: int = 5000  # the batcher sheds (HTTP 503) a request it expects to wait longer than this
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        if self.encoder not in ("auto", *BACKENDS):
            raise ValueError(f"{PREFIX}ENCODER={self.encoder!r}: expected auto, {', '.join(BACKENDS)}")
        if self.workers < 0:
            raise ValueError(f"{PREFIX}WORKERS={self.workers}: 0 (one per core) or more")

    @property
    def server_workers(self) -> int:
        if self.workers:
            return self.workers
        return 1 if self.device.startswith("cuda") else min(_cores(), MAX_AUTO_WORKERS)

    @property
    def worker_threads(self) -> int:
        return self.threads or max(1, _cores() // self.server_workers)

    @property
    def log_directory(self) -> str:
        return self.prediction_log or os.path.join(self.artifact_root, "predictions")

    @classmethod
    def from_env(cls, environ=os.environ) -> ServingConfig:
        """Each field from `CANDLE_VLM_<FIELD>` (limits too: `CANDLE_VLM_MAX_BARS`, ...), else its default; the
        artifact root also from `CANDLE_VLM_ARTIFACT_ROOT`, as for the pipeline."""
        values = {f.name: _parse(f"{PREFIX}{f.name.upper()}", environ[f"{PREFIX}{f.name.upper()}"], f.type)
                  for f in fields(cls) if f.name != "limits" and f"{PREFIX}{f.name.upper()}" in environ}
        limits = {f.name: _parse(f"{PREFIX}{f.name.upper()}", environ[f"{PREFIX}{f.name.upper()}"], f.type)
                  for f in fields(Limits) if f"{PREFIX}{f.name.upper()}" in environ}
        return cls(**values, limits=Limits(**limits))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _parse(name: str, raw: str, kind) -> object:
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind == "bool":
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{name}={raw!r}: expected true or false")
        return raw.lower() in ("1", "true", "yes")
    if kind == "int":
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected an integer") from None
        if value < 0:
            raise ValueError(f"{name}={raw!r}: must not be negative")
        return value
    return raw
