"""One scenario, run by the daemon (a process, in real time, with waits of seconds) and by
Simulation (virtual time): the same messages go out, to the same people, in the same order."""

from __future__ import annotations

import email
import email.policy
import time
from pathlib import Path

import httpx
import pytest
from daemon_harness import API_SECRET

from segflowd.testing import Simulation

pytestmark = pytest.mark.slow

SEND_TIMEOUT = 30.0  # seconds for the daemon to send every message of the scenario

APP = """\
from segflowd import Segflow

app = Segflow(templates="templates")
app.segment("signed-up", sql="SELECT user_id AS id FROM events WHERE name = 'signup'")

@app.campaign("series", segments=["signed-up"], behavior="static")
def series(ctx, rt):
    yield rt.send_email("hello")
    yield rt.wait(seconds=2)
    if ctx.user.get("plan") == "pro":
        yield rt.send_email("pro-tips")
    else:
        yield rt.send_email("upgrade")
    yield rt.wait(seconds=1)
    yield rt.send_email("bye")

app.template("hello", subject="Hello {{ user.name }}", html="t.html")
app.template("pro-tips", subject="Tips for pros", html="t.html")
app.template("upgrade", subject="Go pro, {{ user.name }}", html="t.html")
app.template("bye", subject="That is all", html="t.html")
app.template("reset", subject="Reset for {{ user.name }}", html="t.html")
app.transaction("reset", event="reset", template="reset")
"""
USERS = {"ann": {"email": "ann@example.com", "name": "Ann", "plan": "pro"},
         "bob": {"email": "bob@example.com", "name": "Bob"}}
EVENTS = [("ann", "signup"), ("bob", "signup")]
# Sent once both welcomes are out: a transaction and a campaign's step started by
# different events at the same moment may go out in either order in the daemon.
LATER = ("bob", "reset")
EXPECTED = 7  # ann: hello, pro-tips, bye; bob: hello, reset, upgrade, bye


def per_user(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for to, subject in pairs:
        out.setdefault(to, []).append(subject)
    return out


def test_simulation_and_daemon_send_the_same(start_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "d0"  # where start_daemon writes app.py and segflow.toml
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "t.html").write_text("<p>Hi {{ user.name }}</p>")
    d = start_daemon(store_url=f"sqlite+aiosqlite:///{folder / 'store.db'}", app=APP)
    headers = {"Authorization": f"Bearer {API_SECRET}"}
    with httpx.Client(base_url=d.base_url, headers=headers, timeout=10) as client:
        for uid, attributes in USERS.items():
            client.put(f"/v1/users/{uid}", json={"attributes": attributes}).raise_for_status()
        for uid, name in EVENTS:
            client.post(f"/v1/users/{uid}/events", json={"name": name}).raise_for_status()
        outbox = folder / "var" / "outbox"
        deadline = time.monotonic() + SEND_TIMEOUT
        while len(list(outbox.glob("*.eml"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        client.post(f"/v1/users/{LATER[0]}/events", json={"name": LATER[1]}).raise_for_status()
    while len(list(outbox.glob("*.eml"))) < EXPECTED and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # nothing more may come
    files = sorted(outbox.glob("*.eml"))  # named by outbox row id: the order of sending
    mails = [email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
             for f in files]
    daemon = per_user([(str(m["To"]), str(m["Subject"])) for m in mails])
    d.stop()

    with Simulation(f"{folder / 'app.py'}:app", start="2026-03-01T09:00:00Z") as sim:
        for uid, attributes in USERS.items():
            sim.user(uid, **attributes)
        for uid, name in EVENTS:
            sim.event(uid, name)
        sim.event(*LATER)
        sim.advance(seconds=10)
        simulated = per_user([(m.to, m.subject) for m in sim.sent()])

    assert simulated == {
        "ann@example.com": ["Hello Ann", "Tips for pros", "That is all"],
        "bob@example.com": ["Hello Bob", "Reset for Bob", "Go pro, Bob", "That is all"]}
    assert daemon == simulated
