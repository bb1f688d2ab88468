"""GET /metrics of an in-process daemon (real SQLite store, every service) after traffic:
the latency histograms and the process metrics are exposed and their counts move."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import select

from segflowd import Segflow
from segflowd.config import load_config
from segflowd.daemon import Daemon
from segflowd.schema import events, users

pytestmark = pytest.mark.anyio

SECRET = "metrics-test-secret"
METRICS_KEY = "scrape-me"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_app() -> Segflow:
    app = Segflow()

    @app.segment("buyers")
    def buyers():  # type: ignore[no-untyped-def]  # app code, as users write it
        return (select(users.c.id).join(events, events.c.user_id == users.c.id)
                .where(events.c.name == "purchase"))

    @app.campaign("thanks", segments=["buyers"])
    def thanks(ctx, rt):  # type: ignore[no-untyped-def]  # app code, as users write it
        yield rt.wait(seconds=0.2)

    return app


def counts(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every ``_count`` line (histogram observations)."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(\w+_count(?:\{[^}]*\})?) (\S+)$", text, re.M)}


async def test_metrics_expose_histograms_and_process_metrics_that_move(
        tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "segflow.toml"
    path.write_text(f"""
[daemon]
app = "unused.py"
drain_timeout = 5.0
[store]
url = "sqlite+aiosqlite:///var/s.db"
[http]
listen = "127.0.0.1:{port}"
metrics_key = "{METRICS_KEY}"
[[http.keys]]
name = "default"
secret = "{SECRET}"
[email]
from = "Test <test@example.com>"
provider = "outbox"
[providers.outbox]
plugin = "outbox"
path = "var/outbox"
""")
    daemon = Daemon(load_config(path, {}), make_app())
    auth = {"authorization": f"Bearer {METRICS_KEY}"}
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(30):
            while not daemon.statistics().ready:  # noqa: ASYNC110 - readiness is a flag
                await anyio.sleep(0.01)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/metrics")).status_code == 401
                before = (await client.get("/metrics", headers=auth)).text
                for uid in ("u1", "u2"):
                    r = await client.post(f"/v1/users/{uid}/events", json={"name": "purchase"},
                                          headers={"authorization": f"Bearer {SECRET}"})
                    assert r.status_code == 202, r.text
                want = ("segflow_segment_entry_seconds_count",
                        "segflow_flow_step_lateness_seconds_count")
                with anyio.move_on_after(10):  # entries and the waits' timers follow
                    while True:
                        text = (await client.get("/metrics", headers=auth)).text
                        now = counts(text)
                        if all(now.get(name, 0) >= 2 for name in want):
                            break
                        await anyio.sleep(0.05)
        daemon.request_stop()

    was = counts(before)
    assert was.get('segflow_ingest_request_seconds_count{api="native"}', 0) == 0
    assert now.get('segflow_ingest_request_seconds_count{api="native"}') == 2
    assert now.get("segflow_group_commit_seconds_count") == 2
    assert now.get("segflow_segment_entry_seconds_count") == 2
    assert now.get("segflow_flow_step_lateness_seconds_count", 0) >= 2
    for name in ("segflow_ingest_request_seconds", "segflow_group_commit_seconds",
                 "segflow_segment_entry_seconds", "segflow_flow_step_lateness_seconds"):
        assert f"# TYPE {name} histogram\n" in text
        assert re.search(rf'^{name}_bucket\{{(?:.*,)?le="\+Inf"\}} [1-9]', text, re.M), name
        assert re.search(rf"^{name}_sum(?:\{{[^}}]*\}})? \S+$", text, re.M), name
    for name, kind in (("process_cpu_seconds_total", "counter"),
                       ("process_resident_memory_bytes", "gauge"),
                       ("process_virtual_memory_bytes", "gauge"),
                       ("process_open_fds", "gauge"), ("process_max_fds", "gauge"),
                       ("process_start_time_seconds", "gauge")):
        assert f"# TYPE {name} {kind}\n" in text
        value = re.search(rf"^{name} (\S+)$", text, re.M)
        assert value is not None, name
        assert float(value.group(1)) > 0, name
