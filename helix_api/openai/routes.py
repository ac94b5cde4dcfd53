"""The OpenAI-compatible API under /v1: chat completions, models and image generations.

Programs that speak OpenAI's API (its official clients included) use Helix with an API key as their
key. Each request becomes a session with its interactions and one task, like the native API's, so an
operator sees it in SQL; see notes.md ("OpenAI-compatible API") for what maps to what.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from flask import Blueprint, g, url_for
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from helix_api import constraints, responses
from helix_api.accounts.auth import require_user
from helix_api.errors import Forbidden, InvalidField, ModelNotFound, echo
from helix_api.models import Mode, SessionType
from helix_api.openai import completions, model_ids
from helix_api.params import check_params
from helix_api.schemas import openai as schemas
from helix_api.services import services
from helix_api.sessions import actions, tool_calls
from helix_api.validation import field, json_body, query

bp = Blueprint("openai", __name__, url_prefix="/v1")

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_URL_SALT = "helix.v1.file-content"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# What a message of a role may carry beside role, content and name: an assistant's calls, a tool result's call.
_ROLE_KEYS = {"assistant": ("tool_calls",), "tool": ("tool_call_id",)}

# Fields OpenAI's clients send that Helix cannot honour: accepted when their value asks for nothing
# (what the clients send by default), otherwise a 400 that says so rather than silently ignored.
_NEUTRAL = {
    "n": (lambda v: v == 1, "only n=1 is supported"),
    "frequency_penalty": (lambda v: v == 0, "not supported; Helix takes repetition_penalty (> 0, 1 is none)"),
    "presence_penalty": (lambda v: v == 0, "not supported; Helix takes repetition_penalty (> 0, 1 is none)"),
    "logit_bias": (lambda v: v == {}, "logit_bias is not supported"),
    "functions": (lambda v: v == [], "the deprecated functions are not supported: send tools"),
    "function_call": (lambda v: v in ("none", "auto"), "the deprecated function_call is not supported: send "
                                                       "tool_choice"),
    "modalities": (lambda v: v == ["text"], "only text replies are supported"),
    "service_tier": (lambda v: v in ("auto", "default"), "there are no service tiers"),
}
# Accepted and ignored: they ask nothing of the model (every request is stored as a session anyway).
_IGNORED = {"user", "store", "metadata"}
# OpenAI name -> Helix param; Helix's own (top_k, repetition_penalty, ...) pass under their names.
_CHAT_PARAMS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
                "top_k": "top_k", "repetition_penalty": "repetition_penalty",
                # Structured output and tool calls: OpenAI's shapes, stored as they come (constraints.py).
                **{name: name for name in sorted(constraints.NAMES)}}
_IMAGE_PARAMS = {"n": "num_images", "seed": "seed", "negative_prompt": "negative_prompt",
                 "num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale"}


# Models.


def _listing() -> list[dict[str, Any]]:
    svc = services()
    return model_ids.listing(svc.database, svc.catalog, user_id=g.caller.id, user_name=g.caller.name)


def _resolve(requested: str, type_: SessionType) -> model_ids.Model:
    svc = services()
    return model_ids.resolve(svc.database, svc.catalog, user_id=g.caller.id, model=requested, type_=type_)


@bp.get("/models")
@require_user
def list_models():
    """Configured models, models a runner serves now, and the caller's fine-tunes, OpenAI-style."""
    return {"object": "list", "data": _listing()}


@bp.get("/models/<path:model>")
@require_user
def get_model(model: str):
    """One model of the listing (named by its id, or by full name), or 404 model_not_found."""
    wanted = model_ids.listed_id(services().catalog, model)
    for item in _listing():
        if item["id"] == wanted:
            return item
    raise ModelNotFound(f"The model {echo(model)} does not exist (GET /v1/models lists them).", field="model")


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
            raise InvalidField(f"{name}={echo(body[name])}: {why}.", field=name)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "\n".join(p["text"] for p in value)
    raise InvalidField(f"{where}.content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} "
                       "parts (images, audio and files are not supported).", field=f"{where}.content")


def _tool_calls(value: Any, where: str, seen: set[str]) -> list[dict[str, Any]]:
    """An assistant message's earlier calls, in the task input's shape; their ids join `seen`."""
    shape = '{"id", "type": "function", "function": {"name", "arguments"}}'
    if not isinstance(value, list):
        raise InvalidField(f"{where}.tool_calls must be a list of {shape}.", field=f"{where}.tool_calls")
    calls = []
    for index, call in enumerate(value):
        at = f"{where}.tool_calls[{index}]"
        if (not isinstance(call, dict) or call.get("type", "function") != "function"
                or not isinstance(call.get("function"), dict)):
            raise InvalidField(f"{at} must be {shape}.", field=at)
        call_id, function = call.get("id"), call["function"]
        if not isinstance(call_id, str) or not 0 < len(call_id) <= tool_calls.CALL_ID_CHARS or call_id in seen:
            raise InvalidField(f"{at}.id must be a string of 1 to {tool_calls.CALL_ID_CHARS} characters that no "
                               f"other call of the chat has, not {echo(call_id)}.", field=f"{at}.id")
        name = function.get("name")
        if not isinstance(name, str) or not constraints.NAME.match(name):
            raise InvalidField(f"{at}.function.name must be a function name (^[a-zA-Z0-9_-]{{1,64}}$), not "
                               f"{echo(name)}.", field=f"{at}.function.name")
        arguments = function.get("arguments")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidField(f"{at}.function.arguments must be the JSON text of an object, not {echo(arguments)}.",
                               field=f"{at}.function.arguments")
        seen.add(call_id)
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def _message(message: Any, where: str, calls_so_far: set[str]) -> dict[str, Any]:
    """One OpenAI message in the task input's shape (notes.md, "Structured output and tool calls")."""
    if not isinstance(message, dict):
        raise InvalidField(f"{where} must be an object with role and content.", field=where)
    role = _ROLES.get(message["role"]) if isinstance(message.get("role"), str) else None
    if role is None:
        raise InvalidField(f"{where}.role must be system, user, assistant or tool, not "
                           f"{echo(message.get('role'))}.", field=f"{where}.role")
    # A reply sent back as it came (tool_calls: null, refusal: null, ...) asks for nothing more.
    for key, extra in message.items():
        if key not in ("role", "content", "name", *_ROLE_KEYS.get(role, ())) and extra not in (None, []):
            raise InvalidField(f"{where}.{key} is not supported on a {role} message (audio, refusals and "
                               "function_call are not supported at all).", field=f"{where}.{key}")
    if role == "assistant" and message.get("tool_calls"):
        content = message.get("content")
        return {"role": role, "content": "" if content is None else _content(content, where),
                "tool_calls": _tool_calls(message["tool_calls"], where, calls_so_far)}
    if role == "tool":
        call_id = message.get("tool_call_id")
        if call_id not in calls_so_far:
            raise InvalidField(f"{where}.tool_call_id must be the id of a call an earlier assistant message made, "
                               f"not {echo(call_id)}.", field=f"{where}.tool_call_id")
        return {"role": role, "tool_call_id": call_id, "content": _content(message.get("content"), where)}
    return {"role": role, "content": _content(message.get("content"), where)}


def _messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI messages as the task input's; the last one, which Helix answers, is the user's or a tool result."""
    if not isinstance(value, list) or not value:
        raise InvalidField("'messages' must be a non-empty list of messages.", field="messages")
    calls: set[str] = set()
    messages = [_message(message, f"messages[{index}]", calls) for index, message in enumerate(value)]
    if messages[-1]["role"] not in ("user", "tool"):
        where = f"messages[{len(messages) - 1}].role"
        raise InvalidField(f"{where} is {messages[-1]['role']!r}: the last message must be the user's or a tool "
                           "result, which Helix answers.", field=where)
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


def _start(model: model_ids.Model, requested: str, messages: list[dict[str, Any]],
           params: dict[str, Any], knowledge: Any = None) -> completions.Request:
    svc = services()
    kb_ids = actions.knowledge_bases(svc, g.caller.id, knowledge, model.type)
    return completions.start(svc.database, svc.policy, user_id=g.caller.id, model=model, requested=requested,
                             messages=messages, params=params, knowledge_bases=kb_ids, knowledge=svc.retrieval)


def _wait(started: completions.Request) -> Any:
    svc = services()
    return completions.wait(svc.database, started, recheck=svc.settings["RECHECK_SECONDS"],
                            timeout=float(svc.settings["OPENAI_WAIT_SECONDS"]),
                            grace=float(svc.settings["NO_RUNNER_GRACE_SECONDS"]))


def _headers(started: completions.Request) -> dict[str, str]:
    # Where the request went, for whoever wants to look it up in the native API or in SQL.
    return {"X-Helix-Session-Id": str(started.session_id), "X-Helix-Task-Id": str(started.task_id)}


# Chat.


@bp.post("/chat/completions")
@require_user
def chat_completions():
    """Answer a chat: a `chat.completion`, or with `stream` Server-Sent chunks ending in `[DONE]`."""
    body = json_body(schemas.ChatCompletion)
    requested = field(body, "model", str)
    messages = _messages(body.get("messages"))
    params = _chat_params(body)
    _neutral(body)
    stream = field(body, "stream", bool, required=False, default=False)
    options = field(body, "stream_options", dict, required=False)
    if options is not None and not stream:
        raise InvalidField("stream_options is only allowed with stream: true.", field="stream_options")
    include_usage = field(options or {}, "include_usage", bool, required=False, default=False)
    model = _resolve(requested, SessionType.TEXT)
    started = _start(model, requested, messages, params, body.get("knowledge"))
    if stream:
        svc = services()
        intake = svc.scheduler.intake
        chunks = completions.stream_chat(svc.database, intake.live, started, include_usage=include_usage,
                                         keepalive=svc.settings["SSE_KEEPALIVE_SECONDS"],
                                         recheck=svc.settings["RECHECK_SECONDS"], bus=intake.bus,
                                         text_every=svc.settings["SSE_TEXT_SECONDS"],
                                         grace=float(svc.settings["NO_RUNNER_GRACE_SECONDS"]))
        return responses.event_stream(chunks, _headers(started))
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
            raise InvalidField(f"size must be WIDTHxHEIGHT in pixels, like 1024x1024, not {echo(size)}.",
                               field="size")
        params["width"], params["height"] = int(match[1]), int(match[2])
    for name, allowed in (("quality", ("auto", "standard")), ("style", ())):
        if body.get(name) is not None and body[name] not in allowed:
            raise InvalidField(f"{name}={echo(body[name])} is not supported; leave it out.", field=name)
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
    body = json_body(schemas.ImageGeneration)
    prompt = field(body, "prompt", str)
    if not prompt.strip():
        raise InvalidField("'prompt' must not be empty.", field="prompt")
    response_format = field(body, "response_format", str, required=False, default="url")
    if response_format not in ("url", "b64_json"):
        raise InvalidField("response_format must be url or b64_json.", field="response_format")
    params = _image_params(body)
    requested = field(body, "model", str, required=False) or _default_image_model()
    model = _resolve(requested, SessionType.IMAGE)
    started = _start(model, requested, [{"role": "user", "content": prompt}], params)
    task = _wait(started)
    data = [_image_json(row, response_format) for row in completions.images(services().database, task)]
    return {"created": started.created, "data": data}, 200, _headers(started)


@bp.get("/files/<int:file_id>/content")
def file_content(file_id: int):
    """An image from /v1/images/generations, by its signed, time-limited link (no key needed)."""
    token = query(schemas.FileLink).get("token", "")
    try:
        signed_id = _signer().loads(token, max_age=services().settings["IMAGE_URL_SECONDS"])
    except SignatureExpired:
        raise Forbidden("This image link has expired: generate the image again, or fetch it with your key "
                        "through /api/v1/sessions.") from None
    except BadSignature:
        raise Forbidden("This image link is not valid: it needs the token it was made with.") from None
    if signed_id != file_id:
        raise Forbidden("This image link is not valid: it needs the token it was made with.")
    svc = services()
    row = completions.output_image(svc.database, file_id)
    return responses.stored_file(row, svc.store.open(row.path), attachment=False)
