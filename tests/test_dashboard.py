"""The Grafana dashboard names only metrics that the API or a runner exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from helix_api.ops import metrics as api_metrics
from runner import metrics as runner_metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "helix.json"
# Sample names a family adds to its own (histograms' buckets, counters' _total...).
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exported() -> set[str]:
    """Every sample name the API and runner can export: their registries, and the gauges read at scrape time."""
    names: set[str] = set()
    families = [*api_metrics.REGISTRY.collect(), *runner_metrics.REGISTRY.collect()]
    for family in families:
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES if family.type in ("counter", "histogram"))
    names.update({"helix_database_up", "helix_queue_depth", "helix_tasks_running", "helix_queue_oldest_wait_seconds",
                  "helix_runners_live", "helix_runners_wanted", "helix_runner_gpu_memory_used_bytes",
                  "helix_runner_gpu_memory_total_bytes"})
    return names


def test_every_metric_the_dashboard_names_exists():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    named = {name for panel in panels for target in panel["targets"]
             for name in re.findall(r"\bhelix_[a-z_]+", target["expr"])}
    assert {"helix_queue_depth", "helix_queue_wait_seconds_bucket", "helix_time_to_first_token_seconds_bucket",
            "helix_generated_tokens_total", "helix_tasks_finished_total"} <= named
    assert named - exported() == set()


def test_the_gauges_read_at_scrape_time_are_the_state_collectors(db):
    collected = {family.name for family in api_metrics.StateCollector(db).collect()}
    assert collected == {"helix_database_up", "helix_queue_depth", "helix_tasks_running",
                         "helix_queue_oldest_wait_seconds", "helix_runners_live", "helix_runners_wanted"}
