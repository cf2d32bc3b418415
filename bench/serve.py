"""HTTP benchmark of the inference service on loopback: latency and throughput of /predict/patterns.

    python bench/serve.py [--sequential 500] [--concurrency 1,4,16,32] [--requests 2000] [--bars 100]
                          [--bad-rounds 20] [--json out.json]

Starts `bentoml serve bento.service:CandleVLM` (the promoted model: `candle_vlm:latest` in $BENTOML_HOME, or
CANDLE_VLM_MODEL) on a free port, warms it up, then measures (1) sequential requests with 100 bars: median, P95,
P99 latency as the client sees it; (2) requests per second at each concurrency level; and reports the batch sizes
the server's adaptive batcher formed in each phase (from its /metrics); (3) the bad-input set
(`bench.common.bad_requests`: every refusal the service promises) --bad-rounds times, mixed with as many good
requests, 16 at a time: every answer's status, any case answered otherwise than promised, 5xx answers, and worker
restarts (the server's worker processes before and after). The server runs with the CANDLE_VLM_*
settings of the environment (e.g. CANDLE_VLM_WORKERS, CANDLE_VLM_ENCODER). The client (aiohttp) runs on the same
machine and shares its cores with the server, as it would for a co-located caller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

from bench.common import Server, bad_requests, machine_info, synthetic_bars, worker_pids  # noqa: E402


def batch_histogram(metrics: str) -> dict:
    """Per-bucket counts of the encoder's batch sizes (bucket upper bounds), their mean and the batch count."""
    buckets = {}
    for le, value in re.findall(r'candle_vlm_encode_batch_size_bucket\{le="([^"]+)"\} ([0-9.e+]+)', metrics):
        buckets[le] = buckets.get(le, 0.0) + float(value)
    total = sum(float(v) for v in re.findall(r"candle_vlm_encode_batch_size_sum ([0-9.e+]+)", metrics))
    count = sum(float(v) for v in re.findall(r"candle_vlm_encode_batch_size_count ([0-9.e+]+)", metrics))
    cumulative, previous = {}, 0.0
    for le in sorted(buckets, key=lambda b: float("inf") if b == "+Inf" else float(b)):
        cumulative[le] = int(buckets[le] - previous)
        previous = buckets[le]
    return {"batches": int(count), "mean_batch_size": total / count if count else 0.0,
            "batches_by_size_up_to": {k: v for k, v in cumulative.items() if v}}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (the server and its worker)."""
    import psutil

    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])


def formed(before: dict, after: dict) -> dict:
    """The batches formed between two /metrics snapshots: count, mean size, count per size bucket."""
    count = after["batches"] - before["batches"]
    items = after["mean_batch_size"] * after["batches"] - before["mean_batch_size"] * before["batches"]
    by_size = {k: v - before["batches_by_size_up_to"].get(k, 0) for k, v in after["batches_by_size_up_to"].items()}
    return {"batches": count, "mean_batch_size": items / count if count else 0.0,
            "batches_by_size_up_to": {k: v for k, v in by_size.items() if v}}


async def measure(url: str, payload: dict, sequential: int, concurrencies: list[int], requests: int,
                  server_pid: int) -> dict:
    import aiohttp

    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=max(concurrencies, default=1))
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> float:
            started = time.perf_counter()
            async with session.post(f"{url}/predict/patterns", data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
            return time.perf_counter() - started

        async def batches() -> dict:
            async with session.get(f"{url}/metrics") as response:
                return batch_histogram(await response.text())

        async def concurrent(concurrency: int) -> dict:
            queue = iter(range(requests))
            times: list = []

            async def worker():
                for _ in queue:
                    times.append(await one())

            before = await batches()
            server_cpu, client_cpu = tree_cpu_seconds(server_pid), time.process_time()
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            server_cpu, client_cpu = tree_cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
            latencies = np.array(times) * 1000
            return {"concurrency": concurrency, "requests": requests, "seconds": elapsed,
                    "requests_per_second": requests / elapsed, "p50_ms": float(np.percentile(latencies, 50)),
                    "p95_ms": float(np.percentile(latencies, 95)),
                    "server_cpu_ms_per_request": server_cpu / requests * 1000,
                    "client_cpu_ms_per_request": client_cpu / requests * 1000,
                    "batches": formed(before, await batches())}

        for _ in range(30):  # warm-up: connection, allocator, dispatcher's latency model
            await one()
        before = await batches()
        latencies = np.array([await one() for _ in range(sequential)]) * 1000
        sequential_batches = formed(before, await batches())
        levels = [await concurrent(c) for c in concurrencies]
    return {
        "sequential": {"requests": sequential, "p50_ms": float(np.percentile(latencies, 50)),
                       "p95_ms": float(np.percentile(latencies, 95)), "p99_ms": float(np.percentile(latencies, 99)),
                       "mean_ms": float(latencies.mean()), "batches": sequential_batches},
        "concurrent": levels,
    }


async def bad_input_phase(url: str, payload: dict, rounds: int, concurrency: int, server_pid: int) -> dict:
    """The whole bad-input set `rounds` times over, mixed with as many good requests, `concurrency` at a time: the
    status of every answer, the cases answered otherwise than promised, and whether any worker process restarted."""
    import aiohttp

    cases = bad_requests(payload["bars"])
    good = json.dumps(payload).encode()
    jobs = [case for _ in range(rounds) for case in cases]
    jobs = [job for pair in zip(jobs, [None] * len(jobs)) for job in pair]  # None: a good request
    statuses: dict[str, int] = {}
    wrong: dict[str, str] = {}
    before = worker_pids(server_pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        queue = iter(jobs)

        async def worker():
            for case in queue:
                path, body = ("/predict/patterns", good) if case is None else (case.path, case.body)
                method = session.get(url + path) if body is None else session.post(
                    url + path, data=body, headers={"Content-Type": "application/json"})
                async with method as response:
                    text = await response.text()
                    statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
                    expected = 200 if case is None else case.status
                    if response.status != expected or (case is not None and case.message not in text):
                        wrong[case.name if case else "good request"] = f"HTTP {response.status}: {text[:200]}"

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        async with session.get(url + "/readyz") as response:
            ready = response.status == 200
    after = worker_pids(server_pid)
    return {"cases": len(cases), "rounds": rounds, "requests": len(jobs), "concurrency": concurrency,
            "statuses": dict(sorted(statuses.items())),
            "server_errors": sum(n for status, n in statuses.items() if int(status) >= 500),
            "not_as_promised": wrong, "worker_pids_before": before, "worker_pids_after": after,
            "worker_restarts": len(set(after) - set(before)), "ready_after": ready}


def table(report: dict) -> str:
    seq = report["sequential"]
    rows = [("encoder backend / workers / threads", f"{report['encoder']} / {report['workers']} / {report['threads']}"),
            ("sequential P50 / P95 / P99 (ms)", f"{seq['p50_ms']:.1f} / {seq['p95_ms']:.1f} / {seq['p99_ms']:.1f}")]
    for level in report["concurrent"]:
        by_size = ", ".join(f"<={float(k):g}: {v}" if k != "+Inf" else f">{v}"
                            for k, v in level["batches"]["batches_by_size_up_to"].items())
        rows += [(f"concurrency {level['concurrency']}: req/s, P50 / P95 (ms)",
                  f"{level['requests_per_second']:.1f}, {level['p50_ms']:.1f} / {level['p95_ms']:.1f}"),
                 ("    CPU per request, server / client (ms)",
                  f"{level['server_cpu_ms_per_request']:.1f} / {level['client_cpu_ms_per_request']:.1f}"),
                 ("    encoder batches: mean size; per size bucket",
                  f"{level['batches']['mean_batch_size']:.2f}; {by_size}")]
    bad = report.get("bad_inputs")
    if bad:
        rows += [(f"bad inputs: {bad['cases']} cases x {bad['rounds']} + as many good, concurrency {bad['concurrency']}",
                  ", ".join(f"HTTP {s}: {n}" for s, n in bad["statuses"].items())),
                 ("    5xx answers / not as promised / worker restarts",
                  f"{bad['server_errors']} / {len(bad['not_as_promised'])} / {bad['worker_restarts']}")]
    rows.append(("predictions logged", str(report["logged_predictions"])))
    return "\n".join(f"{name:48s} {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    parser.add_argument("--bars", type=int, default=100)
    parser.add_argument("--bad-rounds", type=int, default=20,
                        help="times the bad-input set is sent, mixed with good requests (0: skip)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    from vlm_assets.serving.config import ServingConfig

    config = ServingConfig.from_env()
    payload = {"symbol": "BENCH", "timeframe": "5m", "bars": synthetic_bars(args.bars)}
    with tempfile.TemporaryDirectory(prefix="candle-vlm-serve-bench-") as scratch:
        env = {"CANDLE_VLM_PREDICTION_LOG": str(Path(scratch) / "predictions")}
        with Server(env, log_path=str(Path(scratch) / "server.log")) as server:
            report = asyncio.run(measure(server.url, payload, args.sequential,
                                         [int(c) for c in args.concurrency.split(",")], args.requests,
                                         server.process.pid))
            if args.bad_rounds:
                report["bad_inputs"] = asyncio.run(bad_input_phase(server.url, payload, args.bad_rounds, 16,
                                                                   server.process.pid))
            encoder = re.search(r'candle_vlm_model_info\{[^}]*encoder="([^"]+)"',
                                urllib.request.urlopen(f"{server.url}/metrics").read().decode())
        logged = sum(1 for p in (Path(scratch) / "predictions").rglob("*.jsonl") for _ in p.open("rb"))
    report |= {"bars": args.bars, "encoder": encoder.group(1) if encoder else "unknown", "workers": config.server_workers,
               "threads": config.worker_threads, "logged_predictions": logged, "machine": machine_info(),
               "command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(report, indent=2))
    print()
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
