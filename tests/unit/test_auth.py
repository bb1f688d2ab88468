"""API key checks for the three styles, on fake requests."""

from __future__ import annotations

import base64

import pytest

from segflowd.config import HttpKey
from segflowd.http import HTTPError, Request
from segflowd.ingest.auth import Authenticator

AUTH = Authenticator([HttpKey("site-a", "secret-a"), HttpKey("site-b", "secret-b")])


def request(authorization: str | None = None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}

    async def receive() -> dict[str, object]:  # pragma: no cover - bodies are not read
        return {"type": "http.request", "body": b""}

    return Request(scope, receive, {})


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_native_bearer_names_the_matching_key() -> None:
    assert AUTH.native(request("Bearer secret-b")) == "site-b"


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer ", basic("secret-a"),
                                    "secret-a"])
def test_native_refuses_anything_but_a_valid_bearer(header: str | None) -> None:
    with pytest.raises(HTTPError) as info:
        AUTH.native(request(header))
    assert info.value.status == 401
    assert "Bearer" in info.value.headers["WWW-Authenticate"]


def test_segment_basic_wins_over_body_write_key() -> None:
    assert AUTH.segment(request(basic("secret-a")), "secret-b") == "site-a"
    with pytest.raises(HTTPError):
        AUTH.segment(request(basic("wrong")), "secret-a")


def test_segment_body_write_key_when_no_basic() -> None:
    assert AUTH.segment(request(), "secret-b") == "site-b"
    with pytest.raises(HTTPError):
        AUTH.segment(request(), "wrong")
    with pytest.raises(HTTPError):
        AUTH.segment(request(), None)


def test_customerio_needs_the_name_and_secret_of_the_same_key() -> None:
    assert AUTH.customerio(request(basic("site-a", "secret-a"))) == "site-a"
    for header in (basic("site-a", "secret-b"), basic("secret-a"), "Bearer secret-a",
                   "Basic !!notbase64"):
        with pytest.raises(HTTPError) as info:
            AUTH.customerio(request(header))
        assert info.value.status == 401
