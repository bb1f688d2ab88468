"""``rt.webhook``: the command it builds, what a journaled answer or failure replays as."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from segflowd import WebhookFailed
from segflowd.app import Segflow
from segflowd.errors import FlowError
from segflowd.flows.journal import JournalRow, Replay
from segflowd.flows.runtime import Runtime, WebhookResponse

Gen = Generator[object, Any, None]
rt = Runtime(lambda name: True)


def test_webhook_builds_a_waiting_command_with_its_request() -> None:
    cmd = rt.webhook("https://x.example/h", method="put", json={"a": [1]},
                     headers={"X-A": "1"}, timeout=5)
    assert (cmd.kind, cmd.name) == ("webhook", "https://x.example/h")
    assert dict(cmd.args) == {"method": "PUT", "json": {"a": [1]}, "headers": {"X-A": "1"},
                              "timeout": 5.0}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"url": 5}, "url must be a string"),
    ({"method": "TRACE"}, "method must be one of"),
    ({"timeout": 0}, "timeout must be"),
    ({"timeout": 61}, "timeout must be"),
    ({"timeout": True}, "timeout must be"),
    ({"json": {"when": object()}}, "JSON-able"),
    ({"headers": {"X": 1}}, "headers must map strings"),
])
def test_webhook_refuses_bad_arguments_with_a_sentence(kwargs: dict[str, Any], match: str
                                                       ) -> None:
    args: dict[str, Any] = {"url": "https://x.example/h", **kwargs}
    with pytest.raises(FlowError, match=match):
        rt.webhook(**args)


def replayed(flow: Any, result: object) -> list[object]:
    """What ``flow`` saw, replayed from a journal whose webhook row holds ``result``."""
    app = Segflow()
    app.campaign("c", segments=["s"])(flow)
    cmd = rt.webhook("https://x.example/h")
    seen: list[object] = []
    journal = [JournalRow(0, "webhook", cmd.name, cmd.hash, result, {})]
    r = Replay(app.campaigns["c"], "u", journal, None)
    flow.seen = seen
    r.replay()
    stored = result if isinstance(result, dict) else {}
    r.resume(None if "error" in stored else WebhookResponse.from_json(stored.get("value")),
             stored.get("error"))
    return seen


def test_a_journaled_answer_resumes_the_flow_with_a_webhook_response() -> None:
    def flow(ctx: Any, rt: Any) -> Gen:
        r = yield rt.webhook("https://x.example/h")
        flow.seen.append(r)  # type: ignore[attr-defined]
        yield rt.exit()

    (r,) = replayed(flow, {"value": {"status": 202, "json": {"id": 1},
                                     "headers": {"x-a": "b"}, "truncated": False}})
    assert r == WebhookResponse(202, {"id": 1}, {"x-a": "b"}, False)


def test_a_journaled_failure_is_thrown_into_the_flow_as_webhook_failed() -> None:
    def flow(ctx: Any, rt: Any) -> Gen:
        try:
            yield rt.webhook("https://x.example/h")
        except WebhookFailed as exc:
            flow.seen.append(str(exc))  # type: ignore[attr-defined]
        yield rt.exit()

    assert replayed(flow, {"error": "failed after 5 attempts: HTTP 500"}) == [
        "failed after 5 attempts: HTTP 500"]


def test_webhook_failed_is_a_flow_error() -> None:
    assert issubclass(WebhookFailed, FlowError)
