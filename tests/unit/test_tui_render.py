from __future__ import annotations

from segflow_tui.render import FeedFilter, feed_line, short_time, timeline
from segflow_tui.testing import USER

EVENT = {"seq": 1, "kind": "flow.step", "at": "2026-03-01T09:00:00Z", "user_id": "u1",
         "campaign": "welcome"}


def test_feed_filter_matches_campaign_user_kind_prefix_and_words() -> None:
    assert FeedFilter.parse("").matches(EVENT)
    assert FeedFilter.parse("campaign:welcome user:u1 kind:flow").matches(EVENT)
    assert FeedFilter.parse("kind:flow.step").matches(EVENT)
    assert not FeedFilter.parse("kind:fl").matches(EVENT)
    assert not FeedFilter.parse("user:u2").matches(EVENT)
    assert FeedFilter.parse("WELC").matches(EVENT)
    assert not FeedFilter.parse("welcome nothing").matches(EVENT)


def test_feed_line_shows_time_kind_and_fields() -> None:
    assert feed_line(EVENT).plain.split() == ["09:00:00", "flow.step", "user_id=u1",
                                              "campaign=welcome"]


def test_timeline_orders_a_users_journey_oldest_first() -> None:
    lines = timeline(USER).plain.splitlines()
    steps = [line[21:43].strip() for line in lines if line[:4] == "2026"]
    assert steps == ["segment entered", "event", "email sent", "segment entered",
                     "flow started", "send_email", "wait", "segment left", "email opened",
                     "email clicked"]
    assert short_time("2026-03-01T09:00:00.123456Z") == "2026-03-01 09:00:00"
