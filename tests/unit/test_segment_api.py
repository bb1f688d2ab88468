"""Segment payloads into committer writes."""

from __future__ import annotations

import pytest

from segflowd.http import HTTPError
from segflowd.ingest.segment_api import parse_batch, parse_message
from segflowd.ingest.writes import EventWrite, LinkWrite, UserWrite

LIMIT = 32 * 1024


def test_identify_with_anonymous_id_merges_traits_and_links() -> None:
    writes = parse_message({"userId": "u1", "anonymousId": "a1", "traits": {"plan": None},
                            "context": None, "timestamp": None}, "identify", field="body",
                           max_event=LIMIT)
    assert writes == [UserWrite("u1", {"plan": None}), LinkWrite("a1", "u1")]


def test_track_keeps_properties_context_and_a_namespaced_message_id() -> None:
    (w,) = parse_message({"userId": "u1", "event": "Signed Up", "properties": {"a": 1},
                          "context": {"ip": "1.2.3.4"}, "messageId": "m1"}, "track",
                         field="body", max_event=LIMIT)
    assert isinstance(w, EventWrite)
    assert w.attributes == {"a": 1, "$context": {"ip": "1.2.3.4"}}
    assert w.dedupe_key is not None
    assert w.dedupe_key.startswith("s:")


def test_batch_context_is_under_the_item_context() -> None:
    writes = parse_batch({"batch": [{"type": "track", "userId": "u", "event": "e",
                                     "context": {"a": "item"}}],
                          "context": {"a": "batch", "b": "batch"}}, max_event=LIMIT)
    (w,) = writes
    assert isinstance(w, EventWrite)
    assert w.attributes["$context"] == {"a": "item", "b": "batch"}


@pytest.mark.parametrize(("body", "message"), [
    ({"batch": {}}, "batch: must be an array"),
    ({"batch": [5]}, "batch[0]: must be a JSON object"),
    ({"batch": [{"type": "alias", "userId": "u"}]}, "batch[0].previousId: is required"),
    ({"batch": [{"type": "group", "userId": "u"}]}, "batch[0].groupId: is required"),
    ({"batch": [{"type": "track", "userId": "u", "event": "e", "properties": 3}]},
     "batch[0].properties: must be a JSON object"),
])
def test_bad_batches_name_the_field(body: dict[str, object], message: str) -> None:
    with pytest.raises(HTTPError) as info:
        parse_batch(body, max_event=LIMIT)
    assert info.value.message.startswith(message)
