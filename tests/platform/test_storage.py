"""Storage locations: parsing work dirs, local I/O and local pre-flight (S3: tests/cluster)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maxdeeplab.platform.storage import Location, StorageError, check_writable


def test_parse_normalises_local_paths_and_uris(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Location.parse("runs").uri == str(tmp_path / "runs")
    assert Location.parse(f"file://{tmp_path}/x").uri == str(tmp_path / "x")
    assert Location.parse("~/w").uri == os.path.expanduser("~/w")
    s3 = Location.parse("s3://bucket/prefix/")
    assert s3.uri == "s3://bucket/prefix" and not s3.is_local and s3.scheme == "s3"
    assert (s3 / "ray" / "run").uri == "s3://bucket/prefix/ray/run"
    assert (s3 / "ray").parent == s3 and (s3 / "ray").name == "ray"
    assert Location.parse("gs://b").uri == "gs://b"


@pytest.mark.parametrize(
    ("text", "message"),
    [("s3:///prefix", "no bucket named"), ("ftp://host/x", "unsupported storage scheme 'ftp'")],
)
def test_parse_rejects_what_it_cannot_store_to(text: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        Location.parse(text)


def test_local_files_round_trip_and_list(tmp_path: Path) -> None:
    root = Location.parse(tmp_path / "w")
    assert not root.exists()
    (root / "a" / "b.txt").write_text("hello")
    (root / "c.bin").write_bytes(b"\x00\x01")
    assert (root / "a" / "b.txt").read_text() == "hello"
    assert (root / "a" / "b.txt").is_file() and not (root / "a").is_file()
    assert sorted(p.name for p in root.list_files()) == ["b.txt", "c.bin"]
    assert not [p for p in (tmp_path / "w" / "a").iterdir() if p.name.startswith(".")]
    root.remove_tree()
    assert not root.exists()
    assert Location.parse(tmp_path / "nothing").list_files() == []


def test_local_preflight_names_an_unwritable_folder(tmp_path: Path) -> None:
    check_writable(Location.parse(tmp_path / "new"))  # created on the way
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match=f"{blocker}/sub: cannot create"):
        check_writable(Location.parse(blocker / "sub"))
