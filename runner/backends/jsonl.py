"""Training data as JSONL files: every line parsed, every bad line named, before any training starts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

BAD_LINES_SHOWN = 5


def read(files: list[tuple[str, Path]], parse: Callable[[Any], Any], *, error: type[Exception],
         what: str) -> list[Any]:
    """`parse` of each non-blank line of the files; `error("bad <what>: ...")` naming the bad lines, or if none."""
    items: list[Any] = []
    problems: list[str] = []
    for name, path in files:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    items.append(parse(json.loads(line)))
                except (ValueError, TypeError) as exc:
                    problems.append(f"{name} line {number}: {exc}")
    if problems:
        shown = "; ".join(problems[:BAD_LINES_SHOWN])
        more = f" (and {len(problems) - BAD_LINES_SHOWN} more)" if len(problems) > BAD_LINES_SHOWN else ""
        raise error(f"bad {what}: {shown}{more}")
    if not items:
        raise error(f"bad {what}: none in the training data")
    return items
