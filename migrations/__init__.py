"""Alembic revisions of the Helix schema; the wheel ships this folder as `helix_api.migrations`."""
