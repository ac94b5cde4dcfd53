"""The OpenAPI 3.1 document at /api/v1/openapi.json: valid, built from the schemas the views use, and
covering every route under /api and /v1 (the web app's page of it: tests/web/test_docs.py)."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from helix_api.schemas.openapi import OPERATIONS, PREFIXES


def _document(client) -> dict:
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    return response.json


def test_the_document_is_valid_openapi_3_1(client):
    document = _document(client)
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on anything invalid


def test_every_api_and_v1_route_of_the_url_map_is_in_the_document(app, client):
    paths = _document(client)["paths"]
    missing = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(PREFIXES):
            continue
        path = re.sub(r"<(?:\w+(?:\([^)]*\))?:)?(\w+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            if method.lower() not in paths.get(path, {}):
                missing.append(f"{method} {path}")
    assert not missing, missing
    assert {"/api/v1/sessions", "/api/v1/worker/task/{task_id}/events", "/api/v1/admin/overview",
            "/v1/chat/completions", "/api/v1/openapi.json"} <= set(paths)


def test_every_endpoint_that_reads_a_body_has_its_schema(app):
    readers = {rule.endpoint for rule in app.url_map.iter_rules()
               if rule.rule.startswith(PREFIXES) and {"POST", "PUT"} & (rule.methods or set())}
    bodiless = {"sessions.cancel"}  # POSTs that read nothing
    described = {name for name, op in OPERATIONS.items() if op.json is not None or op.form is not None}
    assert readers - bodiless == described, (readers - bodiless) ^ described


def test_the_document_carries_the_limits_the_schemas_enforce(client):
    document = _document(client)
    schemas = document["components"]["schemas"]
    seq = schemas["TokenEvent"]["properties"]["seq"]
    assert seq["maximum"] == 2**31 - 1 and seq["minimum"] == 1
    assert schemas["SessionCreate"]["properties"]["name"]["anyOf"][0]["maxLength"] == 200
    assert schemas["SessionCreate"]["additionalProperties"] is False
    temperature = schemas["ParamsTextCreate"]["properties"]["temperature"]
    assert temperature["maximum"] == 100 and "a number" in temperature["description"]
    claim = document["paths"]["/api/v1/worker/task"]["get"]["parameters"]
    # A poll names its queue by model_name (the seed's URL) or by repeated kind=MODE:TYPE:MODEL: neither alone
    # is required, and both are described with their limits.
    by_name = {p["name"]: p for p in claim}
    assert by_name["model_name"]["schema"]["maxLength"] == 500 and by_name["kind"]["schema"]["maxLength"] == 600
    assert by_name["warm"]["schema"]["maxLength"] == 128
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")

