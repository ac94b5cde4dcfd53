"""Training data checked up front: every problem named by file and line, before anything is stored.

Text: JSONL of chats (`{"messages": [{"role", "content"}, ...]}`) or question/answer pairs
(`question`/`answer`, or `prompt`/`completion`), normalised to one `train.jsonl` of chats.
Comparisons (DPO, reward models): JSONL of `{"prompt", "chosen", "rejected"}`, or a chat `messages`
ending with the user's turn and a `chosen` and a `rejected` reply (strings or assistant messages),
normalised to one `train.jsonl` of `{"messages", "chosen", "rejected"}`.
Images: each image with a caption: `x.png` + `x.txt`, or one `captions.json` of `{"x.png": "..."}`.
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, Protocol

from helix_api.errors import InvalidTrainingData, echo
from helix_api.schemas.base import json_problem
from helix_api.sessions.storage import safe_name

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = {"jsonl": "application/jsonl", "json": "application/json", "txt": "text/plain"}
IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
MAX_PROBLEMS = 20  # enough to fix a file by, short enough to read
MAX_NAME = 255  # what a filesystem takes for one name


class Upload(Protocol):
    """An uploaded file: werkzeug's FileStorage fits."""

    filename: str | None
    stream: IO[bytes]


@dataclass
class TextSet:
    """Chats ready for training, as one JSONL file of `{"messages": [...]}` lines."""

    examples: int
    jsonl: BinaryIO


@dataclass
class ImageSet:
    """Images (by safe name) with their captions."""

    images: dict[str, tuple[Upload, str]] = field(default_factory=dict)  # name -> (upload, content type)
    captions: dict[str, str] = field(default_factory=dict)  # image name -> caption
    caption_files: list[Upload] = field(default_factory=list)


class Problems:
    """Problems found so far, each naming its file (and line)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, file: str, message: str, line: int | None = None) -> None:
        item: dict[str, Any] = {"file": file, "message": message}
        if line is not None:
            item["line"] = line
        self.items.append(item)

    def raise_if_any(self, summary: str) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_PROBLEMS]
        lines = "; ".join(f"{p['file']}{':' + str(p['line']) if 'line' in p else ''}: {p['message']}"
                          for p in shown)
        more = f" (and {len(self.items) - len(shown)} more)" if len(self.items) > len(shown) else ""
        raise InvalidTrainingData(f"{summary}: {lines}{more}", field="files", problems=shown)


def shown_name(name: str) -> str:
    """A file's name as a message may show it: what is not printable (NUL, a lone surrogate) escaped."""
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else f"\\u{ord(c):04x}"
                   for c in name[:MAX_NAME]) + ("..." if len(name) > MAX_NAME else "")


def _name_problem(name: str) -> str | None:
    """Why an uploaded file's name is refused, or None.

    Names are stored (made safe) and shown back; one a browser or a filesystem could not have made is
    refused with its file rather than silently renamed.
    """
    if len(name) > MAX_NAME:
        return f"a file name longer than {MAX_NAME} characters"
    odd = next((c for c in name if not c.isprintable() or 0xD800 <= ord(c) <= 0xDFFF), None)
    if odd is not None:
        what = "a NUL character" if odd == "\x00" else f"the character U+{ord(odd):04X}"
        return f"the file's name holds {what}"
    return None


def _loads(text: str | bytes) -> Any:
    """json.loads, with JSON nested past Python's recursion limit refused as bad JSON (a ValueError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _messages_of(messages: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """A `messages` array as role/content messages, or why it is not one."""
    if not isinstance(messages, list) or not messages:
        return None, "'messages' must be a non-empty array"
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return None, f"messages[{i}] must be an object"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return None, f"messages[{i}] has unknown role {echo(role)} (allowed: {', '.join(ROLES)})"
        if not isinstance(content, str) or not content.strip():
            return None, f"messages[{i}] needs a non-empty string 'content'"
        chat.append({"role": role, "content": content})
    return chat, None


def _chat_of(record: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """The chat a JSONL record stands for, or why it is not one."""
    if not isinstance(record, dict):
        return None, "each line must be a JSON object"
    if "messages" in record:
        chat, why = _messages_of(record["messages"])
        if chat is None:
            return None, why
        if not any(m["role"] == "assistant" for m in chat) or not any(m["role"] == "user" for m in chat):
            return None, "a chat needs at least one user and one assistant message"
        return chat, None
    for ask, answer in (("question", "answer"), ("prompt", "completion")):
        if ask in record or answer in record:
            q, a = record.get(ask), record.get(answer)
            if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
                return None, f"'{ask}' and '{answer}' must both be non-empty strings"
            return [{"role": "user", "content": q}, {"role": "assistant", "content": a}], None
    return None, "expected 'messages', or 'question' and 'answer' (or 'prompt' and 'completion')"


def _reply_of(record: dict[str, Any], name: str) -> tuple[str | None, str | None]:
    """The text of a comparison's `chosen` or `rejected` reply, or why it is not one."""
    value = record.get(name)
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            return None, f"'{name}' must be the assistant's reply, not a {echo(value.get('role'))} message"
        value = value.get("content")
    if not isinstance(value, str) or not value.strip():
        return None, f"'{name}' must be a non-empty string (or an assistant message with one)"
    return value, None


def _comparison_of(record: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The comparison a JSONL record stands for, or why it is not one."""
    if not isinstance(record, dict):
        return None, "each line must be a JSON object"
    if "chosen" not in record or "rejected" not in record:
        return None, "a comparison needs 'chosen' and 'rejected' replies"
    if "messages" in record:
        chat, why = _messages_of(record["messages"])
        if chat is None:
            return None, why
        if chat[-1]["role"] != "user":
            return None, "'messages' must end with the user's turn that 'chosen' and 'rejected' answer"
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        chat = [{"role": "user", "content": record["prompt"]}]
    else:
        return None, "expected 'prompt' (a non-empty string) or 'messages' ending with the user's turn"
    chosen, why = _reply_of(record, "chosen")
    if chosen is None:
        return None, why
    rejected, why = _reply_of(record, "rejected")
    if rejected is None:
        return None, why
    if chosen == rejected:
        return None, "'chosen' and 'rejected' are the same reply: nothing to learn from"
    return {"messages": chat, "chosen": chosen, "rejected": rejected}, None


def check_comparisons(uploads: list[Upload], min_examples: int) -> TextSet:
    """Every line checked as a comparison; normalised ones, or InvalidTrainingData naming each bad line."""
    return check_text(uploads, min_examples, comparisons=True)


def check_text(uploads: list[Upload], min_examples: int, *, comparisons: bool = False) -> TextSet:
    """Every line of every file checked; normalised chats, or InvalidTrainingData naming each bad line."""
    problems = Problems()
    out = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
    examples = 0
    if not uploads:
        problems.add("files", "no training files were uploaded (send JSONL files in the 'files' field)")
    for upload in uploads:
        name = upload.filename or "upload"
        odd_name = _name_problem(name)
        if odd_name:
            problems.add(shown_name(name), odd_name)
            continue
        if not name.lower().endswith(TEXT_SUFFIXES):
            problems.add(name, "not a JSONL file (expected a .jsonl file of chats or question/answer pairs)")
            continue
        upload.stream.seek(0)
        for number, raw in enumerate(upload.stream, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                problems.add(name, "not UTF-8 text", number)
                break
            if not line:
                continue
            try:
                record = _loads(line)
            except ValueError as exc:
                problems.add(name, f"not valid JSON ({getattr(exc, 'msg', exc)})", number)
                continue
            problem = json_problem(record)  # NaN, NUL, a lone surrogate: nothing a trainer should get
            if problem:
                problems.add(name, f"{problem[0].lstrip('.') or 'the line'} holds {problem[1]}", number)
                continue
            normalised, why = _comparison_of(record) if comparisons else _chat_of(record)
            if normalised is None:
                problems.add(name, why or "not a training example", number)
                continue
            examples += 1
            line_out = normalised if comparisons else {"messages": normalised}
            out.write(json.dumps(line_out, ensure_ascii=False).encode() + b"\n")
        upload.stream.seek(0)
    problems.raise_if_any("The training data has problems")
    if examples < min_examples:
        what = "comparisons" if comparisons else "training examples"
        problems.add("files", f"only {examples} {what}; at least {min_examples} are needed")
        problems.raise_if_any("Too few training examples")
    out.seek(0)
    return TextSet(examples=examples, jsonl=out)


def content_type(name: str) -> str:
    """The content type of a checked upload, from its name (the check made sure they agree)."""
    suffix = safe_name(name).rpartition(".")[2].lower()
    return IMAGE_TYPES.get(suffix) or CONTENT_TYPES.get(suffix) or "application/octet-stream"


def _image_problem(upload: Upload, max_bytes: int, max_side: int) -> str | None:
    """Why an upload is not a usable training image, or None."""
    from PIL import Image, UnidentifiedImageError  # the API's one use of Pillow: keep start-up light

    stream = upload.stream
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    if size > max_bytes:
        return f"the image is {size} bytes; the limit is {max_bytes}"
    try:
        with warnings.catch_warnings():
            # Pillow's pixel limit: a header claiming more pixels than it allows is a decompression
            # bomb (a few KB of PNG that would take gigabytes to decode), refused before decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                kind = (image.format or "").lower()
                image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"the image claims too many pixels to decode (over Pillow's limit of {Image.MAX_IMAGE_PIXELS})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a readable image ({exc.__class__.__name__})"
    finally:
        stream.seek(0)
    suffix = safe_name(upload.filename or "").rpartition(".")[2].lower()
    if IMAGE_TYPES.get(kind) != IMAGE_TYPES.get(suffix):
        return f"the file holds {kind.upper() or 'unknown'} data, not what its .{suffix} name says"
    if width > max_side or height > max_side:
        return f"the image is {width}x{height}; at most {max_side} pixels a side"
    return None


def check_images(uploads: list[Upload], *, min_images: int, max_bytes: int, max_side: int) -> ImageSet:
    """Images and captions paired and checked; InvalidTrainingData naming each bad or unpaired file."""
    problems = Problems()
    found = ImageSet()
    texts: dict[str, str] = {}  # stem -> caption from x.txt
    json_captions: dict[str, str] = {}
    for upload in uploads:
        raw_name = upload.filename or "upload"
        odd_name = _name_problem(raw_name)
        if odd_name:
            problems.add(shown_name(raw_name), odd_name)
            continue
        name = safe_name(raw_name)
        stem, _, suffix = name.rpartition(".")
        suffix = suffix.lower()
        if suffix in IMAGE_TYPES:
            if name in found.images:
                problems.add(raw_name, "two images with the same name")
                continue
            why = _image_problem(upload, max_bytes, max_side)
            if why:
                problems.add(raw_name, why)
                continue
            found.images[name] = (upload, IMAGE_TYPES[suffix])
        elif suffix == "txt":
            caption = _read_text(upload, raw_name, problems)
            if caption is not None:
                texts[stem] = caption
                found.caption_files.append(upload)
        elif suffix == "json":
            mapping = _read_captions_json(upload, raw_name, problems)
            json_captions.update(mapping)
            found.caption_files.append(upload)
        else:
            problems.add(raw_name, "neither an image (png, jpg, webp) nor a caption (.txt, captions.json)")
    for name in found.images:
        caption = json_captions.get(name) or texts.get(name.rpartition(".")[0])
        if caption:
            found.captions[name] = caption
        else:
            problems.add(name, f"no caption: add {name.rpartition('.')[0]}.txt or an entry in captions.json")
    for stem in texts:
        if not any(n.rpartition(".")[0] == stem for n in found.images):
            problems.add(f"{stem}.txt", "a caption with no image of the same name")
    problems.raise_if_any("The training images have problems")
    if len(found.images) < min_images:
        problems.add("files", f"only {len(found.images)} captioned images; at least {min_images} are needed")
        problems.raise_if_any("Too few training images")
    return found


def _read_text(upload: Upload, name: str, problems: Problems) -> str | None:
    upload.stream.seek(0)
    try:
        text = upload.stream.read(64 * 1024 + 1).decode("utf-8").strip()
    except UnicodeDecodeError:
        problems.add(name, "a caption must be UTF-8 text")
        return None
    finally:
        upload.stream.seek(0)
    if not text or len(text) > 64 * 1024:
        problems.add(name, "a caption must be non-empty text of at most 64 KiB")
        return None
    if "\x00" in text:  # PostgreSQL's JSON cannot store it, and no caption needs it
        problems.add(name, "a caption must not hold a NUL character")
        return None
    return text


def _read_captions_json(upload: Upload, name: str, problems: Problems) -> dict[str, str]:
    upload.stream.seek(0)
    try:
        mapping = _loads(upload.stream.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        problems.add(name, f"not valid JSON ({exc})")
        return {}
    finally:
        upload.stream.seek(0)
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v.strip() for v in mapping.values()):
        problems.add(name, 'captions JSON must be an object of {"image.png": "caption", ...}')
        return {}
    problem = json_problem(mapping)  # NUL, a lone surrogate: nothing the task's JSON can store
    if problem:
        problems.add(name, f"{problem[0].lstrip('.') or 'the captions'} holds {problem[1]}")
        return {}
    return {safe_name(k): v.strip() for k, v in mapping.items()}
