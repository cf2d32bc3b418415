"""Plotly figures of OHLCV windows for people (Dagster metadata, docs, reports) and kaleido PNG export.

plotly is imported on first use only, so the raster serving path never loads it. kaleido 0.2.1 can hang,
so exports always run in a separate worker process (its own session, so one killpg also takes down
kaleido's chromium) and are bounded by a timeout.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from vlm_assets.rendering.raster import moving_average, validate_bars
from vlm_assets.rendering.style import DEFAULT_STYLE, RGB, ChartStyle

if TYPE_CHECKING:
    import plotly.graph_objects as go


_CLOSE_GRACE = 5.0  # s a closing worker gets to shut kaleido down before its group is killed


class KaleidoTimeout(TimeoutError):
    """An export did not finish in time; the worker was killed and restarted."""


class KaleidoExportError(RuntimeError):
    """kaleido rejected the figure or its worker died."""


def _rgb(color: RGB) -> str:
    return f"rgb({color[0]},{color[1]},{color[2]})"


def _x_labels(bars: pd.DataFrame) -> list:
    # Category axes show no gaps for weekends or nights; labels must be unique or categories merge.
    if not bars.index.is_unique:
        return list(range(len(bars)))
    if isinstance(bars.index, pd.DatetimeIndex):
        return list(bars.index.strftime("%Y-%m-%d %H:%M"))
    return [str(label) for label in bars.index]


def _candlestick(bars: pd.DataFrame, x: list, style: ChartStyle, name: str) -> go.Candlestick:
    import plotly.graph_objects as go

    def side(body: RGB, wick: RGB, hollow: bool) -> dict:
        return dict(line=dict(color=_rgb(wick), width=style.wick_width), fillcolor=_rgb(style.background if hollow else body))

    return go.Candlestick(
        x=x,
        open=bars["open"],
        high=bars["high"],
        low=bars["low"],
        close=bars["close"],
        increasing=side(style.up_body, style.up_wick, style.up_hollow),
        decreasing=side(style.down_body, style.down_wick, style.down_hollow),
        whiskerwidth=0,
        name=name,
        showlegend=False,
    )


def plotly_figure(
    bars: pd.DataFrame,
    style: ChartStyle = DEFAULT_STYLE,
    title: str | None = None,
    htf_bars: pd.DataFrame | None = None,
) -> go.Figure:
    """The window as a plotly figure in ``style``'s colours, with its volume pane, overlays and HTF panel.

    Uses ordinary uniform, linear axes (no focus layout): these figures are for people and for a share
    of training images that look like other charting tools. Tick labels follow ``style.axis_labels``, so
    pass a labelled style (e.g. ``PRESETS["grid_light"]``) for figures meant for people.
    """
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    validate_bars(bars)
    if htf_bars is not None:
        validate_bars(htf_bars)
    panes = ["price"] + (["volume"] if style.volume_pane else []) + (["htf"] if htf_bars is not None else [])
    price_share = 1.0 - (style.htf_height if htf_bars is not None else 0.0)
    heights = {"price": price_share * (1 - style.volume_height), "volume": price_share * style.volume_height, "htf": style.htf_height}
    fig = make_subplots(rows=len(panes), cols=1, vertical_spacing=0.03, row_heights=[heights[p] for p in panes])
    row = {pane: i + 1 for i, pane in enumerate(panes)}

    x = _x_labels(bars)
    fig.add_trace(_candlestick(bars, x, style, "price"), row=1, col=1)
    close = bars["close"].to_numpy(dtype=np.float64)
    for i, (kind, period) in enumerate(style.overlays):
        color = style.overlay_colors[i % len(style.overlay_colors)]
        fig.add_trace(
            go.Scatter(x=x, y=moving_average(close, kind, period), mode="lines", name=f"{kind.upper()} {period}",
                       line=dict(color=_rgb(color), width=style.overlay_width)),
            row=1, col=1,
        )
    if style.volume_pane:
        up = (bars["close"] >= bars["open"]).to_numpy()
        colors = np.where(up, _rgb(style.up_body), _rgb(style.down_body)).tolist()
        fig.add_trace(
            go.Bar(x=x, y=bars["volume"], marker=dict(color=colors, opacity=style.volume_alpha, line_width=0),
                   name="volume", showlegend=False),
            row=row["volume"], col=1,
        )
        fig.update_xaxes(matches="x", row=row["volume"], col=1)
    if htf_bars is not None:
        fig.add_trace(_candlestick(htf_bars, _x_labels(htf_bars), style, "higher timeframe"), row=row["htf"], col=1)

    left, top, right, bottom = style.margins
    fig.update_layout(
        template="none",
        paper_bgcolor=_rgb(style.background),
        plot_bgcolor=_rgb(style.background),
        font=dict(color=_rgb(style.text_color), size=11),
        margin=dict(l=left, t=top + (36 if title else 0), r=right, b=bottom, autoexpand=True),
        showlegend=bool(style.overlays),
        legend=dict(x=0.01, y=0.99, bgcolor="rgba(0,0,0,0)"),
        title=dict(text=title, x=0.01) if title else None,
        bargap=1 - style.candle_width,
    )
    fig.update_xaxes(type="category", rangeslider_visible=False, showgrid=style.grid, gridcolor=_rgb(style.grid_color),
                     showticklabels=style.axis_labels, automargin=True, nticks=style.grid_lines + 1, zeroline=False)
    fig.update_yaxes(showgrid=style.grid, gridcolor=_rgb(style.grid_color), showticklabels=style.axis_labels,
                     side=style.axis_side, automargin=True, nticks=style.grid_lines + 1, zeroline=False)
    if style.volume_pane:  # the volume pane carries the shared time labels
        fig.update_xaxes(showticklabels=False, row=1, col=1)
        fig.update_yaxes(showticklabels=False, showgrid=False, row=row["volume"], col=1)
    return fig


# Runs in a fresh interpreter (not via multiprocessing) so the worker neither imports this package nor
# re-imports the caller's __main__; it talks over two inherited pipes, leaving stdout to kaleido's chatter.
_WORKER_SOURCE = """
import json, os, sys
from multiprocessing.connection import Connection
import plotly
from kaleido.scopes.plotly import PlotlyScope

requests = Connection(int(sys.argv[1]), writable=False)
replies = Connection(int(sys.argv[2]), readable=False)
# The default plotly.js and MathJax locations are CDNs, which fail or hang offline.
scope = PlotlyScope(plotlyjs=os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js"), mathjax=False)
while True:
    try:
        figure_json, width, height = requests.recv()
    except EOFError:
        break
    try:
        replies.send(("ok", scope.transform(json.loads(figure_json), format="png", width=width, height=height)))
    except Exception as error:
        replies.send(("error", f"{type(error).__name__}: {error}"))
del scope  # PlotlyScope.__del__ closes kaleido's stdin and waits, so chromium exits and is reaped cleanly
"""


class KaleidoExporter:
    """Plotly-to-PNG export in a persistent, killable worker process.

    The first export starts chromium (about a second); later ones take tens of milliseconds. An export
    exceeding its timeout (which includes a worker start) kills the worker's whole process group, starts
    a fresh worker and raises KaleidoTimeout. Thread-safe: exports are serialized.
    """

    def __init__(self, timeout: float = 20.0):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None

    def __enter__(self) -> KaleidoExporter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """Worker pid, which is also its process-group id; None when no worker is running."""
        return self._process.pid if self._process is not None else None

    def to_png(self, fig, width: int, height: int, *, timeout: float | None = None) -> bytes:
        """PNG bytes of ``fig`` (a plotly Figure or figure dict) at ``width`` x ``height`` px."""
        import plotly.io as pio

        figure_json = pio.to_json(fig, validate=False)
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._restart()
            try:
                self._requests.send((figure_json, int(width), int(height)))
                finished = self._replies.poll(limit)
                status, payload = self._replies.recv() if finished else (None, None)
            except (EOFError, OSError):
                self._restart()
                raise KaleidoExportError("kaleido worker died during the export; restarted it") from None
            if not finished:
                self._restart()
                raise KaleidoTimeout(f"kaleido export exceeded {limit} s; killed and restarted the worker")
        if status != "ok":
            raise KaleidoExportError(payload)
        return payload

    def close(self) -> None:
        """Stop the worker (and its chromium). The exporter restarts one if used again."""
        with self._lock:
            self._stop(grace=_CLOSE_GRACE)

    def _restart(self) -> None:
        self._stop()
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_SOURCE, str(request_read), str(reply_write)],
                pass_fds=(request_read, reply_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # own process group: killpg reaches kaleido and chromium too
            )
        except BaseException:
            os.close(request_write)
            os.close(reply_read)
            raise
        finally:
            os.close(request_read)
            os.close(reply_write)
        self._requests = Connection(request_write, readable=False)
        self._replies = Connection(reply_read, writable=False)

    def _stop(self, grace: float = 0.0) -> None:
        """End the worker: closing its request pipe asks it to exit; whatever is left after ``grace`` s is killed."""
        if self._process is None:
            return
        self._requests.close()
        self._replies.close()
        try:
            self._process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:  # also after a clean exit: nothing of the group may outlive the exporter
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait()
        self._process = self._requests = self._replies = None


_shared_exporter: KaleidoExporter | None = None
_shared_lock = threading.Lock()


def figure_png(fig, width: int = 900, height: int = 500, timeout: float = 20.0) -> bytes:
    """One-off export through a shared, lazily started exporter that is closed at interpreter exit."""
    global _shared_exporter
    with _shared_lock:
        if _shared_exporter is None:
            _shared_exporter = KaleidoExporter(timeout)
            atexit.register(_shared_exporter.close)
    return _shared_exporter.to_png(fig, width, height, timeout=timeout)
