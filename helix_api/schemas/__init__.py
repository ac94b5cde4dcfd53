"""Pydantic schemas of every request the API reads, one module per resource; `openapi` publishes them."""
