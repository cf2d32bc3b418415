"""Drift simulation: how soon does the fast check alert after the input distribution changes?

A seeded synthetic market (the pipeline's generator, a fresh seed, patterns planted at the default market's
density) feeds a stream of /predict/patterns requests: every `poll_minutes` of the session, clients ask for the
latest closed `chart_bars` bars of each symbol at each timeframe. Some clients send the bars (the service draws the
chart in the bundle's style), the others a screenshot drawn by their own charting tool in the same style. Each
request is answered by the promoted bundle and logged in the prediction log's format. At a known onset a drift is
injected:

- `volatility`: a market regime shift. From the onset, every symbol's minute moves are scaled by `volatility_factor`
  with bursts (log-volatility an AR(1) with `volatility_burst` standard deviation and `burst_half_life` minutes), and
  prices jump (`jump_rate` per minute, `jump_size` typical minute ranges, Student-t(3)): a disorderly market with
  gaps and spikes. (A pure volatility scale-up is nearly invisible in a chart, which is drawn to its own range.)
- `style`: the screenshot clients' charting tool switches to another theme (`theme`, one of the renderer presets).

The fast check (`alerts.fast_check`) runs on its cadence over the log as it was at each tick; the result is the
delay from the onset to the first alert in trading hours, and every alert raised before the onset (false alerts).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from vlm_assets.features import market_state
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.market.synthetic import SyntheticMarketConfig, generate_market
from vlm_assets.market.timeframes import INTRADAY_MINUTES, TIMEFRAMES, bar_end, resample
from vlm_assets.monitoring.alerts import (
    STALE, FastCheckSettings, JsonlLog, alert_events, fast_check, open_alerts, utc,
)
from vlm_assets.monitoring.reference import Reference, answer_batch
from vlm_assets.versioning import content_hash, stable_rng

DRIFT_KINDS = ("none", "volatility", "style")
DEFAULT_MARKET = SyntheticMarketConfig()
BARS_PER_DAY = {tf: DEFAULT_MARKET.session_minutes // minutes for tf, minutes in INTRADAY_MINUTES.items()} | {"1d": 1}


@dataclass(frozen=True)
class Drift:
    kind: str = "none"
    volatility_factor: float = 2.0
    volatility_burst: float = 0.6
    burst_half_life: float = 30.0  # minutes
    jump_rate: float = 0.05  # chance per minute of a price jump (gap) after the onset
    jump_size: float = 10.0  # jump size in typical minute ranges (Student-t(3) draws)
    theme: str = "grid_dark"

    def __post_init__(self):
        from vlm_assets.rendering import PRESETS

        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"drift kind {self.kind!r}: expected one of {', '.join(DRIFT_KINDS)}")
        for name in ("volatility_factor", "burst_half_life"):
            if not getattr(self, name) > 0:
                raise ValueError(f"drift.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("volatility_burst", "jump_size"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"drift.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.jump_rate <= 1:
            raise ValueError(f"drift.jump_rate must be within [0, 1], got {self.jump_rate!r}")
        if self.theme not in PRESETS:
            raise ValueError(f"theme {self.theme!r}: expected one of {', '.join(sorted(PRESETS))}")


@dataclass(frozen=True)
class StreamConfig:
    symbols: int = 40
    timeframes: tuple[str, ...] = ("1m", "5m", "15m", "1h")
    poll_minutes: int = 15
    screenshot_share: float = 0.5  # share of the symbols whose clients send screenshots instead of bars
    chart_bars: int = 120
    reference_days: int = 20  # the universe's test period before the stream, where the reference is drawn
    clean_days: int = 5  # drift-free trading days streamed before the onset's day
    drift_days: int = 1  # trading days streamed from the onset's day on
    onset: str = "11:20"  # exchange time of the onset on the first drift day
    start: str = "2026-02-02"  # first day of the market
    timezone: str = "America/New_York"
    cadence_minutes: int = 60  # the fast check's schedule
    seed: int = 11

    def __post_init__(self):
        unknown = sorted(set(self.timeframes) - set(TIMEFRAMES))
        if unknown or not self.timeframes:
            raise ValueError(f"timeframes: unknown {unknown}; expected some of {', '.join(TIMEFRAMES)}")
        for name, least in (("symbols", 1), ("poll_minutes", 1), ("cadence_minutes", 1), ("chart_bars", 20),
                            ("clean_days", 1), ("drift_days", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)!r}")
        if not 0 <= self.screenshot_share <= 1:
            raise ValueError(f"screenshot_share must be within [0, 1], got {self.screenshot_share}")
        needed = math.ceil(self.chart_bars / min(BARS_PER_DAY[tf] for tf in self.timeframes))
        if self.reference_days < needed:
            raise ValueError(f"reference_days must be at least {needed}: a full {self.chart_bars}-bar chart of every "
                             "timeframe must fit in the reference period")
        try:
            dt.time.fromisoformat(self.onset)
        except ValueError:
            raise ValueError(f"onset: {self.onset!r} is not an exchange time HH:MM") from None

    @property
    def screenshot_symbols(self) -> int:
        return round(self.symbols * self.screenshot_share)


def market(config: StreamConfig) -> tuple[dict[tuple[str, str], pd.DataFrame], SyntheticMarketConfig]:
    days = config.reference_days + config.clean_days + config.drift_days
    plants = max(1, round(DEFAULT_MARKET.plants_per_timeframe * days / DEFAULT_MARKET.trading_days))
    synthetic = SyntheticMarketConfig(symbols=tuple(f"SIM{i:02d}" for i in range(config.symbols)), trading_days=days,
                                      start=config.start, seed=config.seed, plants_per_timeframe=plants)
    return generate_market(synthetic).bars, synthetic


def onset_time(config: StreamConfig, synthetic: SyntheticMarketConfig) -> pd.Timestamp:
    """The onset as a naive exchange time."""
    day = pd.bdate_range(synthetic.start, periods=synthetic.trading_days)[config.reference_days + config.clean_days]
    return day + pd.Timedelta(dt.time.fromisoformat(config.onset).isoformat())


def inject_volatility(minutes: pd.DataFrame, onset: pd.Timestamp, drift: Drift,
                      rng: np.random.Generator) -> pd.DataFrame:
    """Minute bars whose moves from `onset` on (the gap to the previous close, the candle body and both wicks, in
    log terms) are scaled by the volatility factor times a burst process; prices stay continuous, OHLC stays valid
    and volume rises with volatility as in the generator."""
    o, h, l, c = (np.log(minutes[k].to_numpy(float)) for k in ("open", "high", "low", "close"))
    gap = o - np.r_[o[0], c[:-1]]
    body, upper, lower = c - o, h - np.maximum(o, c), np.minimum(o, c) - l
    phi = 0.5 ** (1 / drift.burst_half_life)
    bursts = lfilter([1.0], [1.0, -phi], rng.normal(0, drift.volatility_burst * math.sqrt(1 - phi**2), len(c)))
    scale = np.ones(len(c))
    after = minutes.index >= onset
    scale[after] = drift.volatility_factor * np.exp(bursts[after] - drift.volatility_burst**2 / 2)
    # jumps open a minute away from the previous close: the gaps and spikes of a disorderly market
    typical = np.median(np.abs(body) + upper + lower)
    jumps = np.where(after & (rng.random(len(c)) < drift.jump_rate),
                     drift.jump_size * typical * rng.standard_t(3, len(c)), 0.0)
    gap = gap + jumps / np.maximum(scale, 1e-12)
    close = o[0] + np.cumsum(scale * (gap + body))  # telescopes back to the original closes before the onset
    opens = close - scale * body
    out = minutes.copy()
    out["open"], out["close"] = np.exp(opens), np.exp(close)
    out["high"] = np.exp(np.maximum(opens, close) + scale * upper)
    out["low"] = np.exp(np.minimum(opens, close) - scale * lower)
    out["volume"] = np.round(minutes["volume"].to_numpy(float) * scale**0.7)
    return out


def drifted_bars(bars: dict, config: StreamConfig, synthetic: SyntheticMarketConfig, drift: Drift) -> dict:
    if drift.kind != "volatility":
        return bars
    onset = onset_time(config, synthetic)
    out = {}
    for symbol in sorted({s for s, _ in bars}):
        minutes = inject_volatility(bars[(symbol, "1m")], onset, drift, stable_rng(config.seed, f"vol-{symbol}"))
        for timeframe in config.timeframes:
            out[(symbol, timeframe)] = minutes if timeframe == "1m" else \
                resample(minutes, timeframe, synthetic.session_time)
    return out


def reference_from_market(predictor, bars: dict, config: StreamConfig, per_timeframe: int, info: dict,
                          seed: int = 0) -> Reference:
    """The universe's reference: charts of its first `reference_days` (its test period, before the stream),
    replayed through the predictor as `embedding_reference` replays the dataset's test blocks."""
    from vlm_assets.monitoring.reference import ReferenceSampling, Session, replay, test_period_windows

    symbols = sorted({s for s, _ in bars})
    test = pd.DataFrame({"symbol": symbols, "block": 0, "split": "test"})
    charts = test_period_windows({k: v for k, v in bars.items() if k[1] in config.timeframes}, test,
                                 config.reference_days, config.chart_bars,
                                 ReferenceSampling(per_timeframe, config.timeframes, seed))
    session = Session(config.timezone, DEFAULT_MARKET.session_start, DEFAULT_MARKET.session_minutes)
    return replay(predictor, charts, info | {"session": dataclasses.asdict(session)})


@dataclass
class ChartCache:
    """Answers by chart (symbol, timeframe, last bar, style, bars variant), shared by scenarios: the stream before
    the onset is the same in every one of them."""

    answers: dict = field(default_factory=dict)
    encoded: int = 0


def _requests(config: StreamConfig, synthetic: SyntheticMarketConfig, bars: dict, drift: Drift, bundle_style):
    """Polls in time order: (exchange time, [(symbol, timeframe, input, window, style, key), ...])."""
    from vlm_assets.rendering import PRESETS

    onset = onset_time(config, synthetic)
    days = pd.bdate_range(synthetic.start, periods=synthetic.trading_days)[config.reference_days:]
    session_open = pd.Timedelta(hours=synthetic.session_time.hour, minutes=synthetic.session_time.minute)
    polls = pd.to_timedelta(np.arange(config.poll_minutes, synthetic.session_minutes + 1, config.poll_minutes),
                            unit="min")
    ends = {key: bar_end(pd.DatetimeIndex(frame.index), key[1]).asi8 for key, frame in bars.items()}
    symbols = sorted({s for s, _ in bars})
    screenshot = set(symbols[len(symbols) - config.screenshot_symbols:])
    variant = content_hash(repr(drift)) if drift.kind == "volatility" else ""
    for day in days:
        for offset in polls:
            now = day + session_open + offset
            style = PRESETS[drift.theme] if drift.kind == "style" and now >= onset else bundle_style
            batch = []
            for symbol in symbols:
                for timeframe in config.timeframes:
                    series = bars[(symbol, timeframe)]
                    closed = int(np.searchsorted(ends[(symbol, timeframe)], now.value, side="right"))
                    if closed < config.chart_bars:
                        continue
                    window = series.iloc[closed - config.chart_bars: closed]
                    kind = "image" if symbol in screenshot else "bars"
                    drawn = style if kind == "image" else bundle_style
                    # a chart whose last bar ends after the onset shows drifted minutes
                    touched = variant if variant and ends[(symbol, timeframe)][closed - 1] > onset.value else ""
                    key = (symbol, timeframe, window.index[-1].value, drawn.style_id(), touched)
                    batch.append((symbol, timeframe, kind, window, drawn, key))
            yield now, batch


def prediction_record(request_id: str, time: pd.Timestamp, model_version: str, embedding: np.ndarray,
                      probabilities: np.ndarray, latency_ms: float, symbol: str, timeframe: str, kind: str,
                      bars: int, market: dict | None = None) -> dict:
    """A /predict/patterns answer of the trained patterns as the service logs it (bento/service.py); `market` is
    the market state of a request with bars (`vlm_assets.features.market_state`)."""
    from vlm_assets.serving.prediction_log import logged_embedding
    from vlm_assets.serving.predictor import embedding_id

    record = {"request_id": request_id, "time": time.isoformat(), "endpoint": "predict_patterns",
              "model_version": model_version, "embedding_id": embedding_id(embedding),
              "embedding": logged_embedding(embedding),
              "probabilities": dict(zip(CORE_PATTERNS, map(float, probabilities))),
              "calibrated": dict.fromkeys(CORE_PATTERNS, True), "latency_ms": round(float(latency_ms), 3),
              "symbol": symbol, "timeframe": timeframe, "input": kind, "bars_used": bars if kind == "bars" else None}
    return record | ({"market": market} if kind == "bars" and market is not None else {})


def spread_latencies(latencies: np.ndarray) -> np.ndarray:
    """`latencies` sorted and reordered by the van der Corput sequence: every run of consecutive values, wherever it
    starts, samples the whole distribution evenly. Replayed in measured order, a stretch of slow measurements (the
    machine was busy while the reference was timed) lands in one check window as a latency drift nobody injected."""
    values = np.sort(np.asarray(latencies, dtype=float))
    if values.size == 0:
        raise ValueError("no latencies to replay: the reference has no timed charts")
    bits = max(1, math.ceil(math.log2(values.size)))
    indices = np.arange(values.size)
    radical_inverse = np.zeros(values.size)
    for bit in range(bits):  # bit-reversed index over 2**bits, as a fraction in [0, 1)
        radical_inverse += ((indices >> bit) & 1) / 2.0 ** (bit + 1)
    return values[np.argsort(np.argsort(radical_inverse, kind="stable"), kind="stable")]


def replay(predictor, config: StreamConfig, drift: Drift, log_dir: str | Path, model_version: str,
           latencies: np.ndarray, cache: ChartCache | None = None, market_data=None) -> dict:
    """Stream the requests through the predictor into a prediction log at `log_dir`; returns a summary. The logged
    latency replays `latencies` (the reference's measured serving times) in `spread_latencies` order, counted per
    input kind: the simulation injects no latency drift, and batch timings on a shared machine would measure the
    machine, not the service."""
    from vlm_assets.rendering import render_chart
    from vlm_assets.serving.prediction_log import PredictionLog

    cache = cache if cache is not None else ChartCache()
    bars, synthetic = market_data if market_data is not None else market(config)
    bars = drifted_bars(bars, config, synthetic, drift)
    log = PredictionLog(log_dir, fsync=False)
    tz = config.timezone
    records, times = 0, []
    latencies = spread_latencies(latencies)
    served = {"bars": 0, "image": 0}  # per kind: the drift check times only requests with bars
    for now, batch in _requests(config, synthetic, bars, drift, predictor.style):
        todo = {key: (kind, window, style) for _, _, kind, window, style, key in batch
                if (key, kind) not in cache.answers}
        if todo:
            for segment in ("bars", "image"):
                keys = [k for k in todo if todo[k][0] == segment]
                if not keys:
                    continue
                images = [render_chart(todo[k][1], todo[k][2]) for k in keys]
                windows = [todo[k][1] for k in keys] if segment == "bars" else None
                embeddings, scores, features = answer_batch(predictor, images, windows)
                states = [market_state(f) for f in features] if features is not None else [None] * len(keys)
                cache.answers.update({(k, segment): answer for k, answer in zip(keys, zip(embeddings, scores, states))})
            cache.encoded += len(todo)
        stamp = now.tz_localize(tz).tz_convert("UTC")
        for symbol, timeframe, kind, window, _, key in batch:
            embedding, probabilities, state = cache.answers[(key, kind)]
            log.append(prediction_record(content_hash(str(config.seed), repr(drift), str(records), length=32),
                                         stamp, model_version, embedding, probabilities,
                                         latencies[served[kind] % len(latencies)], symbol, timeframe, kind,
                                         len(window), state))
            records += 1
            served[kind] += 1
            times.append(stamp)
    log.close()
    return {"records": records, "times": pd.DatetimeIndex(times),
            "onset": onset_time(config, synthetic).tz_localize(tz).tz_convert("UTC")}


def trading_hours(start, end, config: StreamConfig, session: SyntheticMarketConfig = DEFAULT_MARKET) -> float:
    """Session hours (business days, `session_start` + `session_minutes`, exchange time) between two instants."""
    start = utc(start).tz_convert(config.timezone).tz_localize(None)
    end = utc(end).tz_convert(config.timezone).tz_localize(None)
    if end <= start:
        return 0.0
    opening = pd.Timedelta(hours=session.session_time.hour, minutes=session.session_time.minute)
    total = pd.Timedelta(0)
    for day in pd.bdate_range(start.normalize(), end.normalize()):
        lo, hi = day + opening, day + opening + pd.Timedelta(minutes=session.session_minutes)
        total += max(pd.Timedelta(0), min(hi, end) - max(lo, start))
    return total / pd.Timedelta(hours=1)


def check_times(config: StreamConfig, first: pd.Timestamp, last: pd.Timestamp) -> pd.DatetimeIndex:
    """The fast check's ticks (UTC, every `cadence_minutes` from midnight) from the first record to after the last."""
    step = pd.Timedelta(minutes=config.cadence_minutes)
    begin = first.floor("D") + step * math.ceil((first - first.floor("D")) / step)
    return pd.date_range(begin, last + step, freq=step)


def run_checks(reference: Reference, log_dir: str | Path, stream: dict, config: StreamConfig,
               settings: FastCheckSettings, alerts_path: str | Path) -> dict:
    """The fast check at every tick over the log as it stood then (`stream`: replay's summary); alerts go to a
    real alerts log. A tick with no record since the previous one sees the same window, so it is not evaluated
    again (its result and alerts would be the same; only a reminder could differ)."""
    times, onset = stream["times"], stream["onset"]
    alerts = JsonlLog(alerts_path)
    rows, result, seen = [], None, -1
    for tick in check_times(config, times[0], times[-1]):
        logged = int(np.searchsorted(times, tick, side="left"))
        if logged == seen:
            rows.append(rows[-1] | {"time": tick, "alerts": "", "evaluated": False})
            continue
        seen = logged
        result = fast_check(reference, log_dir, tick, settings)
        events = alert_events(result, open_alerts(alerts.read(), reference.model), tick, settings.renotify_hours,
                              "simulation")
        alerts.append(events)
        rows.append({"time": tick, "evaluated": True, "records": result["records"],
                     **{name: m["value"] for name, m in result["metrics"].items() if name != STALE},
                     **{f"{name}_judged": m.get("judged") for name, m in result["metrics"].items() if "judged" in m},
                     "breached": ",".join(n for n, m in result["metrics"].items() if m["breached"]),
                     "alerts": ",".join(e["metric"] for e in events if e["event"] == "alert")})
    checks = pd.DataFrame(rows)
    raised = [e for e in alerts.read() if e["event"] == "alert"]
    false = [e for e in raised if utc(e["time"]) < onset]
    after = [e for e in raised if utc(e["time"]) >= onset]
    first_alert = utc(after[0]["time"]) if after else None
    clean = trading_hours(times[0], onset, config) / (DEFAULT_MARKET.session_minutes / 60)
    return {"onset": onset.isoformat(), "first_alert": None if first_alert is None else first_alert.isoformat(),
            "first_alert_metrics": sorted({e["metric"] for e in after if utc(e["time"]) == first_alert}),
            "lead_trading_hours": None if first_alert is None else trading_hours(onset, first_alert, config),
            "false_alerts": len(false), "false_alert_metrics": sorted({e["metric"] for e in false}),
            "clean_trading_days": round(clean, 3), "checks": checks}


def simulate(predictor, reference: Reference, drift: Drift, config: StreamConfig, settings: FastCheckSettings,
             workdir: str | Path, cache: ChartCache | None = None, market_data=None) -> dict:
    """Replay the stream with `drift` into `workdir` and run the fast check on its cadence."""
    workdir = Path(workdir)
    summary = replay(predictor, config, drift, workdir / "predictions", reference.model,
                     reference.table["latency_ms"].to_numpy(), cache, market_data)
    outcome = run_checks(reference, workdir / "predictions", summary, config, settings, workdir / "alerts.jsonl")
    return {"drift": dataclasses.asdict(drift), "records": summary["records"]} | outcome
