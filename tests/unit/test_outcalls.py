"""The webhook allow-list (``[webhooks] allow``), Retry-After and backoff rules."""

from __future__ import annotations

import datetime as dt
import random
import socket
from pathlib import Path

import pytest

from segflowd.configchannels import WebhookHeaders, WebhooksConfig
from segflowd.delivery.outcalls import (
    backoff,
    literal_refusal,
    parse_retry_after,
    refusal,
    secret_headers,
)

pytestmark = pytest.mark.anyio


def cfg(*allow: str, **kw: object) -> WebhooksConfig:
    return WebhooksConfig(allow=allow, **kw)  # type: ignore[arg-type]


def test_a_url_matching_an_allow_pattern_is_allowed() -> None:
    assert literal_refusal("https://hooks.slack.com/services/T1/B2",
                           cfg("https://hooks.slack.com/*")) is None


def test_an_unlisted_url_is_refused_and_the_reason_names_the_list() -> None:
    why = literal_refusal("https://evil.example/x", cfg("https://hooks.slack.com/*"))
    assert why is not None
    assert "not in [webhooks] allow" in why
    assert "hooks.slack.com" in why


def test_nothing_is_allowed_without_an_allow_list() -> None:
    why = literal_refusal("https://hooks.slack.com/x", cfg())
    assert why is not None
    assert "nothing is listed" in why


@pytest.mark.parametrize("url", ["ftp://files.example/x", "file:///etc/passwd",
                                 "javascript:alert(1)", "https://", "not a url"])
def test_only_http_and_https_urls_with_a_host_can_be_called(url: str) -> None:
    assert literal_refusal(url, cfg("*")) is not None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/x", "http://10.1.2.3/x",
    "http://192.168.0.1/x", "http://172.16.5.5/x", "http://169.254.169.254/latest/meta-data",
    "http://[::1]/x", "http://[fe80::1]/x", "http://0.0.0.0/x", "http://224.0.0.1/x",
    "http://[::ffff:127.0.0.1]/x", "http://100.64.0.1/x", "http://api.localhost/x"])
def test_internal_addresses_are_refused_by_a_wildcard_pattern(url: str) -> None:
    why = literal_refusal(url, cfg("http://*", "https://*"))
    assert why is not None
    assert "explicitly" in why


def test_an_internal_host_named_explicitly_is_allowed() -> None:
    assert literal_refusal("http://127.0.0.1:8080/hook",
                           cfg("http://127.0.0.1:8080/*")) is None
    assert literal_refusal("http://[::1]:9000/x", cfg("http://[::1]:9000/*")) is None
    assert literal_refusal("http://localhost/x", cfg("http://localhost/*")) is None


def test_a_wildcard_in_the_host_part_is_not_explicit() -> None:
    assert literal_refusal("http://127.0.0.1:8080/hook", cfg("http://127.0.0.*:8080/*")) \
        is not None


def test_a_public_address_passes_a_wildcard_pattern() -> None:
    assert literal_refusal("http://93.184.216.34/x", cfg("http://*")) is None


def _loopback_name() -> str:
    """A host name other than ``localhost`` that /etc/hosts maps to a loopback address."""
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) > 1 and fields[0].startswith("127."):
            for name in fields[1:]:
                if "localhost" not in name:
                    return name
    pytest.skip("no name other than localhost maps to 127.x in /etc/hosts")


async def test_a_name_resolving_to_loopback_is_refused_at_send_time() -> None:
    """The literal check cannot know where a name points; the send-time check resolves it."""
    name = _loopback_name()
    url = f"http://{name}:8080/x"
    assert literal_refusal(url, cfg("http://*")) is None
    why = await refusal(url, cfg("http://*"))
    assert why is not None
    assert "resolves to 127." in why
    assert await refusal(url, cfg(f"http://{name}:8080/*")) is None  # named explicitly


async def test_a_name_that_does_not_resolve_raises_for_a_retry() -> None:
    with pytest.raises(socket.gaierror):
        await refusal("http://no-such-host.invalid/x", cfg("http://*"))


async def test_an_explicitly_named_host_is_not_resolved() -> None:
    assert await refusal("http://127.0.0.1:1/x", cfg("http://127.0.0.1:1/*")) is None


def test_secret_headers_go_only_to_matching_urls() -> None:
    c = cfg("https://*", headers=(
        WebhookHeaders("https://api.example.com/*", (("Authorization", "Bearer s3cret"),)),))
    assert secret_headers("https://api.example.com/v1/x", c) == {
        "Authorization": "Bearer s3cret"}
    assert secret_headers("https://hooks.slack.com/x", c) == {}
    assert "s3cret" not in repr(c)


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_backoff_grows_with_jitter_and_honours_retry_after_up_to_retry_max() -> None:
    c = cfg(retry_base=2.0, retry_max=60.0)
    rng = random.Random(1)
    first = [backoff(1, None, c, rng) for _ in range(50)]
    third = [backoff(3, None, c, rng) for _ in range(50)]
    assert all(1.0 <= d <= 2.0 for d in first)
    assert all(4.0 <= d <= 8.0 for d in third)
    assert len(set(first)) > 1  # jitter
    assert backoff(20, None, c, rng) <= 60.0
    assert backoff(1, 30.0, c, rng) == 30.0
    assert backoff(1, 3600.0, c, rng) == 60.0
