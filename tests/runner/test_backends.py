"""Backends by registered name or import path, loaded lazily."""

from __future__ import annotations

import pytest

from runner.backends import BACKENDS, load_backend
from runner.errors import BackendNotFound
from tests.doubles import EchoBackend, PlainBackend


def test_load_by_import_path_passes_config(config):
    backend = load_backend("tests.doubles:EchoBackend", config)
    assert isinstance(backend, EchoBackend)
    assert backend.config is config


def test_load_class_without_config_argument(config):
    assert isinstance(load_backend("tests.doubles:PlainBackend", config), PlainBackend)


def test_registered_name_resolves(monkeypatch):
    monkeypatch.setitem(BACKENDS, "echo", "tests.doubles:EchoBackend")
    assert isinstance(load_backend("echo"), EchoBackend)


def test_unknown_name_names_the_import_path_form():
    with pytest.raises(BackendNotFound, match=r"unknown backend 'nope'.*package\.module:Class"):
        load_backend("nope")


def test_missing_module():
    with pytest.raises(BackendNotFound, match="no module named 'tests.nowhere'"):
        load_backend("tests.nowhere:Backend")


def test_missing_class():
    with pytest.raises(BackendNotFound, match="has no 'Nope'"):
        load_backend("tests.doubles:Nope")


def test_not_a_backend_class():
    with pytest.raises(BackendNotFound, match="not a class with a predict"):
        load_backend("tests.doubles:prompt_of")


def test_missing_dependency_of_the_backend_is_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "needs_torch_xyz.py").write_text("import torch_that_is_not_installed\nclass B: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="torch_that_is_not_installed"):
        load_backend("needs_torch_xyz:B")
