"""Rendering: determinism, styles, focus-layout legibility, input validation, plotly + kaleido export."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlm_assets.rendering import (
    DEFAULT_STYLE,
    PRESETS,
    ChartStyle,
    KaleidoExporter,
    KaleidoTimeout,
    OhlcvArrays,
    encode_png,
    figure_png,
    moving_average,
    plotly_figure,
    randomize_style,
    read_back,
    render_chart,
    render_png,
    validate_bars,
)
from vlm_assets.rendering import figures

REPO = Path(__file__).resolve().parents[1]


def random_bars(n: int, seed: int = 0, start: float = 100.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = start * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[start, close[:-1]] * np.exp(rng.normal(0, 0.002, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.004, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.004, n)))
    volume = rng.lognormal(10, 0.5, n)
    index = pd.date_range("2024-01-02 09:30", periods=n, freq="5min", name="timestamp")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render_cases() -> dict[str, str]:
    """PNG hashes over presets, random styles, sizes and a composite; also run in a fresh interpreter."""
    bars, htf = random_bars(120, seed=1), random_bars(40, seed=2)
    cases = {name: render_png(bars, style) for name, style in PRESETS.items()}
    rng = np.random.default_rng(7)
    for i in range(6):
        cases[f"random{i}"] = render_png(bars, randomize_style(rng), htf_bars=htf if i % 2 else None)
    cases["wide_composite"] = render_png(bars, PRESETS["grid_dark"], 320, 200, htf_bars=htf)
    cases["style_ids"] = json.dumps([style.style_id() for style in PRESETS.values()]).encode()
    return {name: sha(png) for name, png in cases.items()}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def color_mask(image: Image.Image, colors) -> np.ndarray:
    array = pixels(image)
    return np.any([np.all(array == np.asarray(c), axis=-1) for c in colors], axis=0)


def last_candle(image: Image.Image, style: ChartStyle) -> dict[str, int]:
    """Pixel geometry of the rightmost candle: body width, total (wick) height, body height."""
    mask = color_mask(image, [style.up_body, style.down_body, style.up_wick, style.down_wick])
    columns = np.flatnonzero(mask.any(axis=0))
    right = columns[-1]
    left = right
    while left - 1 in set(columns.tolist()):
        left -= 1
    candle = mask[:, left : right + 1]
    rows = np.flatnonzero(candle.any(axis=1))
    row_widths = candle.sum(axis=1)
    body_width = int(row_widths.max())
    return {"body_width": body_width, "height": int(rows[-1] - rows[0] + 1), "body_height": int((row_widths == body_width).sum())}


# --- determinism -------------------------------------------------------------------------------------


def test_same_bars_and_style_give_identical_png_in_process():
    bars = random_bars(100, seed=3)
    reindexed = bars.reset_index(drop=True).copy()  # index is ignored
    for style in [*PRESETS.values(), randomize_style(np.random.default_rng(0))]:
        first = render_png(bars, style)
        assert render_png(bars, style) == first
        assert render_png(reindexed, style) == first


def test_png_identical_across_processes():
    code = "import json; from tests.test_rendering import render_cases; print(json.dumps(render_cases()))"
    runs = [
        subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed})
        for seed in ("1", "2")
    ]
    expected = render_cases()
    for run in runs:
        assert json.loads(run.stdout.strip().splitlines()[-1]) == expected


def test_column_order_and_extra_columns_do_not_change_the_image():
    bars = random_bars(80, seed=4)
    shuffled = bars[["volume", "close", "low", "open", "high"]].assign(symbol="XYZ", volume=bars["volume"].round().astype("int64"))
    bars = bars.assign(volume=bars["volume"].round())
    assert render_png(shuffled) == render_png(bars)


def test_encode_png_is_lossless_and_has_no_ancillary_chunks():
    image = render_chart(random_bars(60), PRESETS["grid_dark"])
    for mode in ("RGB", "RGBA", "L"):
        converted = image.convert(mode)
        png = encode_png(converted)
        decoded = Image.open(io.BytesIO(png))
        assert decoded.mode == mode and np.array_equal(np.asarray(decoded), np.asarray(converted))
        chunks, offset = [], 8
        while offset < len(png):
            length = int.from_bytes(png[offset : offset + 4], "big")
            chunks.append(png[offset + 4 : offset + 8])
            offset += 12 + length
        assert chunks == [b"IHDR", b"IDAT", b"IEND"]
    with pytest.raises(ValueError, match="convert first"):
        encode_png(image.convert("P"))


# --- styles ------------------------------------------------------------------------------------------


def test_every_preset_renders_and_presets_look_different():
    bars = random_bars(100, seed=5)
    hashes = set()
    for name, style in PRESETS.items():
        for width, height in ((224, 224), (320, 180), (96, 96)):
            image = render_chart(bars, style, width, height)
            assert image.size == (width, height) and image.mode == "RGB"
        hashes.add(sha(render_png(bars, style)))
    assert len(hashes) == len(PRESETS)
    assert {"classic_light", "classic_dark", "mono", "hollow_light", "hollow_dark"} <= set(PRESETS)
    assert sum(style.grid and style.axis_labels for style in PRESETS.values()) >= 2
    assert DEFAULT_STYLE is PRESETS["classic_light"]


def test_style_json_round_trip_and_id():
    for style in PRESETS.values():
        restored = ChartStyle.from_dict(json.loads(json.dumps(style.to_dict())))
        assert restored == style and restored.style_id() == style.style_id()
    assert len({style.style_id() for style in PRESETS.values()}) == len(PRESETS)
    assert dataclasses.replace(DEFAULT_STYLE, wick_width=2).style_id() != DEFAULT_STYLE.style_id()
    with pytest.raises(ValueError, match="unknown ChartStyle fields"):
        ChartStyle.from_dict({"colour": [1, 2, 3]})
    with pytest.raises(ValueError, match="candle_width"):
        dataclasses.replace(DEFAULT_STYLE, candle_width=1.5)


def test_randomize_style_is_seeded_and_covers_the_looks():
    def draws(seed):
        rng = np.random.default_rng(seed)
        return [randomize_style(rng) for _ in range(200)]

    styles = draws(11)
    assert styles == draws(11)
    assert styles != draws(12)
    luminance = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in (s.background for s in styles)]
    assert min(luminance) < 60 and max(luminance) > 200
    for flag in ("up_hollow", "down_hollow", "grid", "axis_labels", "volume_pane", "focus_separator"):
        assert {getattr(s, flag) for s in styles} == {True, False}, flag
    assert any(s.overlays for s in styles) and any(not s.overlays for s in styles)
    assert any(s.focus_bars == 0 for s in styles) and any(s.focus_bars > 0 for s in styles)
    # Same-coloured up/down bodies must keep direction visible through hollowness.
    assert all(s.up_hollow != s.down_hollow for s in styles if s.name.startswith("mono"))
    base = randomize_style(np.random.default_rng(3), base=PRESETS["hollow_dark"])
    assert base.name == "hollow_dark~r"
    bars, htf = random_bars(120, seed=6), random_bars(30, seed=7)
    for i, style in enumerate(styles):
        assert render_chart(bars, style, htf_bars=htf if i % 3 == 0 else None).size == (224, 224)


def test_volume_overlays_and_grid_are_drawn():
    bars = random_bars(100, seed=8)
    plain = dataclasses.replace(PRESETS["grid_dark"], volume_pane=False, overlays=(), grid=False, axis_labels=False)
    assert not color_mask(render_chart(bars, plain), plain.overlay_colors).any()
    for change in (dict(volume_pane=True), dict(overlays=(("ema", 9),)), dict(grid=True), dict(axis_labels=True)):
        assert render_png(bars, dataclasses.replace(plain, **change)) != render_png(bars, plain), change
    overlaid = render_chart(bars, dataclasses.replace(plain, overlays=(("ema", 9),)))
    assert color_mask(overlaid, plain.overlay_colors[:1]).sum() > 50


def test_moving_averages():
    close = random_bars(60, seed=9)["close"].to_numpy()
    sma = moving_average(close, "sma", 10)
    assert np.isnan(sma[:9]).all()
    np.testing.assert_allclose(sma[9:], pd.Series(close).rolling(10).mean().to_numpy()[9:])
    ema = moving_average(close, "ema", 10)
    assert np.isnan(ema[:9]).all() and ema[9] == pytest.approx(close[:10].mean())
    expected = pd.Series(np.r_[ema[9], close[10:]]).ewm(span=10, adjust=False).mean().to_numpy()
    np.testing.assert_allclose(ema[9:], expected)
    assert np.isnan(moving_average(close[:5], "sma", 10)).all()


# --- composite ---------------------------------------------------------------------------------------


def test_composite_with_higher_timeframe_panel():
    bars, htf = random_bars(100, seed=10), random_bars(40, seed=11)
    for style in (DEFAULT_STYLE, PRESETS["grid_dark"]):
        for width, height in ((224, 224), (320, 240)):
            composite = render_chart(bars, style, width, height, htf_bars=htf)
            plain = render_chart(bars, style, width, height)
            assert composite.size == plain.size == (width, height)
            assert not np.array_equal(np.asarray(composite), np.asarray(plain))
            candles = color_mask(composite, [style.up_body, style.down_body])
            htf_top = height - style.margins[3] - round((height - style.margins[1] - style.margins[3]) * style.htf_height)
            assert candles[htf_top:].sum() > 100, "HTF candles in the bottom panel"
            assert candles[: htf_top - 8].sum() > 100, "window candles above it"
    with pytest.raises(ValueError, match="htf_bars"):
        render_chart(bars, htf_bars=htf.iloc[:0])


# --- legibility --------------------------------------------------------------------------------------


def with_last_candle(bars: pd.DataFrame, body: float, wick: float) -> pd.DataFrame:
    """Replace the newest bar: body and each wick as fractions of the previous close."""
    bars = bars.copy()
    base = bars["close"].iloc[-2]
    open_, close = base, base * (1 + body)
    bars.iloc[-1] = [open_, max(open_, close) + base * wick, min(open_, close) - base * wick, close, bars["volume"].iloc[-1]]
    return bars


def test_last_candles_stay_legible_in_a_120_bar_window():
    style = DEFAULT_STYLE
    window = with_last_candle(random_bars(120, seed=12), body=0.004, wick=0.003)  # a 1% candle in a ~25% window
    image = render_chart(window, style)
    candle = last_candle(image, style)
    uniform_style = dataclasses.replace(style, focus_bars=0)
    uniform = last_candle(render_chart(window, uniform_style), uniform_style)
    # Uniform spacing gives 1.8 px slots (1 px bodies); the focus layout gives the newest five ~13 px slots.
    assert uniform["body_width"] == 1 and candle["body_width"] >= 7
    assert candle["height"] >= 18 and candle["height"] > uniform["height"]
    assert candle["height"] - candle["body_height"] >= 8, "both wicks visible"
    # The five focus candles span at least focus_min_span of the price panel height.
    panel_height = 224 - style.margins[1] - style.margins[3]
    focus_left = style.margins[0] + round((224 - style.margins[0] - style.margins[2]) * (1 - style.focus_fraction))
    rows = np.flatnonzero(color_mask(image, [style.up_body, style.down_body])[:, focus_left + 1 :].any(axis=1))
    assert rows[-1] - rows[0] + 1 >= style.focus_min_span * panel_height - 2
    for name, preset in PRESETS.items():  # axis labels and volume panes cost some room, not legibility
        measured = last_candle(render_chart(window, preset), preset)
        assert measured["body_width"] >= 7 and measured["height"] >= 15, name


def test_doji_and_small_body_are_distinguishable():
    window = random_bars(120, seed=13)
    doji = last_candle(render_chart(with_last_candle(window, body=0.0, wick=0.005)), DEFAULT_STYLE)
    small = last_candle(render_chart(with_last_candle(window, body=0.001, wick=0.005)), DEFAULT_STYLE)
    assert doji["body_height"] == 1 and doji["height"] >= 20
    assert small["body_height"] >= 3


@pytest.mark.parametrize("case", ["default", "uniform", "composite", "random"])
def test_read_back_keeps_every_price_inside_its_pixel_row(case):
    bars = random_bars(90, seed=21)
    style = {"default": DEFAULT_STYLE, "uniform": dataclasses.replace(DEFAULT_STYLE, focus_bars=0),
             "composite": DEFAULT_STYLE, "random": randomize_style(np.random.default_rng(5))}[case]
    composite = case == "composite"
    edges = [read_back(bars, style, 224, composite, np.full((4, len(bars)), side)) for side in (-0.5, 0.5)]
    centre = read_back(bars, style, 224, composite)
    for column in ("open", "high", "low", "close"):
        original = bars[column].to_numpy()
        below, above, middle = (getattr(read, column) for read in (*edges, centre))
        tolerance = 1e-9 * original
        assert np.all(below <= original + tolerance) and np.all(original <= above + tolerance)
        assert np.all((below <= middle) & (middle <= above))
        assert 0 < np.median(above - below) < 0.01 * original.mean()  # one row is a small slice of the price range


def test_read_back_cannot_tell_prices_on_one_row_apart():
    window = random_bars(120, seed=13)
    one_row = read_back(with_last_candle(window, body=1e-7, wick=0.005))
    assert one_row.open[-1] == one_row.close[-1]  # drawn as a 1 px body, like an exact doji
    visible = read_back(with_last_candle(window, body=0.001, wick=0.005))
    assert visible.close[-1] > visible.open[-1]
    with pytest.raises(ValueError, match="within_row must have shape"):
        read_back(window, within_row=np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"values in \[-0.5, 0.5\]"):
        read_back(window, within_row=np.ones((4, len(window))))


def test_whole_window_stays_in_view():
    style = DEFAULT_STYLE
    top, bottom = style.margins[1], 224 - 1 - style.margins[3]
    for seed in range(20):
        bars = random_bars(120, seed=seed)
        rows = np.flatnonzero(color_mask(render_chart(bars, style), [style.up_body, style.down_body]).any(axis=1))
        # The window's extremes sit just inside the panel (4% headroom at the compressed scale), never clipped.
        assert top <= rows[0] <= top + 10 and bottom - 10 <= rows[-1] <= bottom


def test_focus_magnification_is_capped_for_a_flat_tail():
    # A steady 30% climb, then five near-identical doji: magnifying them to 40% of the panel would be noise.
    ramp = np.linspace(100, 130, 115)
    close, open_ = np.r_[ramp, np.full(5, 130.0)], np.r_[ramp - 0.2, np.full(5, 130.0)]
    bars = pd.DataFrame({"open": open_, "high": np.maximum(open_, close) + 0.05, "low": np.minimum(open_, close) - 0.05,
                         "close": close, "volume": 1.0})

    def tail_height(**change):
        style = dataclasses.replace(DEFAULT_STYLE, **change)
        return last_candle(render_chart(bars, style), style)["height"]

    linear = tail_height(focus_min_span=0.0)
    assert tail_height() <= DEFAULT_STYLE.focus_max_zoom * linear + 1
    assert tail_height(focus_max_zoom=100.0) > 50


# --- validation --------------------------------------------------------------------------------------


def broken(change):
    bars = random_bars(10, seed=15)
    change(bars)
    return bars


@pytest.mark.parametrize(
    "bars, message",
    [
        (random_bars(5).iloc[:0], "bars is empty"),
        (random_bars(5).drop(columns="volume"), r"missing column\(s\) \['volume'\]"),
        (broken(lambda b: b.iloc.__setitem__((3, 3), np.nan)), "row 3 .*non-finite close"),
        (broken(lambda b: b.iloc.__setitem__((4, 1), np.inf)), "row 4 .*non-finite high"),
        (broken(lambda b: b.iloc.__setitem__((2, 0), -1.0)), "row 2 .*open must be > 0"),
        (broken(lambda b: b.iloc.__setitem__((6, 4), -5.0)), "row 6 .*volume must be >= 0"),
        (broken(lambda b: b.iloc.__setitem__((5, 1), b.iloc[5, 2] * 0.9)), "row 5 .*high < low"),
        (broken(lambda b: b.iloc.__setitem__((7, 2), b.iloc[7, [0, 3]].min() * 1.001)), r"row 7 .*low > min\(open, close\)"),
        (broken(lambda b: b.iloc.__setitem__((8, 1), b.iloc[8, [0, 3]].max() * 0.999)), r"row 8 .*high < max\(open, close\)"),
        (random_bars(5).assign(open="x"), "non-numeric"),
        ([[1, 2, 0.5, 1.5, 10]], "must be a pandas DataFrame or OhlcvArrays"),
        # the same rules on columns already taken out of a frame (the service's parsed bars)
        (OhlcvArrays(*np.ones((5, 0))), "bars is empty"),
        (OhlcvArrays(*np.ones((5, 4)))._replace(volume=np.ones(3)), "1-D and of one length"),
        (OhlcvArrays(*broken(lambda b: b.iloc.__setitem__((3, 3), np.nan)).to_numpy().T), "row 3: non-finite close"),
        (OhlcvArrays(*random_bars(5).to_numpy().T)._replace(open=["x"] * 5), "non-numeric"),
    ],
)
def test_bad_bars_raise_a_clear_error(bars, message):
    with pytest.raises(ValueError, match=message):
        validate_bars(bars)
    with pytest.raises(ValueError, match=message):
        render_chart(bars)


def test_bad_sizes_raise_a_clear_error():
    bars = random_bars(50)
    with pytest.raises(ValueError, match="width and height"):
        render_chart(bars, width=20)
    with pytest.raises(ValueError, match="width and height"):
        render_chart(bars, height=100.0)
    assert render_chart(bars, width=np.int64(200)).size == (200, 224)
    with pytest.raises(ValueError, match="price panel"):
        render_chart(bars, dataclasses.replace(DEFAULT_STYLE, margins=(30, 30, 30, 30)), 80, 80)


def test_package_import_stays_light():
    code = ("import sys, vlm_assets.rendering; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'plotly', 'kaleido', 'dagster', 'bentoml'}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.stdout.strip() == "[]"


# --- plotly figures and kaleido ----------------------------------------------------------------------


def group_is_gone(pgid: int, within: float = 5.0) -> bool:
    """No live (non-zombie) process left in the group; SIGKILL lands asynchronously, so allow a moment."""
    deadline = time.monotonic() + within
    while True:
        live = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                text = Path(stat).read_text()
            except OSError:
                continue
            state, _, group = text[text.rindex(")") + 2 :].split()[:3]
            live += [stat] if int(group) == pgid and state != "Z" else []
        if not live or time.monotonic() > deadline:
            return not live
        time.sleep(0.05)


@pytest.fixture(scope="module")
def exporter():
    with KaleidoExporter(timeout=20.0) as exporter:
        yield exporter


def retried(export):
    """kaleido 0.2.1 hangs now and then (plotly/Kaleido#134): the exporter kills and restarts, we retry once."""
    try:
        return export()
    except KaleidoTimeout:
        return export()


def test_plotly_figure_traces():
    bars, htf = random_bars(60, seed=16), random_bars(20, seed=17)
    fig = plotly_figure(bars, PRESETS["grid_dark"], title="window", htf_bars=htf)
    kinds = [trace.type for trace in fig.data]
    assert kinds == ["candlestick", "scatter", "scatter", "bar", "candlestick"]
    assert fig.layout.title.text == "window"
    assert [trace.type for trace in plotly_figure(bars).data] == ["candlestick"]
    with pytest.raises(ValueError, match="row 3"):
        plotly_figure(broken(lambda b: b.iloc.__setitem__((3, 0), 0.0)))


@pytest.mark.timeout(120)
def test_kaleido_export_size_and_determinism(exporter):
    fig = plotly_figure(random_bars(120, seed=18), PRESETS["grid_dark"], title="determinism", htf_bars=random_bars(30))
    first = retried(lambda: exporter.to_png(fig, 640, 360))
    assert Image.open(io.BytesIO(first)).size == (640, 360)
    assert retried(lambda: exporter.to_png(fig, 640, 360)) == first
    exporter.close()  # a fresh worker and chromium give the same bytes
    assert retried(lambda: exporter.to_png(fig, 640, 360)) == first
    small = retried(lambda: figure_png(plotly_figure(random_bars(50)), width=224, height=224, timeout=20))
    assert Image.open(io.BytesIO(small)).size == (224, 224)


@pytest.mark.timeout(120)
def test_kaleido_timeout_kills_the_worker_and_recovers(exporter):
    fig = plotly_figure(random_bars(80, seed=19))
    expected = retried(lambda: exporter.to_png(fig, 300, 200))  # warm: chromium running
    old_group = exporter.pid
    with pytest.raises(KaleidoTimeout):
        exporter.to_png(fig, 300, 200, timeout=0.001)  # an export in flight is cut off
    assert exporter.pid not in (None, old_group), "a fresh worker was started"
    assert group_is_gone(old_group), "worker, kaleido and chromium are all gone"
    assert retried(lambda: exporter.to_png(fig, 300, 200)) == expected


@pytest.mark.timeout(60)
def test_a_hanging_worker_and_its_children_are_killed(monkeypatch, tmp_path):
    # Each worker records its pid (= its process group) and starts a child that would outlive it.
    hang = (f"import os, subprocess, time; open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w').close(); "
            "subprocess.Popen(['sleep', '60']); time.sleep(60)")
    monkeypatch.setattr(figures, "_WORKER_SOURCE", hang)
    monkeypatch.setattr(figures, "_CLOSE_GRACE", 0.1)
    with KaleidoExporter(timeout=2.0) as hanging:
        with pytest.raises(KaleidoTimeout):
            hanging.to_png(plotly_figure(random_bars(20)), 100, 100)
    groups = [int(path.name) for path in tmp_path.iterdir()]
    assert groups and all(group_is_gone(group) for group in groups)
