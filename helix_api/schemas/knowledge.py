"""What the knowledge-base API reads: a new knowledge base's name; documents come as multipart files."""

from __future__ import annotations

from typing import Required

from pydantic import with_config
from typing_extensions import TypedDict

from helix_api.schemas.base import BODY, QUERY, text


@with_config(BODY)
class KnowledgeBaseCreate(TypedDict, total=False):
    """POST /api/v1/knowledge: a new, empty knowledge base."""

    name: Required[text(200, min_length=1)]


@with_config(QUERY)
class DocumentUpload(TypedDict, total=False):
    """POST /api/v1/knowledge/<id>/files (multipart): text or Markdown documents in `files`, nothing else."""
