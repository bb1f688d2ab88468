"""A Twilio-shaped HTTP server on loopback, for tests of the SMS path.

It implements the one call Segflow makes, ``POST /2010-04-01/Accounts/{sid}/Messages.json``
(form-encoded ``To``, ``From`` or ``MessagingServiceSid``, ``Body``, ``StatusCallback``,
HTTP Basic auth ``account_sid:auth_token``), with Twilio's documented answers: 201 and the
message resource (``sid`` ``SM...``, ``status`` ``queued``), or an error
``{"code", "message", "more_info", "status"}`` (401 20003 for bad credentials, 404 20404
for another account's path, 400 21604/21602/21603 for a missing field). It speaks HTTP/1.1
with keep-alive, so a client's connection reuse is visible (``Recorded.client_port``).

A test scripts failures: :meth:`FakeTwilio.fail_next` answers the next N requests with a
given :class:`Answer` (an error, a delay, a dropped connection, an unreadable body);
:meth:`FakeTwilio.fail_to` answers every message to one number so; :meth:`hold_until`
keeps requests waiting until that many are in flight at once (a proof of parallelism
that needs no clock). ``DELETE .../Messages/{sid}.json`` deletes a message it created
(204), answers 404 20404 for a sid it does not have, and 409 20009 for a sid in
:attr:`FakeTwilio.not_final` (delivery not complete); :meth:`FakeTwilio.deleted` lists
the sids deleted. Use the ``twilio_server`` fixture (``pytest_plugins =
("twilio_fake",)`` in the test module) or :func:`running`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "fake-auth-token-7f3a9c"
POLL = 0.05  # seconds between the serving thread's checks for shutdown
HOLD_LIMIT = 10.0  # seconds hold_until waits for the others before giving up (a failing test)


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the server does with a request: wait ``delay`` seconds (cut short when the
    server stops), then close the connection unanswered (``drop``) or answer ``status``
    with ``body`` (JSON, or raw bytes sent as they are)."""

    status: int = 201
    body: object = None
    delay: float = 0.0
    drop: bool = False


def twilio_error(status: int, code: int, message: str) -> Answer:
    """An error answer in Twilio's documented shape."""
    return Answer(status, {"code": code, "message": message, "status": status,
                           "more_info": f"https://www.twilio.com/docs/errors/{code}"})


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One request as the server read it."""

    method: str
    path: str
    form: dict[str, str]
    headers: dict[str, str]
    client_port: int
    sid: str = ""  # the message sid answered, when one was
    answered: int = 0  # the HTTP status a DELETE was answered with


class FakeTwilio(ThreadingHTTPServer):
    daemon_threads = True  # a request held by a test never blocks the server's close

    def __init__(self, account_sid: str = ACCOUNT_SID, auth_token: str = AUTH_TOKEN) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.requests: list[Recorded] = []
        self.errors: list[str] = []
        self.max_in_flight = 0
        self.released = threading.Event()  # set when the server stops: delays end
        self._lock = threading.Lock()
        self._next: list[Answer] = []
        self._by_number: dict[str, Answer] = {}
        self._in_flight = 0
        self._hold: threading.Barrier | None = None
        self.messages: set[str] = set()  # sids of the messages it holds
        self.not_final: set[str] = set()  # sids whose delivery is not complete (no DELETE)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fail_next(self, answer: Answer, times: int = 1) -> None:
        """Answer the next ``times`` requests (after the auth check) with ``answer``."""
        with self._lock:
            self._next.extend([answer] * times)

    def fail_to(self, number: str, answer: Answer) -> None:
        """Answer every message to ``number`` with ``answer``."""
        with self._lock:
            self._by_number[number] = answer

    def hold_until(self, n: int) -> None:
        """Keep each request waiting until ``n`` are in flight together, then answer all."""
        self._hold = threading.Barrier(n)

    def sent(self) -> list[Recorded]:
        """The requests answered with a message sid, in the order they were answered."""
        return [r for r in self.requests if r.sid]

    def deleted(self) -> list[str]:
        """The sids of the messages deleted (answered 204), in order."""
        return [r.path.rsplit("/", 1)[1].removesuffix(".json") for r in self.requests
                if r.method == "DELETE" and r.answered == 204]

    def handle_error(self, request: object, client_address: object) -> None:
        self.errors.append(f"error serving {client_address}")  # e.g. the client gave up

    def _answer_for(self, to: str) -> Answer | None:
        with self._lock:
            if to in self._by_number:
                return self._by_number[to]
            return self._next.pop(0) if self._next else None

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    server: FakeTwilio
    protocol_version = "HTTP/1.1"  # keep-alive, as api.twilio.com

    def log_message(self, format: str, *args: object) -> None:  # the stdlib's name
        return None

    def _send(self, status: int, body: object) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
        self.wfile.flush()

    def do_POST(self) -> None:  # the stdlib's handler name
        self.server._enter()
        try:
            self._post()
        finally:
            self.server._leave()

    def do_DELETE(self) -> None:  # the stdlib's handler name
        srv = self.server
        record = Recorded("DELETE", self.path, {}, dict(self.headers.items()),
                          self.client_address[1])
        expected = "Basic " + base64.b64encode(
            f"{srv.account_sid}:{srv.auth_token}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            srv.requests.append(record)
            return self._send(*_error(401, 20003, "Authenticate"))
        prefix = f"/2010-04-01/Accounts/{srv.account_sid}/Messages/"
        sid = self.path.removeprefix(prefix).removesuffix(".json")
        scripted = srv._answer_for("")
        status, body = (
            (scripted.status, scripted.body) if scripted is not None
            else _error(404, 20404, "The requested resource was not found")
            if not self.path.startswith(prefix) or sid not in srv.messages
            else _error(409, 20009, "Cannot delete message because delivery has not "
                                    "been completed.") if sid in srv.not_final
            else (204, b""))
        srv.requests.append(dataclasses.replace(record, answered=status))
        if status == 204:
            srv.messages.discard(sid)
        return self._send(status, body)

    def _post(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        form = dict(urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True))
        record = Recorded("POST", self.path, form, dict(self.headers.items()),
                          self.client_address[1])
        srv = self.server
        if srv._hold is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                srv._hold.wait(HOLD_LIMIT)
        expected = "Basic " + base64.b64encode(
            f"{srv.account_sid}:{srv.auth_token}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            srv.requests.append(record)
            return self._send(*_error(401, 20003, "Authenticate"))
        prefix = "/2010-04-01/Accounts/"
        if not (self.path.startswith(prefix) and self.path.endswith("/Messages.json")):
            srv.requests.append(record)
            return self._send(*_error(404, 20404, "The requested resource was not found"))
        if self.path != f"{prefix}{srv.account_sid}/Messages.json":
            srv.requests.append(record)
            return self._send(*_error(404, 20404, "The requested resource was not found"))
        scripted = srv._answer_for(form.get("To", ""))
        if scripted is not None:
            srv.requests.append(record)
            if scripted.delay:
                srv.released.wait(scripted.delay)
            if scripted.drop:
                self.close_connection = True
                return None
            return self._send(scripted.status, scripted.body)
        problem = _missing(form)
        if problem is not None:
            srv.requests.append(record)
            return self._send(*problem)
        sid = "SM" + uuid.uuid4().hex
        srv.messages.add(sid)
        srv.requests.append(dataclasses.replace(record, sid=sid))
        return self._send(201, {
            "sid": sid, "account_sid": srv.account_sid, "status": "queued",
            "to": form["To"], "from": form.get("From"), "body": form["Body"],
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "num_segments": "1", "error_code": None, "error_message": None,
            "uri": f"{prefix}{srv.account_sid}/Messages/{sid}.json"})


def _error(status: int, code: int, message: str) -> tuple[int, object]:
    a = twilio_error(status, code, message)
    return a.status, a.body


def _missing(form: dict[str, str]) -> tuple[int, object] | None:
    if not form.get("To"):
        return _error(400, 21604, "A 'To' phone number is required.")
    if not form.get("From") and not form.get("MessagingServiceSid"):
        return _error(400, 21603, "A 'From' phone number is required.")
    if not form.get("Body"):
        return _error(400, 21602, "Message body is required.")
    return None


@contextlib.contextmanager
def running(server: FakeTwilio | None = None) -> Iterator[FakeTwilio]:
    """Serve ``server`` (a new one by default) in a thread until the block ends."""
    srv = server or FakeTwilio()
    thread = threading.Thread(target=srv.serve_forever, args=(POLL,), name="fake-twilio",
                              daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.released.set()
        if srv._hold is not None:
            srv._hold.abort()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def twilio_server() -> Iterator[FakeTwilio]:
    """A :class:`FakeTwilio` serving on loopback for the test (account
    :data:`ACCOUNT_SID`, token :data:`AUTH_TOKEN`)."""
    with running() as server:
        yield server
