import os

import pandas as pd
import pytest

from vlm_assets.storage import ArtifactStore


def test_write_read_roundtrip_and_versions(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    store.write_bytes("asset/v1/data.bin", b"one")
    store.write_json("asset/v1/meta.json", {"a": 1})
    frame = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]})
    store.write_parquet("asset/v1/frame.parquet", frame)
    store.publish("asset", "v1")
    assert store.read_bytes("asset/v1/data.bin") == b"one"
    assert store.read_json("asset/v1/meta.json") == {"a": 1}
    pd.testing.assert_frame_equal(store.read_parquet("asset/v1/frame.parquet"), frame)
    assert store.current_version("asset") == "v1"
    store.write_bytes("asset/v2/data.bin", b"two")
    store.publish("asset", "v2")
    assert store.versions("asset") == ["v1", "v2"]
    assert store.read_bytes("asset/v1/data.bin") == b"one"  # older versions stay


def test_failed_write_keeps_previous_content_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    store.write_bytes("a/file.bin", b"original")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("a/file.bin", b"new content")
    monkeypatch.undo()
    assert store.read_bytes("a/file.bin") == b"original"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["file.bin"]


def test_missing_version_names_the_asset(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize the 'vlm_dataset' asset first"):
        ArtifactStore(tmp_path).current_version("vlm_dataset")


def test_url_root_through_fsspec():
    store = ArtifactStore("memory://candle-vlm-test/root")
    assert not store.is_local
    store.write_bytes("x/v1/blob", b"payload")
    store.publish("x", "v1")
    assert store.read_bytes(f"x/{store.current_version('x')}/blob") == b"payload"
    with pytest.raises(ValueError, match="not a local path"):
        store.local_path("x")
