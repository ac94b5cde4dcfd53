"""The slots' gate: predict() calls share it, a train() call waits for them and runs alone."""

from __future__ import annotations

import threading
import time

import pytest

from runner.gate import SlotGate

pytestmark = pytest.mark.timeout(10)


def test_a_fine_tune_waits_for_the_chats_in_hand_and_holds_back_new_ones():
    gate, order = SlotGate(), []
    chat_in = threading.Event()

    def chat(name: str, hold: float) -> None:
        with gate.shared():
            order.append(f"{name} in")
            chat_in.set()
            time.sleep(hold)
            order.append(f"{name} out")

    def train() -> None:
        with gate.alone():
            order.append("train in")
            time.sleep(0.1)
            order.append("train out")

    first = threading.Thread(target=chat, args=("chat1", 0.2))
    first.start()
    chat_in.wait(2)
    trainer = threading.Thread(target=train)
    trainer.start()
    time.sleep(0.05)
    assert gate.training  # waiting counts: the other slots claim nothing meanwhile
    late = threading.Thread(target=chat, args=("chat2", 0))
    late.start()
    for thread in (first, trainer, late):
        thread.join(5)
    assert order == ["chat1 in", "chat1 out", "train in", "train out", "chat2 in", "chat2 out"]
    assert not gate.training


def test_chats_share_the_gate():
    gate = SlotGate()
    both = threading.Barrier(2, timeout=2)

    def chat() -> None:
        with gate.shared():
            both.wait()  # would time out if the second chat had to wait for the first

    threads = [threading.Thread(target=chat) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert not both.broken
