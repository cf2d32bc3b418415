"""The Dagster code location (workspace.yaml and `dagster dev` load `defs` from here)."""

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from vlm_assets.pipeline.checks import DATA_CHECKS, FUSION_CHECKS, MODEL_CHECKS, SERVING_CHECKS
from vlm_assets.pipeline.data import captions, chart_images, ohlcv_bars, pattern_labels, vlm_dataset
from vlm_assets.pipeline.fusion import FUSION_ASSETS
from vlm_assets.pipeline.model import MODEL_ASSETS
from vlm_assets.pipeline.serving import SERVING_ASSETS
from vlm_assets.pipeline.trading import TRADING_ASSETS, TRADING_CHECKS
from vlm_resources import ArtifactStoreResource, ComputeResource, MarketDataResource

DATA_ASSETS = [ohlcv_bars, pattern_labels, chart_images, captions, vlm_dataset]
ALL_ASSETS = DATA_ASSETS + MODEL_ASSETS + FUSION_ASSETS + TRADING_ASSETS + SERVING_ASSETS

main_job = define_asset_job(
    "main_job",
    selection=AssetSelection.assets(*ALL_ASSETS),
    description="The whole pipeline on the configured market data (the embedded synthetic market by default).",
)


def main_job_assets() -> list:
    """The asset keys the main job materializes."""
    return [key for asset in ALL_ASSETS for key in asset.keys]


def default_resources() -> dict:
    return {"market": MarketDataResource(), "store": ArtifactStoreResource(), "compute": ComputeResource()}


defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=DATA_CHECKS + MODEL_CHECKS + FUSION_CHECKS + TRADING_CHECKS + SERVING_CHECKS,
    jobs=[main_job],
    resources=default_resources(),
    # torch steps already use every core; running steps one at a time in one process avoids oversubscription.
    executor=in_process_executor,
)
