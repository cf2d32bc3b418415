"""Request validation and the prediction log: plain library code, no model."""

import asyncio
import base64
import datetime as dt
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from vlm_assets.serving.config import ServingConfig
from vlm_assets.serving.prediction_log import PredictionLog, logged_embedding, read_predictions
from vlm_assets.serving.requests import (
    Limits, RequestError, check_prompts, check_symbol, check_timeframe, decode_image, parse_bar_arrays, parse_bars,
    pattern_key,
)


def bars(n=30, start="2026-01-05T14:30:00Z"):
    base = dt.datetime.fromisoformat(start.replace("Z", "+00:00"))
    out = []
    for i in range(n):
        o = 100 + i * 0.1
        out.append({"timestamp": (base + dt.timedelta(minutes=5 * i)).isoformat(), "open": o, "high": o + 1,
                    "low": o - 1, "close": o + 0.5, "volume": 1000 + i})
    return out


def test_bars_parse_to_a_utc_frame_with_optional_volume():
    given = bars()
    del given[3]["volume"]
    frame = parse_bars(given)
    assert list(frame.columns) == ["open", "high", "low", "close", "volume"] and len(frame) == 30
    assert frame.index[0] == dt.datetime(2026, 1, 5, 14, 30) and frame["volume"].iloc[3] == 0.0
    epoch = [dict(b, timestamp=1_767_623_400 + 300 * i) for i, b in enumerate(bars())]
    assert parse_bars(epoch).index[0] == dt.datetime(2026, 1, 5, 14, 30)


@pytest.mark.parametrize("suffix, separator, shift_hours", [
    ("Z", "T", 0), ("+00:00", "T", 0), ("", "T", 0), ("", " ", 0), (".250Z", "T", 0), ("-05:00", "T", 5),
])
def test_iso_timestamps_of_every_form_mean_the_same_utc_time(suffix, separator, shift_hours):
    given = [dict(b, timestamp=f"2026-01-05{separator}{14 + i // 12:02d}:{5 * (i % 12):02d}:00{suffix}")
             for i, b in enumerate(bars(24))]
    frame = parse_bars(given)
    fraction = dt.timedelta(milliseconds=250 if suffix.startswith(".") else 0)
    assert frame.index[0] == dt.datetime(2026, 1, 5, 14 + shift_hours, 0) + fraction
    assert frame.index[-1] == dt.datetime(2026, 1, 5, 15 + shift_hours, 55) + fraction
    assert frame.index.tz is None


def test_bar_objects_and_dicts_parse_alike():
    class Bar:
        def __init__(self, **fields):
            self.__dict__.update({"volume": 0.0} | fields)

    given = bars()
    assert parse_bars([Bar(**b) for b in given]).equals(parse_bars(given))
    with pytest.raises(RequestError, match="bar 4: high True is not a number"):
        parse_bars([dict(b, high=True) if i == 3 else b for i, b in enumerate(given)])


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[4].update(high=b[4]["low"] - 1), "bar 5: .*breaks low <= min"),
    (lambda b: b[2].update(close=float("nan")), "bar 3: 'close' is not finite"),
    (lambda b: b[7].update(open=-3.0), "bar 8: 'open' must be positive"),
    (lambda b: b[9].update(timestamp=b[8]["timestamp"]), "bar 10: timestamp .* is not after"),
    (lambda b: b[1].update(open="ten"), "bar 2: open 'ten' is not a number"),
    (lambda b: b[6].pop("close"), "bar 7 is missing close"),
    (lambda b: b[0].update(timestamp="yesterday"), "bar 1: timestamp 'yesterday' is not an ISO 8601 time"),
    (lambda b: b[0].update(timestamp=5), "bar 2: timestamp .* must be an ISO 8601 string or epoch seconds"),
    (lambda b: b[11].update(volume=-1), "bar 12: negative volume"),
    (lambda b: b[3].update(high=10 ** 400), "bar 4: high is an integer beyond the float range"),
])
def test_bad_bars_name_the_bar_and_the_rule(mutate, message):
    given = bars()
    mutate(given)
    with pytest.raises(RequestError, match=message) as error:
        parse_bars(given)
    assert error.value.status == 400


def test_bar_count_limits():
    with pytest.raises(RequestError, match="5 bars given; between 20 and 2000") as error:
        parse_bars(bars(5))
    assert error.value.status == 400
    with pytest.raises(RequestError, match="31 bars given") as error:
        parse_bars(bars(31), Limits(max_bars=30))
    assert error.value.status == 413
    with pytest.raises(RequestError, match="must be a list"):
        parse_bars({"open": 1})


def _png(size=(64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_images_decode_and_bad_ones_are_refused_before_decoding():
    image = decode_image(_png())
    assert image.size == (64, 48) and image.mode == "RGB"
    assert decode_image("data:image/png;base64," + _png()).size == (64, 48)
    with pytest.raises(RequestError, match="not valid base64"):
        decode_image("not base64 at all!")
    with pytest.raises(RequestError, match="not a readable image"):
        decode_image(base64.b64encode(b"just some bytes, no image").decode())
    with pytest.raises(RequestError, match="larger than 100 bytes") as error:
        decode_image(_png(), Limits(max_image_bytes=100))
    assert error.value.status == 413
    # A decompression bomb: a small file that declares many pixels is refused from its header.
    with pytest.raises(RequestError, match="more pixels than the 1,000,000 allowed .2000x2000.") as error:
        decode_image(_png((2000, 2000)), Limits(max_image_pixels=1_000_000))
    assert error.value.status == 413
    with pytest.raises(RequestError, match="non-empty base64"):
        decode_image("")


def test_prompts_symbols_timeframes_and_pattern_names():
    assert check_prompts([" a hammer "]) == ["a hammer"]
    with pytest.raises(RequestError, match="at most 2") as error:
        check_prompts(["a", "b", "c"], Limits(max_prompts=2))
    assert error.value.status == 413
    with pytest.raises(RequestError, match=r"prompts\[1\] has 11 characters; at most 10"):
        check_prompts(["ok", "x" * 11], Limits(max_prompt_chars=10))
    with pytest.raises(RequestError, match=r"prompts\[0\] must be a non-empty string"):
        check_prompts(["  "])
    with pytest.raises(RequestError, match="non-empty list"):
        check_prompts([])
    assert check_symbol("BRK.B") == "BRK.B"
    with pytest.raises(RequestError, match="not a ticker"):
        check_symbol("../etc/passwd" * 5)
    with pytest.raises(RequestError, match="timeframe '2m' is unknown"):
        check_timeframe("2m")
    assert pattern_key(" Bullish  Engulfing") == "bullish_engulfing" and pattern_key("inside-bar") == "inside_bar"


def test_serving_config_from_environment_names_a_bad_variable():
    config = ServingConfig.from_env({"CANDLE_VLM_THREADS": "2", "CANDLE_VLM_MAX_BARS": "500",
                                     "CANDLE_VLM_LOG_FSYNC": "false", "CANDLE_VLM_ARTIFACT_ROOT": "/data/a"})
    assert config.threads == 2 and config.limits.max_bars == 500 and config.log_fsync is False
    assert config.log_directory == os.path.join("/data/a", "predictions")
    with pytest.raises(ValueError, match="CANDLE_VLM_THREADS='many': expected an integer"):
        ServingConfig.from_env({"CANDLE_VLM_THREADS": "many"})
    with pytest.raises(ValueError, match="CANDLE_VLM_ENCODER='onnx-fp8': expected auto, torch-fp32"):
        ServingConfig.from_env({"CANDLE_VLM_ENCODER": "onnx-fp8"})
    with pytest.raises(ValueError, match="CANDLE_VLM_WORKERS='-1': must not be negative"):
        ServingConfig.from_env({"CANDLE_VLM_WORKERS": "-1"})
    # Each worker's encoder gets its share of the cores unless threads are set.
    cores = len(os.sched_getaffinity(0))
    assert ServingConfig(workers=cores).worker_threads == 1 and ServingConfig(threads=3).worker_threads == 3
    # By default one worker per core (a single process is capped by its GIL), one on CUDA.
    automatic = ServingConfig.from_env({})
    assert automatic.server_workers == min(cores, 4) and automatic.worker_threads == max(1, cores // min(cores, 4))
    assert ServingConfig(device="cuda").server_workers == 1
    assert ServingConfig.from_env({"CANDLE_VLM_WORKERS": "3"}).server_workers == 3


def _record(i, time):
    return {"request_id": f"r{i}", "time": time.isoformat(), "model_version": "m:1", "embedding": [0.1, i],
            "probabilities": {"hammer": 0.5}, "latency_ms": 3.0}


def test_prediction_log_group_commits_concurrent_appends_and_reads_them_back(tmp_path):
    log = PredictionLog(tmp_path)
    start = dt.datetime(2026, 3, 2, 23, 59, 58, tzinfo=dt.timezone.utc)

    async def many():
        await asyncio.gather(*(log.append_async(_record(i, start + dt.timedelta(seconds=i))) for i in range(40)))

    asyncio.run(many())
    log.close()
    days = sorted(p.name for p in tmp_path.iterdir())
    assert days == ["2026-03-02", "2026-03-03"]  # shards per day
    frame = read_predictions(tmp_path)
    assert list(frame["request_id"]) == [f"r{i}" for i in range(40)] and log.records == 40
    window = read_predictions(tmp_path, start=start + dt.timedelta(seconds=10), end=start + dt.timedelta(seconds=20))
    assert list(window["request_id"]) == [f"r{i}" for i in range(10, 20)]


def test_a_torn_last_line_is_skipped_and_nothing_else_is_lost(tmp_path):
    log = PredictionLog(tmp_path, fsync=False)
    now = dt.datetime(2026, 3, 2, 12, tzinfo=dt.timezone.utc)
    for i in range(3):
        log.append(_record(i, now + dt.timedelta(seconds=i)))
    log.close()
    shard = next(tmp_path.glob("*/*.jsonl"))
    with open(shard, "ab") as handle:
        handle.write(json.dumps(_record(3, now))[:25].encode())  # a crash mid-write
    assert list(read_predictions(tmp_path)["request_id"]) == ["r0", "r1", "r2"]
    with pytest.raises(ValueError):
        log.append({"time": now.isoformat(), "bad": float("nan")})  # never writes a line JSON cannot read
    assert np.isclose(read_predictions(tmp_path)["latency_ms"].sum(), 9.0)


def test_logged_embeddings_are_plain_floats_to_six_decimals():
    embedding = np.random.default_rng(3).normal(size=256).astype(np.float32)
    logged = logged_embedding(embedding)
    assert all(type(x) is float for x in logged) and len(logged) == 256
    assert np.abs(np.array(logged) - embedding).max() <= 5e-7 + 1e-9  # rounded, not truncated
    assert all(abs(x * 1e6 - round(x * 1e6)) < 1e-6 for x in logged)  # six decimals
    assert json.loads(json.dumps(logged)) == logged


def test_micro_batcher_merges_waiting_requests_and_survives_a_failing_batch():
    from vlm_assets.serving.batching import MicroBatcher

    sizes, calls = [], []

    def run(items):
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("encoder failed")
        return np.array([[len(item)] for item in items])

    batcher = MicroBatcher(run, max_batch_size=4, on_batch=sizes.append)

    async def scenario():
        first = await asyncio.gather(*(batcher.submit("x" * i) for i in range(1, 11)))
        failed = await asyncio.gather(batcher.submit("ok"), batcher.submit("boom"), return_exceptions=True)
        after = await batcher.submit("fine")
        return first, failed, after

    first, failed, after = asyncio.run(scenario())
    assert [int(row[0]) for row in first] == list(range(1, 11))  # every caller gets its own row
    assert sizes[:3] == [4, 4, 2]  # arriving together, they share batches of at most 4
    assert all(isinstance(r, RuntimeError) for r in failed)  # a failing batch fails its own callers only
    assert int(after[0]) == 4 and calls[-1] == ["fine"]
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(run, max_batch_size=0)


def test_micro_batcher_encodes_while_the_caller_works():
    """After enqueue and one yield the encoder thread runs without the event loop, so the service computes the
    bar features while the chart is encoded."""
    import threading

    from vlm_assets.serving.batching import MicroBatcher

    started = threading.Event()

    def run(items):
        started.set()
        return np.array([[len(item)] for item in items])

    async def scenario():
        batcher = MicroBatcher(run)
        pending = batcher.enqueue("abc")
        await asyncio.sleep(0)
        began_before_await = started.wait(timeout=5)  # blocks the loop: only the encoder thread can set it
        return began_before_await, await pending

    began_before_await, row = asyncio.run(scenario())
    assert began_before_await and int(row[0]) == 3


def test_the_service_path_draws_and_computes_features_as_the_frame_does():
    """parse_bar_arrays feeds the renderer and the features without a frame: the same chart and the same features."""
    from vlm_assets.features import window_features
    from vlm_assets.rendering import render_chart

    given = bars(60)
    frame = parse_bars(given)
    index, columns = parse_bar_arrays(given)
    assert index.equals(frame.index) and all(np.array_equal(c, frame[n]) for n, c in columns._asdict().items())
    assert render_chart(columns).tobytes() == render_chart(frame).tobytes()
    assert np.array_equal(window_features(columns), window_features(frame), equal_nan=True)
