"""Knowledge bases API: documents a user's chats can draw on (see retrieval.py)."""

from __future__ import annotations

from flask import Blueprint, g, request

from helix_api.accounts.auth import require_user
from helix_api.errors import InvalidField, echo
from helix_api.knowledge import bases
from helix_api.schemas import knowledge as schemas
from helix_api.services import services
from helix_api.validation import allow_uploads, json_body

bp = Blueprint("knowledge", __name__, url_prefix="/api/v1/knowledge")


@bp.post("")
@require_user
def create_knowledge_base():
    """A new, empty knowledge base: `{"name": ...}`."""
    body = json_body(schemas.KnowledgeBaseCreate)
    return bases.create(services().database, g.caller.id, body.get("name")), 201


@bp.get("")
@require_user
def list_knowledge_bases():
    """The caller's knowledge bases, newest first."""
    return {"knowledge_bases": bases.listing(services().database, g.caller.id)}


@bp.get("/<int:kb_id>")
@require_user
def get_knowledge_base(kb_id: int):
    """One knowledge base with its documents."""
    return bases.shown(services().database, g.caller.id, kb_id)


@bp.post("/<int:kb_id>/files")
@require_user
def add_files(kb_id: int):
    """Add text or Markdown documents (multipart, in `files`); all are checked before any is stored."""
    svc = services()
    allow_uploads(svc.settings["MAX_UPLOAD_BYTES"])
    if request.mimetype != "multipart/form-data":
        raise InvalidField("Send the documents as multipart/form-data in the 'files' field.", field="files")
    unknown = sorted(set(request.form) | (set(request.files) - {"files"}))
    if unknown:
        raise InvalidField(f"Unknown form field {echo(unknown[0])}; send documents in 'files'.", field=unknown[0])
    added = bases.add_documents(svc.database, g.caller.id, kb_id, request.files.getlist("files"),
                                            svc.retrieval)
    return {"documents": added}, 201


@bp.get("/<int:kb_id>/files")
@require_user
def list_files(kb_id: int):
    """The documents of a knowledge base, oldest first."""
    return {"documents": bases.document_list(services().database, g.caller.id, kb_id)}
