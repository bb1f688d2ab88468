"""Every HTTP route under random and malformed requests: no 5xx, no traceback, JSON errors.

The routes are read from the running daemon's router, so a route added later is fuzzed
too. Requests mix valid and garbage credentials, content types and encodings (gzip that
is not gzip, truncated, or a bomb over the limit), invalid UTF-8, JSON with non-standard
numbers and unpaired surrogates, bodies over the configured limits, chunked bodies and
percent-encoded junk in path parameters. Most of it runs in-process against the whole
daemon on SQLite (fast); one test sends a smaller sample to the daemon as a process.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import gzip
import json
import re
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest
import sqlalchemy as sa
from asgi_daemon import Reply, asgi_call, assert_sane, running, signer_of
from daemon_harness import API_SECRET, StartDaemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segflowd.daemon import Daemon
from segflowd.schema import messages

pytestmark = pytest.mark.anyio

MAX_EVENT = 1024  # bytes: [http] max_event_bytes here (the smallest allowed)
MAX_REQUEST = 8192  # bytes: [http] max_request_bytes here
HOOK_USER, HOOK_PASSWORD = "hook", "hook-secret"
ENVIRON = {"SEGFLOW_HTTP_MAX_EVENT_BYTES": str(MAX_EVENT),
           "SEGFLOW_HTTP_MAX_REQUEST_BYTES": str(MAX_REQUEST),
           "SEGFLOW_EMAIL_SECRET": "fuzz-signing-key"}
# A postmark provider table, so /webhooks/postmark checks credentials and reads bodies,
# and an ses table with a topic, so /webhooks/ses does too (without one it is off: 404).
EXTRA = f"""
[providers.pm]
plugin = "postmark"
webhook_username = "{HOOK_USER}"
webhook_password = "{HOOK_PASSWORD}"
[providers.ses]
plugin = "ses"
region = "eu-west-1"
webhook_topic_arn = "arn:aws:sns:eu-west-1:123456789012:ses-events"
"""
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

# Every field name any route reads, so random objects often reach the deep checks.
FIELDS = ("attributes", "name", "timestamp", "id", "userId", "anonymousId", "event",
          "properties", "traits", "context", "messageId", "batch", "type", "previousId",
          "groupId", "writeKey", "data", "anonymous_id", "category", "email",
          "RecordType", "Email", "Inactive", "Description", "Message", "MessageId",
          "SignatureVersion", "SigningCertURL", "Signature", "TopicArn", "SubscribeURL")
TYPES = ("identify", "track", "page", "screen", "group", "alias", "batch", "page ", "")


def _basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def good_auth(template: str) -> bytes | None:
    """The credentials the route takes, in the form its API uses."""
    if template.startswith("/v1/users"):
        return f"Bearer {API_SECRET}".encode()
    if template.startswith("/api/v1"):
        return _basic("default", API_SECRET)
    if template.startswith("/v1/"):
        return _basic(API_SECRET, "")
    if template == "/webhooks/postmark":
        return _basic(HOOK_USER, HOOK_PASSWORD)
    return None


BAD_AUTH = [
    b"", b"Bearer", b"Bearer ", b"Bearer wrong", b"bearer " + API_SECRET.encode() + b"x",
    b"Basic", b"Basic !!!not-base64!!!", b"Basic " + base64.b64encode(b"\xff\xfe:\xff"),
    b"Basic " + base64.b64encode(b"no-colon"), _basic("default", "wrong"),
    _basic("nobody", API_SECRET), b"Digest username=x", b"\xff\xfe\x00garbage",
    b"Bearer " + b"A" * 5000, b"Basic " + base64.b64encode(b"x" * 3000 + b":y"),
]
CONTENT_TYPES = [None, b"application/json", b"application/json; charset=utf-8",
                 b"text/plain", b"application/vnd.api+json", b"application/x-www-form-urlencoded",
                 b"multipart/form-data; boundary=x", b"", b";", b"\xff/\xfe", b"APPLICATION/JSON"]
ENCODINGS = [None, b"gzip", b"deflate", b"x-gzip", b"br", b"identity", b"gzip, gzip", b"\xff",
             b" GZIP "]
LENGTHS = [b"0", b"1", b"-1", b"\xb2", b"12abc", b"99999999999999999999999", b" 5", b""]
PARAMS = ["u1", ".", "..", "%2F", "%2e%2e", "%00", "%FF%FE", "%", "%G1", "%uD800", "a" * 192,
          "%E2%80%AE", "%0D%0ASet-Cookie:%20x=1", "a.b", "%20", "x" * 5000]


class Raw:
    """JSON text written as is: non-standard numbers, unpaired surrogate escapes."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r})"


RAW_VALUES = [Raw("NaN"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400"), Raw("1" * 5000),
              Raw('"\\ud800"'), Raw('"x\\udfff"'), Raw('"\\ud83d\\ude00"'), Raw("1E999999"),
              Raw("0.0000000000000000000000000000000001"), Raw("-0")]
TIMESTAMPS = ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "1970-01-01T00:00:00Z",
              "2026-02-30T00:00:00Z", "2026-01-01T00:00:00+99:00", "now", "", 1e11, -1,
              253402300799, 1e308, 2**63, "2026-01-01T25:00:00"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30), st.sampled_from(RAW_VALUES), st.sampled_from(TIMESTAMPS),
    st.text(min_size=180, max_size=260), st.sampled_from(TYPES))
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(keys, inner, max_size=5)),
    max_leaves=12)
objects = st.dictionaries(keys, values, max_size=8)


def render(value: object, ascii_only: bool) -> str:
    """JSON text of ``value`` (Raw pieces verbatim)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{render(str(k), ascii_only)}:{render(v, ascii_only)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    obj = draw(st.one_of(objects, values,
                         st.builds(lambda items, ctx: {"batch": items, "context": ctx},
                                   st.lists(objects, max_size=4), values)))
    return render(obj, draw(st.booleans())).encode("utf-8", "surrogatepass")


def _gzip_bomb() -> bytes:
    return gzip.compress(b" " * (MAX_REQUEST * 50))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["json", "json", "json", "binary", "bad-utf8", "gzip",
                                 "gzip-garbage", "gzip-truncated", "deflate", "bomb", "big",
                                 "multi-gzip", "empty", "deep"]))
    doc = draw(json_bodies())
    if kind == "json":
        return doc
    if kind == "binary":
        return draw(st.binary(max_size=300))
    if kind == "bad-utf8":
        return b'{"name": "\xff\xfe", "userId": "\xc3\x28", "attributes": {"a\x80": 1}}'
    if kind == "gzip":
        return gzip.compress(doc)
    if kind == "gzip-garbage":
        return b"\x1f\x8b\x08\x00" + draw(st.binary(max_size=60))
    if kind == "gzip-truncated":
        packed = gzip.compress(doc)
        return packed[:draw(st.integers(0, max(0, len(packed) - 1)))]
    if kind == "deflate":
        return zlib.compress(doc)
    if kind == "bomb":
        return _gzip_bomb()
    if kind == "big":
        return b'{"attributes": {"blob": "' + b"x" * draw(st.sampled_from(
            [MAX_EVENT, MAX_REQUEST, MAX_REQUEST * 3])) + b'"}, "name": "n", "userId": "u"}'
    if kind == "deep":
        depth = draw(st.sampled_from([900, 1100, 3000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return b'{"batch": ' + opener * depth + b"1" + closer * depth + b"}"
    if kind == "multi-gzip":
        return gzip.compress(doc) + gzip.compress(b"{}") + draw(st.binary(max_size=5))
    return b""


@st.composite
def path_params(draw: st.DrawFn) -> str:
    return draw(st.one_of(
        st.sampled_from(PARAMS),
        st.text(min_size=1, max_size=60).map(lambda t: quote(t, safe="")),
        st.binary(min_size=1, max_size=40).map(lambda b: quote(b, safe=""))))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One random request, drawn before the test runs (the daemon turns it into bytes)."""

    route: int  # index into the daemon's routes (modulo their number)
    other_path: str | None  # a path of no route instead
    other_method: str | None
    params: tuple[str, str]  # for the path's {placeholders}
    claims: tuple[str, dict[str, str | int]] | None  # a token our key signs, if any
    auth: bytes | None  # None: the route's own good credentials (if it has any)
    headers: tuple[tuple[bytes, bytes], ...]
    chunks: tuple[bytes, ...]
    query: bytes

    def build(self, daemon: Daemon) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
        routes = daemon.router.routes()
        method, template = routes[self.route % len(routes)]
        path = self.other_path if self.other_path is not None else template
        values = list(self.params)
        while "{" in path:
            start, end = path.index("{"), path.index("}")
            value = values.pop(0) if values else "x"
            if path[start + 1:end] == "token" and self.claims is not None:
                value = signer_of(daemon).sign(*self.claims)
            path = path[:start] + value + path[end + 1:]
        headers = list(self.headers)
        auth = self.auth if self.auth is not None else good_auth(template)
        if auth is not None:
            headers.append((b"authorization", auth))
        return self.other_method or method, path.encode("utf-8", "surrogatepass"), headers


@st.composite
def claims(draw: st.DrawFn) -> tuple[str, dict[str, str | int]]:
    """Claims as delivery signs them (or close to it), for any of the link purposes."""
    purpose = draw(st.sampled_from(["o", "c", "u", "x"]))
    data: dict[str, str | int] = {"m": draw(st.integers(1, 2**62))}
    if draw(st.booleans()):
        data["u"] = draw(st.text(max_size=20))
    else:
        data["a"] = draw(st.text(max_size=20))
    data["l"] = draw(st.one_of(
        st.text(max_size=40).map(lambda t: "https://example.com/" + t),
        st.sampled_from(["javascript:alert(1)", "//evil.example", "https://e.com/\u00fc",
                         "https://例え.jp/パス", "http://x/\r\nSet-Cookie: a=b",
                         "HTTPS://EXAMPLE.COM", "data:text/html,x"])))
    return purpose, data


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    headers: list[tuple[bytes, bytes]] = []
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    if ctype is not None:
        headers.append((b"content-type", ctype))
    encoding = draw(st.sampled_from(ENCODINGS))
    if encoding is not None:
        headers.append((b"content-encoding", encoding))
    length = draw(st.sampled_from([*LENGTHS, None, None, None]))
    if length is not None:
        headers.append((b"content-length", length))
    headers += draw(st.lists(st.tuples(st.binary(min_size=1, max_size=12).map(bytes.lower),
                                       st.binary(max_size=40)), max_size=2))
    body = draw(bodies())
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=2)))
    chunks = tuple(body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True))
    other_path = None
    if draw(st.integers(0, 9)) == 0:
        other_path = "/" + draw(st.text(max_size=30)).replace("{", "").replace("}", "")
    return Recipe(
        route=draw(st.integers(0, 10_000)),
        other_path=other_path,
        other_method=draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(
            ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "BREW",
             "get"]))),
        params=(draw(path_params()), draw(path_params())),
        claims=draw(st.one_of(st.none(), claims())),
        auth=draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(BAD_AUTH))),
        headers=tuple(headers),
        chunks=chunks,
        query=draw(st.sampled_from([b"", b"a=1", b"%ff%fe=\xff", b"&&==", b"x=" + b"y" * 2000])),
    )


@pytest.fixture
async def daemon(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Daemon]:
    """The whole daemon in-process; after the test it must still be healthy and serve."""
    async with running(tmp_path / "d", sqlite_url, extra=EXTRA, environ=ENVIRON) as d:
        yield d
        await still_serves(d)


async def healthy(d: Daemon) -> Reply:
    reply = await asgi_call(d.router, "GET", b"/healthz")
    assert reply.status == 200, reply.body
    return reply


async def still_serves(d: Daemon) -> None:
    """Health is ok and a good write and read still work after the fuzzing."""
    await healthy(d)
    auth = [(b"authorization", f"Bearer {API_SECRET}".encode()),
            (b"content-type", b"application/json")]
    put = await asgi_call(d.router, "PUT", b"/v1/users/after-fuzz", auth,
                          b'{"attributes": {"ok": true}}')
    assert put.status == 200, put.body
    got = await asgi_call(d.router, "GET", b"/v1/users/after-fuzz", auth)
    assert got.status == 200
    assert got.json()["attributes"] == {"ok": True}


@FUZZ
@given(recipe=recipes())
async def test_random_requests_to_every_route_get_a_sane_answer(daemon: Daemon,
                                                               recipe: Recipe) -> None:
    method, raw_path, headers = recipe.build(daemon)
    reply = await asgi_call(daemon.router, method, raw_path, headers, recipe.chunks,
                            recipe.query)
    assert_sane(reply, (method, raw_path[:80], headers))
    if reply.status in (301, 302, 303, 307, 308):
        location = reply.headers["location"]
        assert location.isascii()
        assert location.lower().startswith(("http://", "https://"))
    await healthy(daemon)


async def test_every_route_answers_garbage_bodies_sanely(daemon: Daemon) -> None:
    for body in (b"\x1f\x8b" * 100, _gzip_bomb(), b'{"attributes": ' * 2000, b"\xff" * 100):
        for method, template in daemon.router.routes():
            path = template.replace("{id}", "u1").replace("{token}", "t")
            reply = await asgi_call(daemon.router, method, path.encode(),
                                    [(b"content-encoding", b"gzip")], body)
            assert_sane(reply, (method, template))


@pytest.fixture
async def clickable(daemon: Daemon) -> Daemon:
    """The daemon with message 1 stored, so its signed click links redirect."""
    now = dt.datetime(2026, 1, 1)
    async with daemon.store.begin() as conn:
        await conn.execute(sa.insert(messages).values(
            id=1, user_id="u1", kind="campaign", template="t", status="sent", attempts=1,
            created_at=now, updated_at=now, next_attempt_at=now))
    return daemon


WEB = re.compile(r"^https?://[^\s]+$", re.IGNORECASE)
urls = st.one_of(
    st.text(st.characters(exclude_characters="%"), max_size=40).map(
        lambda t: "https://example.com/" + t),
    st.text(st.characters(exclude_characters="%"), max_size=40),
    st.sampled_from(["https://例え.jp/パス?q=ü", "HTTP://EXAMPLE.COM/a b", "https://e.com/\x00",
                     "https://e.com/\x7f", "javascript:alert(1)", "//evil.example/",
                     "https://e.com/\u2028x", "https://e.com/\u0085", "https:/\\evil"]))


@FUZZ
@given(url=urls)
async def test_a_signed_click_link_redirects_only_to_its_own_url_as_ascii(clickable: Daemon,
                                                                          url: str) -> None:
    token = signer_of(clickable).sign("c", {"m": 1, "l": url})
    reply = await asgi_call(clickable.router, "GET", f"/t/c/{token}".encode())
    assert_sane(reply, url)
    if not WEB.match(url):
        assert reply.status == 404
        return
    assert reply.status == 302, reply.body
    location = reply.headers["location"]
    assert location.isascii()
    assert all(0x21 <= ord(c) < 0x7F for c in location), location
    assert location[:8].lower() == url[:8].lower()
    assert unquote(location) == unquote(url)


# -- what the fuzzing found, pinned for every JSON route ---------------------------------

JSON_ROUTES = [
    ("PUT", "/v1/users/u1", f"Bearer {API_SECRET}".encode()),
    ("POST", "/v1/users/u1/events", f"Bearer {API_SECRET}".encode()),
    ("POST", "/v1/identify", _basic(API_SECRET, "")),
    ("POST", "/v1/track", _basic(API_SECRET, "")),
    ("POST", "/v1/batch", _basic(API_SECRET, "")),
    ("PUT", "/api/v1/customers/u1", _basic("default", API_SECRET)),
    ("POST", "/api/v1/customers/u1/events", _basic("default", API_SECRET)),
    ("POST", "/api/v1/events", _basic("default", API_SECRET)),
    ("POST", "/webhooks/postmark", _basic(HOOK_USER, HOOK_PASSWORD)),
    ("POST", "/webhooks/ses", b""),
]
# Bodies no route may take: JSON that is not standard or whose strings are no text.
POISON = {
    "a 4400-digit integer": b'{"attributes": {"n": ' + b"1" * 4400 + b"}}",
    "NaN": b'{"attributes": {"n": NaN}, "name": "e", "userId": "u", "event": "e"}',
    "Infinity": b'{"attributes": {"n": -Infinity}, "name": "e", "userId": "u", "event": "e"}',
    "a float overflowing to infinity": b'{"attributes": {"n": 1e400}, "name": "e", '
                                       b'"userId": "u", "event": "e"}',
    "an unpaired surrogate": b'{"attributes": {"n": "\\ud800"}, "name": "e\\udc00", '
                             b'"userId": "u\\udfff", "event": "e", "traits": {"t": "\\ud800"}}',
    "arrays nested 3000 deep": b'{"attributes": {"n": ' + b"[" * 3000 + b"]" * 3000 + b"}}",
}
# Event times that are valid ISO 8601 but out of datetime's range once in UTC.
TIMES = {
    "a timestamp past year 9999 in UTC": "9999-12-31T23:59:59-14:00",
    "a timestamp before year 1 in UTC": "0001-01-01T00:00:00+14:00",
}


def _headers(auth: bytes) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    if auth:
        headers.append((b"authorization", auth))
    return headers


async def test_json_no_route_could_store_or_echo_is_refused_with_400(daemon: Daemon) -> None:
    for poison, doc in POISON.items():
        for method, path, auth in JSON_ROUTES:
            body = b'{"batch": [' + doc[:-1] + b', "type": "track"}]}' \
                if path == "/v1/batch" else doc
            reply = await asgi_call(daemon.router, method, path.encode(), _headers(auth), body)
            assert_sane(reply, (poison, path))
            if path == "/webhooks/ses":  # its own parser; an unsigned message is refused
                assert reply.status in (400, 403), (poison, reply.body)
            else:
                assert reply.status == 400, (poison, path, reply.body)
                assert reply.json()["error"]["code"] == "invalid_json"


async def test_event_times_out_of_range_in_utc_are_a_400_naming_the_field(
        daemon: Daemon) -> None:
    for when, timestamp in TIMES.items():
        event = {"name": "e", "userId": "u", "event": "e", "timestamp": timestamp}
        native = {"name": "e", "timestamp": timestamp}  # the native API takes only its fields
        for method, path, auth in JSON_ROUTES:
            if path in ("/v1/users/u1", "/api/v1/customers/u1") or path.startswith("/webhooks"):
                continue  # these take no event time
            doc = ({"batch": [{**event, "type": "track"}]} if path == "/v1/batch"
                   else native if path.startswith("/v1/users/") else event)
            reply = await asgi_call(daemon.router, method, path.encode(), _headers(auth),
                                    json.dumps(doc).encode())
            assert_sane(reply, (when, path))
            assert reply.status == 400, (when, path, reply.body)
            assert "timestamp: is out of range" in reply.json()["error"]["message"]


async def test_a_content_length_that_is_not_ascii_digits_is_not_a_crash(daemon: Daemon) -> None:
    for length in (b"\xb2", b"\xb9\xb2\xb3", b"-5", b"1e3", b" 12 "):
        reply = await asgi_call(daemon.router, "PUT", b"/v1/users/u1",
                                [(b"authorization", f"Bearer {API_SECRET}".encode()),
                                 (b"content-length", length)], b'{"attributes": {}}')
        assert_sane(reply, length)
        assert reply.status == 200


# -- the daemon as a process -------------------------------------------------------------

PROCESS_FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture,
                                               HealthCheck.too_slow])


@pytest.mark.slow
def test_the_daemon_process_survives_random_requests(start_daemon: StartDaemon,
                                                     sqlite_url: str) -> None:
    d = start_daemon(store_url=sqlite_url, extra=EXTRA, env=ENVIRON)
    routes = [("PUT", "/v1/users/{id}"), ("GET", "/v1/users/{id}"),
              ("DELETE", "/v1/users/{id}"), ("POST", "/v1/users/{id}/events"),
              ("POST", "/v1/track"), ("POST", "/v1/batch"), ("POST", "/v1/identify"),
              ("PUT", "/api/v1/customers/{id}"), ("POST", "/api/v1/events"),
              ("GET", "/t/c/{token}"), ("POST", "/u/{token}"), ("POST", "/webhooks/postmark"),
              ("POST", "/webhooks/ses"), ("PATCH", "/v1/users/{id}"), ("GET", "/nowhere")]
    with httpx.Client(base_url=d.base_url, timeout=10.0) as client:

        @PROCESS_FUZZ
        @given(route=st.sampled_from(routes), param=path_params(), body=bodies(),
               auth=st.one_of(st.none(), st.sampled_from(BAD_AUTH[:12])),
               good=st.booleans(), ctype=st.sampled_from(CONTENT_TYPES[:8]),
               encoding=st.sampled_from(ENCODINGS[:7]))
        def fuzz(route: tuple[str, str], param: str, body: bytes, auth: bytes | None,
                 good: bool, ctype: bytes | None, encoding: bytes | None) -> None:
            method, template = route
            path = template.replace("{id}", param).replace("{token}", param)
            headers: dict[str, bytes] = {}
            credentials = good_auth(template) if good else auth
            if credentials:
                headers["authorization"] = credentials
            if ctype is not None:
                headers["content-type"] = ctype
            if encoding is not None:
                headers["content-encoding"] = encoding
            r = client.request(method, path, content=body, headers=headers)
            assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
            assert "Traceback" not in r.text
            assert 'File "' not in r.text
            if r.status_code >= 400:
                assert r.headers["content-type"] == "application/json"
                assert set(r.json()["error"]) == {"code", "message"}

        fuzz()
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        put = client.put("/v1/users/after", json={"attributes": {"ok": 1}},
                         headers={"Authorization": f"Bearer {API_SECRET}"})
        assert put.status_code == 200
    assert d.process.poll() is None
