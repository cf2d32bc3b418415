"""Chart rendering: the fast PIL raster path (training and serving) and plotly figures for people.

Importing this package does not import plotly; ``figures`` loads it on first use.
"""

from vlm_assets.rendering.figures import KaleidoExporter, KaleidoExportError, KaleidoTimeout, figure_png, plotly_figure
from vlm_assets.rendering.raster import OHLCV_COLUMNS, OhlcvArrays, encode_png, moving_average, read_back, render_chart, render_png, validate_bars
from vlm_assets.rendering.style import DEFAULT_STYLE, PRESETS, STYLE_VERSION, ChartStyle, randomize_style

__all__ = [
    "DEFAULT_STYLE",
    "OHLCV_COLUMNS",
    "PRESETS",
    "STYLE_VERSION",
    "ChartStyle",
    "KaleidoExportError",
    "KaleidoExporter",
    "KaleidoTimeout",
    "OhlcvArrays",
    "encode_png",
    "figure_png",
    "moving_average",
    "plotly_figure",
    "randomize_style",
    "read_back",
    "render_chart",
    "render_png",
    "validate_bars",
]
