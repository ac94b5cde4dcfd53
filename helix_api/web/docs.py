"""The API's reference page: the OpenAPI document of /api/v1/openapi.json, rendered on the server.

Rendered here rather than by a script in the browser so that its summaries and descriptions, written in
Markdown, go through one well-kept Markdown library (markdown-it-py, in the `markdown` filter), and so
that the page is whole without JavaScript. No CDN, no sign-in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from flask import current_app, render_template, url_for

from helix_api.schemas.openapi import document
from helix_api.services import services
from helix_api.web import bp

_REF = re.compile(r"#/components/schemas/\w+")
_LIMITS = ("minimum", "exclusiveMinimum", "maximum", "maxLength", "maxItems")


@dataclass(frozen=True)
class Row:
    """One field or parameter: its name, whether it is required, its type, its description (Markdown)."""

    name: str
    required: bool
    type: str
    description: str = ""


@dataclass(frozen=True)
class Table:
    """The fields of one schema and what it is; `title` names a schema nested in another (None for the outer one)."""

    rows: list[Row]
    title: str | None = None
    description: str = ""


@dataclass
class Operation:
    """One method on one path, with what it reads."""

    id: str
    method: str
    path: str
    summary: str
    parameters: list[Row] = field(default_factory=list)
    bodies: list[tuple[str, list[Table]]] = field(default_factory=list)  # (content type, tables)


def _name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def type_of(schema: dict[str, Any] | None) -> str:
    """A schema in a few words: `integer (minimum 1, maximum 100)`, `string | null`, `TokenEvent[]`."""
    schema = schema or {}
    if "$ref" in schema:
        return _name(schema["$ref"])
    if "anyOf" in schema:
        return " | ".join(type_of(s) for s in schema["anyOf"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if schema.get("type") == "array":
        return type_of(schema.get("items")) + "[]"
    kind = schema.get("type", "any")
    kind = " | ".join(kind) if isinstance(kind, list) else kind
    limits = [f"{k} {_number(schema[k])}" for k in _LIMITS if k in schema]
    return kind + (f" ({', '.join(limits)})" if limits else "")


def _tables(spec: dict[str, Any], schema: dict[str, Any], seen: set[str], title: str | None = None) -> list[Table]:
    """The fields of `schema`, then those of each schema it refers to that `seen` does not hold yet."""
    schemas = spec["components"]["schemas"]
    if "$ref" in schema:
        schema = schemas.get(_name(schema["$ref"]), {})
    required = set(schema.get("required", []))
    properties = schema.get("properties", {})
    tables = [Table([Row(name, name in required, type_of(prop), prop.get("description", ""))
                     for name, prop in properties.items()], title, schema.get("description", ""))]
    for prop in properties.values():
        for ref in _REF.findall(json.dumps(prop)):
            if _name(ref) not in seen:
                seen.add(_name(ref))
                tables += _tables(spec, {"$ref": ref}, seen, _name(ref))
    return tables


def reference(spec: dict[str, Any]) -> dict[str, Any]:
    """What the page shows: operations grouped by tag, then each kind of task's params."""
    by_tag: dict[str, list[Operation]] = {}
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            operation = Operation(op["operationId"], method.upper(), path, op.get("summary", ""))
            operation.parameters = [Row(p["name"], p.get("required", False), f"{p['in']}, {type_of(p.get('schema'))}",
                                        p.get("description", "")) for p in op.get("parameters", [])]
            for content_type, media in op.get("requestBody", {}).get("content", {}).items():
                operation.bodies.append((content_type, _tables(spec, media["schema"], set())))
            by_tag.setdefault((op.get("tags") or ["other"])[0], []).append(operation)
    params = [(name, _tables(spec, {"$ref": f"#/components/schemas/{name}"}, set()))
              for name in spec["components"]["schemas"] if name.startswith("Params")]
    return {"info": spec["info"], "tags": by_tag, "params": params}


@bp.get("/docs")
def api_docs():
    """The API reference, drawn from the OpenAPI document on the server."""
    spec = document(current_app, services().limits)
    return render_template("web/docs.html", spec_url=url_for("meta.openapi"), **reference(spec))
