"""`helix chat | image | finetune | sessions | usage`: a person's everyday commands, against a remote API.

They talk HTTP to HELIX_API_URL with HELIX_API_KEY (remote.py), never to the server's SQL; the server's
own commands (serve, db, users, tasks) stay in cli.py. An error from the API is one line, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from helix_api.cli import shapes

if TYPE_CHECKING:  # requests is imported when a user command runs, not by `helix serve`'s master
    from helix_api.cli.remote import Event, Remote

ENDS = ("complete", "error", "cancelled")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def remote_command(group: click.Group, *args: Any, **kwargs: Any) -> Callable:
    """A command of `group` that gets a `Remote` as its first argument, its RemoteErrors shown as one line."""
    def decorate(func: Callable) -> Callable:
        @group.command(*args, **kwargs)
        @click.option("--api-url", envvar="HELIX_API_URL", default="http://127.0.0.1:8080", show_envvar=True,
                      show_default=True, help="The Helix API.")
        @click.option("--api-key", envvar="HELIX_API_KEY", show_envvar=True, help="Your API key (hx_...).")
        @functools.wraps(func)
        def command(api_url: str, api_key: str | None, **options: Any) -> None:
            from helix_api.cli.remote import Remote, RemoteError

            if not api_key:
                raise click.UsageError("no API key: set HELIX_API_KEY (or pass --api-key)")
            remote = Remote(api_url, api_key)
            try:
                func(remote, **options)
            except RemoteError as exc:
                raise click.ClickException(str(exc)) from None
            finally:
                remote.close()
        return command
    return decorate


def register(main: click.Group) -> None:
    """Add the user commands to the `helix` group."""
    for name, command in list(_commands.commands.items()):
        main.add_command(command, name)


@click.group()
def _commands() -> None:
    """Holder of the user commands until register() adds them to `helix`."""


# Following a reply.


def reply_of(session: dict[str, Any]) -> dict[str, Any]:
    """The session's last reply interaction."""
    return [i for i in session["interactions"] if i["creator"] == "assistant"][-1]


def follow(remote: Remote, session_id: int, interaction_id: int, after: str | None,
           on_event: Callable[[Event], None]) -> dict[str, Any]:
    """Hand each event of one reply to `on_event` until the reply ends; the state event that ended it."""
    for event in remote.events(session_id, after):
        if event.data.get("interaction_id") != interaction_id:
            continue
        on_event(event)
        if event.event == "state" and event.data.get("state") in ENDS:
            return event.data
    raise click.ClickException(f"the event stream of session {session_id} ended before the reply did")


def _failed(end: dict[str, Any], what: str) -> None:
    if end.get("state") == "cancelled":
        raise click.ClickException(f"{what} was cancelled")
    if end.get("state") != "complete":
        raise click.ClickException(f"{what} failed: {' '.join(str(end.get('error', 'unknown error')).split())[:500]}")


# helix chat


def waiting_line(reply: dict[str, Any]) -> str | None:
    """A queued reply's outlook in words ("queued, 2 in line, starts in about 40 s"); None once it is not waiting.

    `reply` is a reply interaction of the session JSON or an `estimate` event: the same fields.
    """
    phase = reply.get("phase")
    if phase == "no_runner":
        return f"queued: {reply.get('phase_detail') or 'no runner serves this model'}"
    if phase != "queued":
        return None
    parts = ["queued"]
    if reply.get("queue_position"):
        parts.append(f"{reply['queue_position']} in line")
    wait = reply.get("estimated_wait_seconds")
    if isinstance(wait, int | float):
        parts.append(f"starts in about {_about(wait)}")
    return ", ".join(parts)


def _about(seconds: float) -> str:
    """A wait in words, as the web app writes it: "40 s", "3 min", "1.5 h"."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds / 3600, 1)} h"


@contextlib.contextmanager
def _typing_held() -> Iterator[None]:
    """While a reply streams: what is typed is not echoed into it, and is dropped when the reply ends.

    A terminal echoes keys as they are pressed, so a line typed ahead would land in the middle of the
    streamed text; and read at the next prompt, it would be sent unseen. Ctrl-C still interrupts (only
    ECHO is turned off). Not a terminal (a pipe, a file): nothing to hold.
    """
    try:
        import termios
    except ImportError:  # Windows
        yield
        return
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError):  # stdin is no terminal
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflags
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)  # TCSAFLUSH: what was typed meanwhile is discarded


def _stream_reply(remote: Remote, session: dict[str, Any]) -> None:
    """Print a reply's tokens as they come; Ctrl-C cancels the reply and comes back to the prompt.

    A reply asked for as JSON is held and printed indented once complete; tool calls, which never
    stream, are printed from the finished session.
    """
    reply, shown = reply_of(session), {"any": False, "waiting": None}
    params = reply.get("params") or {}
    as_json, with_tools = shapes.asks_for_json(params), bool(params.get("tools"))
    held: list[str] = []

    def waiting(line: str | None) -> None:
        # On stderr, and only when it changes: stdout stays the reply's text.
        if line and line != shown["waiting"]:
            click.echo(f"[{line}]", err=True)
        shown["waiting"] = line


    def show(event: Event) -> None:
        if event.event == "estimate":
            waiting(waiting_line(event.data))
        elif event.event == "token" and as_json:
            held.append(event.data.get("text", ""))
        elif event.event == "token":
            click.echo(event.data.get("text", ""), nl=False)
            shown["any"] = True
        elif event.event == "state" and event.data.get("state") == "queued" and (shown["any"] or held):
            click.echo(("\n" if shown["any"] else "") + "[the runner was lost; the reply starts again]")
            shown["any"] = False
            held.clear()

    try:
        with _typing_held():
            end = follow(remote, session["id"], reply["id"], str(session["last_event_seq"]), show)
    except KeyboardInterrupt:
        remote.call("POST", f"/api/v1/sessions/{session['id']}/cancel")
        click.echo("".join(held) + "\n[cancelled]")
        return
    if end["state"] != "complete":
        click.echo("".join(held))
        click.echo(f"[{end['state']}: {end.get('error') or 'no answer'}]", err=True)
        return
    if not (as_json or with_tools):
        click.echo()
        return
    finished = next(i for i in remote.call("GET", f"/api/v1/sessions/{session['id']}")["interactions"]
                    if i["id"] == reply["id"])
    if as_json:
        click.echo(shapes.pretty_json(finished["output"]))
    elif shown["any"] or not finished.get("tool_calls"):
        click.echo()
    _print_tool_calls(finished)


def _print_tool_calls(reply: dict[str, Any], indent: str = "") -> None:
    for call in reply.get("tool_calls") or []:
        for line in shapes.tool_call_lines(call):
            click.echo(indent + line)


_JSON_FILE = click.Path(dir_okay=False, path_type=Path)


@remote_command(_commands, "chat")
@click.argument("model")
@click.option("--session", "session_id", type=int, help="Continue this session.")
@click.option("--max-new-tokens", type=int, help="Longest reply, in tokens.")
@click.option("--temperature", type=float, help="0 for greedy.")
@click.option("--json", "as_json", is_flag=True, help="Replies are JSON objects (response_format json_object).")
@click.option("--json-schema", "schema", type=_JSON_FILE, metavar="FILE",
              help="Replies follow the JSON Schema in FILE (response_format json_schema, named after the file).")
@click.option("--tools", type=_JSON_FILE, metavar="FILE",
              help="The model may call the tools in FILE: a JSON list of OpenAI tool definitions.")
@click.option("--tool-choice", "choice", metavar="none|auto|required|NAME",
              help="Whether the model must call a tool, or which one (default auto).")
def chat(remote: Remote, model: str, session_id: int | None, max_new_tokens: int | None,
         temperature: float | None, as_json: bool, schema: Path | None, tools: Path | None,
         choice: str | None) -> None:
    """Chat with MODEL: type a message, read the reply as it streams; Ctrl-D ends, Ctrl-C stops a reply."""
    params = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature)) if v is not None}
    params.update(shapes.reply_params(as_json=as_json, schema=schema, tools=tools, choice=choice))
    if session_id is not None:
        session = remote.call("GET", f"/api/v1/sessions/{session_id}")
        click.echo(f"session {session_id} ({session['model_name']}), {len(session['interactions'])} turns so far")
        last = session["interactions"][-1] if session["interactions"] else None
        if last is not None and last["creator"] == "assistant":
            if last["state"] in ("queued", "running"):
                _stream_reply(remote, {**session, "last_event_seq": 0})
            else:
                asked_json = shapes.asks_for_json(last.get("params"))
                click.echo(shapes.pretty_json(last["output"]) if asked_json else last["output"])
                _print_tool_calls(last)
    click.echo("(Ctrl-D to end)")
    while True:
        try:
            message = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            break
        if not message.strip():
            continue
        body: dict[str, Any] = {"message": message}
        if params:
            body["params"] = params
        if session_id is None:
            session = remote.call("POST", "/api/v1/sessions",
                                  json={"mode": "create", "type": "text", "model_name": model, **body})
            session_id = session["id"]
        else:
            session = remote.call("POST", f"/api/v1/sessions/{session_id}/messages", json=body)
        _stream_reply(remote, session)
    if session_id is not None:
        click.echo(f"session {session_id}: continue with `helix chat {model} --session {session_id}`")


# helix image


def _progress_bar(label: str) -> tuple[Callable[[Event], None], Callable[[], None]]:
    """An on_event that moves a tqdm bar by progress events (showing the loss when there is one), and its closer."""
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0)

    def on_event(event: Event) -> None:
        data = event.data
        if event.event == "progress" and isinstance(data.get("step"), int):
            if isinstance(data.get("total"), int) and bar.total != data["total"]:
                bar.total = data["total"]
            if isinstance(data.get("loss"), int | float):
                bar.set_postfix(loss=f"{data['loss']:.4f}", refresh=False)
            bar.update(data["step"] - bar.n)
        elif event.event == "state" and data.get("state") == "queued" and bar.n:
            bar.write("the runner was lost; starting again")
            bar.reset()
        elif event.event == "log":
            bar.write(str(data.get("message", "")))

    return on_event, bar.close


@remote_command(_commands, "image")
@click.argument("model")
@click.argument("prompt")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("image.png"),
              show_default=True, help="Where to write the image (several: out-1.png, out-2.png...).")
@click.option("-n", "count", type=int, default=1, show_default=True, help="How many images.")
@click.option("--steps", type=int, help="Denoising steps.")
@click.option("--size", help="WIDTHxHEIGHT, e.g. 1024x1024.")
@click.option("--seed", type=int)
def image(remote: Remote, model: str, prompt: str, output: Path, count: int, steps: int | None,
          size: str | None, seed: int | None) -> None:
    """Make an image of PROMPT with MODEL and write it to a file."""
    params: dict[str, Any] = {"num_images": count}
    if steps is not None:
        params["num_inference_steps"] = steps
    if seed is not None:
        params["seed"] = seed
    if size:
        width, _, height = size.lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise click.BadParameter("must be WIDTHxHEIGHT, e.g. 1024x1024", param_hint="--size")
        params.update(width=int(width), height=int(height))
    session = remote.call("POST", "/api/v1/sessions", json={"mode": "create", "type": "image", "model_name": model,
                                                            "message": prompt, "params": params})
    on_event, close = _progress_bar("denoising")
    try:
        end = follow(remote, session["id"], reply_of(session)["id"], str(session["last_event_seq"]), on_event)
    finally:
        close()
    _failed(end, f"image session {session['id']}")
    files = [f for f in reply_of(remote.call("GET", f"/api/v1/sessions/{session['id']}"))["files"]
             if f["kind"] == "output"]
    if not files:
        raise click.ClickException(f"image session {session['id']} completed without an image")
    for index, ref in enumerate(files, start=1):
        dest = output if len(files) == 1 else output.with_name(f"{output.stem}-{index}{output.suffix}")
        remote.download(f"/api/v1/sessions/{session['id']}/files/{ref['id']}", dest)
        click.echo(f"wrote {dest}")


# helix finetune


def _training_files(data: Path) -> tuple[str, list[Path]]:
    """The session type and files a fine-tune of `data` uploads: a .jsonl of chats, or a folder of images."""
    if data.is_file():
        if data.suffix.lower() != ".jsonl":
            raise click.BadParameter("a text fine-tune takes a .jsonl file of chats", param_hint="DATA")
        return "text", [data]
    files = sorted(p for p in data.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        raise click.BadParameter(f"{data} holds no images (png, jpeg, webp)", param_hint="DATA")
    return "image", files


@remote_command(_commands, "finetune")
@click.argument("model")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--steps", type=int, help="Training steps (max_steps).")
@click.option("--params", "extra", help='More training params as JSON, e.g. \'{"learning_rate": 0.0002}\'.')
@click.option("--name", help="The session's name.")
@click.option("--follow/--no-follow", "following", default=False, help="Show training progress until it ends.")
def finetune(remote: Remote, model: str, data: Path, steps: int | None, extra: str | None, name: str | None,
             following: bool) -> None:
    """Fine-tune MODEL on DATA: a .jsonl file of chats, or a folder of images with captions."""
    type_, paths = _training_files(data)
    try:
        params = json.loads(extra) if extra else {}
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from None
    if steps is not None:
        params["max_steps"] = steps
    form = {"mode": "finetune", "type": type_, "model_name": model, "params": json.dumps(params)}
    if name:
        form["name"] = name
    handles = [path.open("rb") for path in paths]
    try:
        session = remote.call("POST", "/api/v1/sessions", data=form,
                              files=[("files", (p.name, h)) for p, h in zip(paths, handles, strict=True)])
    finally:
        for handle in handles:
            handle.close()
    click.echo(f"fine-tune session {session['id']} queued ({len(paths)} file(s))")
    if not following:
        click.echo(f"follow it with `helix sessions show {session['id']}`")
        return
    on_event, close = _progress_bar("training")
    try:
        end = follow(remote, session["id"], reply_of(session)["id"], str(session["last_event_seq"]), on_event)
    finally:
        close()
    _failed(end, f"fine-tune session {session['id']}")
    click.echo(f"fine-tune complete. Use it: helix {'chat' if type_ == 'text' else 'sessions show'} "
               f"{model + ' --session ' if type_ == 'text' else ''}{session['id']}")
    click.echo(f"or, through the OpenAI API, model \"ft:{model}:{session['id']}\"")


# helix sessions


@_commands.group("sessions")
def sessions() -> None:
    """Your sessions: list them, show one, cancel its reply."""


@remote_command(sessions, "list")
@click.option("--limit", type=int, default=20, show_default=True)
def sessions_list(remote: Remote, limit: int) -> None:
    """Your newest sessions, one line each."""
    page = remote.call("GET", "/api/v1/sessions", params={"limit": limit})
    click.echo(f"{'id':>6}  {'mode':<8} {'type':<5} {'state':<10} {'model':<40} name")
    for s in page["sessions"]:
        click.echo(f"{s['id']:>6}  {s['mode']:<8} {s['type']:<5} {s.get('state') or '-':<10} "
                   f"{s['model_name'][:40]:<40} {s.get('name') or ''}")
    if not page["sessions"]:
        click.echo("(no sessions)", err=True)


@remote_command(sessions, "show")
@click.argument("session_id", type=int)
def sessions_show(remote: Remote, session_id: int) -> None:
    """A session's turns, its replies' states, errors, tool calls and files."""
    s = remote.call("GET", f"/api/v1/sessions/{session_id}")
    click.echo(f"session {s['id']}: {s['mode']} {s['type']} on {s['model_name']}, {s.get('state')}")
    for turn in s["interactions"]:
        if turn["creator"] == "user":
            click.echo(f"you: {turn['message']}")
            continue
        click.echo(f"{s['model_name'].rsplit('/', 1)[-1]} [{turn.get('phase') or turn['state']}]: {turn['output']}")
        if turn.get("error"):
            click.echo(f"  error: {' '.join(turn['error'].split())[:300]}")
        _print_tool_calls(turn, indent="  ")
        for ref in turn.get("files") or []:
            click.echo(f"  file {ref['id']}: {ref['name']} ({ref['kind']}, {ref['size']} bytes)")


@remote_command(sessions, "cancel")
@click.argument("session_id", type=int)
def sessions_cancel(remote: Remote, session_id: int) -> None:
    """Cancel the session's queued or running reply."""
    remote.call("POST", f"/api/v1/sessions/{session_id}/cancel")
    click.echo(f"cancelled the reply of session {session_id}")


# helix usage

# (key, title, format): one precision per column, so that figures line up and compare at a glance.
_COLUMNS = (("tasks", "tasks", ",.0f"), ("prompt_tokens", "prompt tok", ",.0f"),
            ("completion_tokens", "output tok", ",.0f"), ("images", "images", ",.0f"),
            ("runner_seconds", "runner s", ",.1f"), ("unbilled_runner_seconds", "unbilled s", ",.1f"))


def _figure(value: Any, spec: str) -> str:
    """A usage figure in its column's format; a missing one as a dash."""
    return "-" if value is None else format(float(value), spec)


@remote_command(_commands, "usage")
@click.option("--user", help="Whose usage (admins only).")
@click.option("--from", "start", metavar="WHEN", help="From this date or time (UTC), e.g. 2026-12-01.")
@click.option("--to", "end", metavar="WHEN", help="Up to this date or time (exclusive).")
@click.option("--by", "group_by", type=click.Choice(["model", "day"]), default="model", show_default=True)
def usage(remote: Remote, user: str | None, start: str | None, end: str | None, group_by: str) -> None:
    """What you (or --user) used: tasks, tokens, images and runner time, per model or per day."""
    query = {k: v for k, v in (("user", user), ("from", start), ("to", end), ("group_by", group_by)) if v}
    found = remote.call("GET", "/api/v1/usage", params=query)
    width = max([len(str(g[group_by])) for g in found["groups"]] + [len(group_by), 5])
    click.echo(f"usage of {found['user']}" + (f" from {found['from']}" if found["from"] else "")
               + (f" to {found['to']}" if found["to"] else ""))
    click.echo(f"{group_by:<{width}}  " + "  ".join(f"{title:>10}" for _, title, _ in _COLUMNS))
    for row in [*found["groups"], {group_by: "total", **found["total"]}]:
        click.echo(f"{str(row[group_by]):<{width}}  "
                   + "  ".join(f"{_figure(row.get(key), spec):>10}" for key, _, spec in _COLUMNS))
