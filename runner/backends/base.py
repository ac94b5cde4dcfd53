"""The contract between the runner and a model: load once in setup(), then predict() per task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.config import RunnerConfig
    from runner.messages import Task
    from runner.reporter import Report


class Backend(ABC):
    """A model behind a runner.

    `load_backend` constructs a backend with the runner's `RunnerConfig` when its constructor takes
    an argument (this base class keeps it as `self.config`), else with none. The runner calls
    `setup()` once, before the first task, then `predict(task, report)` for each task, one at a time
    on the main thread. `predict` returns the result as a JSON object (`{"text": ...}` for text;
    `text` becomes the reply) and streams through `report`: `report.token(text)`,
    `report.progress(step, total, message=None, **extra)`, `report.log(message, level="info")`.
    Those calls raise `TaskCancelled` once the task must stop (the user cancelled it, the lease was
    lost, or the runner is shutting down); a long step that emits nothing should call
    `report.check()` now and then, so it stops promptly too. Any other exception fails the task and
    the runner goes on to the next one.
    """

    def __init__(self, config: RunnerConfig | None = None) -> None:
        self.config = config

    def setup(self) -> None:  # noqa: B027 - a backend with nothing to load need not override it
        """Load weights once; the default loads nothing."""

    @abstractmethod
    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Run one task and return its result as a JSON object."""
