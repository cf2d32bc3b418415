"""Monitoring assets (group `monitoring`): the drift reference of the promoted model, the weekly drift report and
the hourly drift alert check, their WARN checks, jobs, schedules, and the sensor that rebuilds the reference when
the promoted model changes (a promotion or a rollback)."""

import dataclasses
import json
import os
import tempfile
import typing
from pathlib import Path

import pandas as pd
import yaml
from dagster import (
    AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, AssetSelection, Config,
    ConfigurableResource, DagsterInvalidDefinitionError, DataVersion, DefaultScheduleStatus, DefaultSensorStatus,
    MaterializeResult, MetadataValue, RunRequest, ScheduleEvaluationContext, SkipReason, WeeklyPartitionsDefinition,
    asset, define_asset_job, schedule, sensor,
)
from pydantic import Field, create_model

from vlm_assets import evaluation as ev
from vlm_assets import promotion
from vlm_assets.monitoring import alerts as al
from vlm_assets.monitoring import drift
from vlm_assets.monitoring import reference as ref_lib
from vlm_assets.monitoring import report
from vlm_assets.pipeline import metadata as md
from vlm_assets.pipeline.artifacts import load_bars, write_version
from vlm_assets.pipeline.model import dataset_windows
from vlm_assets.pipeline.serving import _test_split, promoted_model
from vlm_assets.serving.config import ServingConfig
from vlm_assets.storage import ArtifactStore
from vlm_assets.versioning import content_hash
from vlm_resources import ArtifactStoreResource, ComputeResource

MONITORING_GROUP = "monitoring"
REFERENCE_CODE_VERSION = "2"  # 2: the market state of every reference chart's bars
REPORT_CODE_VERSION = "2"  # 2: market_psi
ALERT_CODE_VERSION = "2"  # 2: market_psi
WARN = AssetCheckSeverity.WARN
# Weeks run Monday 00:00 to Monday 00:00 UTC; the report runs at 01:00 UTC on the Monday after, before any session.
WEEKLY = WeeklyPartitionsDefinition(start_date="2026-01-05", day_offset=1)
REPORT_HOUR_UTC = 1
# The fast check's cadence (a cron string, UTC): hourly unless CANDLE_VLM_DRIFT_ALERT_CRON says otherwise.
ALERT_CRON = os.environ.get("CANDLE_VLM_DRIFT_ALERT_CRON", "0 * * * *")
# A YAML run-config file whose ops.drift_report.config and ops.drift_alert_check.config the scheduled runs use.
MONITORING_CONFIG_ENV = "CANDLE_VLM_MONITORING_CONFIG"


def _serving() -> ServingConfig:
    return ServingConfig.from_env()


class MonitoringResource(ConfigurableResource):
    """The service's prediction log, where alerts and spot-check scorings go, and which promoted model is watched.
    Defaults follow the service's CANDLE_VLM_* settings, so both read and write the same places."""

    prediction_log: str = Field(default_factory=lambda: _serving().log_directory,
                                description="the service's prediction log (CANDLE_VLM_PREDICTION_LOG, else "
                                "<CANDLE_VLM_ARTIFACT_ROOT>/predictions); local disk")
    state_dir: str = Field(default_factory=lambda: os.environ.get("CANDLE_VLM_MONITORING_DIR")
                           or os.path.join(_serving().artifact_root, "monitoring"),
                           description="alerts.jsonl and spot_checks.jsonl (CANDLE_VLM_MONITORING_DIR); local disk")
    webhook_url: str = Field(default_factory=lambda: os.environ.get("CANDLE_VLM_ALERT_WEBHOOK", ""),
                             description="alerts are POSTed here as JSON when set (CANDLE_VLM_ALERT_WEBHOOK)")
    webhook_timeout: float = Field(default=5.0, description="seconds before a webhook post is given up (and logged)")
    model_name: str = Field(default=promotion.MODEL_NAME, description="the promoted model watched")
    encoder: str = Field(default_factory=lambda: _serving().encoder,
                         description="image-encoder backend, as the service's CANDLE_VLM_ENCODER (auto: the bundle's)")

    def alerts(self) -> al.JsonlLog:
        return al.JsonlLog(Path(self.state_dir) / "alerts.jsonl")

    def spot_checks(self) -> al.JsonlLog:
        return al.JsonlLog(Path(self.state_dir) / "spot_checks.jsonl")

    def promoted(self):
        model = promotion.promoted(self.model_name)
        if model is None:
            raise ValueError(f"model_name: no {self.model_name} model is promoted; materialize promoted_model first")
        return model


def settings_config(name: str, settings, base: type[Config] = Config) -> type[Config]:
    """A Config class with the fields, defaults and descriptions (field metadata "doc") of a library settings
    dataclass, so they are declared once, in the library; fields without a plain default (nested settings) are
    left to `base`."""
    hints = typing.get_type_hints(settings)
    declared = {item.name: (hints[item.name], Field(default=item.default, description=item.metadata.get("doc")))
                for item in dataclasses.fields(settings) if item.default is not dataclasses.MISSING}
    return create_model(name, __base__=base, __module__=__name__, __doc__=settings.__doc__, **declared)


ThresholdsConfig = settings_config("ThresholdsConfig", drift.Thresholds)
MinimumsConfig = settings_config("MinimumsConfig", drift.Minimums)


class ReferenceConfig(Config):
    per_timeframe: int = Field(default=500, description="charts per timeframe, from the test split's time blocks")
    timeframes: list[str] = Field(default_factory=list, description="timeframes covered (empty: the dataset's)")
    seed: int = 0
    session_timezone: str = Field(default="America/New_York", description="the exchange's time zone: requests are "
                                  "matched to reference charts of the same session hour (empty: timeframe only)")
    session_open: str = Field(default="09:30", description="the session's opening time (exchange time, HH:MM)")
    session_minutes: int = Field(default=390, description="the session's length in minutes")

    def session(self) -> dict:
        if not self.session_timezone:
            return {}
        session = ref_lib.Session(self.session_timezone, self.session_open, self.session_minutes)
        return {"session": dataclasses.asdict(session)}


class JudgedConfig(Config):
    """What a window of the log is judged by: the warn thresholds and the least data for each statistic."""

    thresholds: ThresholdsConfig = Field(default_factory=ThresholdsConfig)
    minimums: MinimumsConfig = Field(default_factory=MinimumsConfig)

    def judged_by(self) -> dict:
        return {"thresholds": drift.Thresholds(**self.thresholds.model_dump()),
                "minimums": drift.Minimums(**self.minimums.model_dump())}


class DriftReportConfig(JudgedConfig):
    evidently_rows: int = Field(default=1000, description="charts per side in the Evidently report (its t-SNE plot "
                                "takes about a minute at 2 x 2,500 on 2 cores); 0: no Evidently report")
    seed: int = 0


class AlertCheckConfig(settings_config("FastCheckConfig", al.FastCheckSettings, JudgedConfig)):
    as_of: str = Field(default="", description="evaluate as at this UTC time (ISO 8601) instead of the schedule "
                       "tick or now: backfills and replays")

    def settings(self) -> al.FastCheckSettings:
        return al.FastCheckSettings(**self.model_dump(exclude={"as_of", "thresholds", "minimums"}),
                                    **self.judged_by())


# ---- shared ------------------------------------------------------------------------------------------------

def _predictor(model, monitoring: MonitoringResource, compute: ComputeResource):
    """The bundle as the service runs it (the same image-encoder backend), and why that backend."""
    from vlm_assets.serving.encoders import resolve_encoder
    from vlm_assets.serving.predictor import Predictor

    manifest = json.loads(Path(model.path, "bundle.json").read_text())
    device = compute.resolved_device()
    backend, why = resolve_encoder(model.path, manifest, monitoring.encoder, device)
    return Predictor(model.path, device, str(model.tag), backend, compute.threads), why


def load_reference(artifacts: ArtifactStore) -> ref_lib.Reference:
    version = artifacts.current_version("embedding_reference")
    return ref_lib.Reference.from_files({name: artifacts.read_bytes(f"embedding_reference/{version}/{name}")
                                         for name in ("reference.parquet", "reference.json")})


def _spot_check_split(artifacts: ArtifactStore, window_ids: list[str]) -> promotion.TestSplit:
    """The fixed spot-check set: the test windows the reference recorded, in its order."""
    split = _test_split(artifacts)
    position = {w: i for i, w in enumerate(split.windows["window_id"])}
    missing = [w for w in window_ids if w not in position]
    if missing:
        raise ValueError(f"spot_check: {len(missing)} of its windows (e.g. {missing[0]}) are not in the current "
                         "dataset's test split; materialize embedding_reference for the current model")
    rows = [position[w] for w in window_ids]
    return promotion.TestSplit(split.windows.iloc[rows].reset_index(drop=True), [split.pngs[i] for i in rows],
                               split.features.iloc[rows].reset_index(drop=True), split.truth[rows])


def score_spot_check(artifacts: ArtifactStore, reference: ref_lib.Reference, monitoring: MonitoringResource,
                     compute: ComputeResource, now: pd.Timestamp, source: str) -> dict | None:
    """Re-score the spot-check set with the promoted model, as served; append the scoring to the history. None when
    the promoted model is not the reference's: its recall is not comparable with the reference's baseline (the
    reference_model metric flags that until the sensor has rebuilt the reference)."""
    model = monitoring.promoted()
    if str(model.tag) != reference.model:
        return None
    compute.apply_threads()
    predictor, _ = _predictor(model, monitoring, compute)
    baseline = reference.info["spot_check"]
    split = _spot_check_split(artifacts, baseline["window_ids"])
    scored = ref_lib.spot_check(predictor, split.pngs, split.features, split.truth)
    entry = {"time": now.isoformat(), "model": reference.model, "scored_with": str(model.tag),
             "encoder": predictor.backend, "source": source, "macro_recall": scored["macro_recall"],
             "recall": scored["recall"], "windows": scored["windows"],
             "baseline_macro_recall": baseline["macro_recall"], "baseline_recall": baseline["recall"]}
    monitoring.spot_checks().append([ev.to_jsonable(entry)])
    return entry


def _metrics_rows(metrics: dict) -> pd.DataFrame:
    return pd.DataFrame([{"metric": name, "value": m["value"] if isinstance(m["value"], (int, float)) else None,
                          "threshold": m["threshold"] if isinstance(m["threshold"], (int, float)) else None,
                          "breached": m["breached"], "detail": al.describe(name, m)} for name, m in metrics.items()])


def _json(document: dict) -> bytes:
    return json.dumps(ev.to_jsonable(document), indent=2, sort_keys=True, allow_nan=False).encode()


# ---- embedding_reference -------------------------------------------------------------------------------------

@asset(group_name=MONITORING_GROUP, code_version=REFERENCE_CODE_VERSION, deps=[promoted_model], kinds={"numpy"})
def embedding_reference(context: AssetExecutionContext, config: ReferenceConfig, store: ArtifactStoreResource,
                        compute: ComputeResource, monitoring: MonitoringResource) -> MaterializeResult:
    """Charts of the test split's time blocks replayed through the promoted bundle one request at a time, as the
    service answers them: embeddings (centroid, cosine variance), fused and image-only probabilities and serving
    latency per timeframe, and the spot-check set's recall at promotion. Rebuilt for every promoted model (the
    sensor `reference_follows_promoted_model` requests it)."""
    artifacts = store.store()
    compute.apply_threads()
    model = monitoring.promoted()
    predictor, why = _predictor(model, monitoring, compute)
    settings = artifacts.read_json(f"chart_images/{artifacts.current_version('chart_images')}/settings.json")
    timeframes = tuple(config.timeframes or settings["sampling"]["timeframes"])
    sampling = ref_lib.ReferenceSampling(config.per_timeframe, timeframes, config.seed)
    charts = ref_lib.test_period_windows(load_bars(artifacts, timeframes),
                                         dataset_windows(artifacts, ["symbol", "block", "split"]),
                                         settings["sampling"]["block_days"], predictor.render_bars, sampling)
    split = _test_split(artifacts)
    baseline = ref_lib.spot_check(predictor, split.pngs, split.features, split.truth)
    context.log.info(f"spot-check set: {baseline['windows']} test windows, macro recall {baseline['macro_recall']:.4f}")
    info = {"model": str(model.tag), "bundle_id": predictor.manifest["bundle_id"], "encoder": predictor.backend,
            "encoder_reason": why, "dataset_version": artifacts.current_version("vlm_dataset"),
            "sampling": dataclasses.asdict(sampling), "chart_bars": predictor.render_bars,
            "spot_check": baseline | {"window_ids": split.windows["window_id"].tolist()}} | config.session()
    reference = ref_lib.replay(predictor, charts, info, md.Progress(context.log, "reference charts", len(charts)))
    version = write_version(artifacts, "embedding_reference", reference.to_files())
    table = reference.table
    per_timeframe = table.groupby("timeframe").agg(charts=("latency_ms", "size"),
                                                   latency_p50_ms=("latency_ms", "median"),
                                                   latency_p95_ms=("latency_ms", lambda x: x.quantile(0.95)))
    recall = pd.DataFrame({"baseline_recall": baseline["recall"]})
    return MaterializeResult(
        metadata={"model_tag": reference.model, "encoder": predictor.backend, "encoder_reason": why,
                  "charts": len(table), "centroid_norm": MetadataValue.float(reference.info["centroid_norm"]),
                  "cosine_variance": MetadataValue.float(reference.info["cosine_variance"]),
                  "latency_p95_ms": MetadataValue.float(reference.info["latency_ms"]["p95"]),
                  "spot_check_macro_recall": MetadataValue.float(baseline["macro_recall"]),
                  "per_timeframe": md.table(per_timeframe, index_name="timeframe"),
                  "spot_check_recall": md.table(recall, index_name="pattern"),
                  "latency": md.plot_markdown(report.histogram_figure(
                      {"reference requests": table["latency_ms"]}, "Serving latency at promotion (ms)", "ms"),
                      "reference latency"),
                  "path": MetadataValue.path(str(artifacts.path("embedding_reference", version)))},
        data_version=DataVersion(version))


# ---- WARN checks, evaluated by drift_report and drift_alert_check from the statistics they just computed --------

CHECKED_METRICS = {
    "centroid_shift": "embedding centroid shift ||mu_t - mu_ref|| / ||mu_ref||",
    "cosine_variance_increase": "increase of the variance of cosine similarity to the reference centroid",
    "prediction_psi": "prediction distribution shift (PSI) of every trained pattern, per input kind",
    "market_psi": "market-state shift (PSI of log volatility and log range over price) of requests with bars",
    "latency_p95_ratio": "logged P95 latency over the baseline at promotion",
    "recall_drop": "spot-check macro recall drop from the baseline at promotion",
}
STALE_CHECK = "reference_describes_served_model"


def _check_specs(asset_name: str, stale: bool = False) -> list[AssetCheckSpec]:
    specs = [AssetCheckSpec(f"{metric}_within_threshold", asset=asset_name,
                            description=f"WARN when the {what} crosses its threshold (config)")
             for metric, what in CHECKED_METRICS.items()]
    specs.append(AssetCheckSpec("enough_data", asset=asset_name, description="WARN when the window held too few "
                                "distinct charts of the watched model to measure drift"))
    if stale:
        specs.append(AssetCheckSpec(STALE_CHECK, asset=asset_name, description="WARN when the service answers with "
                                    "a model the reference does not describe (rebuild embedding_reference)"))
    return specs


def _check_results(document: dict, stale: bool = False) -> list[AssetCheckResult]:
    results = []
    for metric in CHECKED_METRICS:
        measured = document["metrics"][metric]
        value = MetadataValue.float(measured["value"]) if measured["value"] is not None else "not enough data"
        results.append(AssetCheckResult(
            check_name=f"{metric}_within_threshold", passed=not measured["breached"], severity=WARN,
            metadata={"value": value, "threshold": MetadataValue.float(measured["threshold"]),
                      "detail": al.describe(metric, measured)}))
    results.append(AssetCheckResult(check_name="enough_data", passed=document["embedding"]["sufficient"],
                                    severity=WARN, metadata={"records": document["records"],
                                                             "distinct_charts": document["charts"]}))
    if stale:
        measured = document["metrics"][al.STALE]
        results.append(AssetCheckResult(check_name=STALE_CHECK, passed=not measured["breached"], severity=WARN,
                                        metadata={"served": str(measured["value"]),
                                                  "reference": measured["threshold"]}))
    return results


# ---- drift_report (weekly) -----------------------------------------------------------------------------------

@asset(group_name=MONITORING_GROUP, code_version=REPORT_CODE_VERSION, deps=[embedding_reference],
       partitions_def=WEEKLY, kinds={"evidently"}, check_specs=_check_specs("drift_report"))
def drift_report(context: AssetExecutionContext, config: DriftReportConfig, store: ArtifactStoreResource,
                 compute: ComputeResource, monitoring: MonitoringResource) -> MaterializeResult:
    """The week's prediction log against the reference: centroid shift, cosine variance, prediction shift per pattern,
    latency P95, the spot-check recall over the week's scorings, day by day; a metrics JSON and an Evidently HTML
    report. WARN checks flag every threshold (config)."""
    artifacts = store.store()
    key = context.partition_key
    start, end = (pd.Timestamp(t).tz_convert("UTC") for t in context.partition_time_window)
    judged = config.judged_by()
    thresholds, minimums = judged["thresholds"], judged["minimums"]
    reference = load_reference(artifacts)
    logged = al.read_window(monitoring.prediction_log, start, end)
    ours = logged.model_version == reference.model if len(logged) else []
    window = logged.select(ours) if len(logged) else logged
    result = drift.drift_metrics(reference, window, thresholds, minimums)
    scorings = [e for e in monitoring.spot_checks().read()
                if e["model"] == reference.model and start <= al.utc(e["time"]) < end]
    if not scorings:  # none during the week (the fast check did not run): score now, so the report is never blind
        scored = score_spot_check(artifacts, reference, monitoring, compute, pd.Timestamp.now("UTC"), "drift_report")
        scorings = [scored] if scored is not None else []
    result["metrics"]["recall_drop"] = drift.recall_metric(scorings, thresholds.recall_drop)
    days = report.daily(reference, window, thresholds, minimums)
    other = pd.Series(logged.model_version[~pd.Series(ours, dtype=bool).to_numpy()], dtype=object)
    result |= {"partition": key, "start": start.isoformat(), "end": end.isoformat(), "model": reference.model,
               "thresholds": dataclasses.asdict(thresholds), "minimums": dataclasses.asdict(minimums),
               "other_models": other.value_counts().to_dict(), "daily": days,
               "spot_checks": [{k: e[k] for k in ("time", "macro_recall", "scored_with", "source")} for e in scorings]}
    files = {}
    if result["embedding"]["sufficient"] and config.evidently_rows > 0:
        with tempfile.TemporaryDirectory(prefix="drift-report-") as scratch:
            html = Path(scratch) / "report.html"
            result["evidently"] = report.evidently_report(reference, window, str(html), config.evidently_rows,
                                                          config.seed)
            files["report.html"] = html.read_bytes()
    else:
        result["evidently"] = None
        if config.evidently_rows > 0:
            context.log.warning(f"{key}: {result['charts']} distinct charts of {reference.model} logged; the "
                                f"Evidently report needs {minimums.charts}")
    files["metrics.json"] = _json(result)
    version = write_version(artifacts, f"drift_report/{key}", files)
    folder = artifacts.path("drift_report", key, version)
    meta = {"model_tag": reference.model, "records": len(window), "charts": result["charts"],
            "other_model_records": int(len(other)),
            "metrics": md.table(_metrics_rows(result["metrics"])),
            "daily": md.table(days) if len(days) else "no records",
            "metrics_json": MetadataValue.path(str(folder / "metrics.json"))}
    if "report.html" in files:
        meta |= {"evidently_report": MetadataValue.path(str(folder / "report.html")),
                 "evidently_report_url": MetadataValue.url(f"file://{folder / 'report.html'}"),
                 "embedding_drift_score": MetadataValue.float(result["evidently"]["embedding_drift_score"])}
    if len(days):
        meta["daily_plot"] = md.plot_markdown(report.daily_figure(days, thresholds), "drift per day", height=800)
    if result["latency"]["sufficient"]:
        meta["latency_histogram"] = md.plot_markdown(report.latency_figure(window, reference), "latency histogram")
    if any(part["sufficient"] for part in result["predictions"].values()):
        meta["prediction_shift"] = md.plot_markdown(report.psi_figure(result["predictions"],
                                                                      thresholds.prediction_psi), "PSI per pattern")
    return MaterializeResult(metadata=meta, data_version=DataVersion(content_hash(files["metrics.json"])),
                             check_results=_check_results(result))


# ---- drift_alert_check (hourly) ------------------------------------------------------------------------------

def _now(config: AlertCheckConfig) -> pd.Timestamp:
    """`as_of` (the schedule sets it to its tick), else now."""
    if not config.as_of:
        return pd.Timestamp.now("UTC")
    try:
        return al.utc(config.as_of)
    except ValueError:
        raise ValueError(f"as_of: {config.as_of!r} is not an ISO 8601 time") from None


@asset(group_name=MONITORING_GROUP, code_version=ALERT_CODE_VERSION, deps=[embedding_reference], kinds={"python"},
       check_specs=_check_specs("drift_alert_check", stale=True))
def drift_alert_check(context: AssetExecutionContext, config: AlertCheckConfig, store: ArtifactStoreResource,
                      compute: ComputeResource, monitoring: MonitoringResource) -> MaterializeResult:
    """The fast check: the latest window of the prediction log against the reference, on the schedule's cadence
    (hourly by default). A metric that starts breaching its threshold raises an alert (alerts log, and the webhook
    when one is set), a persisting breach is re-sent every `renotify_hours`, a recovery is sent as resolved. The
    spot-check set is re-scored when its last scoring is older than `spot_check_hours`."""
    artifacts = store.store()
    settings = config.settings()
    now = _now(config)
    reference = load_reference(artifacts)
    history = [e for e in monitoring.spot_checks().read() if e["model"] == reference.model and al.utc(e["time"]) <= now]
    if not history or now - al.utc(history[-1]["time"]) >= pd.Timedelta(hours=settings.spot_check_hours):
        scored = score_spot_check(artifacts, reference, monitoring, compute, now, "drift_alert_check")
        history += [scored] if scored is not None else []
    result = al.fast_check(reference, monitoring.prediction_log, now, settings, history)
    alerts = monitoring.alerts()
    events = al.alert_events(result, al.open_alerts(alerts.read(), reference.model), now, settings.renotify_hours,
                             "drift_alert_check")
    events = al.notify(alerts, events, monitoring.webhook_url, monitoring.webhook_timeout)
    for event in events:
        context.log.warning(f"drift {event['event']}: {event['detail']} ({event['webhook']})")
    result |= {"thresholds": dataclasses.asdict(settings.thresholds), "events": events,
               "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "thresholds"}}
    document = _json(result)
    version = write_version(artifacts, "drift_alert_check", {"status.json": document})
    breached = [name for name, m in result["metrics"].items() if m["breached"]]
    return MaterializeResult(
        metadata={"as_of": now.isoformat(), "model_tag": reference.model, "records": result["records"],
                  "charts": result["charts"], "window_from": str(result["from"]), "window_to": str(result["to"]),
                  "breached": ", ".join(breached) or "none",
                  "metrics": md.table(_metrics_rows(result["metrics"])),
                  "events": md.table(pd.DataFrame(events)[["event", "metric", "detail", "webhook"]]) if events
                  else "none",
                  "against_thresholds": md.plot_markdown(report.metrics_figure(result["metrics"]), "metrics"),
                  "alerts_log": MetadataValue.path(str(alerts.path)),
                  "path": MetadataValue.path(str(artifacts.path("drift_alert_check", version)))},
        data_version=DataVersion(version), check_results=_check_results(result, stale=True))


# ---- jobs, schedules, sensor ---------------------------------------------------------------------------------

embedding_reference_job = define_asset_job("embedding_reference_job", AssetSelection.assets(embedding_reference),
                                           description="Rebuild the drift reference for the promoted model.")
drift_report_job = define_asset_job("drift_report_job", AssetSelection.assets(drift_report),
                                    description="One week's drift report (metrics JSON + Evidently HTML).")
drift_alert_job = define_asset_job("drift_alert_job", AssetSelection.assets(drift_alert_check),
                                   description="The fast drift check over the latest window of the prediction log.")


def scheduled_config(op: str, **overrides) -> dict:
    """The run config of a scheduled run of `op`: `ops.<op>.config` of the YAML run-config file that
    CANDLE_VLM_MONITORING_CONFIG names (read at every tick, so edits apply to the next run), with `overrides`."""
    path = os.environ.get(MONITORING_CONFIG_ENV, "")
    config = {}
    if path:
        try:
            document = yaml.safe_load(Path(path).read_text()) or {}
            config = ((document.get("ops") or {}).get(op) or {}).get("config") or {}
        except (OSError, yaml.YAMLError, AttributeError) as error:
            raise ValueError(f"{MONITORING_CONFIG_ENV}={path!r}: cannot read ops.{op}.config ({error})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{MONITORING_CONFIG_ENV}={path!r}: ops.{op}.config must be a mapping, got "
                             f"{type(config).__name__}")
    return {"ops": {op: {"config": config | overrides}}}


def _without_reference(store: ArtifactStoreResource) -> SkipReason | None:
    try:
        store.store().current_version("embedding_reference")
    except FileNotFoundError:
        return SkipReason("no embedding_reference yet: run the main job (or embedding_reference_job) after a "
                          "promotion")
    return None


@schedule(name="weekly_drift_report", job=drift_report_job, cron_schedule=f"0 {REPORT_HOUR_UTC} * * 1",
          execution_timezone="UTC", default_status=DefaultScheduleStatus.RUNNING,
          description="The week that just ended (Monday to Monday, UTC), every Monday at 01:00 UTC.")
def weekly_drift_report(context: ScheduleEvaluationContext, store: ArtifactStoreResource):
    key = WEEKLY.get_partition_keys(current_time=context.scheduled_execution_time)[-1]
    return _without_reference(store) or RunRequest(run_key=key, partition_key=key,
                                                   run_config=scheduled_config("drift_report"))


def _drift_alert_tick(context: ScheduleEvaluationContext, store: ArtifactStoreResource):
    tick = pd.Timestamp(context.scheduled_execution_time).tz_convert("UTC")
    return _without_reference(store) or RunRequest(
        run_config=scheduled_config("drift_alert_check", as_of=tick.isoformat()))


try:
    drift_alert_schedule = schedule(
        name="drift_alert_schedule", job=drift_alert_job, cron_schedule=ALERT_CRON, execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
        description=f"The fast drift check at every tick of {ALERT_CRON!r} (UTC; CANDLE_VLM_DRIFT_ALERT_CRON, "
        "hourly by default), evaluated as at the tick.")(_drift_alert_tick)
except DagsterInvalidDefinitionError as error:
    raise ValueError(f"CANDLE_VLM_DRIFT_ALERT_CRON={ALERT_CRON!r}: {error}") from None


@sensor(job=embedding_reference_job, minimum_interval_seconds=300, default_status=DefaultSensorStatus.RUNNING,
        description="Requests embedding_reference when the promoted model (its :latest) is not the reference's.")
def reference_follows_promoted_model(store: ArtifactStoreResource, monitoring: MonitoringResource):
    model = promotion.promoted(monitoring.model_name)
    if model is None:
        return SkipReason(f"no {monitoring.model_name} model is promoted")
    artifacts = store.store()
    try:
        current = load_reference(artifacts).model
    except FileNotFoundError:
        current = None
    if current == str(model.tag):
        return SkipReason(f"the reference describes {current}")
    return RunRequest(run_key=str(model.tag), tags={"reason": f"promoted {model.tag}, reference of {current}"})


MONITORING_ASSETS = [embedding_reference, drift_report, drift_alert_check]
MONITORING_CHECK_KEYS = [key for asset_def in MONITORING_ASSETS for key in asset_def.check_keys]  # in the assets
MONITORING_JOBS = [embedding_reference_job, drift_report_job, drift_alert_job]
MONITORING_SCHEDULES = [weekly_drift_report, drift_alert_schedule]
MONITORING_SENSORS = [reference_follows_promoted_model]

