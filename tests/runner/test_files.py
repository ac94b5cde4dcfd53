"""A task's files: fetched once by checksum, verified, unpacked safely, uploaded under the lease."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from runner.files import FileCorrupt, TaskFiles, safe_name

from .conftest import API

FILE_URL = f"{API}/api/v1/worker/task/42/files"


def _ref(data: bytes, file_id: int = 7, name: str = "train.jsonl") -> dict:
    return {"id": file_id, "name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


@pytest.fixture
def files(api_client, tmp_path) -> TaskFiles:
    return TaskFiles(api_client, 42, "l_42", tmp_path / "cache")


def test_fetch_downloads_with_the_lease_and_caches_by_checksum(api, files):
    data = b'{"messages": []}\n' * 1000
    api.get(f"{FILE_URL}/7", body=data, headers={"X-Helix-SHA256": hashlib.sha256(data).hexdigest()})
    path = files.fetch(_ref(data))
    assert path.read_bytes() == data and path.name == "train.jsonl"
    assert api.calls[0].request.headers["X-Helix-Lease"] == "l_42"
    assert files.fetch(_ref(data)) == path
    assert len(api.calls) == 1  # the second fetch came from the cache


def test_a_corrupt_download_is_refused_and_not_kept(api, files):
    api.get(f"{FILE_URL}/7", body=b"truncated")
    with pytest.raises(FileCorrupt):
        files.fetch(_ref(b"the real content"))
    assert not [p for p in files.cache_dir.rglob("*") if p.is_file()]


def test_a_download_retries_after_a_503(api, files):
    data = b"adapter bytes"
    api.get(f"{FILE_URL}/7", status=503)
    api.get(f"{FILE_URL}/7", body=data)
    assert files.fetch(_ref(data)).read_bytes() == data


def test_fetch_dir_unpacks_an_adapter_once(api, files, tmp_path):
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    (source / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in source.iterdir():
            archive.write(path, path.name)
    data = buffer.getvalue()
    api.get(f"{FILE_URL}/9", body=data)
    unpacked = files.fetch_dir(_ref(data, 9, "adapter.zip"))
    assert sorted(p.name for p in unpacked.iterdir() if not p.name.startswith(".")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert files.fetch_dir(_ref(data, 9, "adapter.zip")) == unpacked and len(api.calls) == 1


def test_fetch_dir_refuses_a_zip_that_escapes(api, files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../../escaped.txt", "gotcha")
    data = buffer.getvalue()
    api.get(f"{FILE_URL}/9", body=data)
    with pytest.raises(FileCorrupt, match="outside"):
        files.fetch_dir(_ref(data, 9, "adapter.zip"))
    assert not list(files.cache_dir.parent.rglob("escaped.txt"))


def test_upload_sends_the_lease_kind_and_file_and_resends_whole_after_a_503(api, files, tmp_path):
    image = tmp_path / "0.png"
    image.write_bytes(b"\x89PNG fake")
    api.post(FILE_URL, status=503)
    api.post(FILE_URL, status=201, json={"file": {"id": 57, "name": "0.png"}})
    ref = files.upload(image, kind="output")
    assert ref["id"] == 57
    bodies = [call.request.body for call in api.calls]
    assert len(bodies) == 2 and all(b"\x89PNG fake" in body for body in bodies)
    assert b'name="lease_token"' in bodies[1] and b"l_42" in bodies[1] and b"image/png" in bodies[1]


def test_upload_dir_zips_the_directory(api, files, tmp_path):
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_config.json").write_text('{"r": 4}')
    api.post(FILE_URL, status=201, json={"file": {"id": 60}})
    assert files.upload_dir(source)["id"] == 60
    body = api.calls[0].request.body
    assert b'filename="adapter.zip"' in body and b"adapter_config.json" in body and b"adapter" in body


@pytest.mark.parametrize("name,safe", [("../../etc/passwd", "passwd"), ("a b.png", "a_b.png"), ("..", "file")])
def test_safe_name(name, safe):
    assert safe_name(name) == safe


def test_nothing_is_left_behind_in_the_cache_on_failure(api, files):
    api.get(f"{FILE_URL}/7", status=404, json={"error": "not_found", "message": "No file"})
    with pytest.raises(Exception, match="404"):
        files.fetch(_ref(b"x"))
    assert not [p for p in Path(files.cache_dir).rglob("*") if p.is_file()]
