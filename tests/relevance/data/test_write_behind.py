"""WriteBehind: calls run in order on one thread, bounded, and no error is lost."""

import threading

import pytest

from relevance.data.write_behind import WriteBehind


def test_write_behind_runs_calls_in_submission_order_on_one_thread():
    seen = []
    behind = WriteBehind(max_pending=3, name="writer")
    for i in range(40):
        behind.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    behind.drain()
    behind.close()
    assert [i for i, _ in seen] == list(range(40))
    assert {name.split("_")[0] for _, name in seen} == {"writer"}


def test_write_behind_submit_waits_when_max_pending_calls_are_queued():
    gate = threading.Event()
    behind = WriteBehind(max_pending=2)
    behind.submit(gate.wait)
    behind.submit(lambda: None)
    blocked = threading.Thread(target=behind.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # the third call waits for the first to finish
    gate.set()
    blocked.join(5)
    assert not blocked.is_alive()
    behind.drain()
    behind.close()


def test_write_behind_drain_raises_the_first_failure_after_every_call_ran():
    ran = []
    behind = WriteBehind()

    def fail(msg):
        ran.append(msg)
        raise RuntimeError(msg)

    behind.submit(fail, "first")
    behind.submit(fail, "second")
    behind.submit(ran.append, "third")
    with pytest.raises(RuntimeError, match="first"):
        behind.drain()
    assert ran == ["first", "second", "third"]
    behind.close()


def test_a_bound_below_one_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="max_pending must be >= 1, got 0"):
        WriteBehind(max_pending=0)
