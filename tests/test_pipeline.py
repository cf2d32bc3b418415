"""The data assets materialized for real on a tiny synthetic market (and on user files)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import Definitions, materialize

from vlm_assets.definitions import DATA_ASSETS, defs
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.pipeline.checks import DATA_CHECKS, FUSION_CHECKS, MODEL_CHECKS, SERVING_CHECKS
from vlm_assets.pipeline.model import MODEL_ASSETS
from vlm_assets.pipeline.monitoring import MONITORING_CHECK_KEYS
from vlm_assets.pipeline.trading import TRADING_CHECKS
from vlm_assets.storage import ArtifactStore
from bench.common import check_outcomes
from tests.conftest import TINY_FULL_RUN_CONFIG, TINY_MARKET, TINY_RUN_CONFIG, tiny_resources

REPO = Path(__file__).resolve().parents[1]
ERROR_CHECKS = {"ohlc_rules_hold", "no_split_leakage", "min_count_per_core_pattern", "labels_rederived_agree", "images_decode"}


def run_pipeline(root, **market):
    return materialize([*DATA_ASSETS, *DATA_CHECKS], resources=tiny_resources(root, **market), run_config=TINY_RUN_CONFIG)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run1")
    return root, run_pipeline(root)


def test_all_assets_materialize_and_error_checks_pass(first_run):
    root, result = first_run
    assert result.success
    checks = check_outcomes(result)
    assert ERROR_CHECKS <= set(checks) and all(checks[c] for c in ERROR_CHECKS), checks
    store = ArtifactStore(root)
    tag = store.current_version("vlm_dataset")
    assert tag.startswith("v1-")
    windows = store.read_parquet(f"vlm_dataset/{tag}/windows.parquet")
    pairs = store.read_parquet(f"vlm_dataset/{tag}/pairs.parquet")
    card = store.read_json(f"vlm_dataset/{tag}/card.json")
    assert len(windows) == 60 and card["windows"] == 60 and card["pairs"] == len(pairs)
    assert set(windows["split"]) == {"train", "val", "test"}
    assert set(pairs["window_id"]) == set(windows["window_id"])
    assert (pairs.merge(windows[["window_id", "split"]], on="window_id", suffixes=("", "_w")).eval("split == split_w")).all()
    for pattern in CORE_PATTERNS:
        assert windows[pattern].sum() >= 4
    assert windows["png"].map(lambda b: b[:8] == b"\x89PNG\r\n\x1a\n").all()
    assert {"raster", "plotly"} <= set(windows["renderer"])
    assert windows["composite"].any()
    assert card["content_sha256"]["windows.parquet"]


def test_materialization_metadata_is_readable_in_the_ui(first_run):
    _, result = first_run
    metadata = {m.asset_key.to_user_string(): m.metadata for m in result.asset_materializations_for_node("vlm_dataset")}
    meta = metadata["vlm_dataset"]
    assert meta["sample_charts"].value.startswith("![sample charts](data:image/png;base64,")
    assert "data:image/png;base64," in meta["class_balance"].value
    counts = {r.data["label"]: r.data for r in meta["counts_per_label_and_split"].value.records}
    assert counts["hammer"]["total"] >= 4
    labels_meta = result.asset_materializations_for_node("pattern_labels")[0].metadata
    assert labels_meta["firing_rate_percent"].value.records


def test_same_config_same_dataset_bytes(first_run, tmp_path):
    root, _ = first_run
    assert run_pipeline(tmp_path).success
    first, second = ArtifactStore(root), ArtifactStore(tmp_path)
    tag = first.current_version("vlm_dataset")
    assert second.current_version("vlm_dataset") == tag
    for name in ("windows.parquet", "pairs.parquet", "card.json"):
        assert first.read_bytes(f"vlm_dataset/{tag}/{name}") == second.read_bytes(f"vlm_dataset/{tag}/{name}"), name


def test_other_seed_gives_another_version(first_run, tmp_path):
    root, _ = first_run
    assert run_pipeline(tmp_path, seed=99).success
    assert ArtifactStore(tmp_path).current_version("vlm_dataset") != ArtifactStore(root).current_version("vlm_dataset")


def test_user_csv_directory_feeds_the_pipeline(first_run, tmp_path):
    root, _ = first_run
    source = ArtifactStore(root)
    table = source.read_parquet(f"ohlcv_bars/{source.current_version('ohlcv_bars')}/bars_1m.parquet")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for symbol, part in table.groupby("symbol"):
        part.drop(columns="symbol").to_csv(data_dir / f"{symbol}.csv", index=False)
    resources = tiny_resources(tmp_path / "artifacts", source="directory", directory=str(data_dir), base_timeframe="1m")
    result = materialize([*DATA_ASSETS, *DATA_CHECKS], resources=resources, run_config=TINY_RUN_CONFIG)
    assert result.success
    assert check_outcomes(result)["timeframes_agree"]
    store = ArtifactStore(tmp_path / "artifacts")
    assert store.read_json(f"vlm_dataset/{store.current_version('vlm_dataset')}/card.json")["windows"] == 60


def test_bad_user_file_fails_the_run_with_a_named_row_and_keeps_old_artifacts(first_run, tmp_path):
    root, _ = first_run
    data_dir = tmp_path / "bad"
    data_dir.mkdir()
    (data_dir / "ACME_5m.csv").write_text(
        "timestamp,open,high,low,close,volume\n2024-01-02 09:30,10,11,9,10.5,100\n2024-01-02 09:35,10.5,10.0,10.2,10.4,100\n")
    before = ArtifactStore(root).current_version("ohlcv_bars")
    result = materialize(DATA_ASSETS[:1], resources=tiny_resources(root, source="directory", directory=str(data_dir)),
                         raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.to_string()
    assert "ACME_5m.csv: row 2" in message and "low <= min(open, close)" in message
    assert ArtifactStore(root).current_version("ohlcv_bars") == before


def test_definitions_load_with_jobs_checks_and_resources():
    Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("main_job")
    assert {n.name for n in job.graph.node_defs} >= {a.op.name for a in DATA_ASSETS + MODEL_ASSETS} | {"embedding_reference"}
    assert len(list(defs.resolve_asset_graph().asset_check_keys)) == len(DATA_CHECKS) + len(MODEL_CHECKS) + len(FUSION_CHECKS) + len(TRADING_CHECKS) + len(SERVING_CHECKS) + len(MONITORING_CHECK_KEYS)
    for name in ("embedding_reference_job", "drift_report_job", "drift_alert_job"):
        defs.resolve_job_def(name)
    schedules = {name: defs.resolve_schedule_def(name) for name in ("weekly_drift_report", "drift_alert_schedule")}
    assert schedules["weekly_drift_report"].cron_schedule == "0 1 * * 1"
    assert schedules["drift_alert_schedule"].cron_schedule == "0 * * * *"
    defs.resolve_sensor_def("reference_follows_promoted_model")


def test_cli_runs_the_main_job_into_a_project_instance(tmp_path):
    """README command 1's entry point, on a tiny config, with the repository's dagster.yaml."""
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    config = yaml.safe_load(yaml.safe_dump(TINY_FULL_RUN_CONFIG))
    config["ops"]["embedding_reference"] = {"config": {"per_timeframe": 20}}  # the main job ends with the reference
    config["resources"] = {"market": {"config": TINY_MARKET}, "store": {"config": {"root": str(tmp_path / "artifacts")}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "CANDLE_VLM_"))}
    done = subprocess.run([sys.executable, "-m", "vlm_assets.cli", "run", "--config", "tiny.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout and "vlm_dataset" in done.stdout and "model_evaluation" in done.stdout
    assert (tmp_path / ".dagster_home" / "runs.db").exists() or any((tmp_path / ".dagster_home").rglob("*.db"))
    assert (tmp_path / "artifacts" / "vlm_dataset" / "CURRENT").exists()
    assert (tmp_path / "artifacts" / "model_evaluation" / "CURRENT").exists()
    assert (tmp_path / "artifacts" / "promoted_model" / "CURRENT").exists()  # the job promotes...
    assert (tmp_path / "artifacts" / "embedding_reference" / "CURRENT").exists()  # ... and leaves a drift reference
