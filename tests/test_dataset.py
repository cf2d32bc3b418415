import pandas as pd
import pytest

from vlm_assets.dataset import (
    SplitConfig, WindowSamplingConfig, all_candidates, assign_splits, leakage_violations,
    select_windows,
)
from vlm_assets.labeling import CORE_PATTERNS, NEUTRAL, label_bars
from vlm_assets.market.synthetic import SyntheticMarketConfig, generate_market
from vlm_assets.market.timeframes import bar_end

SAMPLING = WindowSamplingConfig(n_windows=300, min_bars=50, max_bars=60, per_core_pattern=12, per_zero_shot_pattern=5,
                                near_miss_windows=10, block_days=5, timeframes=("1m", "5m", "15m"))


@pytest.fixture(scope="module")
def market():
    return generate_market(SyntheticMarketConfig(symbols=("AAA", "BBB"), trading_days=40, plants_per_timeframe=60))


@pytest.fixture(scope="module")
def windows(market):
    labels = {key: label_bars(bars) for key, bars in market.bars.items()}
    candidates = all_candidates(market.bars, labels, SAMPLING)
    return select_windows(candidates, SAMPLING, market.plants[market.plants["near_miss"]])


def test_quotas_are_met_and_windows_fit_their_block(windows):
    assert len(windows) == SAMPLING.n_windows
    assert windows["window_id"].is_unique
    for pattern in CORE_PATTERNS:
        assert windows[pattern].sum() >= SAMPLING.per_core_pattern, pattern
    assert windows[NEUTRAL].mean() >= SAMPLING.neutral_share - 0.01
    assert (windows["near_miss_of"] != "").sum() >= SAMPLING.near_miss_windows
    assert set(windows["timeframe"]) == set(SAMPLING.timeframes)
    assert windows["n_bars"].between(SAMPLING.min_bars, SAMPLING.max_bars).all()


def test_selection_is_deterministic(market, windows):
    labels = {key: label_bars(bars) for key, bars in market.bars.items()}
    again = select_windows(all_candidates(market.bars, labels, SAMPLING), SAMPLING, market.plants[market.plants["near_miss"]])
    assert again["window_id"].tolist() == windows["window_id"].tolist()


def test_splits_by_time_block_never_leak(market, windows):
    frame = windows.copy()
    frame["split"] = assign_splits(frame, SplitConfig())
    assert set(frame["split"]) == {"train", "val", "test"}
    assert frame.groupby(["symbol", "block"])["split"].nunique().max() == 1
    # Real spans: the first bar of each window to the close of its last bar.
    starts, ends = [], []
    for row in frame.itertuples():
        bars = market.bars[(row.symbol, row.timeframe)]
        starts.append(bars.index[row.pos - row.n_bars + 1])
        ends.append(bar_end(bars.index[row.pos: row.pos + 1], row.timeframe)[0])
    frame["span_start"], frame["span_end"] = starts, ends
    assert leakage_violations(frame).empty
    shares = frame["split"].value_counts(normalize=True)
    assert shares["train"] > shares["val"] and shares["train"] > shares["test"]


def test_leak_detector_finds_an_overlap():
    t = pd.Timestamp("2024-01-02 10:00")
    frame = pd.DataFrame({
        "window_id": ["a", "b", "c"], "symbol": ["S", "S", "S"], "split": ["train", "test", "test"],
        "span_start": [t, t + pd.Timedelta(minutes=30), t + pd.Timedelta(hours=3)],
        "span_end": [t + pd.Timedelta(hours=1), t + pd.Timedelta(hours=2), t + pd.Timedelta(hours=4)],
    })
    leaks = leakage_violations(frame)
    assert leaks[["window_id", "overlaps_window_id"]].values.tolist() == [["b", "a"]]


def test_too_few_blocks_is_a_clear_error(windows):
    one_block = windows.assign(block=0, symbol="S")
    with pytest.raises(ValueError, match="at least 3 time blocks"):
        assign_splits(one_block, SplitConfig())


def test_bad_sampling_config_is_refused():
    with pytest.raises(ValueError, match="min_bars"):
        WindowSamplingConfig(min_bars=130, max_bars=120)
    with pytest.raises(ValueError, match="unknown"):
        WindowSamplingConfig(timeframes=("2h",))
    with pytest.raises(ValueError, match="fractions"):
        SplitConfig(fractions=(0.5, 0.5, 0.5))


def test_a_failed_kaleido_export_is_retried_before_the_raster_fallback(market, windows, monkeypatch):
    """A timeout on a loaded machine must not change the dataset: the export is retried on the restarted worker;
    only repeated failures fall back to the raster renderer, and the row says so."""
    from vlm_assets import rendering
    from vlm_assets.dataset import KALEIDO_ATTEMPTS, ImageConfig, render_windows

    few = windows.head(2)
    config = ImageConfig(plotly_share=1.0, composite_share=0.0)
    real_export = rendering.KaleidoExporter.to_png
    calls = []

    def every_other_call_fails(self, figure, width, height, **kwargs):
        calls.append(1)
        if len(calls) % 2:
            raise rendering.KaleidoTimeout("simulated timeout")
        return real_export(self, figure, width, height, **kwargs)

    monkeypatch.setattr(rendering.KaleidoExporter, "to_png", every_other_call_fails)
    retried = render_windows(few, market.bars, SAMPLING, config)
    assert list(retried["renderer"]) == ["plotly", "plotly"] and len(calls) == 4

    monkeypatch.setattr(rendering.KaleidoExporter, "to_png", real_export)
    assert list(render_windows(few, market.bars, SAMPLING, config)["image_sha256"]) == list(retried["image_sha256"])

    def always_fails(self, *args, **kwargs):
        calls.append(1)
        raise rendering.KaleidoTimeout("simulated timeout")

    calls.clear()
    monkeypatch.setattr(rendering.KaleidoExporter, "to_png", always_fails)
    fallen_back = render_windows(few, market.bars, SAMPLING, config)
    assert list(fallen_back["renderer"]) == ["raster_fallback"] * 2 and len(calls) == 2 * KALEIDO_ATTEMPTS
