"""The API's reference page: /api/v1/openapi.json rendered in the browser by the app's own script (no CDN)."""

from __future__ import annotations

from flask import render_template, url_for

from helix_api.web import bp


@bp.get("/docs")
def api_docs():
    """The API reference, drawn from the OpenAPI document by static/api-docs.js."""
    return render_template("web/docs.html", spec_url=url_for("meta.openapi"))
