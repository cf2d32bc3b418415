"""The Dagster code location (workspace.yaml and `dagster dev` load `defs` from here)."""

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from vlm_assets.pipeline.checks import DATA_CHECKS, FUSION_CHECKS, MODEL_CHECKS, SERVING_CHECKS
from vlm_assets.pipeline.data import captions, chart_images, ohlcv_bars, pattern_labels, vlm_dataset
from vlm_assets.pipeline.fusion import FUSION_ASSETS
from vlm_assets.pipeline.model import MODEL_ASSETS
from vlm_assets.pipeline.monitoring import (
    MONITORING_ASSETS, MONITORING_JOBS, MONITORING_SCHEDULES, MONITORING_SENSORS,
    MonitoringResource, embedding_reference,
)
from vlm_assets.pipeline.serving import SERVING_ASSETS
from vlm_assets.pipeline.trading import TRADING_ASSETS, TRADING_CHECKS
from vlm_resources import ArtifactStoreResource, ComputeResource, MarketDataResource

DATA_ASSETS = [ohlcv_bars, pattern_labels, chart_images, captions, vlm_dataset]
# The main job ends by promoting, then rebuilds the drift reference of the promoted model (a minute or two), so a
# fresh run leaves everything the monitoring schedules need. drift_report (weekly partitions) and drift_alert_check
# run from their schedules over the service's prediction log.
ALL_ASSETS = DATA_ASSETS + MODEL_ASSETS + FUSION_ASSETS + TRADING_ASSETS + SERVING_ASSETS + [embedding_reference]
SCHEDULED_ASSETS = [a for a in MONITORING_ASSETS if a not in ALL_ASSETS]

main_job = define_asset_job(
    "main_job",
    selection=AssetSelection.assets(*ALL_ASSETS),
    description="The whole pipeline on the configured market data (the embedded synthetic market by default), "
                "ending with the promotion and the drift reference of the promoted model.",
)


def main_job_assets() -> list:
    """The asset keys the main job materializes."""
    return [key for asset in ALL_ASSETS for key in asset.keys]


def default_resources() -> dict:
    return {"market": MarketDataResource(), "store": ArtifactStoreResource(), "compute": ComputeResource(),
            "monitoring": MonitoringResource()}


defs = Definitions(
    assets=ALL_ASSETS + SCHEDULED_ASSETS,  # the monitoring assets carry their own WARN checks (check_specs)
    asset_checks=DATA_CHECKS + MODEL_CHECKS + FUSION_CHECKS + TRADING_CHECKS + SERVING_CHECKS,
    jobs=[main_job, *MONITORING_JOBS],
    schedules=MONITORING_SCHEDULES,
    sensors=MONITORING_SENSORS,
    resources=default_resources(),
    # torch steps already use every core; running steps one at a time in one process avoids oversubscription.
    executor=in_process_executor,
)
