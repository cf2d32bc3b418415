"""`candle-vlm`: run the pipeline, open the Dagster UI with the project-local instance (./dagster.yaml), list or roll
back promoted models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def project_instance_env(project: Path) -> None:
    """The same instance `dagster dev` gets from .env: ./dagster.yaml, state under ./.dagster_home."""
    os.environ.setdefault("DAGSTER_HOME", str(project))
    os.environ.setdefault("CANDLE_VLM_DAGSTER_STATE", str(project / ".dagster_home"))
    Path(os.environ["CANDLE_VLM_DAGSTER_STATE"]).mkdir(parents=True, exist_ok=True)


def _load_run_config(path: str | None) -> dict:
    if not path:
        return {}
    import yaml

    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def run(args: argparse.Namespace) -> int:
    project_instance_env(Path.cwd())
    from dagster import DagsterInstance

    from vlm_assets.definitions import ALL_ASSETS, defs
    from vlm_resources import ArtifactStoreResource

    job = defs.resolve_job_def(args.job)
    with DagsterInstance.get() as instance:
        result = job.execute_in_process(run_config=_load_run_config(args.config), instance=instance,
                                        raise_on_error=False)
    failed = {"ERROR": [], "WARN": []}
    for event in result.all_events:
        check = event.asset_check_evaluation_data if event.event_type_value == "ASSET_CHECK_EVALUATION" else None
        if check is not None and not check.passed:
            failed[check.severity.value].append(f"{check.asset_key.to_user_string()}:{check.check_name}")
    store = ArtifactStoreResource().store()
    print(f"\nrun {result.run_id}: {'succeeded' if result.success else 'FAILED'}")
    for name in (a.key.to_user_string() for a in ALL_ASSETS):
        try:
            print(f"  {name:21s} {store.current_version(name):24s} {store.path(name)}")
        except FileNotFoundError:
            print(f"  {name:21s} (not materialized)")
    try:
        summary = store.read_json(f"model_evaluation/{store.current_version('model_evaluation')}/evaluation.json")["summary"]
        print("  test-split metrics: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float)))
    except FileNotFoundError:
        pass
    for severity, names in failed.items():
        if names:
            print(f"  failed {severity} checks: " + ", ".join(names))
    print("  open the UI with: candle-vlm ui   (or `dagster dev` from the repository root)")
    return 0 if result.success and not failed["ERROR"] else 1


def ui(args: argparse.Namespace) -> int:
    project_instance_env(Path.cwd())
    command = ["dagster", "dev", "-w", "workspace.yaml", "-p", str(args.port), "-h", args.host]
    os.execvp(command[0], command)
    return 0


def models(args: argparse.Namespace) -> int:
    from vlm_assets import promotion

    versions = promotion.history(args.name)
    if not versions:
        print(f"no {args.name} model in the BentoML model store ({os.environ.get('BENTOML_HOME', '~/bentoml')})")
        return 1
    current = promotion.promoted(args.name)
    for model in versions:
        labels = model.info.labels
        marker = "*" if current is not None and model.tag == current.tag else " "
        extra = f"  rollback of {labels['rollback_of']}" if "rollback_of" in labels else ""
        print(f"{marker} {model.tag}  {model.info.creation_time:%Y-%m-%d %H:%M:%S}  macro F1 {labels.get('macro_f1')}  "
              f"bundle {labels.get('bundle_id')}  dataset {labels.get('dataset_version')}{extra}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    from vlm_assets import promotion

    try:
        tag = promotion.rollback(args.to, args.name)
    except ValueError as error:
        print(f"rollback: {error}", file=sys.stderr)
        return 1
    print(f"{args.name}:latest is now {tag}; restart `bentoml serve` (or redeploy) to serve it")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="candle-vlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="materialize the pipeline in-process, recorded in the project instance")
    run_parser.add_argument("--job", default="main_job")
    run_parser.add_argument("--config", help="YAML run config (ops: {asset_name: {config: {...}}}, resources: ...)")
    run_parser.set_defaults(handler=run)
    ui_parser = sub.add_parser("ui", help="start `dagster dev` (webserver + daemon) on this project")
    ui_parser.add_argument("--port", type=int, default=3000)
    ui_parser.add_argument("--host", default="127.0.0.1")
    ui_parser.set_defaults(handler=ui)
    models_parser = sub.add_parser("models", help="list the promoted versions in the BentoML model store (* = current)")
    models_parser.add_argument("--name", default="candle_vlm")
    models_parser.set_defaults(handler=models)
    rollback_parser = sub.add_parser("rollback", help="make an earlier promoted version current again")
    rollback_parser.add_argument("--to", help="version (tag) to restore; default: the one before the current")
    rollback_parser.add_argument("--name", default="candle_vlm")
    rollback_parser.set_defaults(handler=rollback)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
