"""Validating what a client sends: bars, chart images, prompts, pattern names. Every problem raises a
`RequestError` (a ValueError) whose message names the field and, for bars, the bar; the service turns it into an
HTTP 4xx, so nothing a client sends can crash a worker."""

from __future__ import annotations

import base64
import binascii
import io
import re
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vlm_assets.market.io import MarketDataError, check_rows
from vlm_assets.market.timeframes import TIMEFRAMES
from vlm_assets.rendering.raster import OHLCV_COLUMNS, OhlcvArrays

CHART_SIZE = (224, 224)  # what the renderer draws and the image tower reads
SYMBOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,31}$")
BAR_FIELDS = ("timestamp", "open", "high", "low", "close", "volume")
PLAIN_ISO = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?")
FRAME_COLUMNS = pd.Index(OHLCV_COLUMNS)  # built once: a frame's columns from a list cost more than its data
PLAIN_ISO_LINES = re.compile(rf"(?:{PLAIN_ISO.pattern}\n)*{PLAIN_ISO.pattern}")  # one match for every timestamp


class RequestError(ValueError):
    """A request the service cannot answer; `status` is the HTTP status that says why (400, 404, 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What a request may contain. Charts are drawn from the last `render_bars` bars, as in training (50-120)."""

    min_bars: int = 20
    max_bars: int = 2000
    render_bars: int = 120
    max_image_bytes: int = 4_000_000
    max_image_pixels: int = 16_000_000
    max_prompts: int = 32
    max_prompt_chars: int = 200
    max_lookback: int = 2000


def check_symbol(symbol) -> str:
    if not isinstance(symbol, str) or not SYMBOL.match(symbol):
        raise RequestError(f"symbol {symbol!r} is not a ticker (1-32 characters: letters, digits, . _ : / -)")
    return symbol


def check_timeframe(timeframe) -> str:
    if timeframe not in TIMEFRAMES:
        raise RequestError(f"timeframe {timeframe!r} is unknown; expected one of {', '.join(TIMEFRAMES)}")
    return timeframe


def _timestamp_error(values: list) -> RequestError:
    """The first timestamp that is neither ISO 8601 nor epoch seconds of the same kind as the first."""
    numeric = isinstance(values[0], (int, float)) and not isinstance(values[0], bool)
    for row, value in enumerate(values):
        if numeric != (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return RequestError(f"bars: bar {row + 1}: timestamp {value!r} must be an ISO 8601 string or epoch "
                                "seconds, the same kind for every bar")
        if numeric and not np.isfinite(value):
            return RequestError(f"bars: bar {row + 1}: timestamp {value!r} is not finite")
        if not numeric:
            try:
                if pd.Timestamp(value) is pd.NaT:
                    raise ValueError
            except (ValueError, TypeError):
                return RequestError(f"bars: bar {row + 1}: timestamp {value!r} is not an ISO 8601 time")
    return RequestError("bars: timestamps mix time zones or formats; send them all alike (ISO 8601 or epoch seconds)")


def _utc_iso(values: list) -> np.ndarray | None:
    """The common case at numpy speed (pandas' parser costs ~0.2 ms per 100 bars): every string naive or UTC with
    one suffix ("Z" or "+00:00"). None when any string needs pandas (other offsets, other formats)."""
    if not all(type(v) is str for v in values):
        return None
    suffix = next((s for s in ("Z", "+00:00") if values[0].endswith(s)), "")
    bare = [v[:-len(suffix)] for v in values] if suffix else values
    if (suffix and not all(v.endswith(suffix) for v in values)) or not PLAIN_ISO_LINES.fullmatch("\n".join(bare)):
        return None
    try:
        return np.array(bare, dtype="datetime64[ns]")
    except ValueError:  # e.g. month 13: pandas names the bar
        return None


def _timestamps(values: list) -> pd.DatetimeIndex:
    """ISO 8601 strings or epoch seconds, all of one kind, as naive UTC (strings without an offset are UTC)."""
    fast = _utc_iso(values)
    if fast is not None:
        return pd.DatetimeIndex(fast)
    try:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            stamps = np.asarray(values, dtype=np.float64)
            if not np.isfinite(stamps).all():
                raise ValueError
            return pd.DatetimeIndex(pd.to_datetime(stamps, unit="s"))
        if not all(isinstance(v, str) for v in values):
            raise ValueError
        return pd.DatetimeIndex(pd.to_datetime(values, format="ISO8601", utc=True)).tz_localize(None)
    except (ValueError, TypeError, OverflowError):
        raise _timestamp_error(values) from None


def _plain_columns(bars: list) -> dict[str, list] | None:
    """Columns of well-formed bars (dicts, or objects as BentoML's validated models) in one pass per field; None
    when any bar lacks a field or holds a value that is not an int or float, so the checked path can say which."""
    try:
        if all(type(bar) is dict for bar in bars):
            columns = {name: [bar[name] for bar in bars] for name in BAR_FIELDS[:5]}
            columns["volume"] = [bar.get("volume", 0.0) for bar in bars]
        else:
            columns = {name: [getattr(bar, name) for bar in bars] for name in BAR_FIELDS}
    except (KeyError, AttributeError):
        return None
    numbers = {float, int}
    return columns if all(set(map(type, columns[name])) <= numbers for name in BAR_FIELDS[1:]) else None


def _checked_columns(bars: list) -> dict[str, list]:
    """The same columns for any bars, numbers as float64 arrays; raises RequestError naming the first bad bar."""
    for row, bar in enumerate(bars):
        if isinstance(bar, dict):
            missing = [f for f in BAR_FIELDS[:5] if f not in bar]
            if missing:
                raise RequestError(f"bars: bar {row + 1} is missing {', '.join(missing)}")
        elif not all(hasattr(bar, f) for f in BAR_FIELDS):
            raise RequestError(f"bars: bar {row + 1} is not an object")
    columns = {"timestamp": [_field(bar, "timestamp") for bar in bars]}
    for name in BAR_FIELDS[1:]:
        column = [_field(bar, name) for bar in bars]
        try:
            if any(isinstance(v, bool) for v in column):
                raise TypeError
            columns[name] = np.asarray(column, dtype=np.float64)
        except OverflowError:
            row = next(i for i, v in enumerate(column) if isinstance(v, int) and abs(v) > sys.float_info.max)
            raise RequestError(f"bars: bar {row + 1}: {name} is an integer beyond the float range") from None
        except (TypeError, ValueError):
            row = next(i for i, v in enumerate(column) if isinstance(v, bool) or not isinstance(v, (int, float)))
            raise RequestError(f"bars: bar {row + 1}: {name} {column[row]!r} is not a number") from None
    return columns


def _field(bar, name: str):
    return bar.get(name, 0.0 if name == "volume" else None) if isinstance(bar, dict) else getattr(bar, name)


def parse_bar_arrays(bars, limits: Limits = Limits()) -> tuple[pd.DatetimeIndex, OhlcvArrays]:
    """Bars oldest first, each {timestamp, open, high, low, close, volume} (a dict, or an object with those
    attributes; volume 0 when absent), to their naive UTC times and float64 OHLCV columns: what the service draws and
    computes features from, with no frame in between. Bars are numbered from 1 in messages; the rules are the
    market-data loader's (`vlm_assets.market.io.check_rows`)."""
    if not isinstance(bars, list):
        raise RequestError("bars must be a list of {timestamp, open, high, low, close, volume} objects")
    if not limits.min_bars <= len(bars) <= limits.max_bars:
        raise RequestError(f"bars: {len(bars)} bars given; between {limits.min_bars} and {limits.max_bars} are "
                           "accepted", 413 if len(bars) > limits.max_bars else 400)
    columns = _plain_columns(bars)
    if columns is None:  # something is off: find the first bad bar and say what
        columns = _checked_columns(bars)
    index = _timestamps(columns.pop("timestamp"))
    try:
        values = OhlcvArrays(*np.array([columns[name] for name in BAR_FIELDS[1:]], dtype=np.float64))
    except OverflowError:  # an integer too large for a float: the checked path names its bar
        values = OhlcvArrays(*(_checked_columns(bars)[name] for name in BAR_FIELDS[1:]))
    try:
        check_rows(index, values._asdict(), "bars")
    except MarketDataError as error:
        raise RequestError(str(error).replace(f"row {error.row}:", f"bar {error.row}:")) from None
    return index.rename("timestamp"), values


def parse_bars(bars, limits: Limits = Limits()) -> pd.DataFrame:
    """`parse_bar_arrays` as a float OHLCV frame indexed by naive UTC time."""
    index, values = parse_bar_arrays(bars, limits)
    return pd.DataFrame(np.column_stack(values), index=index, columns=FRAME_COLUMNS, copy=False)


def decode_image(image_base64, limits: Limits = Limits()):
    """A base64 PNG/JPEG/... (optionally a data: URL) to an RGB PIL image, refusing oversized files and
    decompression bombs before decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image_base64, str) or not image_base64.strip():
        raise RequestError("image_base64 must be a non-empty base64 string")
    text = image_base64.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
        raise RequestError(f"image_base64: the image is larger than {limits.max_image_bytes:,} bytes", 413)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image_base64 is not valid base64") from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"image_base64: the image is {len(data):,} bytes; at most {limits.max_image_bytes:,}", 413)
    too_large = f"image_base64: the image has more pixels than the {limits.max_image_pixels:,} allowed"
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # read from the header: nothing decoded yet
        if width * height > limits.max_image_pixels:
            raise RequestError(f"{too_large} ({width}x{height})", 413)
        image.load()
        return image.convert("RGB")
    except RequestError:
        raise
    except Image.DecompressionBombError:  # PIL's own guard, for headers far beyond any sane size
        raise RequestError(too_large, 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise RequestError(f"image_base64 is not a readable image ({type(error).__name__})") from None


def check_prompts(prompts, limits: Limits = Limits(), field: str = "prompts") -> list[str]:
    if not isinstance(prompts, list) or not prompts:
        raise RequestError(f"{field} must be a non-empty list of strings")
    if len(prompts) > limits.max_prompts:
        raise RequestError(f"{field}: {len(prompts)} given; at most {limits.max_prompts}", 413)
    cleaned = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(f"{field}[{i}] must be a non-empty string")
        if len(prompt) > limits.max_prompt_chars:
            raise RequestError(f"{field}[{i}] has {len(prompt)} characters; at most {limits.max_prompt_chars}", 413)
        cleaned.append(prompt.strip())
    return cleaned


def pattern_key(name: str) -> str:
    """'Bullish Engulfing', 'bullish-engulfing' -> 'bullish_engulfing' (how a requested name matches a class)."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())
