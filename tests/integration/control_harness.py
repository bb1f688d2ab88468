"""A daemon running in-process with only the control socket, and a store with fixed data.

Shared by the control-socket and TUI tests. Data is inserted with Core straight into the
tables the snapshot queries read, so these tests depend on no other engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import anyio
import sqlalchemy as sa

from segflowd import schema
from segflowd.app import Segflow
from segflowd.clock import Clock
from segflowd.config import Config, load_config
from segflowd.control.service import ControlService
from segflowd.daemon import Daemon
from segflowd.kernel import Action
from segflowd.store import Store

T0 = dt.datetime(2026, 3, 1, 9, 0, 0)

app = Segflow()


@app.segment("active", refresh="1h")
def active() -> sa.Select[tuple[str]]:
    return sa.select(schema.users.c.id)


@app.segment("vip")
def vip() -> sa.Select[tuple[str]]:
    return sa.select(schema.users.c.id)


@app.campaign("welcome", segments=["active"])
def welcome(ctx: object, rt: object):  # type: ignore[no-untyped-def]
    yield None


@contextlib.contextmanager
def short_tmp() -> Iterator[Path]:
    """A short folder: unix socket paths are limited to ~107 bytes."""
    d = tempfile.mkdtemp(prefix="sfc", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_config(folder: Path, store_url: str, **daemon: object) -> Config:
    path = folder / "segflow.toml"
    path.write_text(f"""
[daemon]
app = "app.py:app"
control_socket = "ctl.sock"
[store]
url = "{store_url}"
[http]
listen = "127.0.0.1:18999"
[email]
provider = "outbox"
[providers.outbox]
plugin = "outbox"
""")
    config = load_config(path, environ={})
    http = dataclasses.replace(config.http, listen="127.0.0.1:0")
    return dataclasses.replace(config, http=http,
                               daemon=dataclasses.replace(config.daemon, **daemon))


@contextlib.asynccontextmanager
async def running_daemon(config: Config, *, actions: Mapping[str, Action] | None = None,
                         clock: Clock | None = None, stream_buffer: int | None = None,
                         ) -> AsyncIterator[Daemon]:
    """The daemon with only the ControlService, ready; stopped (gracefully) on exit."""
    daemon = Daemon(config, app, clock=clock, services=[])
    kw = {} if stream_buffer is None else {"stream_buffer": stream_buffer}
    daemon.services = [ControlService(daemon.kernel, **kw)]  # type: ignore[arg-type]
    daemon.kernel.actions.update(actions or {})
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(30):
            while not daemon.statistics().ready:  # noqa: ASYNC110 - the daemon has no ready event
                await anyio.sleep(0.01)
        try:
            yield daemon
        finally:
            daemon.request_stop()


async def seed(store: Store) -> None:
    """Three users, two campaigns' instances with journals, messages, segment state."""
    s = schema
    async with store.begin() as conn:
        await conn.execute(sa.insert(s.users), [
            {"id": "u1", "email": "ann@example.com", "attributes": {"plan": "pro", "name": "Ann"},
             "created_at": T0, "updated_at": T0},
            {"id": "u2", "email": "bob@example.com", "attributes": {"plan": "free"},
             "created_at": T0, "updated_at": T0},
            {"id": "u3", "email": "cy@example.com", "attributes": {},
             "created_at": T0, "updated_at": T0},
        ])
        await conn.execute(sa.insert(s.events), [
            {"user_id": "u1", "name": "signed_up", "attributes": {"via": "web"},
             "created_at": T0, "received_at": T0},
        ])
        await conn.execute(sa.insert(s.segment_members), [
            {"segment": "active", "user_id": u, "entered_at": T0, "evaluated_at": T0}
            for u in ("u1", "u2", "u3")
        ] + [{"segment": "vip", "user_id": "u1", "entered_at": T0, "evaluated_at": T0}])
        await conn.execute(sa.insert(s.campaign_settings).values(
            campaign="welcome", paused=True, updated_at=T0))
        await conn.execute(sa.insert(s.segment_state), [
            {"segment": "active", "last_refresh_at": T0,
             "next_refresh_at": T0 + dt.timedelta(hours=1), "size": 3},
        ])
        inst = [
            (1, "u1", "waiting", 1, 2), (2, "u2", "waiting", 1, 1), (3, "u3", "completed", None, 3),
            (4, "u2", "failed", None, 1),
        ]
        await conn.execute(sa.insert(s.flow_instances), [
            {"id": i, "campaign": "welcome" if i < 4 else "winback", "user_id": u,
             "version": "v1", "status": st, "live": live, "seq": n, "created_at": T0,
             "updated_at": T0, "error": "boom: KeyError 'plan'" if st == "failed" else None,
             "ended_at": None if live else T0 + dt.timedelta(hours=2)}
            for i, u, st, live, n in inst
        ])
        steps = [("send_email", "welcome_1"), ("wait", "2d"), ("send_email", "welcome_2")]
        await conn.execute(sa.insert(s.flow_journal), [
            {"instance_id": i, "seq": q, "kind": steps[q][0], "name": steps[q][1],
             "args_hash": "h", "result": None, "created_at": T0 + dt.timedelta(minutes=q)}
            for i, _u, _st, _live, n in inst if i < 4 for q in range(n)
        ])
        for message in [
            {"id": 1, "user_id": "u1", "kind": "campaign", "campaign": "welcome",
             "instance_id": 1, "template": "welcome_1", "to_address": "ann@example.com",
             "status": "sent", "attempts": 1, "created_at": T0, "updated_at": T0,
             "sent_at": T0},
            {"id": 2, "user_id": "u2", "kind": "campaign", "campaign": "welcome",
             "instance_id": 2, "template": "welcome_1", "to_address": "bob@example.com",
             "status": "failed", "attempts": 5, "last_error": "550 mailbox unavailable",
             "created_at": T0 + dt.timedelta(minutes=1), "updated_at": T0},
            {"id": 3, "user_id": "u3", "kind": "transaction", "transaction": "receipt",
             "template": "receipt", "to_address": "cy@example.com", "status": "queued",
             "attempts": 0, "created_at": T0 + dt.timedelta(minutes=2), "updated_at": T0},
        ]:
            await conn.execute(sa.insert(s.messages).values(**message))


def socket_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
