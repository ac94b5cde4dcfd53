"""The gate between a runner's slots: chats share the loaded model, a fine-tune runs alone.

A runner that polls for both the inference and the fine-tuning of its model (`--kind create:... --kind
finetune:...`) may hold several chats at once (`--max-parallel`), decoded together in one batch, but a
training run wants the accelerator to itself (it loads its own copy of the model). So predict() calls
take the gate shared and train() calls take it alone; a fine-tune waiting for the gate holds back new
chats (the writer goes first), and while one is waiting or running the other slots claim nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SlotGate:
    """A readers-writer lock that prefers the writer: shared for predict(), exclusive for train()."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sharing = 0  # predict() calls running
        self._alone = False  # a train() call running
        self._waiting_alone = 0  # train() calls waiting for the running predict() calls to end

    @property
    def training(self) -> bool:
        """Whether a fine-tune runs or waits to: the other slots should take no new work meanwhile."""
        with self._cond:
            return self._alone or self._waiting_alone > 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the gate beside other predict() calls, once no fine-tune runs or waits."""
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        """Hold the gate alone, once the running predict() calls (and any other fine-tune) have ended."""
        with self._cond:
            self._waiting_alone += 1
            try:
                self._cond.wait_for(lambda: not self._alone and not self._sharing)
            finally:
                self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()
