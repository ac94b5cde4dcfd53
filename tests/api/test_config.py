"""Settings and the model catalogue."""

from __future__ import annotations

import pytest

from helix_api.app import create_app
from helix_api.catalog import Catalog, CatalogError
from helix_api.config import load_settings
from helix_api.errors import UnknownModel


def test_environment_overrides_defaults_and_overrides_win():
    env = {"HELIX_LEASE_SECONDS": "12.5", "HELIX_MAX_ATTEMPTS": "5", "HELIX_DATA_DIR": "/srv/helix"}
    settings = load_settings(env, {"MAX_ATTEMPTS": 7})
    assert settings["LEASE_SECONDS"] == 12.5 and settings["MAX_ATTEMPTS"] == 7
    assert settings["DATABASE_URL"] == "sqlite:////srv/helix/helix.db" and settings["AUTO_UPGRADE"] is True


def test_a_shared_database_does_not_upgrade_itself():
    settings = load_settings({"HELIX_DATABASE_URL": "postgresql://db/helix"})
    assert settings["AUTO_UPGRADE"] is False


def test_operators_add_models():
    catalog = Catalog.from_setting("text:/models/tiny-mistral, image:org/sdxl-turbo")
    assert catalog.get("/models/tiny-mistral", "text").name == "/models/tiny-mistral"
    assert catalog.get("org/sdxl-turbo", "image").type == "image"
    assert "mistral-7b-instruct" in catalog.names() and "mistralai/Mistral-7B-Instruct-v0.1" not in catalog.names()
    with pytest.raises(UnknownModel):
        catalog.get("org/sdxl-turbo", "text")


@pytest.mark.parametrize("bad", ["audio:x", "just-a-name", "text:", "text:=org/x", "image:alias="])
def test_bad_model_entries_are_refused(bad):
    with pytest.raises(CatalogError, match="TYPE:ALIAS=NAME"):
        Catalog.from_setting(bad)


def test_an_alias_names_its_model_everywhere_a_name_comes_in():
    catalog = Catalog.from_setting("text:smollm2-135m=HuggingFaceTB/SmolLM2-135M-Instruct,"
                                   "image:tiny-sdxl=/abs/path/tiny-sdxl")
    assert catalog.resolve("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert catalog.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert catalog.resolve("tiny-sdxl") == "/abs/path/tiny-sdxl"
    assert catalog.resolve("not-configured/served") == "not-configured/served"  # for runners' own models
    assert catalog.get("tiny-sdxl", "image").name == "/abs/path/tiny-sdxl"
    assert catalog.shown("/abs/path/tiny-sdxl") == "tiny-sdxl"
    assert catalog.names("text") == ["mistral-7b-instruct", "smollm2-135m"]
    assert catalog.names("image") == ["sdxl-base", "tiny-sdxl"]


def test_the_defaults_have_aliases_an_entry_may_replace():
    assert Catalog.from_setting("").resolve("mistral-7b-instruct") == "mistralai/Mistral-7B-Instruct-v0.1"
    assert Catalog.from_setting("").resolve("sdxl-base") == "stabilityai/stable-diffusion-xl-base-1.0"
    renamed = Catalog.from_setting("text:mistral=mistralai/Mistral-7B-Instruct-v0.1")
    assert renamed.names("text") == ["mistral"] and renamed.resolve("mistral-7b-instruct") == "mistral-7b-instruct"
    kept = Catalog.from_setting("text:mistralai/Mistral-7B-Instruct-v0.1")
    assert kept.names("text") == ["mistral-7b-instruct"]


def test_a_path_is_never_shown_it_goes_by_its_directory_name():
    catalog = Catalog.from_setting("image:/data/models/tiny-sdxl/,text:./local/llm")
    assert catalog.names() == ["llm", "mistral-7b-instruct", "sdxl-base", "tiny-sdxl"]
    assert catalog.resolve("tiny-sdxl") == "/data/models/tiny-sdxl/" and catalog.resolve("llm") == "./local/llm"
    listed = {m["name"]: m for m in catalog.as_list()}
    assert listed["tiny-sdxl"]["full_name"] is None and listed["tiny-sdxl"]["alias"] == "tiny-sdxl"
    assert listed["sdxl-base"]["full_name"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "/" not in " ".join(m["name"] for m in catalog.as_list() if m["full_name"] is None)
    assert catalog.shown("/somewhere/a-runner-served") == "a-runner-served"  # a path nobody configured


@pytest.mark.parametrize("setting,names", [
    ("text:sdxl-base=org/llm", ("'sdxl-base'", "'org/llm'", "'stabilityai/stable-diffusion-xl-base-1.0'")),
    ("text:a=org/one,text:a=org/two", ("'a'", "'org/one'", "'org/two'")),
    ("text:x=org/one,text:x", ("'x'", "'org/one'")),  # an alias that is another model's name
    ("image:/a/tiny,image:/b/tiny", ("'tiny'", "'/a/tiny'", "'/b/tiny'", "directory")),
])
def test_a_clashing_alias_is_refused_naming_both_models(setting, names):
    with pytest.raises(CatalogError, match="clashes") as refused:
        Catalog.from_setting(setting)
    for name in names:
        assert name in str(refused.value)


@pytest.mark.parametrize("alias", ["my model", "a/b", "x$y", "a&b", "é", "a?b", "a#b", "*"])
def test_an_alias_a_url_or_a_shell_would_mangle_is_refused(alias):
    with pytest.raises(CatalogError, match=r"A-Za-z0-9\._-") as refused:
        Catalog.from_setting(f"text:{alias}=org/llm")
    assert repr(alias) in str(refused.value) and "'org/llm'" in str(refused.value)


def test_a_path_whose_directory_name_is_no_alias_must_be_given_one():
    with pytest.raises(CatalogError, match="needs an alias"):
        Catalog.from_setting("text:/models/my model")
    assert Catalog.from_setting("text:mine=/models/my model").resolve("mine") == "/models/my model"


def test_the_api_refuses_to_start_with_a_clashing_alias(settings):
    with pytest.raises(CatalogError, match="'sdxl-base'.*clashes"):
        create_app({**settings, "MODELS": "text:sdxl-base=org/llm"})
