import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
# Tests never touch the user's BentoML model store: a private one, set before bentoml is first imported.
BENTOML_HOME = tempfile.mkdtemp(prefix="candle-vlm-test-bentoml-")
os.environ["BENTOML_HOME"] = BENTOML_HOME


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(BENTOML_HOME, ignore_errors=True)

TINY_MARKET = {"symbols": ["AAA", "BBB"], "trading_days": 30, "plants_per_timeframe": 40}
TINY_RUN_CONFIG = {
    "ops": {
        "chart_images": {"config": {
            "n_windows": 60, "min_bars": 50, "max_bars": 60, "per_core_pattern": 4, "per_zero_shot_pattern": 2,
            "near_miss_windows": 4, "block_days": 5, "timeframes": ["1m", "5m", "15m"], "plotly_share": 0.05,
        }},
        "vlm_dataset": {"config": {"min_per_core_pattern": 4}},
    }
}
# Real training, a few steps of a few charts: enough to exercise every code path, not to learn.
TINY_TRAINING = {"steps": 3, "batch_size": 8, "warmup_steps": 1, "workers": 0}
TINY_HORIZONS = {"1m": 15, "5m": 6, "15m": 4}
TINY_TRADING = {"ops": {
    "direction_model": {"config": {"horizons": TINY_HORIZONS, "folds": 4, "min_train_rows": 20, "n_estimators": 20,
                                   "learning_rate": 0.1, "num_leaves": 7, "min_child_samples": 5, "threads": 1,
                                   "guard_sample": 64}},
    # any lean of the direction model counts and gates open easily: the tiny run has ~10 validation windows and a
    # barely trained fuser, and the point here is that every path runs
    "gated_signals": {"config": {"min_confidence": 0.5, "min_precision": 0.5, "min_probability": 0.0}},
}}
TINY_FULL_RUN_CONFIG = {"ops": TINY_RUN_CONFIG["ops"] | TINY_TRADING["ops"] | {
    "chart_clip_pretrained": {"config": TINY_TRAINING | {"caption_pool": 32}},
    "chart_clip_finetuned": {"config": TINY_TRAINING},
    "resnet_baseline": {"config": TINY_TRAINING},
    "feature_model": {"config": {"n_estimators": 20}},
    # an impossible gap bound: the fallback to late fusion is always taken (and tested)
    "fuser": {"config": {"epochs": 3, "max_train_val_gap": -1.0}},
}}


def tiny_resources(root, **market_overrides):
    from vlm_resources import ArtifactStoreResource, ComputeResource, MarketDataResource

    return {
        "market": MarketDataResource(**(TINY_MARKET | market_overrides)),
        "store": ArtifactStoreResource(root=str(root)),
        "compute": ComputeResource(threads=2, device="cpu"),
    }


@pytest.fixture(scope="session")
def encoder():
    from vlm_assets.text_encoder import MiniLMEncoder

    return MiniLMEncoder()


def run_model_pipeline(root):
    """Data, model, fusion and trading assets with their checks, materialized for real on the tiny config."""
    from dagster import materialize

    from vlm_assets.definitions import DATA_ASSETS
    from vlm_assets.pipeline.checks import FUSION_CHECKS, MODEL_CHECKS
    from vlm_assets.pipeline.fusion import FUSION_ASSETS
    from vlm_assets.pipeline.model import MODEL_ASSETS
    from vlm_assets.pipeline.trading import TRADING_ASSETS, TRADING_CHECKS

    return materialize([*DATA_ASSETS, *MODEL_ASSETS, *MODEL_CHECKS, *FUSION_ASSETS, *FUSION_CHECKS, *TRADING_ASSETS,
                        *TRADING_CHECKS],
                       resources=tiny_resources(root), run_config=TINY_FULL_RUN_CONFIG)


@pytest.fixture(scope="session")
def model_run(tmp_path_factory):
    """One tiny pipeline run shared by the model, fusion and serving tests: (artifact root, result)."""
    root = tmp_path_factory.mktemp("model-run")
    return root, run_model_pipeline(root)
