"""The benchmark suite: every performance figure of candle-vlm beside a baseline measured in the same run.

    python bench/suite.py [--quick] [--pipeline] [--json bench/results/suite.json]

Runs, each in its own process so thread settings do not leak between them:
  render    bench/render.py    raster charts per second vs plotly+kaleido (one core)
  encoder   bench/encoder.py   image-encoder latency per backend vs open_clip ViT-B-32 in torch (same threads)
  serve     bench/serve.py     /predict/patterns over HTTP: sequential P50/P95/P99, req/s at concurrency 1/4/16/32
  training  bench/training.py  training samples per second, fp32 vs mixed precision
  pipeline  the main job's wall time on the default config: with --pipeline a fresh `candle-vlm run` into a
            temporary artifact root and model store (about half an hour here); without it, the latest successful
            main_job run recorded in the repository's Dagster instance, with its run id and date
Needs a promoted model (`candle_vlm:latest` in $BENTOML_HOME) for encoder and serve. --quick shortens every part
(for a smoke check, not for the docs). Prints one JSON report and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from a checkout

from bench.common import machine_info  # noqa: E402

FULL = {"render": ["--n", "2000", "--kaleido-n", "30"], "encoder": ["--runs", "200"],
        "serve": ["--sequential", "500", "--requests", "2000"], "training": ["--steps", "12"]}
QUICK = {"render": ["--n", "200", "--rounds", "2", "--kaleido-n", "5"], "encoder": ["--runs", "20"],
         "serve": ["--sequential", "50", "--requests", "200"], "training": ["--steps", "2", "--batch", "16"]}


def run_part(name: str, extra: list[str], scratch: Path) -> dict:
    output = scratch / f"{name}.json"
    command = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *extra, "--json", str(output)]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(output.read_text())
    report["part_seconds"] = time.perf_counter() - started
    return report


def pipeline_seconds(fresh: bool) -> dict:
    """The main job's wall time: a fresh run, or the latest successful one in the repository's instance."""
    if fresh:
        with tempfile.TemporaryDirectory(prefix="candle-vlm-suite-") as scratch:
            env = {**os.environ, "CANDLE_VLM_ARTIFACT_ROOT": f"{scratch}/artifacts", "BENTOML_HOME": f"{scratch}/bentoml"}
            started = time.perf_counter()
            subprocess.run([str(Path(sys.executable).with_name("candle-vlm")), "run"], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            return {"source": "fresh run (this suite)", "seconds": time.perf_counter() - started}
    from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

    from vlm_assets.cli import project_instance_env
    from vlm_assets.definitions import main_job_assets

    project_instance_env(ROOT)
    wanted = {key.to_user_string() for key in main_job_assets()}
    with DagsterInstance.get() as instance:
        for record in instance.get_run_records(RunsFilter(job_name="main_job", statuses=[DagsterRunStatus.SUCCESS]),
                                               limit=50):
            events = instance.get_records_for_run(record.dagster_run.run_id,
                                                  of_type=DagsterEventType.ASSET_MATERIALIZATION).records
            # A run that skipped assets (or ran an older, smaller job) would understate the time.
            if wanted <= {e.event_log_entry.dagster_event.asset_key.to_user_string() for e in events}:
                import datetime as dt

                return {"source": f"main_job run {record.dagster_run.run_id} (this repository's Dagster instance)",
                        "finished": dt.datetime.fromtimestamp(record.end_time, dt.timezone.utc).isoformat(
                            timespec="seconds"), "seconds": record.end_time - record.start_time}
    return {"source": "no main_job run of every current asset in this repository's Dagster instance (--pipeline "
                      "times a fresh one)"}


def table(report: dict) -> str:
    rows = []
    render = report["render"]
    best = max(render["raster"], key=lambda row: row["render_png_per_s"])
    slowest = min(render["raster"], key=lambda row: row["render_png_per_s"])
    kaleido = render["kaleido"]
    rows.append(("render, charts/s incl. PNG (one core)",
                 f"{slowest['render_png_per_s']:.0f}-{best['render_png_per_s']:.0f}",
                 f"plotly+kaleido {kaleido['render_png_per_s']:.0f}",
                 f"x{slowest['render_png_per_s'] / kaleido['render_png_per_s']:.0f}"))
    encoders = report["encoder"]["encoders"]
    baseline = next(v for k, v in encoders.items() if "ViT-B-32" in k)
    for backend, figures in encoders.items():
        if "ViT-B-32" in backend:
            continue
        rows.append((f"encoder {backend}: batch 1 median / P95, batch 32 per image (ms)",
                     f"{figures['batch1_median_ms']:.2f} / {figures['batch1_p95_ms']:.2f}, "
                     f"{figures['batch32_per_image_ms']:.2f}",
                     f"ViT-B-32 {baseline['batch1_median_ms']:.1f} / {baseline['batch1_p95_ms']:.1f}, "
                     f"{baseline['batch32_per_image_ms']:.1f}",
                     f"x{figures['speedup_vs_vit_b32_batch1']:.1f}"))
    serve = report["serve"]
    seq = serve["sequential"]
    rows.append((f"/predict/patterns sequential P50 / P95 / P99 (ms), {serve['encoder']}",
                 f"{seq['p50_ms']:.1f} / {seq['p95_ms']:.1f} / {seq['p99_ms']:.1f}", "", ""))
    for level in serve["concurrent"]:
        rows.append((f"/predict/patterns at concurrency {level['concurrency']}: req/s (P95 ms)",
                     f"{level['requests_per_second']:.0f} ({level['p95_ms']:.0f})", "", ""))
    training = report["training"]
    rows.append((f"training samples/s, {training['mixed_precision']} autocast",
                 f"{training['mixed_samples_per_s']:.1f}", f"fp32 {training['fp32_samples_per_s']:.1f}",
                 f"x{training['speedup']:.2f}"))
    pipeline = report["pipeline"]
    rows.append(("main job wall time (min), default config",
                 f"{pipeline['seconds'] / 60:.1f}" if "seconds" in pipeline else "n/a", pipeline["source"], ""))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'figure':{width}s}  {'candle-vlm':24s}  {'baseline (same run)':28s}  ratio"]
    lines += [f"{name:{width}s}  {value:24s}  {base:28s}  {ratio}" for name, value, base, ratio in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs of every part (a smoke check)")
    parser.add_argument("--pipeline", action="store_true", help="time a fresh main job run (about half an hour)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    report = {}
    with tempfile.TemporaryDirectory(prefix="candle-vlm-suite-") as scratch:
        for name, extra in settings.items():
            print(f"[suite] {name} ...", file=sys.stderr, flush=True)
            report[name] = run_part(name, extra, Path(scratch))
    print("[suite] pipeline ...", file=sys.stderr, flush=True)
    report["pipeline"] = pipeline_seconds(args.pipeline)
    report |= {"quick": args.quick, "machine": machine_info(),
               "command": "python bench/suite.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(report, indent=2))
    print()
    print(table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
