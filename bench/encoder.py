"""Image-encoder latency per backend, side by side with open_clip ViT-B-32 in torch measured in the same run.

    python bench/encoder.py [--bundle DIR] [--threads N] [--runs 200] [--json out.json]

Encodes a rendered 100-bar chart through the promoted bundle's serving path (`Predictor.encode`: PIL image in,
normalized embedding out) with every backend the bundle can run here, and the baseline: open_clip ViT-B-32 with
random weights (no hub here; the weights do not change the cost) on an already preprocessed tensor, with the same
thread count. Reports batch 1 median and P95 and batch 32 per-image time, and each backend's speed-up over the
baseline at batch 1. The bundle is `candle_vlm:latest` in $BENTOML_HOME unless --bundle is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

from bench.common import machine_info, synthetic_bars  # noqa: E402


def timings(encode, runs: int, warm_up: int = 5) -> np.ndarray:
    for _ in range(warm_up):
        encode()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        encode()
        times.append(time.perf_counter() - started)
    return np.array(times) * 1000


def summary(encode_one, encode_32, runs: int) -> dict:
    single = timings(encode_one, runs)
    batch = timings(encode_32, max(5, runs // 20), warm_up=2)
    return {"batch1_median_ms": float(np.median(single)), "batch1_p95_ms": float(np.percentile(single, 95)),
            "batch32_per_image_ms": float(np.median(batch) / 32)}


def vit_b32_baseline(runs: int) -> dict:
    import open_clip
    import torch

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    one, many = torch.randn(1, 3, 224, 224), torch.randn(32, 3, 224, 224)
    with torch.inference_mode():
        return summary(lambda: model.encode_image(one), lambda: model.encode_image(many), runs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="a bundle directory (default: the promoted candle_vlm:latest)")
    parser.add_argument("--threads", type=int, default=0, help="threads for every encoder; 0 = every usable core")
    parser.add_argument("--runs", type=int, default=200, help="batch-1 encodes per backend")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    import pandas as pd
    import torch

    from vlm_assets.serving import encoders
    from vlm_assets.serving.predictor import Predictor
    from vlm_assets.serving.requests import parse_bars

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    bundle = args.bundle
    if bundle is None:
        from vlm_assets.promotion import promoted

        stored = promoted()
        if stored is None:
            raise SystemExit("no candle_vlm model is promoted: run the main job, or pass --bundle DIR")
        bundle = stored.path
    results, skipped = {}, {}
    for backend in encoders.BACKENDS:
        unavailable = encoders.runnable(backend, "cpu", bundle)
        if unavailable:
            skipped[backend] = unavailable
            continue
        predictor = Predictor(bundle, "cpu", backend=backend, threads=threads)
        image = predictor.render(predictor.window(parse_bars(synthetic_bars(100))))
        results[backend] = summary(lambda: predictor.encode([image]), lambda: predictor.encode([image] * 32),
                                   args.runs)
    results["open_clip ViT-B-32 (torch, baseline)"] = vit_b32_baseline(max(20, args.runs // 5))
    baseline = results["open_clip ViT-B-32 (torch, baseline)"]["batch1_median_ms"]
    for figures in results.values():
        figures["speedup_vs_vit_b32_batch1"] = baseline / figures["batch1_median_ms"]
    report = {"threads": threads, "bundle": str(bundle), "encoders": results, "not_runnable_here": skipped,
              "machine": machine_info(), "command": "python bench/encoder.py " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    print(json.dumps(report, indent=2))
    print()
    print(pd.DataFrame(results).T.round(2).to_string())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
