"""Chart rendering throughput on one core: raster (with and without PNG encoding) vs plotly + kaleido.

    python bench/render.py [--bars 100] [--n 2000] [--kaleido-n 30] [--json out.json]

Prints a table and a JSON report (also written to --json). The raster target is >= 1,000 charts/s of
100 bars on one core, excluding PNG encoding.
"""

from __future__ import annotations

import os

# One core, one thread: set before numpy loads its BLAS/OpenMP runtimes.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

from bench.common import machine_info  # noqa: E402
from vlm_assets.rendering import PRESETS, KaleidoExporter, encode_png, plotly_figure, randomize_style, render_chart  # noqa: E402

TARGET_CHARTS_PER_SECOND = 1000


def synthetic_bars(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[100, close[:-1]] * np.exp(rng.normal(0, 0.002, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.004, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.004, n)))
    index = pd.date_range("2024-01-02 09:30", periods=n, freq="5min")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": rng.lognormal(10, 0.5, n)}, index=index)


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"core {core}"
    return "not pinned (no sched_setaffinity on this platform)"


def best_and_median_ms(run_one, n: int, rounds: int) -> tuple[float, float]:
    """Per-call ms over ``rounds`` rounds of n/rounds calls: the best round is the least disturbed by other load."""
    per_round = max(1, n // rounds)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(per_round):
            run_one(i)
        times.append(1000 * (time.perf_counter() - start) / per_round)
    return min(times), statistics.median(times)


def raster_case(name: str, windows: list[pd.DataFrame], styles: list, n: int, size: tuple[int, int],
                htf: pd.DataFrame | None, rounds: int) -> dict:
    def chart(i):
        return render_chart(windows[i % len(windows)], styles[i % len(styles)], *size, htf_bars=htf)

    for i in range(min(n, 100)):  # warm caches and lazy imports
        chart(i)
    render_ms, render_median_ms = best_and_median_ms(chart, n, rounds)
    png_ms, png_median_ms = best_and_median_ms(lambda i: encode_png(chart(i)), n, rounds)
    return {
        "case": name,
        "n": n,
        "render_ms": render_ms,
        "render_median_ms": render_median_ms,
        "render_per_s": 1000 / render_ms,
        "render_png_ms": png_ms,
        "render_png_median_ms": png_median_ms,
        "render_png_per_s": 1000 / png_ms,
        "png_bytes_mean": statistics.fmean(len(encode_png(chart(i))) for i in range(min(n, 200))),
    }


def kaleido_case(windows: list[pd.DataFrame], n: int, width: int, height: int) -> dict:
    start = time.perf_counter()
    figures = [plotly_figure(windows[i % len(windows)]) for i in range(n)]
    figure_seconds = time.perf_counter() - start
    with KaleidoExporter(timeout=60.0) as exporter:
        start = time.perf_counter()
        exporter.to_png(figures[0], width, height)
        cold_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for figure in figures:
            exporter.to_png(figure, width, height)
        export_seconds = time.perf_counter() - start
    per_chart = (figure_seconds + export_seconds) / n
    return {
        "case": "plotly+kaleido",
        "n": n,
        "figure_ms": 1000 * figure_seconds / n,
        "export_ms": 1000 * export_seconds / n,
        "cold_start_s": cold_seconds,
        "render_png_ms": 1000 * per_chart,
        "render_png_per_s": 1 / per_chart,
    }


def table(report: dict) -> str:
    lines = [f"{key:>14}: {value}" for key, value in report["machine"].items()]
    lines += ["", f"{report['bars']} bars, {report['width']}x{report['height']} px, one core, ms per chart (best round)",
              f"{'case':<26}{'render ms':>10}{'charts/s':>10}{'+png ms':>9}{'charts/s':>10}{'png bytes':>10}"]
    for row in report["raster"]:
        lines.append(f"{row['case']:<26}{row['render_ms']:>10.3f}{row['render_per_s']:>10.0f}"
                     f"{row['render_png_ms']:>9.3f}{row['render_png_per_s']:>10.0f}{row['png_bytes_mean']:>10.0f}")
    k = report["kaleido"]
    lines.append(f"{'plotly+kaleido':<26}{'':>10}{'':>10}{k['render_png_ms']:>9.1f}{k['render_png_per_s']:>10.1f}"
                 f"   (figure {k['figure_ms']:.1f} ms + export {k['export_ms']:.1f} ms; cold start {k['cold_start_s']:.2f} s)")
    verdict = "meets the target in every case" if report["target_met"] else "MISSES the target in some case"
    lines.append(f"\nraster render without PNG (best of {report['rounds']} rounds) vs {TARGET_CHARTS_PER_SECOND} charts/s: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=100, help="bars per window")
    parser.add_argument("--n", type=int, default=2000, help="raster charts per case")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds per case; the best round is reported")
    parser.add_argument("--kaleido-n", type=int, default=30, help="plotly+kaleido exports")
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    machine = machine_info(pin_to_one_core())
    windows = [synthetic_bars(args.bars, seed) for seed in range(16)]
    htf = synthetic_bars(max(10, args.bars // 3), seed=99)
    rng = np.random.default_rng(0)
    random_styles = [randomize_style(rng) for _ in range(64)]

    def case(name, styles, htf_bars=None):
        return raster_case(name, windows, styles, args.n, (args.width, args.height), htf_bars, args.rounds)

    raster = [
        case("classic_light", [PRESETS["classic_light"]]),
        case("grid_dark (grid+vol+MAs)", [PRESETS["grid_dark"]]),
        case("grid_dark + HTF panel", [PRESETS["grid_dark"]], htf),
        case("randomized styles", random_styles),
    ]
    report = {
        "bars": args.bars,
        "width": args.width,
        "height": args.height,
        "rounds": args.rounds,
        "machine": machine,
        "raster": raster,
        "kaleido": kaleido_case(windows, args.kaleido_n, args.width, args.height),
        "target_met": all(row["render_per_s"] >= TARGET_CHARTS_PER_SECOND for row in raster),
    }
    print(table(report))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
