"""The hand-written hot-path answers of ingest are the JSON json_response would write."""

from __future__ import annotations

import json

import pytest

from segflowd.http import json_response
from segflowd.ingest.service import _SUCCESS, _event_reply


@pytest.mark.parametrize(("event_id", "duplicate"),
                         [(1, False), (2**63 - 1, True), (None, True), (0, False)])
def test_the_event_reply_is_what_json_response_writes(event_id: int | None,
                                                      duplicate: bool) -> None:
    reply = _event_reply(event_id, duplicate)
    expected = json_response({"id": event_id, "duplicate": duplicate}, 202)
    assert (reply.status, reply.body, reply.content_type) == \
        (expected.status, expected.body, expected.content_type)
    assert json.loads(reply.body) == {"id": event_id, "duplicate": duplicate}


def test_the_segment_success_body_is_what_json_response_writes() -> None:
    assert json_response({"success": True}).body == _SUCCESS
