"""The fast drift check and its alerts.

`fast_check` evaluates the latest records of the prediction log (the last `window_records` answers of the reference's
model, at most `lookback_hours` old) against the reference; `alert_events` turns breaches into alerts: one when a
metric starts breaching, a reminder every `renotify_hours` while it stays breached, and a `resolved` event when it
is measured within its threshold again. Events go to an append-only JSONL alerts log and, when a webhook URL is
set, are posted to it as one JSON message per check (a `text` summary, as Slack-style webhooks expect, and the
events); a webhook that fails is logged and recorded in the events, never raised.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vlm_assets.monitoring.drift import (
    LogWindow, Minimums, Thresholds, doc, drift_metrics, recall_metric, require_numbers,
)
from vlm_assets.monitoring.reference import Reference
from vlm_assets.serving.prediction_log import read_predictions

log = logging.getLogger(__name__)

STALE = "reference_model"  # the service answers with a model the reference does not describe


class JsonlLog:
    """An append-only JSON-lines file shared by concurrent writers: each append is one write under an exclusive
    lock, fsynced; a torn last line (a crash mid-write) is skipped by `read`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records).encode()
        with open(self.path, "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_bytes().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


def utc(moment) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def read_window(root: str | os.PathLike, start, end, model: str | None = None) -> LogWindow:
    """Records with start <= time < end (UTC), read one log day at a time so only arrays are held, of `model` only
    when given."""
    start, end = utc(start), utc(end)
    parts, day = [], start.normalize()
    while day < end:
        part = LogWindow.from_records(read_predictions(root, max(day, start), min(day + pd.Timedelta(days=1), end)))
        parts.append(part if model is None or not len(part) else part.select(part.model_version == model))
        day += pd.Timedelta(days=1)
    return LogWindow.concat(parts)


def latest_window(root: str | os.PathLike, now, records: int, lookback_hours: float) -> LogWindow:
    """The last `records` records before `now` and at most `lookback_hours` old, all models (newest day first, so
    an hourly check reads a day or two, not the whole lookback)."""
    now = utc(now)
    oldest = now - pd.Timedelta(hours=lookback_hours)
    parts, count, day = [], 0, now.normalize()
    while count < records and day + pd.Timedelta(days=1) > oldest:
        part = read_window(root, max(day, oldest), min(day + pd.Timedelta(days=1), now))
        parts.insert(0, part)
        count += len(part)
        day -= pd.Timedelta(days=1)
    window = LogWindow.concat(parts)
    return window.select(np.arange(len(window)) >= len(window) - records) if len(window) > records else window


@dataclass(frozen=True)
class FastCheckSettings:
    window_records: int = doc(1000, "the latest answers of the watched model that are evaluated")
    lookback_hours: float = doc(96.0, "records older than this are not the latest window (96 h spans a long weekend)")
    renotify_hours: float = doc(24.0, "a persisting breach is sent again this often")
    spot_check_hours: float = doc(24.0, "re-score the spot-check set when its last scoring is this old")
    thresholds: Thresholds = field(default_factory=Thresholds)
    minimums: Minimums = field(default_factory=Minimums)

    def __post_init__(self):
        require_numbers(self, names=("window_records", "lookback_hours", "renotify_hours", "spot_check_hours"))
        if self.window_records < self.minimums.charts:
            raise ValueError(f"window_records ({self.window_records}) is below minimums.charts "
                             f"({self.minimums.charts}): the embedding statistics could never be computed")


def fast_check(reference: Reference, root: str | os.PathLike, now, settings: FastCheckSettings = FastCheckSettings(),
               spot_checks: list[dict] = ()) -> dict:
    """Metrics of the latest window of the log (the reference's model only) with verdicts; `spot_checks` are the
    spot-check scorings of the reference, oldest first (the latest one is judged)."""
    now = utc(now)
    recent = latest_window(root, now, settings.window_records, settings.lookback_hours)
    window = recent.select(recent.model_version == reference.model) if len(recent) else recent
    result = drift_metrics(reference, window, settings.thresholds, settings.minimums)
    result["metrics"]["recall_drop"] = recall_metric(list(spot_checks)[-1:], settings.thresholds.recall_drop)
    newest = str(recent.model_version[-1]) if len(recent) else None
    result["metrics"][STALE] = {"value": newest, "threshold": reference.model, "sufficient": newest is not None,
                                "breached": newest is not None and newest != reference.model}
    result |= {"now": now.isoformat(), "model": reference.model,
               "from": pd.Timestamp(window.time[0]).tz_localize("UTC").isoformat() if len(window) else None,
               "to": pd.Timestamp(window.time[-1]).tz_localize("UTC").isoformat() if len(window) else None}
    return result


def open_alerts(events: list[dict], model: str) -> dict[str, dict]:
    """The metrics of `model` alerting now: the last alert or reminder of each metric not resolved since."""
    state: dict[str, dict] = {}
    for event in events:
        if event.get("model") != model:
            continue
        if event["event"] == "resolved":
            state.pop(event["metric"], None)
        else:
            state[event["metric"]] = event
    return state


def alert_events(result: dict, previous: dict[str, dict], now, renotify_hours: float, source: str) -> list[dict]:
    """New events for a check's `result` given the metrics alerting before (`open_alerts`)."""
    now = utc(now)
    events = []
    for name, metric in result["metrics"].items():
        prior = previous.get(name)
        if metric["breached"]:
            if prior is not None and now - utc(prior["time"]) < pd.Timedelta(hours=renotify_hours):
                continue
            kind = "alert" if prior is None else "reminder"
        elif metric["sufficient"] and prior is not None:
            kind = "resolved"
        else:
            continue
        events.append({"time": now.isoformat(), "event": kind, "metric": name, "value": metric["value"],
                       "threshold": metric["threshold"], "model": result["model"], "source": source,
                       "records": result["records"], "window_from": result.get("from"),
                       "window_to": result.get("to"), "detail": describe(name, metric)})
    return events


def describe(name: str, metric: dict) -> str:
    if name == STALE:
        return f"the service answers with {metric['value']}, the reference describes {metric['threshold']}: " \
               "rebuild embedding_reference"
    if metric["value"] is None:
        return f"{name}: not enough data"
    worst = f" ({metric['worst']})" if metric.get("worst") else ""
    judged = f" (net of sampling noise {metric['judged']:.4g})" if "judged" in metric else ""
    comparison = ">=" if name == "recall_drop" else ">"
    verdict = comparison if metric["breached"] else "within"
    return f"{name}{worst} = {metric['value']:.4g}{judged} {verdict} {metric['threshold']:.4g}"


def post_webhook(url: str, events: list[dict], timeout: float = 5.0) -> str:
    """POST the events to `url`; returns what happened ("sent: HTTP 200" or "failed: ..."), never raises."""
    lines = [f"candle-vlm drift {e['event']}: {e['detail']} (model {e['model']}, {e['source']})" for e in events]
    body = json.dumps({"text": "\n".join(lines), "events": events}, allow_nan=False).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return f"sent: HTTP {response.status}"
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        log.warning("drift alert webhook %s failed: %s", url, error)
        return f"failed: {type(error).__name__}: {getattr(error, 'reason', error)}"


def notify(alerts: JsonlLog, events: list[dict], webhook_url: str = "", timeout: float = 5.0) -> list[dict]:
    """Post the events (when a webhook is set) and append them, with the webhook's outcome, to the alerts log."""
    if not events:
        return []
    outcome = post_webhook(webhook_url, events, timeout) if webhook_url else "no webhook configured"
    events = [e | {"webhook": outcome} for e in events]
    alerts.append(events)
    return events

