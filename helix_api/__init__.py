"""Helix control plane: sessions, tasks and the pull protocol runners use."""

from __future__ import annotations


def create_app(overrides=None):
    """Build the API (see helix_api.app.create_app); imported lazily to keep `import helix_api` light."""
    from helix_api.app import create_app as factory

    return factory(overrides)
