"""The services an app runs on, built once by the factory: database, file store, models, limits, scheduler.

Functions that do the work take what they need from a `Services` as arguments; only views reach the
current app's, through `services()` (as flaskr's views reach their database through `get_db()`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from flask import Flask, current_app

from helix_api.catalog import Catalog
from helix_api.db import Database
from helix_api.knowledge.retrieval import RetrievalSettings
from helix_api.params import Limits
from helix_api.sessions.storage import FileStore, LocalFileStore
from helix_api.tasks.leases import LeasePolicy
from helix_api.tasks.scheduler import Scheduler

_EXTENSION = "helix"


@dataclass(frozen=True)
class Services:
    """Everything a request's work needs besides its input, for one app."""

    database: Database
    store: FileStore
    catalog: Catalog
    limits: Limits
    # Claims, leases and how attempts end; it keeps the app's reap clock.
    scheduler: Scheduler
    # How documents are chunked and how much retrieval adds to a turn.
    retrieval: RetrievalSettings
    # Read-only: settings are read at the edges and never changed after start-up.
    settings: Mapping[str, Any]

    @property
    def policy(self) -> LeasePolicy:
        """The lease policy, the scheduler's own."""
        return self.scheduler.policy

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], database: Database) -> Services:
        """The services `settings` describe, on a connected `database`."""
        store = LocalFileStore(settings["FILES_DIR"])
        scheduler = Scheduler.from_settings(settings, database, store)
        return cls(
            database=database, store=store, catalog=Catalog.from_setting(settings["MODELS"]),
            limits=Limits.from_settings(settings), scheduler=scheduler,
            retrieval=RetrievalSettings.from_settings(settings), settings=MappingProxyType(settings))

    def init_app(self, app: Flask) -> None:
        """Make these the services of `app`."""
        app.extensions[_EXTENSION] = self


def services() -> Services:
    """The services of the current app."""
    return current_app.extensions[_EXTENSION]
