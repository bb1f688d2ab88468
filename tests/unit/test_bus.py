from __future__ import annotations

import pytest

from segflowd.bus import Bus

pytestmark = pytest.mark.anyio


async def test_subscriber_receives_events_published_after_it_subscribed() -> None:
    bus = Bus()
    bus.publish("ingest.event", user_id="before")
    sub = bus.subscribe()
    bus.publish("ingest.event", user_id="u1")
    event, missed = await sub.receive()
    assert (event.kind, event.data["user_id"], missed) == ("ingest.event", "u1", 0)


async def test_slow_subscriber_misses_events_and_is_told_how_many() -> None:
    bus = Bus()
    slow = bus.subscribe(buffer=3)
    fast = bus.subscribe(buffer=100)
    for i in range(10):
        bus.publish("flow.step", n=i)
    assert slow.pending() == 3
    assert fast.pending() == 10
    first, missed = await slow.receive()
    assert first.data["n"] == 0
    assert missed == 7
    assert bus.statistics().dropped == 7


async def test_kind_filter_matches_prefix_and_exact_kind() -> None:
    bus = Bus()
    sub = bus.subscribe(kinds=frozenset({"segment", "message.sent"}))
    bus.publish("segment.entered")
    bus.publish("flow.step")
    bus.publish("message.sent")
    bus.publish("message.failed")
    events, _ = sub.drain()
    assert [e.kind for e in events] == ["segment.entered", "message.sent"]


async def test_closed_subscription_stops_iteration() -> None:
    bus = Bus()
    sub = bus.subscribe()
    bus.publish("a")
    sub.close()
    seen = [e.kind async for e in sub]
    assert seen == ["a"]
    assert bus.statistics().subscribers == 0


async def test_publish_each_is_publish_for_every_item_at_one_time() -> None:
    bus = Bus()
    one = bus.publish("flow.step", n=-1)
    events = bus.subscribe(kinds=frozenset({"event.ingested"}))
    steps = bus.subscribe(kinds=frozenset({"flow"}), buffer=2)
    bus.publish_each("event.ingested", ({"n": i} for i in range(3)))
    got = events.drain()[0]
    assert [(e.kind, e.data["n"]) for e in got] == [("event.ingested", i) for i in range(3)]
    assert [e.seq for e in got] == [one.seq + 1, one.seq + 2, one.seq + 3]
    assert len({e.at for e in got}) == 1
    assert steps.pending() == 0  # the kind filter applies to each
    assert list(bus.recent)[-3:] == got
    assert bus.statistics().published == 4
