"""The one place that builds an app at import time: `gunicorn helix_api.wsgi:app`."""

from __future__ import annotations

import logging

from helix_api.app import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
