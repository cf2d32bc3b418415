"""Build the data half of the pipeline on the default config and report time and dataset figures.

    python bench/dataset.py [--root DIR] [--twice] [--json out.json]

Materializes ohlcv_bars -> pattern_labels -> chart_images -> captions -> vlm_dataset (with their asset checks)
in-process, as `candle-vlm run` does, into a fresh artifact root, and prints a table and a JSON report: wall time
per asset, dataset size and balance, and (with --twice) whether a second build gives the same version tag and bytes.
Acceptance floors (issue 2): >= 5,000 pairs, each core pattern in >= 300 windows, neutral >= 15%, <= 300 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

from bench.common import check_outcomes, machine_info, step_seconds  # noqa: E402

FLOORS = {"pairs": 5000, "per_core_pattern": 300, "neutral_share": 0.15, "build_seconds": 300}


def build(root: Path) -> dict:
    from dagster import DagsterInstance, materialize

    from vlm_assets.definitions import DATA_ASSETS, default_resources
    from vlm_assets.pipeline.checks import DATA_CHECKS
    from vlm_resources import ArtifactStoreResource

    resources = default_resources() | {"store": ArtifactStoreResource(root=str(root))}
    instance = DagsterInstance.ephemeral()
    started = time.perf_counter()
    result = materialize([*DATA_ASSETS, *DATA_CHECKS], resources=resources, instance=instance)
    total = time.perf_counter() - started
    steps = step_seconds(instance, result.run_id)
    checks = check_outcomes(result)
    return {"success": result.success, "seconds": total,
            "asset_seconds": {a.key.to_user_string(): round(steps.get(a.key.to_user_string(), float("nan")), 1) for a in DATA_ASSETS},
            "checks": checks}


def dataset_figures(root: Path) -> dict:
    from vlm_assets.labeling import CORE_PATTERNS, NEUTRAL, ZERO_SHOT_PATTERNS
    from vlm_assets.storage import ArtifactStore

    store = ArtifactStore(root)
    tag = store.current_version("vlm_dataset")
    card = store.read_json(f"vlm_dataset/{tag}/card.json")
    windows = store.read_parquet(f"vlm_dataset/{tag}/windows.parquet", columns=["split", "timeframe", "renderer", "composite",
                                                                              NEUTRAL, *CORE_PATTERNS, *ZERO_SHOT_PATTERNS])
    pairs = store.read_parquet(f"vlm_dataset/{tag}/pairs.parquet", columns=["detail", "tier", "source"])
    return {
        "version": tag,
        "windows": len(windows), "pairs": len(pairs),
        "per_label": {p: int(windows[p].sum()) for p in (*CORE_PATTERNS, *ZERO_SHOT_PATTERNS, NEUTRAL)},
        "min_core_pattern": int(min(windows[p].sum() for p in CORE_PATTERNS)),
        "neutral_share": round(float(windows[NEUTRAL].mean()), 4),
        "splits": windows["split"].value_counts().to_dict(),
        "timeframes": windows["timeframe"].value_counts().to_dict(),
        "renderers": windows["renderer"].value_counts().to_dict(),
        "composites": int(windows["composite"].sum()),
        "pair_details": pairs["detail"].value_counts().to_dict(),
        "pair_tiers": pairs["tier"].value_counts().to_dict(),
        "content_sha256": card["content_sha256"],
    }


def table(report: dict) -> str:
    run, data = report["runs"][0], report["dataset"]
    lines = [f"{k:>14}: {v}" for k, v in report["machine"].items()]
    lines += ["", f"{'asset':<16}{'seconds':>9}"] + [f"{k:<16}{v:>9.1f}" for k, v in run["asset_seconds"].items()]
    lines += [f"{'total (+checks)':<16}{run['seconds']:>9.1f}", "",
              f"dataset {data['version']}: {data['windows']} windows, {data['pairs']} pairs, "
              f"neutral {data['neutral_share']:.1%}, smallest core pattern {data['min_core_pattern']} windows",
              f"{'label':<20}{'windows':>8}"] + [f"{k:<20}{v:>8}" for k, v in data["per_label"].items()]
    if len(report["runs"]) > 1:
        lines.append(f"\nsecond build: same version tag {report['same_version']}, same bytes {report['same_bytes']}")
    lines.append("\nfloors: " + ", ".join(f"{k} {'ok' if ok else 'MISSED'}" for k, ok in report["floors_met"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="artifact root (default: a fresh temporary directory)")
    parser.add_argument("--twice", action="store_true", help="build a second time into another root and compare")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    roots = [args.root or Path(tempfile.mkdtemp(prefix="candle-vlm-bench-"))]
    if args.twice:
        roots.append(Path(tempfile.mkdtemp(prefix="candle-vlm-bench-")))
    runs = [build(root) for root in roots]
    data = dataset_figures(roots[0])
    report = {"machine": machine_info(), "runs": runs, "dataset": data, "roots": [str(r) for r in roots]}
    if args.twice:
        second = dataset_figures(roots[1])
        report["same_version"] = second["version"] == data["version"]
        report["same_bytes"] = second["content_sha256"] == data["content_sha256"]
    report["floors_met"] = {
        "pairs": data["pairs"] >= FLOORS["pairs"],
        "per_core_pattern": data["min_core_pattern"] >= FLOORS["per_core_pattern"],
        "neutral_share": data["neutral_share"] >= FLOORS["neutral_share"],
        "build_seconds": runs[0]["seconds"] <= FLOORS["build_seconds"],
    }
    print(table(report))
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
