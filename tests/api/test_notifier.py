"""Wake-ups: a waiter never misses a notification that came between its check and its wait."""

from __future__ import annotations

import threading
import time

from helix_api.notifier import Notifier


def test_notify_before_wait_is_not_lost():
    notifier = Notifier()
    with notifier.watch("t") as watch:
        notifier.notify("t")
        started = time.monotonic()
        assert watch.wait(5) is True
        assert time.monotonic() - started < 1


def test_wait_times_out_without_notification():
    notifier = Notifier()
    with notifier.watch("t") as watch:
        assert watch.wait(0.05) is False


def test_notify_one_wakes_one_waiter_early():
    notifier = Notifier()
    woken = []
    ready = threading.Barrier(4)

    def waiter(n: int) -> None:
        with notifier.watch("q") as watch:
            ready.wait()
            started = time.monotonic()
            # The others see the new version too, but only when their own wait times out.
            if watch.wait(2.0) and time.monotonic() - started < 1.0:
                woken.append(n)

    threads = [threading.Thread(target=waiter, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.1)
    notifier.notify("q", 1)
    for t in threads:
        t.join()
    assert len(woken) == 1


def test_topics_without_watchers_are_forgotten():
    notifier = Notifier()
    with notifier.watch("session:1"):
        pass
    notifier.notify("session:1")
    assert notifier._topics == {}
