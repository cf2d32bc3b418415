"""Shared by the benchmarks: the machine the numbers were measured on, and step timings of a Dagster run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import NamedTuple

PACKAGES = ("numpy", "pandas", "pillow", "torch", "plotly", "kaleido", "dagster")


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine_info(pinning: str | None = None) -> dict:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if pinning is not None:
        info["pinning"] = pinning
    for package in PACKAGES:
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def step_seconds(instance, run_id: str) -> dict[str, float]:
    """Wall time per step of a run, from the instance's event log (STEP_START to STEP_SUCCESS)."""
    steps, starts = {}, {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type_value == "STEP_START":
            starts[event.step_key] = entry.timestamp
        elif event.event_type_value == "STEP_SUCCESS" and event.step_key in starts:
            steps[event.step_key] = entry.timestamp - starts[event.step_key]
    return steps


def check_outcomes(result) -> dict[str, bool]:
    return {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`bentoml serve bento.service:CandleVLM` in a subprocess on a free loopback port; a context manager that waits
    for /readyz and stops the server (and its workers) on exit. `env` adds CANDLE_VLM_* / BENTOML_HOME settings."""

    def __init__(self, env: dict | None = None, timeout: float = 180.0, log_path: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
        self.timeout = timeout
        self.log_path = log_path
        self.process = None

    def __enter__(self) -> "Server":
        import subprocess
        import sys
        import time
        import urllib.request

        root = Path(__file__).resolve().parents[1]
        bentoml = str(Path(sys.executable).with_name("bentoml"))
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen([bentoml, "serve", "bento.service:CandleVLM", "--host", "127.0.0.1",
                                         "--port", str(self.port)], cwd=root, env=self.env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"bentoml serve was not ready within {self.timeout:.0f} s (log: {self.log_path})")

    def __exit__(self, *exc) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except Exception:  # noqa: BLE001  a server that ignores SIGTERM is killed
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.log_path and hasattr(self._log, "close"):
            self._log.close()


def worker_pids(server_pid: int) -> list[int]:
    """The processes under a server's (its workers): a restarted worker comes back under a new pid."""
    import psutil

    return sorted(p.pid for p in psutil.Process(server_pid).children(recursive=True))


def synthetic_bars(n: int = 100, seed: int = 0) -> list[dict]:
    """A seeded random walk of n 5-minute bars as /predict/patterns takes them."""
    import datetime as dt

    import numpy as np

    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    opens = np.r_[close[0], close[:-1]]
    start = dt.datetime(2026, 1, 5, 14, 30, tzinfo=dt.timezone.utc)
    return [{"timestamp": (start + dt.timedelta(minutes=5 * i)).isoformat(), "open": float(o), "close": float(c),
             "high": float(max(o, c) * (1 + rng.uniform(0, 0.002))), "low": float(min(o, c) * (1 - rng.uniform(0, 0.002))),
             "volume": float(rng.integers(500, 5000))} for i, (o, c) in enumerate(zip(opens, close))]


def png_base64(image) -> str:
    """A PIL image as the base64 PNG the service's `image_base64` fields take."""
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class BadRequest(NamedTuple):
    """A request the service must refuse with `status` and a message containing `message`."""

    name: str
    path: str
    body: bytes | None  # None: a GET
    status: int
    message: str


def bad_requests(bars: list[dict]) -> list[BadRequest]:
    """The bad-input set: every refusal the service promises (issue 5), built around good `bars` and a good chart.
    bench/serve.py sends it over HTTP under load and counts 5xx answers and worker restarts; tests/test_serving.py
    sends it once and checks each status and message."""
    import base64
    import json

    from PIL import Image

    chart = png_base64(Image.new("RGB", (224, 224), "white"))

    def predict(**fields) -> bytes:
        return json.dumps({"symbol": "ACME", "timeframe": "5m", **fields}).encode()

    def changed(index: int, **fields) -> list[dict]:
        return [dict(b, **fields) if i == index else b for i, b in enumerate(bars)]

    def shuffled(i: int, j: int) -> list[dict]:
        out = [dict(b) for b in bars]
        out[i]["timestamp"], out[j]["timestamp"] = out[j]["timestamp"], out[i]["timestamp"]
        return out

    high = bars[9]["high"]
    cases = [
        ("OHLC broken", "/predict/patterns", predict(bars=changed(9, low=high + 1)), 400, "bar 10:"),
        ("negative price", "/predict/patterns", predict(bars=changed(3, low=-1.0)), 400, "bar 4:"),
        ("zero price", "/predict/patterns", predict(bars=changed(5, open=0.0, low=0.0)), 400, "bar 6:"),
        ("infinite price", "/predict/patterns",
         predict(bars=changed(2, close=1e309)).replace(b"Infinity", b"1e999"), 400, "bar 3:"),
        ("timestamps out of order", "/predict/patterns", predict(bars=shuffled(20, 21)), 400, "bar 22:"),
        ("repeated timestamp", "/predict/patterns",
         predict(bars=changed(30, timestamp=bars[29]["timestamp"])), 400, "bar 31:"),
        ("mixed timestamp kinds", "/predict/patterns", predict(bars=changed(0, timestamp=1767623400)), 400,
         "the same kind for every bar"),
        ("unreadable timestamp", "/predict/patterns", predict(bars=changed(7, timestamp="yesterday")), 400,
         "timestamp"),
        ("price not a number", "/predict/patterns", predict(bars=changed(4, high="x")), 400, "validation error"),
        ("bar missing a field", "/predict/patterns", predict(bars=[{"open": 1.0}] * 30), 400, "validation error"),
        ("bars not a list", "/predict/patterns", predict(bars={"open": 1.0}), 400, "validation error"),
        ("too few bars", "/predict/patterns", predict(bars=bars[:5]), 400, "5 bars given"),
        ("too many bars", "/predict/patterns", predict(bars=(bars * (2001 // len(bars) + 1))[:2001]), 413,
         "2001 bars given"),
        ("unknown timeframe", "/predict/patterns", predict(timeframe="2m", bars=bars), 400, "timeframe '2m' is unknown"),
        ("symbol not a ticker", "/predict/patterns", predict(symbol="DROP TABLE;", bars=bars), 400, "not a ticker"),
        ("bars and image", "/predict/patterns", predict(bars=bars, image_base64=chart), 400, "not both"),
        ("neither bars nor image", "/predict/patterns", predict(), 400, "exactly one of bars or image_base64"),
        ("base64 broken", "/predict/patterns", predict(image_base64="%%%"), 400, "not valid base64"),
        ("not an image", "/predict/patterns",
         predict(image_base64=base64.b64encode(b"GIF89a but not really").decode()), 400, "not a readable image"),
        ("image too many bytes", "/predict/patterns",
         predict(image_base64=base64.b64encode(bytes(4_000_001)).decode()), 413, "bytes"),
        ("decompression bomb", "/predict/patterns",
         predict(image_base64=png_base64(Image.new("1", (20_000, 20_000)))), 413, "more pixels than the"),
        ("too many patterns", "/predict/patterns", predict(bars=bars, patterns=[f"p{i}" for i in range(40)]), 413,
         "at most 32"),
        ("repeated pattern", "/predict/patterns", predict(bars=bars, patterns=["hammer", "hammer"]), 400,
         "repeats patterns[0]"),
        ("empty pattern", "/predict/patterns", predict(bars=bars, patterns=[""]), 400, "patterns[0]"),
        ("prompt too long", "/query/zero_shot", json.dumps({"image_base64": chart, "prompts": ["a" * 300]}).encode(),
         413, "at most 200"),
        ("repeated prompt", "/query/zero_shot", json.dumps({"image_base64": chart, "prompts": ["a doji"] * 2}).encode(),
         400, "repeats prompts[0]"),
        ("no prompts", "/query/zero_shot", json.dumps({"image_base64": chart, "prompts": []}).encode(), 400, "prompts"),
        ("zero-shot without image", "/query/zero_shot", json.dumps({"prompts": ["a doji"]}).encode(), 400,
         "validation error"),
        ("body not JSON", "/predict/patterns", b"{this is not json", 400, "error"),
        ("empty body", "/predict/patterns", b"", 400, "error"),
        ("lookback too long", "/embeddings?symbol=AAA&timeframe=5m&lookback=5000", None, 400, "lookback 5000"),
        ("lookback not a number", "/embeddings?symbol=AAA&timeframe=5m&lookback=ten", None, 400, "not an integer"),
        ("unknown symbol", "/embeddings?symbol=ZZZ&timeframe=5m&lookback=60", None, 404, "no bars for symbol 'ZZZ'"),
        ("embeddings without symbol", "/embeddings?timeframe=5m", None, 400, "not a ticker"),
    ]
    return [BadRequest(*case) for case in cases]
