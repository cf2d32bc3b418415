"""The artifact store: one root (a local path or an fsspec URL such as s3://bucket/prefix) for every artifact.

Layout: `<root>/<name>/<version>/<file>` holds immutable versions; `<root>/<name>/CURRENT` names the version that
downstream steps read. Old versions are never overwritten, so a bad run cannot destroy what was stored before.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

CURRENT_POINTER = "CURRENT"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """Parquet with fixed settings (zstd, fixed row groups, no index) so equal frames give equal bytes."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer, compression="zstd", row_group_size=65536)
    return buffer.getvalue()


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = UPath(root)
        self.is_local = self.root.protocol in ("", "file", "local")
        if self.is_local:
            self.root = UPath(Path(str(self.root.path)).expanduser().resolve())

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    def path(self, *parts: str) -> UPath:
        return self.root.joinpath(*parts)

    def local_path(self, *parts: str) -> Path:
        """A plain filesystem path (for tools that need one, e.g. HTML report writers); local roots only."""
        if not self.is_local:
            raise ValueError(f"artifact root {self.root} is not a local path")
        return Path(str(self.path(*parts).path))

    def write_bytes(self, rel: str, data: bytes) -> UPath:
        """Atomic: readers see the old file or the new one, never a partial write."""
        target = self.path(rel)
        if self.is_local:
            atomic_write(Path(str(target.path)), data)
        else:
            # Object stores publish an object only when its upload completes, which is the atomicity we need.
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as handle:
                handle.write(data)
        return target

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def write_json(self, rel: str, value: Any) -> UPath:
        return self.write_bytes(rel, json.dumps(value, indent=2, sort_keys=True).encode("utf-8"))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_parquet(self, rel: str, frame: pd.DataFrame) -> UPath:
        return self.write_bytes(rel, parquet_bytes(frame))

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pd.DataFrame:
        return pq.read_table(io.BytesIO(self.read_bytes(rel)), columns=columns).to_pandas()

    def publish(self, name: str, version: str) -> None:
        """Point `name`'s CURRENT at `version` (after all its files are written)."""
        self.write_bytes(f"{name}/{CURRENT_POINTER}", version.encode("utf-8"))

    def current_version(self, name: str) -> str:
        pointer = f"{name}/{CURRENT_POINTER}"
        if not self.exists(pointer):
            raise FileNotFoundError(
                f"no published version of '{name}' under {self.root}: materialize the '{name}' asset first"
            )
        return self.read_bytes(pointer).decode("utf-8").strip()

    def versions(self, name: str) -> list[str]:
        base = self.path(name)
        if not base.exists():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())
