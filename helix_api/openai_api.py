"""The OpenAI-compatible API under /v1: chat completions, models and image generations.

Programs that speak OpenAI's API (its official clients included) use Helix with an API key as their
key. Each request becomes a session with its interactions and one task, like the native API's, so an
operator sees it in SQL; see notes.md ("OpenAI-compatible API") for what maps to what.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, g, request, send_file, stream_with_context, url_for
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select

from . import completions, conversations, files, runners
from .auth import require_user
from .errors import FileNotFound, Forbidden, InvalidField, ModelNotFound
from .files import FileKind
from .models import File, Mode, Session, SessionType
from .params import check_params
from .services import services
from .validation import field, json_body

bp = Blueprint("openai", __name__, url_prefix="/v1")

FT_PREFIX = "ft:"
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_URL_SALT = "helix.v1.file-content"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Fields OpenAI's clients send that Helix cannot honour: accepted when their value asks for nothing
# (what the clients send by default), otherwise a 400 that says so rather than silently ignored.
_NEUTRAL = {
    "n": (lambda v: v == 1, "only n=1 is supported"),
    "frequency_penalty": (lambda v: v == 0, "not supported; Helix takes repetition_penalty (> 0, 1 is none)"),
    "presence_penalty": (lambda v: v == 0, "not supported; Helix takes repetition_penalty (> 0, 1 is none)"),
    "logprobs": (lambda v: v is False, "log probabilities are not supported"),
    "top_logprobs": (lambda v: v == 0, "log probabilities are not supported"),
    "logit_bias": (lambda v: v == {}, "logit_bias is not supported"),
    "tools": (lambda v: v == [], "tool calling is not supported"),
    "functions": (lambda v: v == [], "function calling is not supported"),
    "tool_choice": (lambda v: v in ("none", "auto"), "tool calling is not supported"),
    "function_call": (lambda v: v in ("none", "auto"), "function calling is not supported"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "tool calling is not supported"),
    "response_format": (lambda v: v == {"type": "text"}, "only plain text replies are supported"),
    "modalities": (lambda v: v == ["text"], "only text replies are supported"),
    "service_tier": (lambda v: v in ("auto", "default"), "there are no service tiers"),
}
# Accepted and ignored: they ask nothing of the model (every request is stored as a session anyway).
_IGNORED = {"user", "store", "metadata"}
# OpenAI name -> Helix param; Helix's own (top_k, repetition_penalty, ...) pass under their names.
_CHAT_PARAMS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
                "top_k": "top_k", "repetition_penalty": "repetition_penalty"}
_CHAT_FIELDS = {"model", "messages", "stream", "stream_options", *_CHAT_PARAMS, *_NEUTRAL, *_IGNORED}
_IMAGE_PARAMS = {"n": "num_images", "seed": "seed", "negative_prompt": "negative_prompt",
                 "num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale"}
_IMAGE_FIELDS = {"prompt", "model", "size", "response_format", "quality", "style", *_IMAGE_PARAMS, *_IGNORED}


@dataclass(frozen=True)
class Model:
    """What a /v1 model id names: a base model of one type, with a fine-tune's adapter or none."""

    name: str
    type: SessionType
    adapter: Any | None = None


# Models.


def _offered(conn: Any) -> dict[str, tuple[str, bool]]:
    """name -> (type, served): the configured models and those a live runner serves for inference."""
    offered = {m["name"]: (m["type"], False) for m in services().catalog.as_list()}
    for mode, type_, name in runners.served_models(conn):
        if mode == Mode.CREATE.value:
            offered[name] = (type_, True)
    return offered


def _fine_tunes(db: Any, user_id: int) -> list[Any]:
    """The caller's sessions with a completed adapter, oldest first."""
    return list(db.execute(select(Session.id, Session.model_name, Session.type, Session.created_at)
                           .where(Session.user_id == user_id, Session.id.in_(files.sessions_with_adapters()))
                           .order_by(Session.id)))


def _model_json(id_: str, type_: str, *, owned_by: str, created: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": id_, "object": "model", "created": created, "owned_by": owned_by, "helix_type": type_, **extra}


def _listing(db: Any) -> list[dict[str, Any]]:
    data = [_model_json(name, type_, owned_by="helix", helix_served=served)
            for name, (type_, served) in sorted(_offered(db.connection()).items())]
    data += [_model_json(f"{FT_PREFIX}{row.model_name}:{row.id}", row.type.value, owned_by=g.caller.name,
                         created=int(row.created_at.timestamp()), helix_base_model=row.model_name,
                         helix_session_id=row.id) for row in _fine_tunes(db, g.caller.id)]
    return data


def _resolve(db: Any, model: str, type_: SessionType) -> Model:
    """The model a request names, or 404 model_not_found; `ft:<base>:<session>` is one of your fine-tunes."""
    if model.startswith(FT_PREFIX):
        base, _, session_id = model[len(FT_PREFIX):].rpartition(":")
        # Bounded, so an absurd id is a 404 rather than an integer the database cannot take.
        session = db.get(Session, int(session_id)) if session_id.isdigit() and len(session_id) < 19 else None
        adapter = files.session_adapter(db, session.id) if session is not None else None
        if (adapter is None or session.user_id != g.caller.id or session.model_name != base
                or session.type != type_):
            raise ModelNotFound(f"No {type_.value} fine-tune {model!r} of yours: its id is "
                                f"ft:<base model>:<session id> of a completed fine-tune session (GET /v1/models).",
                                field="model")
        return Model(base, type_, adapter)
    offered = _offered(db.connection())
    if model not in offered or offered[model][0] != type_.value:
        names = sorted(n for n, (t, _) in offered.items() if t == type_.value)
        raise ModelNotFound(f"The model {model!r} does not exist as a {type_.value} model here; offered: "
                            f"{', '.join(names)} (and your ft: fine-tunes).", field="model")
    return Model(model, type_)


@bp.get("/models")
@require_user
def list_models():
    """Configured models, models a runner serves now, and the caller's fine-tunes, OpenAI-style."""
    with services().database.read() as db:
        return {"object": "list", "data": _listing(db)}


@bp.get("/models/<path:model>")
@require_user
def get_model(model: str):
    """One model of the listing, or 404 model_not_found."""
    with services().database.read() as db:
        for item in _listing(db):
            if item["id"] == model:
                return item
    raise ModelNotFound(f"The model {model!r} does not exist (GET /v1/models lists them).", field="model")


# Request checks.


def _checked_params(params: dict[str, Any], names: dict[str, str], type_: SessionType) -> dict[str, Any]:
    """`params` checked as the native API checks them, with errors naming the OpenAI field."""
    try:
        return check_params(params, Mode.CREATE, type_, services().limits)
    except InvalidField as err:
        helix = (err.field or "").removeprefix("params.")
        ours = names.get(helix, helix)
        shown = repr(ours) if ours == helix else f"{ours!r} ({helix})"
        raise InvalidField(err.message.replace(f"Param {helix!r}", shown, 1), field=ours) from None


def _neutral(body: dict[str, Any]) -> None:
    for name, (neutral, why) in _NEUTRAL.items():
        if body.get(name) is not None and not neutral(body[name]):
            raise InvalidField(f"{name}={json.dumps(body[name])[:60]}: {why}.", field=name)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "\n".join(p["text"] for p in value)
    raise InvalidField(f"{where}.content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} "
                       "parts (images, audio and files are not supported).", field=f"{where}.content")


def _messages(value: Any) -> list[dict[str, str]]:
    """OpenAI messages as Helix's role/content messages; the last one must be the user's."""
    if not isinstance(value, list) or not value:
        raise InvalidField("'messages' must be a non-empty list of messages.", field="messages")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidField(f"{where} must be an object with role and content.", field=where)
        role = _ROLES.get(message["role"]) if isinstance(message.get("role"), str) else None
        if role is None:
            raise InvalidField(f"{where}.role must be system, user or assistant, not "
                               f"{json.dumps(message.get('role'))[:40]}.", field=f"{where}.role")
        # A reply sent back as it came (tool_calls: null, refusal: null, ...) asks for nothing more.
        for key, extra in message.items():
            if key not in ("role", "content", "name") and extra not in (None, []):
                raise InvalidField(f"{where}.{key} is not supported (no tool calls, audio or refusals).",
                                   field=f"{where}.{key}")
        messages.append({"role": role, "content": _content(message.get("content"), where)})
    if messages[-1]["role"] != "user":
        where = f"messages[{len(messages) - 1}].role"
        raise InvalidField(f"{where} is {messages[-1]['role']!r}: the last message must be the user's, which "
                           "Helix answers.", field=where)
    return messages


def _chat_params(body: dict[str, Any]) -> dict[str, Any]:
    """Helix params from the OpenAI fields, checked."""
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise InvalidField("Send max_tokens or max_completion_tokens, not both.", field="max_completion_tokens")
    params: dict[str, Any] = {}
    names: dict[str, str] = {}
    for name, helix in _CHAT_PARAMS.items():
        if body.get(name) is not None and body[name] != []:
            params[helix], names[helix] = body[name], name
    # OpenAI samples at temperature 1 unless told otherwise; Helix's own default is greedy.
    params.setdefault("temperature", 1.0)
    return _checked_params(params, names, SessionType.TEXT)


def _start(model: Model, requested: str, messages: list[dict[str, str]],
           params: dict[str, Any]) -> completions.Request:
    session, task = conversations.create_from_messages(
        services().database, user_id=g.caller.id, type_=model.type, model_name=model.name, messages=messages,
        params=params, policy=services().policy, adapter=model.adapter)
    return completions.Request(session_id=session.id, task_id=task.id, model=requested,
                               created=int(session.created_at.timestamp()))


def _wait(started: completions.Request) -> Any:
    settings = services().settings
    return completions.wait(services().database, started, recheck=settings["RECHECK_SECONDS"],
                            timeout=float(settings["OPENAI_WAIT_SECONDS"]))


def _headers(started: completions.Request) -> dict[str, str]:
    # Where the request went, for whoever wants to look it up in the native API or in SQL.
    return {"X-Helix-Session-Id": str(started.session_id), "X-Helix-Task-Id": str(started.task_id)}


# Chat.


@bp.post("/chat/completions")
@require_user
def chat_completions():
    """Answer a chat: a `chat.completion`, or with `stream` Server-Sent chunks ending in `[DONE]`."""
    body = json_body(_CHAT_FIELDS)
    requested = field(body, "model", str)
    messages = _messages(body.get("messages"))
    params = _chat_params(body)
    _neutral(body)
    stream = field(body, "stream", bool, required=False, default=False)
    options = field(body, "stream_options", dict, required=False)
    if options is not None and not stream:
        raise InvalidField("stream_options is only allowed with stream: true.", field="stream_options")
    include_usage = field(options or {}, "include_usage", bool, required=False, default=False)
    with services().database.read() as db:
        model = _resolve(db, requested, SessionType.TEXT)
    started = _start(model, requested, messages, params)
    if stream:
        settings = services().settings
        chunks = completions.stream_chat(services().database, started, include_usage=include_usage,
                                         keepalive=settings["SSE_KEEPALIVE_SECONDS"],
                                         recheck=settings["RECHECK_SECONDS"])
        return Response(stream_with_context(chunks), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **_headers(started)})
    return completions.chat_completion(started, _wait(started)), 200, _headers(started)


# Images.


def _default_image_model() -> str:
    names = services().catalog.names(SessionType.IMAGE.value)
    if not names:
        raise ModelNotFound("No image model is configured: name one in 'model'.", field="model")
    return names[0]


def _image_params(body: dict[str, Any]) -> dict[str, Any]:
    params = {helix: body[name] for name, helix in _IMAGE_PARAMS.items() if body.get(name) is not None}
    names = {helix: name for name, helix in _IMAGE_PARAMS.items()} | {"width": "size", "height": "size"}
    size = field(body, "size", str, required=False, default="auto")
    if size != "auto":
        match = _SIZE.match(size)
        if match is None:
            raise InvalidField(f"size must be WIDTHxHEIGHT in pixels, like 1024x1024, not {size[:40]!r}.",
                               field="size")
        params["width"], params["height"] = int(match[1]), int(match[2])
    for name, allowed in (("quality", ("auto", "standard")), ("style", ())):
        if body.get(name) is not None and body[name] not in allowed:
            raise InvalidField(f"{name}={json.dumps(body[name])[:40]} is not supported; leave it out.", field=name)
    return _checked_params(params, names, SessionType.IMAGE)


def _signer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(services().settings["SECRET_KEY"], salt=_URL_SALT)


def _image_json(row: Any, response_format: str) -> dict[str, str]:
    if response_format == "b64_json":
        with services().store.open(row.path) as handle:
            return {"b64_json": base64.b64encode(handle.read()).decode()}
    return {"url": url_for("openai.file_content", file_id=row.id, token=_signer().dumps(row.id), _external=True)}


@bp.post("/images/generations")
@require_user
def generate_images():
    """Make images for a prompt; answers their bytes (`b64_json`) or links that need no key (`url`)."""
    body = json_body(_IMAGE_FIELDS)
    prompt = field(body, "prompt", str)
    if not prompt.strip():
        raise InvalidField("'prompt' must not be empty.", field="prompt")
    response_format = field(body, "response_format", str, required=False, default="url")
    if response_format not in ("url", "b64_json"):
        raise InvalidField("response_format must be url or b64_json.", field="response_format")
    params = _image_params(body)
    requested = field(body, "model", str, required=False) or _default_image_model()
    with services().database.read() as db:
        model = _resolve(db, requested, SessionType.IMAGE)
    started = _start(model, requested, [{"role": "user", "content": prompt}], params)
    task = _wait(started)
    ids = [i for i in (task.result or {}).get("files") or [] if isinstance(i, int)]
    with services().database.read() as db:
        rows = {row.id: row for row in db.scalars(select(File).where(
            File.id.in_(ids), File.interaction_id == task.interaction_id))}
    data = [_image_json(rows[i], response_format) for i in ids if i in rows]
    return {"created": started.created, "data": data}, 200, _headers(started)


@bp.get("/files/<int:file_id>/content")
def file_content(file_id: int):
    """An image from /v1/images/generations, by its signed, time-limited link (no key needed)."""
    token = request.args.get("token", "")
    try:
        signed_id = _signer().loads(token, max_age=services().settings["IMAGE_URL_SECONDS"])
    except SignatureExpired:
        raise Forbidden("This image link has expired: generate the image again, or fetch it with your key "
                        "through /api/v1/sessions.") from None
    except BadSignature:
        raise Forbidden("This image link is not valid: it needs the token it was made with.") from None
    if signed_id != file_id:
        raise Forbidden("This image link is not valid: it needs the token it was made with.")
    with services().database.read() as db:
        row = db.get(File, file_id)
    if row is None or row.kind != FileKind.OUTPUT.value:
        raise FileNotFound(f"No image {file_id}: it was deleted.")
    return send_file(services().store.open(row.path), mimetype=row.content_type, download_name=row.name, max_age=0)
