"""Delivery benchmarks: rendering and handing messages to a batching provider.

    .venv/bin/python bench/delivery.py            # full: 20,000 messages
    .venv/bin/python bench/delivery.py --quick    # 2,000 messages
    .venv/bin/python bench/delivery.py --quick --processes 0   # no render-pool figure

Figures (one JSON line each, baseline measured in the same run):

* ``rendered_and_sent_per_s``: messages rendered (Jinja2 with the component library,
  CSS inlined with css-inline, text part from :mod:`segflowd.delivery.htmltext`), built into MIME
  and handed to the ``postmark`` provider (``/email/batch``, 500 per call) talking to a
  local HTTP server on loopback, all in this process. Target >= 2,000/s. Baseline: the
  same pipeline with Jinja only.
* ``rendered_and_sent_per_cpu_s``: the same two runs per CPU-second of the process.
* ``rendered_and_sent_per_s_poolN``: the same with rendering on a
  :class:`~segflowd.delivery.renderpool.RenderPool` of ``--processes`` workers (delivery's
  ``render_processes``), two batches in flight as two delivery workers would have.
  Baseline: the same pooled pipeline with Jinja only.
* ``render_cost_per_message``: milliseconds to render one message fully (template,
  inlining, text part) against a Jinja-only render of the same template (baseline).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
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
from segflowd.delivery.mime import MessageParts, build_message
from segflowd.delivery.renderpool import RenderJob, RenderPool, RenderResult, worker_renderer
from segflowd.delivery.templates import Rendered, Renderer
from segflowd.providers import OutgoingMessage, ProviderContext

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
                   full: bool) -> tuple[float, float]:
    """Seconds (wall, this process's CPU) to render n messages and hand them over in
    batches of 500."""
    env_tpl = renderer.env.get_template("digest.html")
    t0, c0 = time.perf_counter(), time.process_time()
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
    return time.perf_counter() - t0, time.process_time() - c0


def jinja_chunk(jobs: list[RenderJob]) -> list[RenderResult]:
    """The baseline's work in a pool worker: the Jinja-only render of each job."""
    tpl = worker_renderer().env.get_template("digest.html")
    out: list[RenderResult] = []
    for _, ctx in jobs:
        user = ctx["user"]
        assert isinstance(user, dict)
        out.append(Rendered(subject=f"Digest for {user['name']}", html=tpl.render(ctx), text=""))
    return out


async def pooled(pool: RenderPool, provider: PostmarkProvider, n: int, full: bool) -> float:
    """Seconds for n messages rendered on the pool, two batches of 500 in flight."""
    now = dt.datetime(2026, 1, 1)
    starts = iter(range(0, n, provider.max_batch))

    async def worker() -> None:
        for start in starts:
            jobs: list[RenderJob] = [("digest", context(i))
                                     for i in range(start, min(n, start + provider.max_batch))]
            results = await anyio.to_thread.run_sync(
                pool.render_many if full else functools.partial(pool.map, jinja_chunk), jobs)
            batch = []
            for i, r in enumerate(results, start):
                assert isinstance(r, Rendered)
                batch.append(build_message(MessageParts(
                    row_id=i, kind="campaign", sender="Example <hello@example.com>",
                    to=f"user{i}@example.org", subject=r.subject, html=r.html, text=r.text,
                    message_id=f"{i}.bench@example.com", date=now,
                    unsubscribe_url=f"https://mail.example.com/u/token-{i}")))
            res = await provider.send(batch)
            assert all(x.ok for x in res)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        tg.start_soon(worker)
    return time.perf_counter() - t0


async def main(n: int, processes: int) -> None:
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
        pool = RenderPool(app, max(1, processes))  # workers start only when used
        try:
            await pipeline(renderer, provider, min(n, 500), True)  # warm caches
            jinja_s, jinja_cpu = await pipeline(renderer, provider, n, False)
            full_s, full_cpu = await pipeline(renderer, provider, n, True)
            if processes:
                await pooled(pool, provider, min(n, 1000), True)  # workers started, warm
                pool_jinja_s = await pooled(pool, provider, n, False)
                pool_full_s = await pooled(pool, provider, n, True)
        finally:
            await provider.aclose()
            pool.close()
            server.shutdown()
        emit("rendered_and_sent_per_s", n / full_s, "messages/s", n / jinja_s, TARGET_PER_S)
        # The same runs per CPU-second of this process (the HTTP sink's thread included):
        # steadier than wall time on a machine other work shares.
        emit("rendered_and_sent_per_cpu_s", n / full_cpu, "messages/cpu-s", n / jinja_cpu,
             None)
        if processes:
            emit(f"rendered_and_sent_per_s_pool{processes}", n / pool_full_s, "messages/s",
                 n / pool_jinja_s, TARGET_PER_S)
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
    parser.add_argument("--processes", type=int, default=2,
                        help="render pool workers for the pooled figure (0: skip it)")
    args = parser.parse_args()
    anyio.run(main, 2000 if args.quick else 20000, args.processes)
    sys.exit(0)
