"""Shared by the benchmarks: the machine the numbers were measured on, and step timings of a Dagster run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

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
