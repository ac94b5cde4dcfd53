"""Helix runner: a pull-based job runner that loads a model once and pulls tasks over HTTP."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
