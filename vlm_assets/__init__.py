"""candle-vlm: a vision-language system that reads candlestick charts.

The subpackages are a plain library (no Dagster, no BentoML): market data, labeling, rendering, captions,
dataset. The Dagster layer lives in `vlm_assets.pipeline` / `vlm_assets.definitions` and only wires them.
"""

__version__ = "0.1.0"
