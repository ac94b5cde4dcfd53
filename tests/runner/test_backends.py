"""Backends by registered name or import path, loaded lazily and always constructed with the runner's config."""

from __future__ import annotations

import pytest

from runner.backends import BACKENDS, load_backend
from runner.backends.base import Backend
from runner.errors import BackendNotFound, BadTaskInput
from runner.messages import Task
from tests.doubles import CrashBackend, EchoBackend, FakeReport


def test_load_by_import_path_passes_config(config):
    backend = load_backend("tests.doubles:EchoBackend", config)
    assert isinstance(backend, EchoBackend)
    assert backend.config is config


def test_registered_name_resolves_and_gets_the_config(monkeypatch, config):
    monkeypatch.setitem(BACKENDS, "echo", "tests.doubles:EchoBackend")
    backend = load_backend("echo", config)
    assert isinstance(backend, EchoBackend) and backend.config is config


def test_the_config_is_required():
    with pytest.raises(TypeError):
        load_backend("tests.doubles:EchoBackend")  # type: ignore[call-arg]


def test_unknown_name_names_the_import_path_form(config):
    with pytest.raises(BackendNotFound, match=r"unknown backend 'nope'.*package\.module:Class"):
        load_backend("nope", config)


def test_missing_module(config):
    with pytest.raises(BackendNotFound, match="no module named 'tests.nowhere'"):
        load_backend("tests.nowhere:Backend", config)


def test_missing_class(config):
    with pytest.raises(BackendNotFound, match="has no 'Nope'"):
        load_backend("tests.doubles:Nope", config)


def test_not_a_class(config):
    with pytest.raises(BackendNotFound, match="not a subclass of runner.backends.Backend"):
        load_backend("tests.doubles:prompt_of", config)


def test_a_class_that_does_not_subclass_backend_is_refused(config):
    with pytest.raises(BackendNotFound, match="NotABackend is not a subclass of runner.backends.Backend"):
        load_backend("tests.doubles:NotABackend", config)


def test_missing_dependency_of_the_backend_is_not_hidden(tmp_path, monkeypatch, config):
    (tmp_path / "needs_torch_xyz.py").write_text("import torch_that_is_not_installed\nclass B: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="torch_that_is_not_installed"):
        load_backend("needs_torch_xyz:B", config)


# What every backend gets from the base class.


def test_a_backend_holds_one_task_at_a_time_unless_it_says_otherwise(config):
    assert Backend.max_parallel == 1
    assert CrashBackend(config).max_parallel == 1
    assert EchoBackend(config).max_parallel > 1


def test_a_backend_that_cannot_train_refuses_a_finetune_as_bad_input(config):
    task = Task(id=1, session_id=1, interaction_id=1, mode="finetune", type="text", model_name="m", attempt=1)
    with pytest.raises(BadTaskInput, match="CrashBackend backend does not fine-tune"):
        CrashBackend(config).train(task, FakeReport())
