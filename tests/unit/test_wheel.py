"""The hierarchical timer wheel: add, cancel, advancing across levels, ordering."""

from __future__ import annotations

import heapq
import random

from segflowd.flows.wheel import RESOLUTION, TimerWheel


def test_a_timer_fires_once_at_its_deadline_and_never_before() -> None:
    w = TimerWheel(now=1000.0)
    w.add("a", 1005.0)
    assert w.advance(1004.9) == []
    assert w.advance(1005.0) == [("a", 1005.0)]
    assert w.advance(1100.0) == []
    assert len(w) == 0


def test_cancel_removes_the_timer_and_reports_whether_it_had_one() -> None:
    w = TimerWheel(now=0.0)
    w.add(1, 10.0)
    w.add(2, 20.0)
    assert w.cancel(1) is True
    assert w.cancel(1) is False
    assert [k for k, _ in w.advance(30.0)] == [2]


def test_adding_a_key_again_replaces_its_timer() -> None:
    w = TimerWheel(now=0.0)
    w.add("x", 10.0)
    w.add("x", 50.0)
    assert w.advance(20.0) == []
    assert w.advance(50.0) == [("x", 50.0)]


def test_timers_on_every_level_cascade_down_and_fire_in_order() -> None:
    w = TimerWheel(now=0.0)
    deadlines = {"l0": 3.0, "l1": 600.0, "l2": 3 * 86400.0, "l3": 400 * 86400.0}
    for k, d in deadlines.items():
        w.add(k, d)
    assert w.counts() == (1, 1, 1, 1)
    fired = w.advance(500 * 86400.0)
    assert fired == sorted(deadlines.items(), key=lambda kv: kv[1])


def test_advancing_a_month_in_one_call_is_cheap_and_exact() -> None:
    w = TimerWheel(now=0.0)
    rng = random.Random(7)
    expected = sorted((rng.uniform(0, 30 * 86400.0), i) for i in range(2000))
    for d, i in expected:
        w.add(i, d)
    got: list[int] = []
    now = 0.0
    while now < 30 * 86400.0:  # in irregular strides, like a sleeping ticker would
        now += rng.uniform(1, 40000)
        for key, deadline in w.advance(now):
            assert deadline <= now + RESOLUTION
            got.append(key)  # type: ignore[arg-type]
    assert got == [i for _, i in expected]


def test_overdue_timers_fire_on_the_next_advance_oldest_first() -> None:
    w = TimerWheel(now=100.0)
    w.add("late", 50.0)
    w.add("later", 20.0)
    assert [k for k, _ in w.advance(100.0)] == ["later", "late"]


def test_next_due_is_a_lower_bound_of_the_earliest_deadline() -> None:
    w = TimerWheel(now=0.0)
    assert w.next_due() is None
    w.add("a", 7200.0)
    w.add("b", 12.3)
    nd = w.next_due()
    assert nd is not None
    assert nd <= 12.3
    w.cancel("b")
    nd = w.next_due()
    assert nd is not None
    assert nd <= 7200.0


def test_wheel_matches_a_heap_under_random_adds_and_cancels() -> None:
    rng = random.Random(1)
    w = TimerWheel(now=0.0)
    heap: list[tuple[float, int]] = []
    live: dict[int, float] = {}
    now = 0.0
    fired_w: list[int] = []
    fired_h: list[int] = []
    for i in range(5000):
        d = now + rng.choice([rng.uniform(0, 30), rng.uniform(0, 3000), rng.uniform(0, 9e5)])
        w.add(i, d)
        live[i] = d
        heapq.heappush(heap, (d, i))
        if rng.random() < 0.3 and live:
            k = rng.choice(list(live))
            w.cancel(k)
            del live[k]
        if i % 50 == 0:
            now += rng.uniform(0, 5000)
            fired_w.extend(k for k, _ in w.advance(now))  # type: ignore[misc]
            while heap and heap[0][0] <= now - RESOLUTION:
                d0, k0 = heapq.heappop(heap)
                if live.get(k0) == d0:
                    del live[k0]
                    fired_h.append(k0)
    # the wheel may fire up to one tick earlier than the heap's strict cut above
    assert set(fired_h) <= set(fired_w)
    assert len(fired_w) == len(set(fired_w))


def test_next_fire_is_the_tick_a_timer_fires_on_so_a_sleeper_never_wakes_to_nothing() -> None:
    w = TimerWheel(now=0.0)
    assert w.next_fire() is None
    w.add("a", 12.34)
    fire = w.next_fire()
    assert fire is not None
    assert 12.34 <= fire <= 12.34 + 0.1
    assert w.advance(12.36) == []  # after the deadline, before its tick: nothing yet
    assert w.next_fire() == fire  # so waking at 12.36 was early; next_fire says so
    assert [k for k, _ in w.advance(fire + 1e-6)] == ["a"]
