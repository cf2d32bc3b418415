"""Content hashes and stable serialization used for dataset tags and Dagster data versions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from typing import Any

import numpy as np


def stable_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values always hash equally."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def content_hash(*parts: bytes | str, length: int = 16) -> str:
    """sha256 over length-prefixed parts (so ("ab", "c") and ("a", "bc") differ), hex-truncated."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:length]


def stable_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key), not on the order in which keys are visited."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(key.encode("utf-8"))]))
