"""Tools of the fault tests: an SMTP sink, an HTTP load, the store read back.

- :class:`Sink` is an aiosmtpd server on a loopback port that records every message it
  receives by Message-ID; it can hold a message in DATA (so a kill lands mid-send) and go
  down and come back on the same port.
- :class:`Load` drives the native API from a few threads (``PUT /v1/users/{id}`` then
  ``POST /v1/users/{id}/events``), records every answer and every acknowledged write.
- :func:`snapshot` reads users, events, messages and flows back from the store (sync
  SQLAlchemy), for the "nothing acknowledged is lost" checks.
(A private MariaDB server of a test's own is :class:`segflowd.testing.PrivateMariaDB`.)
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import email.parser
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from daemon_harness import API_SECRET

from segflowd.schema import events, flow_instances, flow_journal, messages, users

WAIT_SECONDS = 4  # the campaign's wait between its two sends
SETTLE_TIMEOUT = 40.0  # seconds for every flow to finish and the outbox to empty
HOLD_TIMEOUT = 15.0  # seconds for a message to reach the sink while it holds DATA
REQUEST_TIMEOUT = 15.0  # seconds per load request

# A campaign for every user with an email: a send, a wait, a second send.
APP_SOURCE = '''
from sqlalchemy import select
from segflowd import Segflow
from segflowd.schema import users

app = Segflow(templates={templates!r})

@app.segment("with-email")
def with_email():
    return select(users.c.id).where(users.c.email.is_not(None))

app.template("hello", subject="hello {{{{ user.name }}}}", html="hello.html")
app.template("later", subject="later {{{{ user.name }}}}", html="later.html")

@app.campaign("drip", segments=["with-email"])
def drip(ctx, rt):
    yield rt.send_email("hello")
    yield rt.wait(seconds={wait})
    yield rt.send_email("later")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def utcnow() -> dt.datetime:
    """Naive UTC, as the store keeps times."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def wait_for(what: str, predicate: Callable[[], bool], timeout: float,
              interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- the app and its config ---------------------------------------------------------------

def campaign_app(folder: Path, wait: int = WAIT_SECONDS) -> str:
    """Write the campaign's templates into ``folder``; return the app's source."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hello.html").write_text("<p>Hello {{ user.name }}</p>", encoding="utf-8")
    (folder / "later.html").write_text("<p>Still there, {{ user.name }}?</p>",
                                       encoding="utf-8")
    return APP_SOURCE.format(templates=str(folder), wait=wait)


def smtp_config(port: int, *, concurrency: int = 2, max_batch: int | None = None) -> str:
    """A ``[providers.sink]`` table: the smtp plugin at the sink (appended to the config)."""
    return f"""
[providers.sink]
plugin = "smtp"
host = "127.0.0.1"
port = {port}
security = "none"
timeout = 5.0
concurrency = {concurrency}
""" + ("" if max_batch is None else f"max_batch = {max_batch}\n")


def smtp_env(*, retry_base: float = 0.5, retry_max: float = 2.0,
             max_attempts: int = 50) -> dict[str, str]:
    """Environment overrides that make ``[providers.sink]`` the sender, retrying quickly."""
    return {
        "SEGFLOW_EMAIL_PROVIDER": "sink",
        "SEGFLOW_EMAIL_SECRET": "fault-tests-link-key",
        "SEGFLOW_EMAIL_POLL_INTERVAL": "0.2",
        "SEGFLOW_EMAIL_RETRY_BASE": str(retry_base),
        "SEGFLOW_EMAIL_RETRY_MAX": str(retry_max),
        "SEGFLOW_EMAIL_MAX_ATTEMPTS": str(max_attempts),
    }


def log_events(text: str, name: str) -> list[dict[str, object]]:
    """The JSON log lines of event ``name`` in a daemon's output."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == name:
            found.append(entry)
    return found


# -- the SMTP sink ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Received:
    message_id: str
    subject: str
    to: tuple[str, ...]


class Sink:
    """An SMTP server on ``127.0.0.1:port`` keeping every message it receives.

    ``delay`` seconds are spent in each DATA. :meth:`hold` keeps the next DATA from being
    answered until :meth:`release` (the message counts as received: the server has it).
    :meth:`down` stops the server between transactions, as a server shutting down
    cleanly does, and :meth:`up` starts it again on the same port.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.port = free_port()
        self.delay = delay
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._holding = threading.Event()
        self._held = threading.Event()
        self._released = threading.Event()
        self.held_message: Received | None = None
        self._closing = False
        self._busy = 0  # messages taken in DATA and not yet answered
        self._controller: Controller | None = None

    # aiosmtpd hooks (run in the controller's event loop thread)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self._closing:
            return "421 4.3.2 shutting down"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session,
                          envelope: Envelope) -> str:
        raw = bytes(envelope.original_content or envelope.content or b"")
        headers = email.parser.BytesHeaderParser().parsebytes(raw)
        got = Received(str(headers.get("Message-ID", "")).strip(),
                       str(headers.get("Subject", "")), tuple(envelope.rcpt_tos))
        with self._lock:
            if self._closing:  # not taken, so not received: the client retries it
                return "421 4.3.2 shutting down"
            self._busy += 1
            self.received.append(got)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self._holding.is_set():
                self.held_message = got
                self._held.set()
                await asyncio.get_running_loop().run_in_executor(None, self._released.wait)
            return "250 2.0.0 queued"
        finally:
            with self._lock:
                self._busy -= 1

    # control (from the test's thread)

    def up(self) -> None:
        with self._lock:
            self._closing = False
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def down(self) -> None:
        """Refuse new transactions, let the running ones answer, then stop listening."""
        with self._lock:
            self._closing = True
        wait_for("the sink's transactions to end", lambda: self._busy == 0, 10.0, 0.01)
        time.sleep(0.2)  # the last 250 reaches the client before the socket closes
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def close(self) -> None:
        self.release()
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def hold(self) -> None:
        self._held.clear()
        self._released.clear()
        self._holding.set()

    def wait_held(self, timeout: float = HOLD_TIMEOUT) -> Received:
        if not self._held.wait(timeout):
            pytest.fail(f"no message reached the sink within {timeout} s while holding")
        assert self.held_message is not None
        return self.held_message

    def release(self) -> None:
        self._holding.clear()
        self._released.set()

    def message_ids(self) -> list[str]:
        with self._lock:
            return [r.message_id for r in self.received]

    def count(self) -> int:
        with self._lock:
            return len(self.received)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    s.up()
    try:
        yield s
    finally:
        s.close()


def bare_message_id(value: str) -> str:
    return value.strip().strip("<>")


# -- the HTTP load ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Answer:
    """One request of the load: when it was sent and answered (monotonic), and how."""

    sent: float
    done: float
    method: str
    status: int | None  # None: no HTTP answer (connection refused or cut)
    retry_after: str | None
    error: str | None


class Load:
    """Threads that create users and give them events until :meth:`stop` (or the cap).

    Each iteration of a thread: ``PUT /v1/users/{uid}`` with an email (the campaign's
    segment), then ``POST /v1/users/{uid}/events`` with a unique ``id``. What got a 2xx
    is in :attr:`acked_users` and :attr:`acked_events` (client id → stored row id).
    """

    def __init__(self, base_url: str, *, prefix: str, threads: int = 3, pause: float = 0.1,
                 max_requests: int = 3000) -> None:
        self.base_url = base_url
        self.prefix = prefix
        self.threads = threads
        self.pause = pause
        self.max_requests = max_requests
        self.answers: list[Answer] = []
        self.acked_users: set[str] = set()
        self.acked_events: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    def start(self) -> None:
        for t in range(self.threads):
            w = threading.Thread(target=self._run, args=(t,), name=f"load-{t}", daemon=True)
            self._workers.append(w)
            w.start()

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(REQUEST_TIMEOUT + 5)
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _budget(self) -> bool:
        with self._lock:
            return len(self.answers) < self.max_requests

    def _request(self, client: httpx.Client, method: str, path: str,
                 body: dict[str, object]) -> httpx.Response | None:
        sent = time.monotonic()
        try:
            r = client.request(method, f"{self.base_url}{path}", json=body)
        except httpx.HTTPError as exc:
            answer = Answer(sent, time.monotonic(), method, None, None,
                            f"{type(exc).__name__}: {exc}")
            response = None
        else:
            answer = Answer(sent, time.monotonic(), method, r.status_code,
                            r.headers.get("retry-after"), None)
            response = r
        with self._lock:
            self.answers.append(answer)
        return response

    def _run(self, t: int) -> None:
        try:
            with httpx.Client(timeout=REQUEST_TIMEOUT,
                              headers={"Authorization": f"Bearer {API_SECRET}"}) as client:
                i = 0
                while not self._stop.is_set() and self._budget():
                    uid = f"{self.prefix}{t}-{i}"
                    r = self._request(client, "PUT", f"/v1/users/{uid}", {
                        "attributes": {"email": f"{uid}@example.com", "name": uid}})
                    if r is not None and r.is_success:
                        with self._lock:
                            self.acked_users.add(uid)
                    eid = f"{uid}-signup"
                    r = self._request(client, "POST", f"/v1/users/{uid}/events", {
                        "name": "signup", "id": eid, "attributes": {"tag": eid}})
                    if r is not None and r.is_success:
                        row = r.json()["id"]
                        with self._lock:
                            self.acked_events[eid] = int(row)
                    i += 1
                    self._stop.wait(self.pause)
        except BaseException as exc:  # surfaced by stop(): a broken load is a test failure
            self._errors.append(exc)

    def contract_breaches(self) -> list[Answer]:
        """Answers outside the contract: anything but 200/202, or a 503 without Retry-After.

        (No HTTP answer at all is not counted here: the tests say when that is expected.)
        """
        with self._lock:
            return [a for a in self.answers if a.status is not None and (
                a.status not in (200, 202, 503) or (a.status == 503 and not a.retry_after))]

    def statuses(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(str(a.status) if a.status is not None else "no answer"
                                       for a in self.answers)

    def acked(self) -> int:
        with self._lock:
            return len(self.acked_events)


# -- the store, read back -----------------------------------------------------------------

def sync_url(url: str) -> str:
    u = sa.engine.make_url(url)
    driver = "sqlite" if u.drivername.startswith("sqlite") else "mysql+pymysql"
    return u.set(drivername=driver).render_as_string(hide_password=False)


@dataclasses.dataclass
class Snapshot:
    users: set[str]
    events: dict[int, dict[str, object]]  # row id -> attributes
    messages: list[dict[str, object]]
    instances: list[dict[str, object]]
    journal: list[dict[str, object]]

    def event_tags(self) -> dict[str, int]:
        return {str(a["tag"]): i for i, a in self.events.items() if "tag" in a}

    def message_statuses(self) -> collections.Counter[str]:
        return collections.Counter(str(m["status"]) for m in self.messages)


def snapshot(url: str) -> Snapshot:
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return Snapshot(
                users=set(conn.execute(sa.select(users.c.id)).scalars()),
                events={int(i): dict(a or {}) for i, a in conn.execute(
                    sa.select(events.c.id, events.c.attributes))},
                messages=[dict(r) for r in conn.execute(sa.select(messages)).mappings()],
                instances=[dict(r) for r in conn.execute(
                    sa.select(flow_instances)).mappings()],
                journal=[dict(r) for r in conn.execute(sa.select(flow_journal)).mappings()],
            )
    finally:
        engine.dispose()


def settled(url: str) -> bool:
    """Every flow ended and no message waits to be sent."""
    s = snapshot(url)
    return (bool(s.instances)
            and all(i["status"] not in ("running", "waiting") for i in s.instances)
            and not any(m["status"] in ("queued", "claimed", "sending") for m in s.messages))


def missing_acknowledged(load: Load, snap: Snapshot) -> list[str]:
    """What the load saw acknowledged that the store does not hold."""
    lost = [f"user {u}" for u in sorted(load.acked_users - snap.users)]
    tags = snap.event_tags()
    for eid, row in sorted(load.acked_events.items()):
        if tags.get(eid) != row:
            lost.append(f"event {eid} (row {row}, stored as {tags.get(eid)})")
    return lost


def check_sink_against_store(sink: Sink, snap: Snapshot) -> None:
    """Each message reached the sink at most once, and each sent message exactly once."""
    got = collections.Counter(bare_message_id(m) for m in sink.message_ids())
    twice = {m: n for m, n in got.items() if n > 1}
    assert not twice, f"delivered more than once: {twice}"
    by_mid = {str(m["message_id"]): m for m in snap.messages if m["message_id"]}
    strangers = sorted(set(got) - set(by_mid))
    assert not strangers, f"the sink got messages the store does not know: {strangers[:5]}"
    unsent = sorted(mid for mid, m in by_mid.items() if m["status"] == "sent" and mid not in got)
    assert not unsent, f"recorded as sent but never received: {unsent[:5]}"
