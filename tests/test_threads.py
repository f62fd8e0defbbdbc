"""_threads.Handoff: a producer blocked on a full queue gives up once stopped; a consumer notices a dead producer."""

from __future__ import annotations

import threading

from scalex_scale._threads import Failure, Handoff


def test_blocked_put_gives_up_when_stopped():
    h = Handoff(1)
    assert h.put("a")
    results = []
    t = threading.Thread(target=lambda: results.append(h.put("b")))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # waiting for room
    h.stop()
    t.join(2)
    assert not t.is_alive() and results == [False] and h.stopped
    h.drain()
    assert h.empty()


def test_get_reports_a_producer_that_died_silently():
    h = Handoff(2)
    producer = threading.Thread(target=lambda: h.put("last"))
    producer.start()
    producer.join()
    assert h.get(producer, "the feeder") == "last"  # what it left comes first
    got = h.get(producer, "the feeder")
    assert isinstance(got, Failure) and "the feeder stopped without a result" in str(got.exc)
