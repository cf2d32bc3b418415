"""Monitoring (Phase 5): the drift reference, the weekly drift report with its Evidently HTML and WARN checks, the fast
alert check with its alerts log and a real webhook, the schedules and sensor, and a small drift simulation. Real
assets on the tiny pipeline; the promoted model is this module's own ("monitoring_test") in the session's private
model store; prediction logs are written in the service's format from real answers of that model."""

import dataclasses
import datetime as dt
import http.server
import json
import threading

import numpy as np
import pandas as pd
import pytest
from dagster import (
    AssetCheckSeverity, DagsterInstance, Definitions, build_schedule_context, build_sensor_context, materialize,
)

from bench.common import check_outcomes, free_port
from vlm_assets import promotion
from vlm_assets.features import MARKET_FEATURES, market_state
from vlm_assets.monitoring import alerts as al
from vlm_assets.monitoring import drift
from vlm_assets.monitoring import reference as ref_lib
from vlm_assets.monitoring import simulation as sim
from vlm_assets.market.timeframes import bar_end
from vlm_assets.pipeline.artifacts import load_bars
from vlm_assets.pipeline.model import dataset_windows
from vlm_assets.pipeline.monitoring import (
    MONITORING_ASSETS, MONITORING_JOBS, MONITORING_SCHEDULES, MONITORING_SENSORS, MonitoringResource, drift_alert_check,
    drift_report, embedding_reference, load_reference,
)
from vlm_assets.pipeline.serving import promoted_model
from vlm_assets.rendering import PRESETS, render_chart
from vlm_assets.serving.prediction_log import PredictionLog
from vlm_assets.serving.predictor import Predictor
from vlm_assets.storage import ArtifactStore
from tests.conftest import tiny_resources

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
NAME = "monitoring_test"
WEEK = "2026-03-02"  # a Monday: the weekly partition the synthetic logs fall in
SMALL = {"charts": 20, "segment": 10, "latency": 10}
DRIFT_THEME = "terminal_dark"
CLIENT_SYMBOLS = 12


def resources(root, monitoring: dict) -> dict:
    return tiny_resources(root) | {"monitoring": MonitoringResource(model_name=NAME, **monitoring)}


@pytest.fixture(scope="module")
def promoted(model_run):
    root, _ = model_run
    result = materialize([promoted_model], resources=tiny_resources(root), run_config={
        "ops": {"promoted_model": {"config": {"model_name": NAME, "encoders": []}}}})
    assert result.success
    return root


@pytest.fixture(scope="module")
def reference(promoted, tmp_path_factory):
    root = promoted
    state = tmp_path_factory.mktemp("monitoring-state")
    result = materialize([embedding_reference], resources=resources(root, {"state_dir": str(state)}),
                         run_config={"ops": {"embedding_reference": {"config": {"per_timeframe": 40}}}})
    assert result.success
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    return root, load_reference(ArtifactStore(root)), metadata


def request_time(window: pd.DataFrame, timeframe: str) -> pd.Timestamp:
    """When a live client would ask for this chart in WEEK: the weekday and New York time its last bar closes."""
    close = bar_end(pd.DatetimeIndex(window.index[-1:]), timeframe)[0]
    local = pd.Timestamp(WEEK) + pd.Timedelta(days=close.dayofweek) + (close - close.normalize())
    return local.tz_localize("America/New_York").tz_convert("UTC")


def synthetic_log(directory, predictor, reference, charts, style=None, latency_scale=1.0, embedding_shift=0.0,
                  probability_shift=0.0, market_scale=1.0):
    """Every chart as one request at its `request_time` (even ones with bars, odd ones as a screenshot in `style`),
    answered by the model as the service answers; latency like the reference's measured serving times, or with
    `latency_scale` its P95 times that. The tiny model embeds every chart almost alike (a few training steps), so a drift of the
    embeddings is injected: `embedding_shift` along one seeded direction plus as much seeded spread. The tiny market
    has two symbols, too few to judge the embedding statistics (their noise is estimated from the symbols, with
    g - 1 degrees of freedom), so the requests name CLIENT_SYMBOLS symbols in turn. It also answers every screenshot
    within about 0.01 of one probability, which no theme moves beyond a small sample's PSI noise: `probability_shift`
    is added to the screenshots' answers."""
    kinds = ["image" if i % 2 else "bars" for i in range(len(charts))]
    images = [render_chart(window, style if style is not None and kind == "image" else predictor.style)
              for (_, _, window), kind in zip(charts, kinds)]
    embeddings = np.empty((len(charts), reference.embeddings.shape[1]), np.float32)
    probabilities = np.empty((len(charts), len(sim.CORE_PATTERNS)))
    states = [None] * len(charts)
    for kind in ("bars", "image"):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        embeddings[rows], probabilities[rows], features = ref_lib.answer_batch(
            predictor, [images[i] for i in rows], [charts[i][2] for i in rows] if kind == "bars" else None)
        if features is not None:  # the bars' market state as the service logs it; `market_scale` moves prices more
            for i, row in zip(rows, features):
                states[i] = {k: v * market_scale for k, v in market_state(row).items()}
    probabilities[[i for i, k in enumerate(kinds) if k == "image"]] += probability_shift
    if embedding_shift:
        rng = np.random.default_rng(0)
        direction = rng.normal(size=embeddings.shape[1])
        moved = embeddings + embedding_shift * (direction / np.linalg.norm(direction)
                                                + rng.normal(0, 1 / np.sqrt(embeddings.shape[1]), embeddings.shape))
        embeddings = (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)
    # The reference's measured times, spread evenly over its quantiles (a subset of times measured on a shared,
    # loaded machine can have another P95); slowed, every request takes `latency_scale` times the reference's P95.
    # Only requests with bars are timed against the reference.
    measured = reference.table["latency_ms"].to_numpy()
    latencies = np.full(len(charts), np.quantile(measured, 0.95) * latency_scale)
    if latency_scale == 1.0:
        timed = [i for i, kind in enumerate(kinds) if kind == "bars"]
        spread = np.quantile(measured, (np.arange(len(timed)) + 0.5) / len(timed))
        latencies[timed] = np.random.default_rng(1).permutation(spread)
    log = PredictionLog(directory, fsync=False)
    for i, ((_, timeframe, window), kind) in enumerate(zip(charts, kinds)):
        log.append(sim.prediction_record(f"r{i}", request_time(window, timeframe), reference.model,
                                         embeddings[i], probabilities[i], latencies[i],
                                         f"C{i % CLIENT_SYMBOLS:02d}", timeframe, kind, len(window), states[i]))
    log.close()


@pytest.fixture(scope="module")
def logs(reference, tmp_path_factory):
    """A clean and a drifted week of the log: other test-period charts than the reference's; the drifted one has its
    screenshots in another theme, moved embeddings and answers, three times the latency and twice the volatility."""
    root, ref, _ = reference
    artifacts = ArtifactStore(root)
    settings = artifacts.read_json(f"chart_images/{artifacts.current_version('chart_images')}/settings.json")
    charts = ref_lib.test_period_windows(load_bars(artifacts, ("1m", "5m", "15m")),
                                         dataset_windows(artifacts, ["symbol", "block", "split"]),
                                         settings["sampling"]["block_days"], 120,
                                         ref_lib.ReferenceSampling(per_timeframe=40, seed=7))
    predictor = Predictor(promotion.promoted(NAME).path)
    base = tmp_path_factory.mktemp("logs")
    synthetic_log(base / "clean", predictor, ref, charts)
    synthetic_log(base / "drifted", predictor, ref, charts, PRESETS[DRIFT_THEME], latency_scale=3.0,
                  embedding_shift=0.5, probability_shift=0.3, market_scale=2.0)
    return base, pd.Timestamp(WEEK, tz="UTC") + pd.Timedelta(days=5), len(charts)


def test_reference_describes_the_promoted_model(reference):
    root, ref, metadata = reference
    artifacts = ArtifactStore(root)
    record = artifacts.read_json(f"promoted_model/{artifacts.current_version('promoted_model')}/promotion.json")
    assert ref.model == record["tag"] == str(promotion.promoted(NAME).tag)
    assert ref.info["encoder"] == "torch-fp32"  # promotion measured no other backend (encoders: [])
    # Charts of every tiny timeframe, each answered with bars and as a screenshot, unit-norm embeddings.
    counts = ref.table["timeframe"].value_counts()
    assert set(counts.index) == {"1m", "5m", "15m"} and counts["1m"] == 40 and counts.max() == 40
    n = len(ref.table)
    assert np.allclose(np.linalg.norm(ref.embeddings, axis=1), 1.0, atol=1e-3)
    for segment in ref_lib.SEGMENTS:
        probabilities = ref.probabilities(segment)
        assert probabilities.shape == (n, len(sim.CORE_PATTERNS)) and ((0 <= probabilities) & (probabilities <= 1)).all()
    assert (ref.table["latency_ms"] > 0).all() and ref.info["latency_ms"]["p95"] >= ref.info["latency_ms"]["p50"]
    # The spot-check baseline is promotion's own test-split recall: same windows, same serving path.
    assert ref.info["spot_check"]["macro_recall"] == pytest.approx(record["candidate"]["macro_recall"], abs=1e-12)
    assert len(ref.info["spot_check"]["window_ids"]) == record["candidate"]["windows"]
    assert metadata["charts"].value == n and "per_timeframe" in metadata
    # Same seed, same charts and answers: the reference is a function of the model and the test period (latency
    # aside); the first charts are replayed again to show it.
    charts = ref_lib.test_period_windows(
        load_bars(artifacts, ("1m", "5m", "15m")), dataset_windows(artifacts, ["symbol", "block", "split"]), 5, 120,
        ref_lib.ReferenceSampling(per_timeframe=40, timeframes=("1m", "5m", "15m")))
    again = ref_lib.replay(Predictor(promotion.promoted(NAME).path), charts[:12], {"model": ref.model})
    assert np.array_equal(again.embeddings, ref.embeddings[:12])
    assert again.table.drop(columns="latency_ms").equals(ref.table.drop(columns="latency_ms").iloc[:12])


def report_run(root, log_dir, state, **config):
    return materialize([drift_report], partition_key=WEEK,
                       resources=resources(root, {"prediction_log": str(log_dir), "state_dir": str(state)}),
                       run_config={"ops": {"drift_report": {"config": {"minimums": SMALL, "evidently_rows": 60}
                                                            | config}}})


def test_weekly_report_on_a_clean_and_a_drifted_log(reference, logs, tmp_path):
    root, ref, _ = reference
    base, _, n = logs
    artifacts = ArtifactStore(root)
    clean = report_run(root, base / "clean", tmp_path / "state-clean")
    metrics = artifacts.read_json(f"drift_report/{WEEK}/{artifacts.current_version(f'drift_report/{WEEK}')}/metrics.json")
    assert check_outcomes(clean) == {f"{m}_within_threshold": True for m in (
        "centroid_shift", "cosine_variance_increase", "prediction_psi", "market_psi", "latency_p95_ratio",
        "recall_drop")} | {"enough_data": True}, (metrics["metrics"], metrics["predictions"], metrics["market"])
    assert metrics["partition"] == WEEK and metrics["model"] == ref.model
    assert metrics["records"] == n and metrics["charts"] == n
    assert metrics["inputs"] == {"bars": (n + 1) // 2, "image": n // 2}
    assert metrics["thresholds"] == {"centroid_shift": 0.15, "cosine_variance_increase": 0.2, "recall_drop": 0.05,
                                     "latency_p95_ratio": 2.0, "prediction_psi": 0.25, "market_psi": 0.25}
    assert set(metrics["metrics"]) == {"centroid_shift", "cosine_variance_increase", "prediction_psi", "market_psi",
                                       "latency_p95_ratio", "recall_drop"}
    # The market state of every request with bars, against the reference's: the same test period, so alike.
    assert metrics["market"]["answers"] == (n + 1) // 2
    for name, median in metrics["market"]["median"].items():
        assert median == pytest.approx(metrics["market"]["reference_median"][name], rel=0.5)
    assert all(m["sufficient"] and not m["breached"] for m in metrics["metrics"].values())
    # No scoring of the spot-check set during the week: the report scored it and recorded that in the history.
    assert metrics["metrics"]["recall_drop"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert [e["source"] for e in al.JsonlLog(tmp_path / "state-clean" / "spot_checks.jsonl").read()] == ["drift_report"]
    assert metrics["latency"]["ratio"] == pytest.approx(1.0, abs=0.35)  # the reference's own latencies
    assert metrics["daily"][0]["day"] == WEEK and metrics["evidently"]["rows"] == 60
    assert ref.info["session"]["timezone"] == "America/New_York"  # matched by timeframe and session hour
    html = next(artifacts.path(f"drift_report/{WEEK}").glob("*/report.html")).read_text()
    assert "Drift in embeddings" in html and "latency_ms" in html and "volatility" in html
    metadata = clean.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["evidently_report"].value.endswith("report.html") and "latency_histogram" in metadata

    # The drifted week: screenshots in another theme, three times the latency, twice the volatility, and a
    # spot-check scoring (in the history the fast check keeps) 20% under the baseline.
    state = tmp_path / "state-drifted"
    baseline = ref.info["spot_check"]
    al.JsonlLog(state / "spot_checks.jsonl").append([{
        "time": f"{WEEK}T12:00:00+00:00", "model": ref.model, "scored_with": ref.model, "source": "drift_alert_check",
        "macro_recall": 0.8 * baseline["macro_recall"], "recall": baseline["recall"], "windows": 1,
        "baseline_macro_recall": baseline["macro_recall"], "baseline_recall": baseline["recall"]}])
    drifted = report_run(root, base / "drifted", state, evidently_rows=0)
    outcomes = check_outcomes(drifted)
    assert outcomes["prediction_psi_within_threshold"] is False
    assert outcomes["latency_p95_ratio_within_threshold"] is False
    assert outcomes["recall_drop_within_threshold"] is False
    assert outcomes["centroid_shift_within_threshold"] is False
    assert outcomes["cosine_variance_increase_within_threshold"] is False
    assert outcomes["market_psi_within_threshold"] is False
    severities = {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.severity
                  for e in drifted.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert set(severities.values()) == {AssetCheckSeverity.WARN}
    metrics = artifacts.read_json(f"drift_report/{WEEK}/{artifacts.current_version(f'drift_report/{WEEK}')}/metrics.json")
    assert metrics["metrics"]["latency_p95_ratio"]["value"] == pytest.approx(3.0, rel=0.35)
    assert metrics["metrics"]["recall_drop"]["value"] == pytest.approx(0.2)
    assert metrics["metrics"]["prediction_psi"]["worst"].startswith("image:")
    for name, median in metrics["market"]["median"].items():  # prices move twice as far per bar
        assert median == pytest.approx(2 * metrics["market"]["reference_median"][name], rel=0.5)


class Webhook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        Webhook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def alert_run(root, log_dir, state, as_of, webhook_url=""):
    result = materialize([drift_alert_check], resources=resources(
        root, {"prediction_log": str(log_dir), "state_dir": str(state), "webhook_url": webhook_url,
               "webhook_timeout": 2.0}),
        run_config={"ops": {"drift_alert_check": {"config": {"minimums": SMALL, "window_records": 200,
                                                              "as_of": as_of.isoformat()}}}})
    assert result.success
    return result


def test_fast_check_alerts_once_posts_to_the_webhook_and_resolves(reference, logs, tmp_path):
    root, ref, _ = reference
    base, end, _ = logs
    server = http.server.HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    Webhook.received.clear()
    state = tmp_path / "state"
    try:
        first = alert_run(root, base / "drifted", state, end, url)
        assert check_outcomes(first)["prediction_psi_within_threshold"] is False
        events = al.JsonlLog(state / "alerts.jsonl").read()
        alerted = {e["metric"] for e in events if e["event"] == "alert"}
        assert {"prediction_psi", "latency_p95_ratio", "centroid_shift"} <= alerted
        assert all(e["webhook"] == "sent: HTTP 200" and e["model"] == ref.model for e in events)
        assert len(Webhook.received) == 1 and {e["metric"] for e in Webhook.received[0]["events"]} == alerted
        assert "drift alert: prediction_psi" in Webhook.received[0]["text"]
        # The fast check re-scored the spot-check set (none was scored yet): the recall is the baseline's.
        scored = al.JsonlLog(state / "spot_checks.jsonl").read()
        assert len(scored) == 1 and scored[0]["macro_recall"] == pytest.approx(scored[0]["baseline_macro_recall"])
        # An hour later the breach persists: no second message (re-sent only after renotify_hours).
        alert_run(root, base / "drifted", state, end + pd.Timedelta(hours=1), url)
        assert len(Webhook.received) == 1 and len(al.JsonlLog(state / "alerts.jsonl").read()) == len(events)
        # The clean log: every alert resolves, in one message.
        clean = alert_run(root, base / "clean", state, end + pd.Timedelta(hours=2), url)
        assert all(check_outcomes(clean).values())
        resolved = [e for e in al.JsonlLog(state / "alerts.jsonl").read() if e["event"] == "resolved"]
        assert {e["metric"] for e in resolved} == alerted and len(Webhook.received) == 2
        assert al.open_alerts(al.JsonlLog(state / "alerts.jsonl").read(), ref.model) == {}
    finally:
        server.shutdown()
    # A webhook that cannot be reached is logged with the alert and does not fail the run.
    dead = alert_run(root, base / "drifted", tmp_path / "state-dead", end, f"http://127.0.0.1:{free_port()}/hook")
    assert dead.success
    events = al.JsonlLog(tmp_path / "state-dead" / "alerts.jsonl").read()
    assert events and all(e["webhook"].startswith("failed:") for e in events)


def test_schedules_jobs_and_sensor(reference, tmp_path, monkeypatch):
    root, ref, _ = reference
    from vlm_assets.definitions import defs as project, main_job_assets

    # The code location carries the monitoring jobs, schedules (with their intended crons) and sensor.
    weekly = project.resolve_schedule_def("weekly_drift_report")
    assert weekly.cron_schedule == "0 1 * * 1" and weekly.execution_timezone == "UTC"
    assert weekly.job_name == "drift_report_job"
    hourly = project.resolve_schedule_def("drift_alert_schedule")
    assert hourly.cron_schedule == "0 * * * *" and hourly.execution_timezone == "UTC"
    assert hourly.job_name == "drift_alert_job"
    assert project.resolve_sensor_def("reference_follows_promoted_model").job_name == "embedding_reference_job"
    # A fresh main run leaves a reference of the model it promoted; the report and the fast check are scheduled.
    assert {k.to_user_string() for k in main_job_assets()} & {a.key.to_user_string() for a in MONITORING_ASSETS} \
        == {"embedding_reference"}
    defs = Definitions(assets=MONITORING_ASSETS, jobs=MONITORING_JOBS, schedules=MONITORING_SCHEDULES,
                       sensors=MONITORING_SENSORS, resources=resources(root, {"state_dir": str(tmp_path)}))
    # Monday 01:00 UTC runs the week that ended at midnight, with the thresholds of CANDLE_VLM_MONITORING_CONFIG.
    (tmp_path / "monitoring.yaml").write_text("ops:\n  drift_report:\n    config: {thresholds: {centroid_shift: 0.2}}\n")
    monkeypatch.setenv("CANDLE_VLM_MONITORING_CONFIG", str(tmp_path / "monitoring.yaml"))
    tick = dt.datetime(2026, 3, 9, 1, tzinfo=dt.timezone.utc)
    with DagsterInstance.ephemeral() as instance:
        context = build_schedule_context(instance, scheduled_execution_time=tick, resources=tiny_resources(root),
                                         repository_def=defs.get_repository_def())
        requests = weekly.evaluate_tick(context).run_requests
        assert [r.partition_key for r in requests] == [WEEK]
        assert requests[0].run_config["ops"]["drift_report"]["config"] == {"thresholds": {"centroid_shift": 0.2}}
        # The fast check is evaluated as at its tick; without a reference both schedules skip.
        context = build_schedule_context(instance, scheduled_execution_time=tick, resources=tiny_resources(root))
        (request,) = hourly.evaluate_tick(context).run_requests
        assert request.run_config["ops"]["drift_alert_check"]["config"] == {"as_of": "2026-03-09T01:00:00+00:00"}
        empty = build_schedule_context(instance, scheduled_execution_time=tick,
                                       resources=tiny_resources(tmp_path / "empty-store"))
        assert "no embedding_reference" in hourly.evaluate_tick(empty).skip_message
    # The sensor asks for a reference only when the promoted model is not the one the reference describes.
    sensor = defs.resolve_sensor_def("reference_follows_promoted_model")
    up_to_date = sensor.evaluate_tick(build_sensor_context(resources=resources(root, {"state_dir": str(tmp_path)})))
    assert not up_to_date.run_requests and "describes" in up_to_date.skip_message
    empty = tiny_resources(tmp_path / "empty-store") | {"monitoring": MonitoringResource(model_name=NAME)}
    missing = sensor.evaluate_tick(build_sensor_context(resources=empty))
    assert [r.run_key for r in missing.run_requests] == [ref.model]


def log_window(vectors, symbols, probabilities=None, latency_ms=None, market=None) -> drift.LogWindow:
    """Answers of /predict/patterns requests with bars on 5m charts of model "m", one per embedding row."""
    n = len(vectors)
    market = np.full((n, len(MARKET_FEATURES)), np.nan) if market is None else market
    return drift.LogWindow(np.arange(n).astype("datetime64[ns]"), vectors.astype(np.float32),
                           np.array([f"e{i}" for i in range(n)], dtype=object), np.full(n, "5m", dtype=object),
                           np.full(n, "bars", dtype=object),
                           np.full((n, 9), 0.1) if probabilities is None else probabilities,
                           np.full(n, 10.0) if latency_ms is None else latency_ms,
                           np.full(n, "predict_patterns", dtype=object), np.full(n, "m", dtype=object),
                           np.array(symbols, dtype=object), market)


def test_drift_statistics_are_judged_net_of_sampling_noise():
    rng = np.random.default_rng(0)
    centre = np.ones(16) / 4.0
    table = pd.DataFrame({"timeframe": ["5m"] * 400, "latency_ms": 10.0}
                         | {c: 0.1 for s in ref_lib.SEGMENTS for c in ref_lib.probability_columns(s)})
    embeddings = centre + rng.normal(0, 0.3, (400, 16))
    reference = ref_lib.Reference(table, embeddings.astype(np.float32),
                                  {"model": "m", "latency_ms": {"p95": 10.0}})

    # Six symbols whose own market states each move their charts: a large raw shift, mostly noise.
    states = rng.normal(0, 0.4, (6, 16))
    noisy = log_window(centre + np.repeat(states, 50, axis=0) + rng.normal(0, 0.3, (300, 16)),
                   np.repeat([f"S{i}" for i in range(6)], 50))
    stats = drift.embedding_statistics(reference, noisy, drift.Minimums(charts=20))
    assert stats["centroid_shift"] > 0.15 and stats["centroid_shift_judged"] < stats["centroid_shift"]
    assert stats["clusters"] == 6
    # One symbol is not judged; two are judged with one degree of freedom: the same large raw shift is noise.
    assert not drift.embedding_statistics(reference, log_window(noisy.embeddings[:50], ["S0"] * 50),
                                          drift.Minimums(charts=20))["sufficient"]
    two = drift.embedding_statistics(reference, log_window(noisy.embeddings[:100], noisy.symbol[:100]),
                                     drift.Minimums(charts=20))
    assert two["clusters"] == 2 and two["centroid_shift"] > 0.15 and two["centroid_shift_judged"] == 0.0
    # A shift shared by every symbol stays after the correction.
    moved = log_window(centre + 0.5 + rng.normal(0, 0.3, (300, 16)), np.repeat([f"S{i}" for i in range(30)], 10))
    stats = drift.embedding_statistics(reference, moved, drift.Minimums(charts=20))
    assert stats["centroid_shift_judged"] > 0.5 * stats["centroid_shift"] > 0.15


def test_market_shift_watches_the_bars_own_volatility():
    rng = np.random.default_rng(3)

    def states(symbols: int, per_symbol: int, scale: float = 1.0) -> np.ndarray:
        """Log-normal volatility and range/price, each symbol with its own level (its market's regime)."""
        level = np.repeat(rng.normal(0, 0.3, symbols), per_symbol)[:, None]
        return scale * np.exp(np.log([0.002, 0.003]) + level + rng.normal(0, 0.2, (symbols * per_symbol, 2)))

    table = pd.DataFrame({"timeframe": ["5m"] * 1200, "latency_ms": 10.0}
                         | {c: 0.1 for s in ref_lib.SEGMENTS for c in ref_lib.probability_columns(s)})
    reference = ref_lib.Reference(table.assign(**dict(zip(ref_lib.MARKET_COLUMNS, states(40, 30).T))),
                                  rng.normal(size=(1200, 8)).astype(np.float32), {"model": "m"})
    symbols = np.repeat([f"S{i}" for i in range(40)], 10)
    vectors = rng.normal(size=(400, 8))
    calm = drift.market_shift(reference, log_window(vectors, symbols, market=states(40, 10)))
    assert calm["sufficient"] and calm["answers"] == 400
    assert max(calm["psi_judged"].values()) == 0.0, calm
    moved = drift.market_shift(reference, log_window(vectors, symbols, market=states(40, 10, scale=2.0)))
    assert min(moved["psi_judged"].values()) > 0.25, moved
    assert moved["median"]["volatility"] == pytest.approx(2 * moved["reference_median"]["volatility"], rel=0.25)
    # Screenshots carry no bars, a window without the history no state; a reference from before has none at all.
    shots = log_window(vectors, symbols, market=states(40, 10, scale=2.0))
    shots = dataclasses.replace(shots, segment=np.full(400, "image", dtype=object))
    assert drift.market_shift(reference, shots) == {"answers": 0, "sufficient": False}
    unknown = np.full((400, 2), np.nan)
    assert not drift.market_shift(reference, log_window(vectors, symbols, market=unknown))["sufficient"]
    before = drift.market_shift(ref_lib.Reference(table, reference.embeddings, {"model": "m"}),
                                log_window(vectors, symbols, market=states(40, 10)))
    assert not before["sufficient"] and "rebuild embedding_reference" in before["reason"]


def test_psi_alert_state_trading_hours_and_bad_input():
    rng = np.random.default_rng(1)
    reference = rng.beta(2, 5, 5000)
    same, noise = drift.psi(reference, np.ones(5000), rng.beta(2, 5, 2000))
    assert same < noise < 0.03  # judged net of its noise: no shift
    assert drift.psi(reference, np.ones(5000), rng.beta(5, 2, 2000))[0] > 1.0
    # 30 answers against 60: the noise alone is far above the 0.25 threshold, so a small sample cannot breach it.
    assert drift.psi(reference[:60], np.ones(60), rng.beta(2, 5, 30))[1] > 1.0
    # Small drift-free samples (56 answers: empty bins weigh heavily) stay within the noise; the chi-square
    # divergence's own bound let about 5% of them through.
    small = [drift.psi(reference[:300], np.ones(300), rng.beta(2, 5, 56)) for _ in range(400)]
    assert sum(index > noise for index, noise in small) <= 2
    # A pattern answered alike for every reference chart: a move of its answers shows, one within a point does not.
    moved, noise = drift.psi(np.full(500, 0.1), np.ones(500), np.full(100, 0.4))
    assert moved - noise > 5
    assert drift.psi(np.full(500, 0.1), np.ones(500), np.full(100, 0.105))[0] < 1e-6
    # An alert, silence while it persists, a reminder after renotify_hours, resolved when measured within.
    breach = {"model": "m", "records": 1, "metrics": {"centroid_shift": {"value": 0.3, "threshold": 0.15,
                                                                         "breached": True, "sufficient": True}}}
    calm = {"model": "m", "records": 1, "metrics": {"centroid_shift": {"value": 0.1, "threshold": 0.15,
                                                                       "breached": False, "sufficient": True}}}
    t0 = pd.Timestamp("2026-03-02 15:00", tz="UTC")
    log = []
    for hours, result in ((0, breach), (1, breach), (25, breach), (26, calm), (27, calm)):
        log += al.alert_events(result, al.open_alerts(log, "m"), t0 + pd.Timedelta(hours=hours), 24.0, "test")
    assert [e["event"] for e in log] == ["alert", "reminder", "resolved"]
    # Trading hours: Friday 15:00 to Monday 10:30 New York time is 1 + 1 hours of session.
    config = sim.StreamConfig()
    friday, monday = (pd.Timestamp(t, tz="America/New_York") for t in ("2026-03-06 15:00", "2026-03-09 10:30"))
    assert sim.trading_hours(friday, monday, config) == pytest.approx(2.0)  # across the switch to summer time
    with pytest.raises(ValueError, match="thresholds.centroid_shift"):
        drift.Thresholds(centroid_shift=-1)
    with pytest.raises(ValueError, match="drift kind 'flood'"):
        sim.Drift("flood")
    with pytest.raises(ValueError, match="screenshot_share"):
        sim.StreamConfig(screenshot_share=1.5)
    with pytest.raises(ValueError, match="reference_days must be at least"):
        sim.StreamConfig(timeframes=("1h",), reference_days=5)
    with pytest.raises(ValueError, match="prediction log records lack field"):
        drift.LogWindow.from_records(pd.DataFrame([{"time": "2026-03-02T00:00:00+00:00"}]))
    with pytest.raises(ValueError, match="window_records"):
        al.FastCheckSettings(window_records=10)


def test_replayed_latencies_carry_no_drift_from_a_slow_stretch_of_the_reference():
    """The reference was timed while the machine was busy for a while: 4% of its charts, one after the other, took
    ten times as long. Replayed in measured order, the windows over that stretch judge a latency breach (a false
    alert, as CI once saw); spread, no window of the check's size does, and the values are the reference's."""
    rng = np.random.default_rng(4)
    measured = rng.uniform(4.0, 6.0, 400)
    measured[200:216] *= 10.0
    reference = ref_lib.Reference(pd.DataFrame({"latency_ms": measured}), np.zeros((400, 4), np.float32),
                                  {"model": "m", "latency_ms": {"p95": float(np.percentile(measured, 95))}})
    threshold = drift.Thresholds().latency_p95_ratio
    size = 120

    def worst_judged_ratio(sequence):
        cycle = np.concatenate([sequence, sequence[:size]])
        windows = [cycle[start:start + size] for start in range(len(sequence))]
        return max(drift.latency(reference, log_window(np.zeros((size, 4)), ["S"] * size, latency_ms=w),
                                 drift.Minimums(latency=size))["ratio_judged"] for w in windows)

    assert worst_judged_ratio(measured) > threshold
    spread = sim.spread_latencies(measured)
    assert np.array_equal(np.sort(spread), np.sort(measured))
    assert worst_judged_ratio(spread) < 1.2
    with pytest.raises(ValueError, match="no latencies"):
        sim.spread_latencies(np.array([]))


def test_drift_simulation_is_quiet_before_the_onset_and_sees_the_drift(promoted, tmp_path):
    """The small simulation (the tiny model, 24 symbols polled every 15 minutes): no alert in the five drift-free
    trading days, and a new screenshot theme moves the prediction PSI above every drift-free value; the regime shift
    changes exactly the bars after its onset; the same seed replays the same answers. The tiny model answers every
    screenshot within about 0.01 of the same probability, so its shift is raw signal, not a judged breach: the delay
    to an alert is measured with the real model by bench/drift.py (docs/monitoring.md)."""
    predictor = Predictor(promotion.promoted(NAME).path)
    config = sim.StreamConfig(symbols=24, timeframes=("15m",), poll_minutes=15, reference_days=6, clean_days=5,
                              drift_days=1, seed=3)
    settings = al.FastCheckSettings(window_records=240, minimums=drift.Minimums(charts=56, segment=100, latency=14))
    bars, synthetic = market = sim.market(config)
    reference = sim.reference_from_market(predictor, bars, config, 400, {"model": "monitoring-sim"})
    theme = sim.Drift("style", theme=DRIFT_THEME)
    outcome = sim.simulate(predictor, reference, theme, config, settings, tmp_path / "style", None, market)
    checks = outcome["checks"]
    assert outcome["clean_trading_days"] >= 5
    assert outcome["false_alerts"] == 0, checks[checks["breached"] != ""].to_string()
    evaluated = checks[checks["evaluated"] & checks["prediction_psi"].notna()]
    before = evaluated[evaluated["time"] < pd.Timestamp(outcome["onset"])]
    after = evaluated[evaluated["time"] >= pd.Timestamp(outcome["onset"])]
    assert len(before) >= 30 and len(after) >= 3  # the hourly checks with new answers
    assert after["prediction_psi"].max() > 2 * before["prediction_psi"].max(), after.to_string()
    # The regime shift: the same minutes before the onset; after it, larger moves, gaps, valid OHLC.
    onset = sim.onset_time(config, synthetic)
    drifted = sim.drifted_bars(bars, config, synthetic, sim.Drift("volatility"))
    clean_bars, drifted_bars = bars[("SIM00", "15m")], drifted[("SIM00", "15m")]
    before_onset = drifted_bars.index + pd.Timedelta(minutes=15) <= onset
    assert np.allclose(drifted_bars[before_onset].to_numpy(), clean_bars[before_onset].to_numpy())
    ranges = [np.log(b["high"] / b["low"])[~before_onset].mean() for b in (clean_bars, drifted_bars)]
    assert ranges[1] > 1.5 * ranges[0]
    assert ((drifted_bars["low"] <= drifted_bars[["open", "close"]].min(axis=1)) &
            (drifted_bars[["open", "close"]].max(axis=1) <= drifted_bars["high"])).all()
    # Deterministic: the same seed replays the same answers.
    again = sim.replay(predictor, config, theme, tmp_path / "again", "monitoring-sim",
                       reference.table["latency_ms"].to_numpy(), None, market)
    span = (again["times"][0], again["times"][-1] + pd.Timedelta(1, "s"))
    first = al.read_window(tmp_path / "style" / "predictions", *span)
    second = al.read_window(tmp_path / "again", *span)
    assert np.array_equal(first.embeddings, second.embeddings) and list(first.embedding_id) == list(second.embedding_id)
    assert np.array_equal(first.probabilities, second.probabilities, equal_nan=True)


def test_evidently_report_survives_near_constant_columns(tmp_path):
    """A pattern the model answers alike for every chart, up to float noise, must not break Evidently's histograms
    ("Cannot create 10 finite-sized bins"): the report's columns are rounded."""
    from vlm_assets.monitoring import report

    rng = np.random.default_rng(0)
    n = 120
    constant = {c: 1 / 22 + rng.normal(0, 1e-17, n) for s in ref_lib.SEGMENTS for c in ref_lib.probability_columns(s)}
    table = pd.DataFrame({"symbol": "S", "timeframe": ["5m"] * n, "end": pd.Timestamp(WEEK),
                          "latency_ms": rng.uniform(5, 10, n)} | constant)
    embeddings = rng.normal(size=(n, 16))
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    reference = ref_lib.Reference(table, embeddings, {"model": "m", "latency_ms": {"p95": 10.0}})
    window = log_window(embeddings, ["S"] * n, 1 / 22 + rng.normal(0, 1e-17, (n, 9)), rng.uniform(5, 10, n))
    figures = report.evidently_report(reference, window, str(tmp_path / "report.html"), rows=n)
    assert figures["rows"] == n and figures["drifted_columns"]["count"] == 0
    assert (tmp_path / "report.html").stat().st_size > 0


def test_evidently_report_compares_the_market_state_of_requests_with_bars(tmp_path):
    from vlm_assets.monitoring import report

    rng = np.random.default_rng(1)
    n = 150
    state = np.exp(np.log([0.002, 0.003]) + rng.normal(0, 0.2, (n, 2)))
    table = pd.DataFrame({"symbol": "S", "timeframe": ["5m"] * n, "end": pd.Timestamp(WEEK),
                          "latency_ms": rng.uniform(5, 10, n)}
                         | {c: rng.uniform(0, 1, n) for s in ref_lib.SEGMENTS for c in ref_lib.probability_columns(s)})
    embeddings = rng.normal(size=(n, 16))
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    reference = ref_lib.Reference(table.assign(**dict(zip(ref_lib.MARKET_COLUMNS, state.T))), embeddings,
                                  {"model": "m", "latency_ms": {"p95": 10.0}})

    def scores(market, ref=reference) -> dict:
        window = log_window(embeddings, ["S"] * n, rng.uniform(0, 1, (n, 9)), rng.uniform(5, 10, n), market)
        return report.evidently_report(ref, window, str(tmp_path / "report.html"), rows=n)["column_drift_scores"]

    calm, doubled = scores(state[rng.permutation(n)]), scores(2 * state)
    assert set(MARKET_FEATURES) <= set(calm) and set(MARKET_FEATURES) <= set(doubled)
    assert all(doubled[name] < 0.01 < calm[name] for name in MARKET_FEATURES), (calm, doubled)  # p-values
    assert "volatility" in (tmp_path / "report.html").read_text()
    # No market state on one side (screenshots only; a reference built before it was kept): no such column.
    assert not set(MARKET_FEATURES) & set(scores(None))
    old = ref_lib.Reference(table, embeddings, reference.info)
    assert not set(MARKET_FEATURES) & set(scores(2 * state, old))
