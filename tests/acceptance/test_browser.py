"""analytics.js in a real browser (issue #17): ``@segment/analytics-next`` in headless
Chromium, on a page from another origin than segflowd, with a ``track``-scope key.

A small static server on its own loopback port serves tests/clients/browser.html and the
analytics-next UMD bundle from tests/clients/node_modules; tests/clients/browser.mjs opens
it with playwright-core and Debian's ``chromium``. The page loads analytics.js with
``cdnSettings`` pointing the Segment.io destination at segflowd (nothing is fetched from
the internet: other origins are aborted), then sends page, track and identify: they must
reach segflowd through its short routes and CORS, with their properties, and the
identify must link the browser's anonymousId. The page cannot read a user even with a
full key (no CORS on the data routes), and the public key cannot read users at all.
Without chromium, node or the npm packages the tests skip, but fail under ``CI=true``.
"""

from __future__ import annotations

import functools
import http.server
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from daemon_harness import (
    API_SECRET,
    CLIENTS_DIR,
    RunningDaemon,
    require_npm_clients,
    require_program,
    running_daemon,
    store_rows,
)

from segflowd.schema import anonymous_links, events

pytestmark = pytest.mark.slow

BROWSER_KEY = "browser-public-key"  # a write key anyone can read in the page's source
KEYS = f"""
[[http.keys]]
name = "browser"
secret = "{BROWSER_KEY}"
scope = "track"
"""
UMD_DIR = CLIENTS_DIR / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd"
RUN_TIMEOUT = 90.0  # seconds for browser.mjs: start Chromium, load, send, close
ARRIVE_TIMEOUT = 20.0  # seconds for the page's three calls to be in the store
USER = "browser-u1"  # browser.html identifies as this user


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    folder = tmp_path_factory.mktemp("browser")
    with running_daemon(folder / "d", store_url=f"sqlite+aiosqlite:///{folder}/segflow.db",
                        extra=KEYS) as d:
        yield d


class _PageHandler(http.server.SimpleHTTPRequestHandler):
    """``/`` is browser.html; anything else a file of the analytics-next UMD bundle (its
    lazily loaded chunks are fetched relative to the page)."""

    def send_head(self) -> Any:
        if urlsplit(self.path).path == "/":
            self.path = "/browser.html"
            self.directory = str(CLIENTS_DIR)
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log
        pass


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """The page's origin: a static server on another loopback port than segflowd's."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_PageHandler, directory=str(UMD_DIR)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _arrived(d: RunningDaemon) -> list[sa.RowMapping]:
    """The browser user's events once page, track and identify are all stored."""
    deadline = time.monotonic() + ARRIVE_TIMEOUT
    while True:
        rows = store_rows(d.store_url, sa.select(events).where(events.c.user_id == USER)
                          .order_by(events.c.id))
        if len(rows) >= 2 or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_analytics_js_in_chromium_tracks_across_origins(
        daemon: RunningDaemon, page_origin: str) -> None:
    chromium = require_program("chromium", "chromium", "chromium-browser")
    node = require_npm_clients()
    host = urlsplit(daemon.base_url).netloc
    query = {"key": BROWSER_KEY, "api": f"{host}/v1", "admin": API_SECRET}
    url = f"{page_origin}/?{urlencode(query)}"
    done = subprocess.run([node, str(CLIENTS_DIR / "browser.mjs"), chromium, url, page_origin,
                           daemon.base_url], cwd=CLIENTS_DIR, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    seen = json.dumps(report, indent=1)
    assert "error" not in report["result"], seen
    anonymous_id = report["result"]["anonymousId"]
    assert anonymous_id
    assert report["result"]["readUser"] == "refused by the browser", seen
    tracked = [r for r in report["responses"]
               if r["url"].startswith(f"{daemon.base_url}/v1/") and r["method"] == "POST"]
    assert {urlsplit(r["url"]).path for r in tracked} >= {"/v1/p", "/v1/t", "/v1/i"}, seen
    assert all(200 <= r["status"] < 300 for r in tracked), seen  # analytics.js's routes
    # No CORS refusal, no failed request but the user read's (Chrome's own "Failed to
    # load resource" line names no URL; every failed request has its line with the URL).
    refusals = [line for line in report["console"] if "/v1/users/" not in line
                and not line.startswith("Failed to load resource")]
    assert refusals == [], seen

    stored = _arrived(daemon)
    by_name = {e["name"]: e for e in stored}
    assert set(by_name) == {"$page", "Signed Up"}, stored
    assert all(e["anonymous_id"] == anonymous_id for e in stored)
    page = by_name["$page"]["attributes"]
    assert (page["name"], page["category"], page["plan"]) == ("Pricing", "Docs", "pro")
    assert page["url"].startswith(page_origin)  # analytics.js adds the page's own properties
    signed = by_name["Signed Up"]["attributes"]
    assert (signed["plan"], signed["seats"]) == ("pro", 3)
    assert store_rows(daemon.store_url, sa.select(anonymous_links.c.user_id).where(
        anonymous_links.c.anonymous_id == anonymous_id)) == [{"user_id": USER}]
    r = httpx.get(f"{daemon.base_url}/v1/users/{USER}",
                  headers={"Authorization": f"Bearer {API_SECRET}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert (r.json()["email"], r.json()["attributes"]["plan"]) == ("browser@example.com", "pro")


def test_a_track_scope_key_cannot_read_delete_or_send(daemon: RunningDaemon) -> None:
    admin = {"Authorization": f"Bearer {API_SECRET}"}
    public = {"Authorization": f"Bearer {BROWSER_KEY}"}
    created = httpx.put(f"{daemon.base_url}/v1/users/scoped-1", headers=admin,
                        json={"attributes": {"email": "scoped@example.com"}}, timeout=10)
    assert created.status_code in (200, 201), created.text
    for method in ("GET", "DELETE"):
        refused = httpx.request(method, f"{daemon.base_url}/v1/users/scoped-1",
                                headers=public, timeout=10)
        assert refused.status_code == 403, (method, refused.text)
        assert refused.json()["code"]
    send = httpx.post(f"{daemon.base_url}/v1/send/email", headers=public, timeout=10,
                      json={"transactional_message_id": "welcome", "to": "x@example.com",
                            "identifiers": {"id": "scoped-1"}})
    assert send.status_code == 403, send.text  # the App API: scope "all" or "app" only
    still = httpx.get(f"{daemon.base_url}/v1/users/scoped-1", headers=admin, timeout=10)
    assert still.json()["email"] == "scoped@example.com"
    tracked = httpx.post(f"{daemon.base_url}/v1/track", auth=(BROWSER_KEY, ""), timeout=10,
                         json={"userId": "scoped-1", "event": "Allowed"})
    assert tracked.status_code == 200, tracked.text  # what the key is for
