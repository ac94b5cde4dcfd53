"""The OpenAPI 3.1 document of the API, built from the same schemas the views validate with.

Paths come from the app's own url_map, so a new route is in the document the day it is added; what
each operation reads (its body, query string and headers) comes from OPERATIONS, by endpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from pydantic import TypeAdapter

from helix_api.params import Limits
from helix_api.params import schemas as param_schemas
from helix_api.schemas import admin, knowledge, openai, sessions, usage, worker
from helix_api.schemas.base import INT32_MAX, adapter

PREFIXES = ("/api/", "/v1/")
_REF = "#/components/schemas/{model}"
_CONVERTED = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")


@dataclass(frozen=True)
class Operation:
    """What one endpoint reads besides its path: a JSON body, a multipart form, a query string, headers."""

    json: Any = None
    form: Any = None
    form_files: tuple[str, bool] | None = None  # the form's file field, and whether it takes several
    query: Any = None
    headers: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)


_RUNNER_NAME = {"X-Helix-Runner": ({"type": "string", "maxLength": 200}, "this runner's name (default: the token's)")}
OPERATIONS: dict[str, Operation] = {
    "sessions.create_session": Operation(json=sessions.SessionCreate, form=sessions.FinetuneForm,
                                         form_files=("files", True)),
    "sessions.list_sessions": Operation(query=sessions.SessionPage),
    "sessions.add_message": Operation(json=sessions.SessionMessage),
    "sessions.score": Operation(json=sessions.ScoreRequest),
    "knowledge.create_knowledge_base": Operation(json=knowledge.KnowledgeBaseCreate),
    "knowledge.add_files": Operation(form=knowledge.DocumentUpload, form_files=("files", True)),
    "sessions.session_events": Operation(query=sessions.EventCursor, headers={"Last-Event-ID": (
        {"type": "integer", "minimum": 0, "maximum": INT32_MAX}, "resume after this event id")}),
    "worker.claim": Operation(query=worker.Claim, headers=_RUNNER_NAME),
    "worker.heartbeat": Operation(json=worker.Heartbeat, headers=_RUNNER_NAME),
    "worker.report_runner": Operation(json=worker.RunnerReport, headers=_RUNNER_NAME),
    "worker.post_events": Operation(json=worker.EventsPost),
    "worker.post_events_many": Operation(json=worker.EventsMany),
    "worker.complete": Operation(json=worker.Complete),
    "worker.fail": Operation(json=worker.Fail),
    "worker.release": Operation(json=worker.Lease),
    "worker.download_file": Operation(headers={"X-Helix-Lease": (
        {"type": "string", "maxLength": 64}, "the task's lease token")}),
    "worker.upload_file": Operation(form=worker.Upload, form_files=("file", False)),
    "admin.show_overview": Operation(query=admin.Overview),
    "admin.set_user_limits": Operation(json=admin.UserLimits),
    "admin.reserve": Operation(json=admin.ReservationSet),
    "usage.show_usage": Operation(query=usage.UsageQuery),
    "openai.chat_completions": Operation(json=openai.ChatCompletion),
    "openai.generate_images": Operation(json=openai.ImageGeneration),
    "openai.file_content": Operation(query=openai.FileLink),
}
# Endpoints that need no credentials.
PUBLIC = {"openai.file_content", "meta.openapi"}

_ERROR = {"type": "object", "required": ["error", "message"], "properties": {
    "error": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}
_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                     "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    """A werkzeug rule as an OpenAPI path and its path parameters."""
    params = []
    for converter, name in _CONVERTED.findall(rule):
        schema: dict[str, Any] = {"type": "string"}
        if converter == "int":
            schema = {"type": "integer", "minimum": 0, "maximum": INT32_MAX}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return _CONVERTED.sub(r"{\2}", rule), params


def _query_parameters(schema: dict[str, Any], where: str = "query") -> list[dict[str, Any]]:
    required = set(schema.get("required", []))
    return [{"name": name, "in": where, "required": name in required, "schema": prop}
            for name, prop in schema.get("properties", {}).items()]


def document(app: Flask, limits: Limits | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of `app` under /api and /v1.

    Built once per app and limits: it costs ~100 ms of CPU, and anyone may ask for it without a
    credential, so building it per request would hand out CPU for free. Callers must not change it.
    """
    key = (limits or Limits())
    cached = app.extensions.setdefault("helix_openapi", {})
    if key not in cached:
        cached[key] = _build(app, key)
    return cached[key]


def _build(app: Flask, limits: Limits) -> dict[str, Any]:
    params = list(param_schemas(limits).values())
    every = {s for op in OPERATIONS.values() for s in (op.json, op.form, op.query) if s is not None}
    inputs = [(schema, "validation", adapter(schema)) for schema in [*every, *params]]
    by_key, defs = TypeAdapter.json_schemas(inputs, ref_template=_REF)
    components = dict(defs.get("$defs", {}))

    def ref(schema: Any) -> dict[str, Any]:
        found = by_key[(schema, "validation")]
        if "$ref" in found:
            return found
        components[schema.__name__] = found
        return {"$ref": _REF.format(model=schema.__name__)}

    def resolved(schema: Any) -> dict[str, Any]:
        found = by_key[(schema, "validation")]
        return components[found["$ref"].rsplit("/", 1)[-1]] if "$ref" in found else found

    for schema in params:
        ref(schema)
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.rule.startswith(PREFIXES):
            continue
        path, path_params = _path(rule.rule)
        view = app.view_functions[rule.endpoint]
        op = OPERATIONS.get(rule.endpoint, Operation())
        openai_shaped = rule.rule.startswith("/v1/")
        error = {"description": "an error", "content": {"application/json": {"schema": {
            "$ref": _REF.format(model="OpenAIError" if openai_shaped else "Error")}}}}
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operation: dict[str, Any] = {
                "operationId": f"{rule.endpoint}.{method.lower()}",
                "summary": (view.__doc__ or rule.endpoint).strip().splitlines()[0],
                "tags": [rule.endpoint.split(".")[0]],
                "parameters": list(path_params),
                "responses": {"200": {"description": "done"}, "201": {"description": "created"},
                              "204": {"description": "nothing to do"}, "4XX": error, "5XX": error},
            }
            if rule.endpoint in PUBLIC:
                operation["security"] = []
            if op.query is not None:
                operation["parameters"] += _query_parameters(resolved(op.query))
            for name, (schema, description) in op.headers.items():
                operation["parameters"].append({"name": name, "in": "header", "required": False,
                                                "schema": schema, "description": description})
            content: dict[str, Any] = {}
            if op.json is not None:
                content["application/json"] = {"schema": ref(op.json)}
            if op.form is not None:
                form = dict(resolved(op.form))
                name, several = op.form_files or ("file", False)
                binary = {"type": "string", "contentMediaType": "application/octet-stream"}
                form["properties"] = {**form.get("properties", {}),
                                      name: {"type": "array", "items": binary} if several else binary}
                content["multipart/form-data"] = {"schema": form}
            if content and method != "GET":
                operation["requestBody"] = {"required": True, "content": content}
            paths.setdefault(path, {})[method.lower()] = operation
    components.update(Error=_ERROR, OpenAIError=_OPENAI_ERROR)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Helix API", "version": "1",
                 "description": "Sessions, runners' worker protocol, admin and the OpenAI-compatible API. "
                                "Params of each kind of task: the Params* schemas."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer", "description": "an API key (hx_...) or a runner token (hxr_...)"}}},
        "security": [{"bearer": []}],
    }

