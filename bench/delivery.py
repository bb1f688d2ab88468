"""Delivery benchmarks: rendering and handing messages to a batching provider.

    .venv/bin/python bench/delivery.py            # full: 20,000 messages
    .venv/bin/python bench/delivery.py --quick    # 2,000 messages

Figures (one JSON line each, baseline measured in the same run):

* ``rendered_and_sent_per_s``: messages rendered (Jinja2 with the component library,
  CSS inlined with css-inline, text part from inscriptis), built into MIME and handed to
  the ``postmark`` provider (``/email/batch``, 500 per call) talking to a local HTTP
  server on loopback. Target >= 2,000/s. Baseline: the same pipeline with Jinja only.
* ``render_cost_per_message``: milliseconds to render one message fully (template,
  inlining, text part) against a Jinja-only render of the same template (baseline).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio

from segflow_plugins.postmark import PostmarkProvider
from segflowd.app import Segflow
from segflowd.mime import MessageParts, build_message
from segflowd.providers import OutgoingMessage, ProviderContext
from segflowd.templates import Renderer

TARGET_PER_S = 2000.0
TEMPLATE = """\
{% extends "segflow/layout.html" %}
{% import "segflow/components.html" as ui %}
{% block preview %}Your week, {{ user.name }}{% endblock %}
{% block content %}
{{ ui.heading("Hello " ~ user.name) }}
{% call ui.text() %}You have {{ user.points }} points and {{ items|length }} new items.{% endcall %}
{% for item in items %}
{% call ui.text(class_="text-sm") %}<b>{{ item.title }}</b> by {{ item.author }}{% endcall %}
{% endfor %}
{{ ui.button("https://example.com/dashboard?u=" ~ user.id, "Open your dashboard") }}
{{ ui.divider() }}
{% endblock %}
"""


class _Sink(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # stdlib's name
        return None

    def do_POST(self) -> None:  # stdlib's name
        batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body = json.dumps([{"ErrorCode": 0, "Message": "OK", "MessageID": f"m{i}"}
                           for i in range(len(batch))]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def context(i: int) -> dict[str, object]:
    return {"user": {"id": f"user-{i}", "name": f"User {i}", "points": i * 7},
            "items": [{"title": f"Item {j} & more", "author": f"Author {j}"} for j in range(5)],
            "unsubscribe_url": f"https://mail.example.com/u/token-{i}"}


def emit(figure: str, value: float, unit: str, baseline: float, target: float | None) -> None:
    print(json.dumps({"bench": "delivery", "figure": figure, "value": round(value, 3),
                      "unit": unit, "baseline": round(baseline, 3),
                      "ratio": round(value / baseline, 3) if baseline else None,
                      "target": target}), flush=True)


async def pipeline(renderer: Renderer, provider: PostmarkProvider, n: int,
                   full: bool) -> float:
    """Seconds to render n messages and hand them over in batches of 500."""
    env_tpl = renderer.env.get_template("digest.html")
    t0 = time.perf_counter()
    batch: list[OutgoingMessage] = []
    now = dt.datetime(2026, 1, 1)
    for i in range(n):
        ctx = context(i)
        if full:
            r = renderer.render("digest", ctx)
            subject, html, text = r.subject, r.html, r.text
        else:
            subject, html, text = f"Digest for User {i}", env_tpl.render(ctx), ""
        batch.append(build_message(MessageParts(
            row_id=i, kind="campaign", sender="Example <hello@example.com>",
            to=f"user{i}@example.org", subject=subject, html=html, text=text,
            message_id=f"{i}.bench@example.com", date=now,
            unsubscribe_url=f"https://mail.example.com/u/token-{i}")))
        if len(batch) == provider.max_batch:
            results = await provider.send(batch)
            assert all(res.ok for res in results)
            batch = []
    if batch:
        await provider.send(batch)
    return time.perf_counter() - t0


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "digest.html").write_text(textwrap.dedent(TEMPLATE))
        app = Segflow(templates=base)
        app.template("digest", subject="Digest for {{ user.name }}", html="digest.html")
        renderer = Renderer(app)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        provider = PostmarkProvider(ProviderContext("bench", {
            "server_token": "t", "base_url": f"http://127.0.0.1:{server.server_address[1]}"},
            base))
        try:
            await pipeline(renderer, provider, min(n, 500), True)  # warm caches
            jinja_s = await pipeline(renderer, provider, n, False)
            full_s = await pipeline(renderer, provider, n, True)
        finally:
            await provider.aclose()
            server.shutdown()
        emit("rendered_and_sent_per_s", n / full_s, "messages/s", n / jinja_s, TARGET_PER_S)
        # Render cost alone, no MIME and no provider.
        tpl = renderer.env.get_template("digest.html")
        m = min(n, 2000)
        t0 = time.perf_counter()
        for i in range(m):
            tpl.render(context(i))
        jinja_ms = (time.perf_counter() - t0) * 1000 / m
        t0 = time.perf_counter()
        for i in range(m):
            renderer.render("digest", context(i))
        full_ms = (time.perf_counter() - t0) * 1000 / m
        emit("render_cost_per_message", full_ms, "ms", jinja_ms, None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 messages, not 20,000")
    args = parser.parse_args()
    anyio.run(main, 2000 if args.quick else 20000)
    sys.exit(0)
