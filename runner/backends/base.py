"""The contract between the runner and a model: setup() once, predict() per task, train() per fine-tune."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from runner.errors import BadTaskInput

if TYPE_CHECKING:
    from runner.config import RunnerConfig
    from runner.messages import Task
    from runner.reporter import Report


class Backend(ABC):
    """A model behind a runner.

    The runner constructs every backend with its `RunnerConfig` (kept as `self.config`), calls
    `setup()` once before the first task, then, for each task it holds, `predict(task, report)` for a
    `create` task or `train(task, report)` for a `finetune` task. With `max_parallel` N > 1 (read after
    setup(), and capped by the runner's own `--max-parallel`), up to N of those calls run at once, each
    on its own slot thread; a backend that cannot share its model keeps the default of 1.

    Both return the result as a JSON object (`{"text": ...}` for text; `text` becomes the reply) and
    stream through `report`: `report.token(text)`, `report.progress(step, total, message=None, **extra)`,
    `report.log(message, level="info")`. Those calls raise `TaskCancelled` once the task must stop (the
    user cancelled it, the lease was lost, or the runner is shutting down); a long step that emits
    nothing should call `report.check()` now and then, so it stops promptly too.

    Input that can never succeed (a missing prompt, a param out of range, unreadable training data)
    raises `BadTaskInput`: the task fails at once, with no retry. Any other exception fails the attempt,
    the API retries it while attempts are left, and the runner goes on to the next task.
    """

    max_parallel: int = 1  # tasks this backend can hold at once
    # With `--max-parallel auto` (config.parallel_auto) a backend that can size its slots from the memory
    # left after setup() (runner.capacity) says so here and sets max_parallel in setup(); the runner
    # holds any other backend to one task, as it has no model config to size by (sdxl).
    sizes_slots: bool = False

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config

    def setup(self) -> None:  # noqa: B027 - a backend with nothing to load need not override it
        """Load weights once; the default loads nothing."""

    @abstractmethod
    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Run one inference task and return its result as a JSON object."""

    def train(self, task: Task, report: Report) -> dict[str, Any]:
        """Run one fine-tune and return its result (with the adapter's file id); the default cannot train."""
        raise BadTaskInput(f"the {type(self).__name__} backend does not fine-tune")
