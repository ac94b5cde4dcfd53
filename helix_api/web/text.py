"""How the pages show text: names that break at sensible points, Markdown, and a message's params.

Registered as template filters on the web blueprint (`breakable`, `markdown`, `changed_params`).
"""

from __future__ import annotations

import re
from typing import Any

from markdown_it import MarkdownIt
from markupsafe import Markup, escape

from helix_api.params import not_default
from helix_api.web import bp

# CommonMark with raw HTML off: a description's `<id>` is text to show, never a tag.
_MARKDOWN = MarkdownIt("commonmark", {"html": False})
# Where a model name or path may break: after a slash, before a dash, underscore or colon (not a dot,
# which would split a version: Mistral-7B-Instruct-v0<wbr>.1).
_BREAKS = re.compile(r"(?<=/)|(?=[-_:])")


@bp.app_template_filter("breakable")
def breakable(name: Any) -> Markup:
    """`name` escaped, with <wbr> where a long name may wrap (mistralai/<wbr>Mistral<wbr>-7B...)."""
    if not name:
        return Markup("")
    parts = _BREAKS.split(str(name))
    return Markup("<wbr>").join(escape(part) for part in parts if part)


@bp.app_template_filter("markdown")
def markdown(text: str | None, inline: bool = False) -> Markup:
    """Markdown as HTML: `inline` for a one-line summary (no <p> around it)."""
    if not text:
        return Markup("")
    rendered = _MARKDOWN.renderInline(text) if inline else _MARKDOWN.render(text)
    return Markup(rendered.strip())  # markdown-it escapes the text itself: html is off


@bp.app_template_filter("changed_params")
def changed_params(params: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    """The params of a message of a `type_` session that differ from what a runner uses without them."""
    return not_default(params or {}, type_)


@bp.app_template_filter("gib")
def gib(size: Any) -> str:
    """A byte count as GiB with one decimal (`79.6 GiB`); empty for none."""
    if not isinstance(size, int | float) or isinstance(size, bool):
        return ""
    return f"{size / 1024**3:.1f} GiB"
