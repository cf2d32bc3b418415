"""Chart styles: every visual choice of the raster renderer, as a frozen, JSON-serializable value.

A style plus ``STYLE_VERSION`` fully determines the pixels produced for a given window, so dataset
caches should key rendered images on ``(STYLE_VERSION, style.style_id(), bars)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

# Bump whenever the renderer would draw different pixels for the same (style, bars).
STYLE_VERSION = "1"

RGB = tuple[int, int, int]
OVERLAY_KINDS = ("sma", "ema")


@dataclass(frozen=True)
class ChartStyle:
    """Every visual choice of a chart. Sizes in pixels unless named as a fraction.

    Focus layout (legibility of the last candles, where patterns live):
      * ``focus_bars`` newest candles share ``focus_fraction`` of the plot width, the older ones share
        the rest (``focus_bars=0`` gives the uniform layout of ordinary charting tools).
      * The price axis is piecewise linear: the focus candles' high-low range spans at least
        ``focus_min_span`` of the price panel height and the rest of the window is compressed into the
        remaining height (never clipped). The magnification is capped at ``focus_max_zoom`` times the
        linear scale so a near-flat tail is not blown up into tick noise.
    """

    name: str = "classic_light"
    background: RGB = (255, 255, 255)
    up_body: RGB = (0, 150, 60)
    down_body: RGB = (215, 40, 40)
    up_wick: RGB = (0, 150, 60)
    down_wick: RGB = (215, 40, 40)
    up_hollow: bool = False
    down_hollow: bool = False
    body_border: RGB | None = None  # outline drawn around filled bodies; None = no outline
    candle_width: float = 0.7  # body width as a fraction of the bar slot
    wick_width: int = 1
    grid: bool = False
    grid_color: RGB = (230, 230, 230)
    grid_lines: int = 4  # approximate number of horizontal grid lines / price labels
    axis_labels: bool = False
    axis_side: str = "right"
    text_color: RGB = (60, 60, 60)
    margins: tuple[int, int, int, int] = (4, 6, 4, 6)  # left, top, right, bottom
    volume_pane: bool = False
    volume_height: float = 0.2  # fraction of the main panel height
    volume_alpha: float = 0.55  # opacity of volume bars over the background
    overlays: tuple[tuple[str, int], ...] = ()  # e.g. (("sma", 20), ("ema", 9))
    overlay_colors: tuple[RGB, ...] = ((33, 110, 220), (240, 150, 20), (150, 60, 200))
    overlay_width: int = 1
    focus_bars: int = 5
    focus_fraction: float = 0.3
    focus_separator: bool = True  # faint vertical line between old and focus candles
    # 70% and up to 10x: at 30-50% and 4x, 40% of the dataset's positives held their rule by under one pixel row
    # (bench/label_ceiling.py; docs/benchmarks.md).
    focus_min_span: float = 0.7
    focus_max_zoom: float = 10.0
    htf_height: float = 0.28  # fraction of the image height given to the higher-timeframe panel

    def __post_init__(self) -> None:
        for field in ("background", "up_body", "down_body", "up_wick", "down_wick", "grid_color", "text_color"):
            _check_rgb(field, getattr(self, field))
        if self.body_border is not None:
            _check_rgb("body_border", self.body_border)
        for color in self.overlay_colors:
            _check_rgb("overlay_colors", color)
        _check_range("candle_width", self.candle_width, 0.05, 1.0)
        _check_range("volume_height", self.volume_height, 0.05, 0.5)
        _check_range("volume_alpha", self.volume_alpha, 0.0, 1.0)
        _check_range("focus_fraction", self.focus_fraction, 0.0, 0.9)
        _check_range("focus_min_span", self.focus_min_span, 0.0, 1.0)
        _check_range("focus_max_zoom", self.focus_max_zoom, 1.0, 100.0)
        _check_range("htf_height", self.htf_height, 0.1, 0.6)
        if self.wick_width < 1 or self.overlay_width < 1 or self.grid_lines < 1 or self.focus_bars < 0:
            raise ValueError("wick_width, overlay_width and grid_lines must be >= 1 and focus_bars >= 0")
        if len(self.margins) != 4 or min(self.margins) < 0:
            raise ValueError(f"margins must be four non-negative ints (left, top, right, bottom), got {self.margins}")
        if self.axis_side not in ("left", "right"):
            raise ValueError(f"axis_side must be 'left' or 'right', got {self.axis_side!r}")
        for kind, period in self.overlays:
            if kind not in OVERLAY_KINDS or period < 1:
                raise ValueError(f"overlay ({kind!r}, {period}) must be one of {OVERLAY_KINDS} with period >= 1")
        if self.overlays and not self.overlay_colors:
            raise ValueError("overlays need at least one overlay colour")

    def to_dict(self) -> dict:
        """Plain JSON types only (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> ChartStyle:
        """Inverse of ``to_dict``; keys missing from ``d`` take the field defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ChartStyle fields: {sorted(unknown)}")
        return cls(**{key: _as_tuples(value) for key, value in d.items()})

    def style_id(self) -> str:
        """Short content hash, stable across processes and machines (independent of ``STYLE_VERSION``)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _check_rgb(field: str, color) -> None:
    if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
        raise ValueError(f"{field} must be an RGB tuple of three ints in 0..255, got {color!r}")


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{field} must be in [{low}, {high}], got {value}")


def _as_tuples(value):
    """JSON lists back to the tuples a frozen (hashable) style holds."""
    if isinstance(value, list):
        return tuple(_as_tuples(item) for item in value)
    return value


_GRID_AXES = dict(grid=True, axis_labels=True, margins=(4, 6, 2, 6))

PRESETS: dict[str, ChartStyle] = {
    style.name: style
    for style in (
        ChartStyle(),
        ChartStyle(
            name="classic_dark",
            background=(19, 23, 34),
            up_body=(38, 166, 154),
            down_body=(239, 83, 80),
            up_wick=(38, 166, 154),
            down_wick=(239, 83, 80),
            grid_color=(42, 46, 57),
            text_color=(178, 181, 190),
        ),
        ChartStyle(
            name="mono",
            up_body=(0, 0, 0),
            down_body=(0, 0, 0),
            up_wick=(0, 0, 0),
            down_wick=(0, 0, 0),
            up_hollow=True,
            text_color=(0, 0, 0),
        ),
        ChartStyle(
            name="hollow_light",
            background=(252, 252, 250),
            up_body=(8, 153, 129),
            down_body=(242, 54, 69),
            up_wick=(8, 153, 129),
            down_wick=(242, 54, 69),
            up_hollow=True,
            candle_width=0.75,
        ),
        ChartStyle(
            name="hollow_dark",
            background=(12, 14, 20),
            up_body=(0, 200, 120),
            down_body=(255, 80, 80),
            up_wick=(0, 200, 120),
            down_wick=(255, 80, 80),
            up_hollow=True,
            grid_color=(40, 44, 52),
            text_color=(190, 190, 190),
        ),
        ChartStyle(
            name="bordered_light",
            background=(255, 255, 255),
            up_body=(120, 200, 140),
            down_body=(235, 120, 120),
            up_wick=(70, 70, 70),
            down_wick=(70, 70, 70),
            body_border=(70, 70, 70),
            candle_width=0.8,
        ),
        ChartStyle(
            name="grid_light",
            background=(250, 250, 250),
            up_body=(33, 150, 243),
            down_body=(40, 40, 40),
            up_wick=(33, 150, 243),
            down_wick=(40, 40, 40),
            grid_color=(222, 222, 222),
            text_color=(80, 80, 80),
            volume_pane=True,
            overlays=(("sma", 20),),
            **_GRID_AXES,
        ),
        ChartStyle(
            name="grid_dark",
            background=(30, 30, 30),
            up_body=(0, 230, 118),
            down_body=(255, 82, 82),
            up_wick=(0, 230, 118),
            down_wick=(255, 82, 82),
            grid_color=(58, 58, 58),
            text_color=(200, 200, 200),
            volume_pane=True,
            overlays=(("ema", 9), ("sma", 50)),
            overlay_colors=((255, 200, 0), (100, 170, 255)),
            **_GRID_AXES,
        ),
        ChartStyle(
            name="terminal_dark",
            background=(0, 0, 0),
            up_body=(0, 255, 0),
            down_body=(255, 0, 255),
            up_wick=(0, 200, 0),
            down_wick=(200, 0, 200),
            up_hollow=True,
            grid_color=(30, 50, 30),
            text_color=(0, 220, 0),
            axis_labels=True,
            axis_side="left",
        ),
    )
}

DEFAULT_STYLE: ChartStyle = PRESETS["classic_light"]

_OVERLAY_CHOICES = (("sma", 10), ("sma", 20), ("sma", 50), ("ema", 9), ("ema", 12), ("ema", 21), ("ema", 26))


def randomize_style(rng: np.random.Generator, base: ChartStyle | None = None) -> ChartStyle:
    """A seeded random look for training-time diversity: same generator state -> same style.

    Starts from ``base`` (or a random preset), jitters colours, widths and margins and toggles grid,
    axis labels, volume pane, overlays, hollow bodies and the focus layout (occasionally uniform, as
    in screenshots from other tools). The name records the origin, e.g. ``"hollow_dark~r"``.
    """
    if base is None:
        base = PRESETS[sorted(PRESETS)[int(rng.integers(len(PRESETS)))]]

    def jitter(color: RGB, amount: int = 14) -> RGB:
        return tuple(int(c) for c in np.clip(np.asarray(color) + rng.integers(-amount, amount + 1, 3), 0, 255))

    focus_bars = 0 if rng.random() < 0.15 else int(rng.integers(3, 8))
    overlays = ()
    if rng.random() < 0.35:
        picks = rng.choice(len(_OVERLAY_CHOICES), size=int(rng.integers(1, 3)), replace=False)
        overlays = tuple(_OVERLAY_CHOICES[i] for i in sorted(picks))
    up_hollow = base.up_hollow if rng.random() < 0.75 else not base.up_hollow
    down_hollow = base.down_hollow if rng.random() < 0.9 else not base.down_hollow
    if base.up_body == base.down_body:  # direction is only visible through hollowness (e.g. mono)
        down_hollow = not up_hollow
    up_body, down_body = jitter(base.up_body), jitter(base.down_body)
    # Most tools paint wicks in the body colour; keep that pairing when the base has it.
    up_wick = up_body if base.up_wick == base.up_body else jitter(base.up_wick)
    down_wick = down_body if base.down_wick == base.down_body else jitter(base.down_wick)
    return dataclasses.replace(
        base,
        name=f"{base.name}~r",
        background=jitter(base.background, 8),
        up_body=up_body,
        down_body=down_body,
        up_wick=up_wick,
        down_wick=down_wick,
        up_hollow=up_hollow,
        down_hollow=down_hollow,
        candle_width=round(float(rng.uniform(0.5, 0.9)), 3),
        wick_width=int(rng.choice((1, 1, 1, 2))),
        grid=bool(rng.random() < 0.5),
        grid_lines=int(rng.integers(3, 7)),
        axis_labels=bool(rng.random() < 0.4),
        axis_side=str(rng.choice(("left", "right", "right"))),
        margins=tuple(int(m) for m in rng.integers(2, 13, 4)),
        volume_pane=bool(rng.random() < 0.35),
        volume_height=round(float(rng.uniform(0.12, 0.28)), 3),
        overlays=overlays,
        focus_bars=focus_bars,
        focus_fraction=round(float(rng.uniform(0.25, 0.4)), 3),
        focus_separator=bool(rng.random() < 0.5),
        focus_min_span=round(float(rng.uniform(0.6, 0.8)), 3),
    )
