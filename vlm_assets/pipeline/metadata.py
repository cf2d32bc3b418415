"""Turning results into what a person reads in the Dagster UI: tables, embedded PNG plots, progress logs."""

from __future__ import annotations

import base64
import io
import logging
import textwrap
import time

import pandas as pd
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)


def table(frame: pd.DataFrame, index_name: str | None = None) -> MetadataValue:
    frame = frame.reset_index(names=index_name) if index_name else frame
    types = {"i": "int", "u": "int", "f": "float", "b": "bool"}
    schema = TableSchema(columns=[TableColumn(str(c), types.get(frame[c].dtype.kind, "string")) for c in frame.columns])
    records = [TableRecord({str(k): (v.item() if hasattr(v, "item") else (v if isinstance(v, (int, float, bool)) else str(v)))
                            for k, v in row.items()}) for row in frame.to_dict("records")]
    return MetadataValue.table(records=records, schema=schema)


def png_markdown(png: bytes, alt: str) -> MetadataValue:
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def plot_markdown(figure, alt: str, width: int = 900, height: int = 450, timeout: float = 30.0) -> MetadataValue:
    """A plotly figure as an embedded PNG (kaleido under a timeout); a failed export leaves a note, not a failed run."""
    from vlm_assets.rendering.figures import figure_png

    try:
        return png_markdown(figure_png(figure, width=width, height=height, timeout=timeout), alt)
    except Exception as exc:  # the plot is a nicety; the asset's data is already written
        log.warning("could not export plot %r: %s", alt, exc)
        return MetadataValue.text(f"plot '{alt}' unavailable: {exc}")


def contact_sheet(images: list[bytes], captions: list[str], columns: int = 4, thumb: int = 224) -> bytes:
    """A grid of chart images, each with its caption wrapped underneath."""
    font = ImageFont.load_default()
    rows = (len(images) + columns - 1) // columns
    text_height = 64
    sheet = Image.new("RGB", (columns * (thumb + 8) + 8, rows * (thumb + text_height + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (png, caption) in enumerate(zip(images, captions)):
        x = 8 + (i % columns) * (thumb + 8)
        y = 8 + (i // columns) * (thumb + text_height + 8)
        sheet.paste(Image.open(io.BytesIO(png)).convert("RGB").resize((thumb, thumb)), (x, y))
        lines = textwrap.wrap(caption, width=thumb // 6)[:5]
        draw.multiline_text((x, y + thumb + 2), "\n".join(lines), fill=(20, 20, 20), font=font)
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


class Progress:
    """Logs `done/total` with a rate at most every `every` seconds, and once at the end."""

    def __init__(self, logger, what: str, total: int, every: float = 5.0):
        self.logger, self.what, self.total, self.every = logger, what, total, every
        self.started = self.last = None  # the clock starts with the work, not with construction

    def start(self) -> "Progress":
        self.started = self.last = time.monotonic()
        return self

    def __call__(self, done: int, total: int | None = None, *_):
        total = total or self.total
        now = time.monotonic()
        if self.started is None:
            self.started = self.last = now
        if done >= total or now - self.last >= self.every:
            rate = done / max(now - self.started, 1e-9)
            self.logger.info(f"{self.what}: {done}/{total} ({rate:,.1f}/s)")
            self.last = now
