"""Train and evaluate the default model end to end and report time and test-split metrics.

    python bench/model.py [--root DIR] [--json out.json] [--skip-data]

Materializes the data assets (unless --skip-data and they exist in --root) and then chart_clip_pretrained ->
zero_shot_baseline -> chart_clip_finetuned -> model_evaluation, then the fusion group (calibrator,
resnet_baseline, feature_model, fuser), with their checks, in-process as `candle-vlm run` does. Prints a table and
a JSON report: wall time per asset, training throughput, model_evaluation's metrics against the acceptance floors,
calibration before/after and every model's and fuser's test macro F1.
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


def run(root: Path, skip_data: bool) -> dict:
    from dagster import DagsterInstance, materialize

    from vlm_assets.definitions import DATA_ASSETS, default_resources
    from vlm_assets.pipeline.checks import CALIBRATION_KPIS, DATA_CHECKS, FUSION_CHECKS, MODEL_CHECKS, MODEL_KPIS
    from vlm_assets.pipeline.fusion import FUSION_ASSETS
    from vlm_assets.pipeline.model import MODEL_ASSETS
    from vlm_assets.storage import ArtifactStore
    from vlm_resources import ArtifactStoreResource

    resources = default_resources() | {"store": ArtifactStoreResource(root=str(root))}
    instance = DagsterInstance.ephemeral()
    store = ArtifactStore(root)
    report: dict = {"root": str(root)}
    if not (skip_data and store.exists("vlm_dataset/CURRENT")):
        started = time.perf_counter()
        data = materialize([*DATA_ASSETS, *DATA_CHECKS], resources=resources, instance=instance)
        report["data_seconds"] = round(time.perf_counter() - started, 1)
        if not data.success:
            raise SystemExit("the data assets failed")
    started = time.perf_counter()
    result = materialize([*MODEL_ASSETS, *MODEL_CHECKS, *FUSION_ASSETS, *FUSION_CHECKS], resources=resources,
                         instance=instance)
    report["model_seconds"] = round(time.perf_counter() - started, 1)
    report["success"] = result.success
    report["asset_seconds"] = {k: round(v, 1) for k, v in step_seconds(instance, result.run_id).items()}
    report["training_seconds"] = round(report["asset_seconds"].get("chart_clip_pretrained", 0)
                                       + report["asset_seconds"].get("chart_clip_finetuned", 0), 1)
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    for name in ("chart_clip_pretrained", "chart_clip_finetuned"):
        if name in meta:
            report[name] = {k: meta[name][k].value for k in ("steps", "images_seen", "images_per_s", "seconds", "final_loss")
                            if k in meta[name]}
    evaluation = store.read_json(f"model_evaluation/{store.current_version('model_evaluation')}/evaluation.json")
    report["metrics"] = evaluation["summary"]
    report["baseline"] = evaluation["baseline_summary"]
    report["per_pattern"] = {c: {k: evaluation["detection"][c][k] for k in ("support", "precision", "recall")}
                             for c in evaluation["detection"]}
    report["zero_shot"] = {c: {k: evaluation["zero_shot"][c][k] for k in ("support", "predicted", "precision", "recall")}
                           for c in evaluation["zero_shot"]}
    report["floors"] = {k: f"{op} {v}" for k, (op, v) in MODEL_KPIS.items()} | {"training_seconds": "<= 1200"}
    report["calibration"] = store.read_json(f"calibrator/{store.current_version('calibrator')}/report.json")["summary"]
    report["calibration_floors"] = {k: f"{op} {v}" for k, (op, v) in CALIBRATION_KPIS.items()}
    for name, file in (("feature_model", "evaluation.json"), ("resnet_baseline", "evaluation.json"), ("fuser", "report.json")):
        report[name] = store.read_json(f"{name}/{store.current_version(name)}/{file}")["summary"]
    report["fusion_test"] = store.read_json(f"fuser/{store.current_version('fuser')}/report.json")["test"]
    report["checks"] = check_outcomes(result)
    return report


def table(report: dict) -> str:
    lines = ["| figure | value | floor |", "|---|---|---|"]
    lines.append(f"| pre-training + fine-tuning (s) | {report['training_seconds']} | <= 1200 |")
    for key, value in report["metrics"].items():
        floor = report["floors"].get(key, "")
        lines.append(f"| {key} | {value:.3f} | {floor} |" if isinstance(value, float) else f"| {key} | {value} | {floor} |")
    lines.append("")
    lines.append("| pattern | support | precision | recall |")
    lines.append("|---|---|---|---|")
    for name, row in report["per_pattern"].items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {row['support']} | {fmt(row['precision'])} | {fmt(row['recall'])} |")
    lines += ["", "| calibration (test) | value | bound |", "|---|---|---|"]
    for key, value in report["calibration"].items():
        bound = report["calibration_floors"].get(key, "")
        lines.append(f"| {key} | {value:.4f} | {bound} |" if isinstance(value, float) else f"| {key} | {value} | {bound} |")
    lines += ["", "| fusion (test macro F1 over the core patterns) | value |", "|---|---|"]
    lines += [f"| {row['model']} | {row['test_macro_f1']:.3f} |" for row in report["fusion_test"]]
    lines.append(f"| active fuser | {report['fuser']['active']}: {report['fuser']['reason']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="artifact root (default: a fresh temp dir)")
    parser.add_argument("--skip-data", action="store_true", help="reuse the data assets already in --root")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="candle-vlm-bench-model-"))
    report = {"machine": machine_info(), "command": " ".join(sys.argv)} | run(root, args.skip_data)
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    print(table(report))
    if args.json:
        args.json.write_text(text)
    return 0 if report["success"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
