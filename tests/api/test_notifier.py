"""Wake-ups: a waiter never misses a notification that came between its check and its wait."""

from __future__ import annotations

import threading
import time

from helix_api.tasks.notifier import Notifier


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


def test_poke_wakes_one_waiter_without_news():
    notifier = Notifier()
    woken: list[bool] = []
    ready = threading.Barrier(3)

    def waiter() -> None:
        with notifier.watch("queue:a") as watch:
            ready.wait()
            started = time.monotonic()
            published = watch.wait(3.0)
            if time.monotonic() - started < 2.0:
                woken.append(published)

    threads = [threading.Thread(target=waiter) for _ in range(2)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.1)
    notifier.poke("queue:a")
    for t in threads:
        t.join()
    assert woken == [False]  # one waiter, early, told nothing was published


def test_the_ticker_wakes_one_waiter_of_each_queue_per_tick():
    notifier = Notifier()
    wakes: dict[str, int] = {"queue:a": 0, "queue:b": 0, "session:1": 0}
    pokes: dict[str, int] = {}
    lock, stop = threading.Lock(), threading.Event()
    ready = threading.Barrier(7)
    poke = notifier.poke

    def counted_poke(name: str) -> None:
        with lock:
            pokes[name] = pokes.get(name, 0) + 1
        poke(name)

    notifier.poke = counted_poke  # type: ignore[method-assign]

    def waiter(name: str) -> None:
        with notifier.watch(name) as watch:
            ready.wait()
            while not stop.is_set():
                watch.wait(30.0)
                with lock:
                    wakes[name] += not stop.is_set()

    threads = [threading.Thread(target=waiter, args=(name,)) for name in wakes for _ in range(2)]
    for t in threads:
        t.start()
    ready.wait()
    notifier.tick_every(0.05)
    while True:
        with lock:
            if min(wakes["queue:a"], wakes["queue:b"]) >= 4:
                seen, poked = dict(wakes), dict(pokes)
                break
        time.sleep(0.01)
    stop.set()
    notifier.stop()
    for name in wakes:
        notifier.notify(name)
    for t in threads:
        t.join()
    # Each tick woke one of the two waiters of each queue, never both, and no event stream's.
    assert seen["queue:a"] <= poked["queue:a"] and seen["queue:b"] <= poked["queue:b"]
    assert seen["session:1"] == 0 and "session:1" not in poked


def test_waiters_are_woken_first_come_first_served():
    notifier = Notifier()
    order: list[int] = []
    arrived = [threading.Event() for _ in range(3)]

    def waiter(n: int) -> None:
        with notifier.watch("queue:q") as watch:
            arrived[n].set()
            if watch.wait(10.0):
                order.append(n)

    threads = []
    for n in range(3):  # one after another, so their order of arrival is known
        threads.append(threading.Thread(target=waiter, args=(n,)))
        threads[-1].start()
        arrived[n].wait(5)
        time.sleep(0.05)
    for woken in range(1, 4):
        notifier.notify("queue:q", 1)
        deadline = time.monotonic() + 10
        while len(order) < woken and time.monotonic() < deadline:  # the one woken has said so
            time.sleep(0.01)
    for t in threads:
        t.join()
    assert order == [0, 1, 2]  # a queued task goes to the runner that has waited longest
