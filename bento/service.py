"""candle-vlm inference service: `bentoml serve bento.service:CandleVLM` (from the repository root).

Serves the promoted bundle (`candle_vlm:latest` in the BentoML model store, or `CANDLE_VLM_MODEL`) through the same
library the pipeline trains and promotes with (`vlm_assets.serving`):

- `POST /predict/patterns` {symbol, timeframe, bars | image_base64, patterns}: trained patterns get calibrated, fused
  probabilities; any other name or free text is scored zero-shot (`calibrated: false`). With bars, the answer
  also carries the trading `signal` (direction, confidence, gated, reasons; vlm_assets.trading).
- `POST /query/zero_shot` {image_base64, prompts}: probabilities over the given prompts.
- `GET /embeddings?symbol=&timeframe=&lookback=`: the embedding of a symbol's latest bars from the market-data store.
- `POST /embed_charts` {charts: [...]}: embeddings of many charts, batched across callers by BentoML.

The endpoints encode through an in-process adaptive batcher (`vlm_assets.serving.batching`): the same batching
without a self-call over HTTP, which cost more CPU per request than the rest of the request (docs/serving.md).

Every answer is appended to the prediction log (group-committed, fsynced) before it is sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import time
import uuid
from typing import Annotated

import bentoml
import numpy as np
import prometheus_client
from pydantic import BaseModel, Field, PrivateAttr, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typing_extensions import NotRequired, TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from vlm_assets.features import market_state
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.serving.config import ServingConfig
from vlm_assets.serving.prediction_log import logged_embedding
from vlm_assets.serving.requests import (
    RequestError, check_prompts, check_symbol, check_timeframe, decode_image, parse_bar_arrays,
)

CONFIG = ServingConfig.from_env()

PREDICTIONS = prometheus_client.Counter("candle_vlm_predictions", "answered requests", ["endpoint", "input"])
REJECTED = prometheus_client.Counter("candle_vlm_rejected_requests", "requests refused with a 4xx",
                                     ["endpoint", "status"])
STAGE_SECONDS = prometheus_client.Histogram(
    "candle_vlm_stage_seconds", "time per request stage", ["stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
ENCODE_BATCH = prometheus_client.Histogram("candle_vlm_encode_batch_size", "charts per image-encoder batch",
                                           buckets=(1, 2, 4, 8, 16, 32, 64, 128))
PATTERN_PROBABILITY = prometheus_client.Histogram(
    "candle_vlm_pattern_probability", "calibrated fused probability per trained pattern", ["pattern"],
    buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99))
LOGGED = prometheus_client.Counter("candle_vlm_prediction_log_records", "records durably appended to the log")
MODEL_INFO = prometheus_client.Gauge("candle_vlm_model_info", "the served model",
                                     ["model_version", "bundle_id", "encoder"])


class Bar(TypedDict):
    """One OHLCV bar (volume 0 when absent). A TypedDict, not a model: pydantic validates plain dicts faster than
    it builds 100 model objects per request."""

    timestamp: Annotated[str | float, Field(description="ISO 8601 (UTC if no offset) or epoch seconds")]
    open: float
    high: float
    low: float
    close: float
    volume: NotRequired[float]


class Chart(BaseModel):
    """One chart to encode: bars (drawn with the training renderer from the last bars) or a base64 image."""

    bars: list[Bar] | None = None
    image_base64: str | None = None
    _image = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _validated(self) -> Chart:
        # Validated per request, before batching: one bad chart never fails a batch of other requests'.
        self._image = _validated_input(self.bars, self.image_base64)[1]
        return self


def _error(endpoint: str, error: RequestError) -> JSONResponse:
    REJECTED.labels(endpoint=endpoint, status=str(error.status)).inc()
    return JSONResponse({"error": str(error)}, status_code=error.status)


async def embeddings_route(request: Request) -> JSONResponse:
    service = bentoml.get_current_service()
    return await service.latest_embedding(request.query_params)


routes = Starlette(routes=[Route("/embeddings", embeddings_route, methods=["GET"])])


@bentoml.asgi_app(routes, path="/")
@bentoml.service(
    name="candle_vlm",
    workers=CONFIG.server_workers,
    threads=1,  # one encoder batch at a time; the encoder uses the worker's cores inside it
    traffic={"timeout": 60},
    # Every answer is in the prediction log and every refusal in /metrics; a line per request on stdout as well
    # costs CPU the encoder needs. CANDLE_VLM_ACCESS_LOG=true turns it back on.
    logging={"access": {"enabled": CONFIG.access_log}},
    # Off, every URL skips the tracing middleware; on, BentoML's own settings (BENTOML_CONFIG) apply.
    tracing={} if CONFIG.tracing else {"excluded_urls": [".*"]},
)
class CandleVLM:
    bundle = bentoml.models.BentoModel(CONFIG.model)

    def __init__(self) -> None:
        import torch

        from vlm_assets.serving.batching import MicroBatcher
        from vlm_assets.serving.market_store import MarketStore
        from vlm_assets.serving.prediction_log import PredictionLog
        from vlm_assets.serving.predictor import Predictor

        from vlm_assets.serving.encoders import resolve_encoder

        torch.set_num_threads(CONFIG.worker_threads)
        stored = self.bundle
        self.model_version = str(stored.tag)
        with open(os.path.join(stored.path, "bundle.json")) as handle:
            backend, why = resolve_encoder(stored.path, json.load(handle), CONFIG.encoder, CONFIG.device)
        logging.getLogger("bentoml").info("candle-vlm image encoder %s: %s", backend, why)
        self.predictor = Predictor(stored.path, CONFIG.device, self.model_version, backend, CONFIG.worker_threads)
        self.market = MarketStore(directory=CONFIG.market_directory) if CONFIG.market_directory \
            else MarketStore(artifact_root=CONFIG.artifact_root)
        self.log = PredictionLog(CONFIG.log_directory, fsync=CONFIG.log_fsync)
        self.batcher = MicroBatcher(self._encode_batch, CONFIG.max_batch_size, ENCODE_BATCH.observe)
        MODEL_INFO.labels(model_version=self.model_version, bundle_id=self.predictor.manifest["bundle_id"],
                          encoder=self.predictor.backend).set(1)
        self._warm_up()

    def _warm_up(self) -> None:
        """One full pass (render, encode, fuse, zero-shot) so the first request is not slow."""
        import pandas as pd

        index = pd.date_range("2026-01-02 14:30", periods=self.predictor.render_bars, freq="5min")
        close = 100 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.002, len(index))))
        bars = pd.DataFrame({"open": np.r_[close[0], close[:-1]], "close": close, "volume": 1000.0}, index=index)
        bars["high"] = bars[["open", "close"]].max(axis=1) * 1.001
        bars["low"] = bars[["open", "close"]].min(axis=1) * 0.999
        embedding = self.predictor.encode([self.predictor.render(bars)])
        features = self.predictor.features([bars])
        self.predictor.score_patterns(embedding[0], [*CORE_PATTERNS, "a long upper shadow"], features[0])

    # ---- the batchable primitive -------------------------------------------------------------------------

    def _encode_batch(self, images: list) -> np.ndarray:
        started = time.perf_counter()
        embeddings = self.predictor.encode(images)
        STAGE_SECONDS.labels(stage="encode_batch").observe(time.perf_counter() - started)
        return embeddings

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def embed_charts(self, charts: list[Chart]) -> np.ndarray:
        """(n, d) L2-normalized embeddings of charts, batched across callers by BentoML; charts from bars are drawn
        from their last `render_bars` bars."""
        images = [self.predictor.render(self.predictor.window(c._image)) if c.bars is not None else c._image
                  for c in charts]
        ENCODE_BATCH.observe(len(charts))
        return self._encode_batch(images)

    async def _embed(self, image) -> np.ndarray:
        """The endpoints' charts go through the in-process batcher: the same batching, without a self-call over
        HTTP (which cost more CPU per request than the encoder, see docs/serving.md)."""
        return await self.batcher.submit(image)

    # ---- endpoints ---------------------------------------------------------------------------------------

    @bentoml.api(route="/predict/patterns")
    async def predict_patterns(self, symbol: str, timeframe: str, bars: list[Bar] | None = None,
                               image_base64: str | None = None, patterns: list[str] | None = None) -> dict:
        """Probabilities of the requested patterns (default: the trained ones) on a chart of `bars` or an image."""
        started = time.perf_counter()
        try:
            check_symbol(symbol)
            check_timeframe(timeframe)
            patterns = list(CORE_PATTERNS) if patterns is None else _unique(check_prompts(
                patterns, CONFIG.limits, "patterns"), "patterns")
            kind, value = _validated_input(bars, image_base64)
        except RequestError as error:
            return _error("predict_patterns", error)
        has_bars = kind == "bars"
        window = self.predictor.window(value) if has_bars else None
        image = self.predictor.render(window) if has_bars else value
        pending = self.batcher.enqueue(image)
        await asyncio.sleep(0)  # the encoder (in its thread, without the GIL) starts while the features are made here
        features = self.predictor.features([window])[0] if has_bars else None
        resnet = None
        if "resnet" in self.predictor.sources_for(has_bars):
            resnet = self.predictor.resnet_outputs([image])
        embedding = await pending
        result = self.predictor.score_patterns(embedding, patterns, features, resnet, timeframe)
        extra = {"symbol": symbol, "timeframe": timeframe, "input": "bars" if has_bars else "image",
                 "bars_used": window.close.size if has_bars else None}
        # A ready Response: BentoML's dict serialization rebuilds the output schema on every call.
        return JSONResponse(await self._answer("predict_patterns", started, embedding, result, extra,
                                               None if features is None else market_state(features)))

    @bentoml.api(route="/query/zero_shot")
    async def query_zero_shot(self, image_base64: str, prompts: list[str]) -> dict:
        """Softmax over the given prompts at the model's logit scale (not calibrated)."""
        started = time.perf_counter()
        try:
            prompts = _unique(check_prompts(prompts, CONFIG.limits), "prompts")
            _, image = _validated_input(None, image_base64)
        except RequestError as error:
            return _error("query_zero_shot", error)
        embedding = await self._embed(image)
        probabilities = self.predictor.prompt_probabilities(embedding[None, :], prompts)[0]
        result = {"probabilities": {p: float(v) for p, v in zip(prompts, probabilities)},
                  "calibrated": {p: False for p in prompts}}
        return JSONResponse(await self._answer("query_zero_shot", started, embedding, result, {"input": "image"}))

    async def latest_embedding(self, query) -> JSONResponse:
        """GET /embeddings: the chart of a symbol's latest `lookback` bars, its embedding and trained patterns."""
        started = time.perf_counter()
        try:
            symbol = check_symbol(query.get("symbol"))
            timeframe = check_timeframe(query.get("timeframe"))
            lookback = _lookback(query.get("lookback", str(self.predictor.render_bars)), self.predictor.render_bars)
            frame = self.market.latest(symbol, timeframe, lookback)
            if len(frame) < CONFIG.limits.min_bars:
                raise RequestError(f"{symbol} {timeframe} has {len(frame)} bars; at least {CONFIG.limits.min_bars} "
                                   "are needed")
        except RequestError as error:
            return _error("embeddings", error)
        embedding = await self._embed(self.predictor.render(frame))
        features = self.predictor.features([frame])[0]
        result = self.predictor.score_patterns(embedding, list(CORE_PATTERNS), features, timeframe=timeframe)
        extra = {"symbol": symbol, "timeframe": timeframe, "input": "market", "bars_used": len(frame),
                 "last_bar": frame.index[-1].isoformat(), "embedding": [float(x) for x in embedding]}
        return JSONResponse(await self._answer("embeddings", started, embedding, result, extra, market_state(features)))

    async def _answer(self, endpoint: str, started: float, embedding: np.ndarray, result: dict, extra: dict,
                      market: dict | None = None) -> dict:
        """The response, written to the prediction log before it is returned; the log also keeps the `market` state
        of requests with bars (vlm_assets.features.MARKET_FEATURES) for drift monitoring."""
        request_id = uuid.uuid4().hex
        answer = {"request_id": request_id, "model_version": self.model_version,
                  "embedding_id": _embedding_id(embedding), **result, **extra}
        answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        record = {"request_id": request_id, "time": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "endpoint": endpoint, "model_version": self.model_version, "embedding_id": answer["embedding_id"],
                  "embedding": logged_embedding(embedding), "probabilities": result["probabilities"],
                  "calibrated": result["calibrated"], "latency_ms": answer["latency_ms"],
                  **{k: v for k, v in extra.items() if k != "embedding"}}
        if market is not None:
            record["market"] = market
        if "signal" in result:
            record["signal"] = {k: result["signal"][k] for k in ("direction", "confidence", "gated")}
        logged = time.perf_counter()
        await self.log.append_async(record)
        STAGE_SECONDS.labels(stage="log").observe(time.perf_counter() - logged)
        STAGE_SECONDS.labels(stage=endpoint).observe(time.perf_counter() - started)
        LOGGED.inc()
        PREDICTIONS.labels(endpoint=endpoint, input=extra["input"]).inc()
        for pattern, probability in result["probabilities"].items():
            if result.get("kind", {}).get(pattern) == "trained" or endpoint == "embeddings":
                PATTERN_PROBABILITY.labels(pattern=pattern).observe(probability)
        return answer


def _embedding_id(embedding: np.ndarray) -> str:
    from vlm_assets.serving.predictor import embedding_id

    return embedding_id(embedding)


def _validated_input(bars: list[Bar] | None, image_base64: str | None) -> tuple[str, object]:
    """("bars", OHLCV columns) or ("image", RGB image); RequestError names what is wrong."""
    if (bars is None) == (image_base64 is None):
        raise RequestError("give exactly one of bars or image_base64" if bars is None or image_base64 is None
                            else "give bars or image_base64, not both")
    if bars is not None:
        return "bars", parse_bar_arrays(bars, CONFIG.limits)[1]
    return "image", decode_image(image_base64, CONFIG.limits)


def _unique(values: list[str], field: str) -> list[str]:
    seen = {}
    for i, value in enumerate(values):
        if value in seen:
            raise RequestError(f"{field}[{i}] repeats {field}[{seen[value]}] ({value!r})")
        seen[value] = i
    return values


def _lookback(raw: str, most: int) -> int:
    try:
        lookback = int(raw)
    except (TypeError, ValueError):
        raise RequestError(f"lookback {raw!r} is not an integer") from None
    if not CONFIG.limits.min_bars <= lookback <= most:
        raise RequestError(f"lookback {lookback}: between {CONFIG.limits.min_bars} and {most} bars (a chart shows at "
                           f"most {most})")
    return lookback

