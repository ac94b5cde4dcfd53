"""Settings and the model catalogue."""

from __future__ import annotations

import pytest

from helix_api.catalog import Catalog
from helix_api.config import load_settings
from helix_api.errors import InvalidField, UnknownModel


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
    assert "mistralai/Mistral-7B-Instruct-v0.1" in catalog.names()
    with pytest.raises(UnknownModel):
        catalog.get("org/sdxl-turbo", "text")


@pytest.mark.parametrize("bad", ["audio:x", "just-a-name", "text:"])
def test_bad_model_entries_are_refused(bad):
    with pytest.raises(InvalidField):
        Catalog.from_setting(bad)
