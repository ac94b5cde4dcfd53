"""Issue 12's benchmark targets, and the side-by-side table of measured figures against them.

Pure functions over a flat dict of figures (`"streaming.tokens_per_s": 2518.0`), so the table and its
verdicts are tested on made-up figures; `bench.all` fills the dict from the benchmarks it runs. A
key's first part names the phase that measures it; a figure its phase did not produce is shown as
"not run: <why>".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MEETS, MISSES = "meets", "MISSES"


@dataclass(frozen=True)
class Target:
    """One row of the issue's table: what is measured, the bound, and where the bound comes from.

    The bound is `bound` itself, or `ratio` times the figure `ref` (the peer's figure when `ref` is
    None), so "within 1.5x of the 1-runner figure" and ">= 0.7x Celery" are both one row. A target
    with `op` "is" holds when the figure is true.
    """

    figure: str
    helix: str
    op: str  # ">=", "<=" or "is"
    bound: float | None = None
    ratio: float | None = None
    ref: str | None = None
    peer: str | None = None
    unit: str = ""
    ref_name: str = "Celery"

    def target_text(self) -> str:
        """The target as the table prints it."""
        if self.op == "is":
            return "yes"
        if self.ratio is None:
            return f"{self.op} {_fmt(self.bound)}{_unit(self.unit)}"
        return f"{self.op} {self.ratio:g}x {self.ref_name}"

    def limit(self, figures: Mapping[str, Any]) -> float | None:
        """The bound this run's figures set, or None when the figure it is relative to is missing."""
        if self.ratio is None:
            return self.bound
        ref = figures.get(self.ref or self.peer or "")
        return None if ref is None else self.ratio * ref


TARGETS: tuple[Target, ...] = (
    Target("full cycles/s, SQLite, vs Celery + Redis", "dispatch.sqlite.cycles_per_s", ">=", ratio=1.0,
           peer="dispatch.celery.cycles_per_s", unit="/s"),
    Target("full cycles/s, PostgreSQL, vs Celery + Redis", "dispatch.postgres.cycles_per_s", ">=", ratio=0.7,
           peer="dispatch.celery.cycles_per_s", unit="/s"),
    Target("API CPU per full cycle, SQLite", "dispatch.sqlite.cpu_ms_per_cycle", "<=", 2.0,
           peer="dispatch.celery.cpu_ms_per_cycle", unit="ms"),
    Target("API CPU per full cycle, PostgreSQL", "dispatch.postgres.cpu_ms_per_cycle", "<=", 3.0,
           peer="dispatch.celery.cpu_ms_per_cycle", unit="ms"),
    Target("API CPU per cycle, seed protocol (claim, plain complete), SQLite", "cycle.sqlite.seed_ms", "<=", 2.0,
           unit="ms"),
    Target("API CPU per cycle, helix-runner (max=8, claim_next), SQLite", "cycle.sqlite.runner_ms", "<=", 2.0,
           unit="ms"),
    Target("API CPU per cycle, seed protocol, PostgreSQL", "cycle.postgres.seed_ms", "<=", 3.0, unit="ms"),
    Target("API CPU per cycle, helix-runner, PostgreSQL", "cycle.postgres.runner_ms", "<=", 3.0, unit="ms"),
    Target("long-poll dispatch p50, 100 runners waiting (SQLite)", "dispatch.sqlite.lp100_p50_ms", "<=",
           ratio=1.0, peer="dispatch.celery.p50_ms", unit="ms"),
    Target("long-poll dispatch p99, 100 runners waiting (SQLite)", "dispatch.sqlite.lp100_p99_ms", "<=", 10.0,
           peer="dispatch.celery.p99_ms", unit="ms"),
    Target("streaming 8x8, one API process: tokens/s stored and delivered", "streaming.tokens_per_s", ">=",
           20000.0, unit="/s"),
    Target("streaming 8x8: API CPU per 1,000 tokens", "streaming.cpu_ms_per_1k", "<=", 50.0, unit="ms"),
    Target("1,000 runners long-polling: idle API CPU", "fleet.idle_cpu_pct", "<=", 5.0, unit="%"),
    Target("1,000 runners long-polling: API RSS", "fleet.rss_mb", "<=", 300.0, unit="MB"),
    Target("1,000 runners long-polling: dispatch p50", "fleet.p50_ms", "<=", ratio=1.5, ref="fleet.p50_1_ms",
           unit="ms", ref_name="the 1-runner p50"),
    Target("3 replicas on one PostgreSQL: dispatch p50", "replicas.p50_ms", "<=", ratio=2.0,
           ref="replicas.single_p50_ms", unit="ms", ref_name="one replica's p50"),
    # Issue 23's scheduling rules (bench.scheduling), each against the same run with the rule off.
    Target("scheduling: adapter loads per 100 tasks, warm routing", "scheduling.warm_loads_per_100", "<=", ratio=0.2,
           ref="scheduling.cold_loads_per_100", ref_name="first-come"),
    Target("scheduling: a small user's p50 wait beside a big user's backlog", "scheduling.small_fair_p50_ms", "<=",
           ratio=2.0, ref="scheduling.small_alone_p50_ms", unit="ms", ref_name="no big user"),
    Target("scheduling: the same, fair share with a running limit of 6 of 8 runners", "scheduling.small_capped_p50_ms",
           "<=", ratio=2.0, ref="scheduling.small_alone_p50_ms", unit="ms", ref_name="no big user"),
    Target("scheduling: a fine-tune's wait with a reserved runner idle", "scheduling.finetune_wait_s", "<=", 1.0,
           unit="s"),
    Target("scheduling: the start estimate's median error", "scheduling.estimate_error_pct", "<=", 25.0, unit="%"),
    Target("scheduling: dispatch cycles/s, rules on", "scheduling.cycles_on_per_s", ">=", ratio=0.9,
           ref="scheduling.cycles_off_per_s", unit="/s", ref_name="rules off"),
    # Issue 25's constrained decoding (bench.structured), SmolLM2-135M on CPU, 8 slots batched.
    Target("structured: tokens/s, every slot constrained by a 10-field schema", "structured.constrained_tokens_per_s",
           ">=", ratio=0.8, ref="structured.free_tokens_per_s", unit="/s", ref_name="unconstrained"),
    Target("structured: free rows' tokens/s beside constrained rows", "structured.neighbours_mixed_tokens_per_s",
           ">=", ratio=0.95, ref="structured.neighbours_free_tokens_per_s", unit="/s", ref_name="beside free rows"),
    Target("structured: constrained replies that parse and validate", "structured.constrained_valid_pct", ">=",
           100.0, unit="%"),
    Target("3 replicas: tokens reach a follower on another replica", "replicas.tokens_cross", "is"),
    Target("API RSS, PostgreSQL default", "dispatch.postgres.rss_mb", "<=", 150.0,
           peer="dispatch.celery.rss_mb", unit="MB"),
)


def _unit(unit: str) -> str:
    return unit if unit in ("/s", "%") else f" {unit}" if unit else ""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def show(value: Any, unit: str = "") -> str:
    """A figure with its unit, or '-'."""
    return "-" if value is None else f"{_fmt(value)}{_unit(unit)}"


def reason(key: str, reasons: Mapping[str, str], default: str) -> str:
    """Why `key` has no figure: the reason filed under its longest prefix ("dispatch.sqlite", "dispatch")."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in reasons:
            return reasons[".".join(parts[:n])]
    return default


def verdict(target: Target, figures: Mapping[str, Any], reasons: Mapping[str, str]) -> str:
    """'meets', 'MISSES' (with the ratio where the bound is relative) or 'not run: <why>'."""
    value = figures.get(target.helix)
    if value is None:
        return f"not run: {reason(target.helix, reasons, 'no figure')}"
    if target.op == "is":
        return MEETS if value else MISSES
    limit = target.limit(figures)
    if limit is None:
        missing = target.ref or target.peer or ""
        return f"not judged: no {target.ref_name} figure ({reason(missing, reasons, 'not measured')})"
    ok = value >= limit if target.op == ">=" else value <= limit
    word = MEETS if ok else MISSES
    if target.ratio is not None and limit:
        return f"{word} ({value / (limit / target.ratio):.2f}x)"
    return word


def rows(figures: Mapping[str, Any], reasons: Mapping[str, str]) -> list[list[str]]:
    """The table: a header, then one row per target."""
    out = [["figure", "target", "Helix", "peer (Celery + Redis)", "verdict"]]
    for t in TARGETS:
        out.append([t.figure, t.target_text(), show(figures.get(t.helix), t.unit),
                    show(figures.get(t.peer), t.unit) if t.peer else "", verdict(t, figures, reasons)])
    return out


def render(figures: Mapping[str, Any], reasons: Mapping[str, str]) -> str:
    """The targets table as printed: figure and verdict left-aligned, the numbers right-aligned."""
    return table(rows(figures, reasons), left=frozenset({0, 4}))


def table(cells: list[list[str]], left: frozenset[int] = frozenset({0})) -> str:
    """Columns padded to width, those in `left` left-aligned, the rest right-aligned; a rule under the header."""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(widths[i]) if i in left else cell.rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
