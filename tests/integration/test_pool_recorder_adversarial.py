"""The render pool and the engagement recorder under an adversary's scenarios; each test
failed on the first version of the code (render pool 65835e3, recorder 24168dc):

- a worker that cannot be replaced (fork/spawn refused: EAGAIN, ENOMEM, EMFILE) is an
  OSError out of ``render_many``: delivery fails every message of the batch, and the
  workers the batch still held are left checked out, so the next batch waits forever;
- a pool refusing a batch after one of its messages killed a worker makes delivery render
  the whole batch in the daemon's process, the killing message included;
- on MariaDB (READ COMMITTED), a forget that commits while the recorder writes leaves an
  engagement row naming the forgotten user and their link.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import threading
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from delivery_harness import ScriptedProvider, add_user, message_row, service
from test_renderpool_faults import GUARD, TIMEOUT, delivery_setup, job, queue, write_templates
from test_tracking_edge import environment

from segflowd.app import Segflow, TemplateDef
from segflowd.delivery import prepare as prepare_module
from segflowd.delivery import renderpool
from segflowd.delivery import tracking as tracking_module
from segflowd.delivery.renderpool import RenderPool
from segflowd.delivery.templates import Rendered
from segflowd.delivery.tracking import Hit
from segflowd.errors import TemplateError
from segflowd.ingest.users import forget
from segflowd.schema import engagement
from segflowd.store import Store


class _Spawns:
    """``renderpool._Worker`` that starts ``allowed`` real workers, then ``fail`` says what."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.made = 0
        self.refuse = True
        self.real = renderpool._Worker

    def __call__(self, init_args: tuple[str, list[TemplateDef]]) -> renderpool._Worker:
        if self.made >= self.allowed and self.refuse:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable (fork)")
        self.made += 1
        return self.real(init_args)


class _DiesStarting(renderpool._Worker):
    """A worker whose process exits before it says it is ready."""

    def __init__(self, init_args: tuple[str, list[TemplateDef]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=os._exit, args=(1,), name="segflow-render")
        self.process.start()
        child.close()
        self.ready = False


async def _users(setup: object, *uids: str) -> None:
    for uid in uids:
        await add_user(setup.kernel.store, uid, f"{uid}@example.org",  # type: ignore[attr-defined]
                       name=uid.upper(), marker="", pause=0, zero=0)


@pytest.mark.anyio
async def test_a_worker_that_cannot_be_replaced_does_not_fail_the_innocent_messages(
        sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung message times out; its replacement cannot be spawned (EAGAIN). The hung
    message may fail, but the two good ones were not at fault: sent or queued again,
    never ``failed`` for good."""
    store = Store.open(sqlite_url)
    await store.migrate()
    try:
        setup = delivery_setup(store, tmp_path)
        await _users(setup, "u1", "u2", "u3")
        provider = ScriptedProvider()
        svc = service(setup, provider)
        assert svc.render_pool is not None
        svc.render_pool.render_timeout = TIMEOUT
        monkeypatch.setattr(renderpool, "_Worker", _Spawns(allowed=1))
        ok = await queue(setup, "ok", "u1")
        hang = await queue(setup, "hang", "u2")
        ok2 = await queue(setup, "ok", "u3")
        try:
            with anyio.fail_after(GUARD * 2):
                assert await svc.run_once() == 3
        finally:
            await anyio.to_thread.run_sync(svc.render_pool.close)
        for mid in (ok, ok2):
            row = await message_row(store, mid)
            assert row["status"] != "failed", (mid, row["last_error"])
        assert (await message_row(store, hang))["status"] in ("failed", "queued")
    finally:
        await store.close()


def test_a_spawn_failure_mid_batch_does_not_wedge_the_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three workers each on a hung message; the first replacement cannot be spawned.
    Once spawning works again, the next batch renders: no worker is left checked out of
    the pool for ever (which blocks every later batch in ``_checkout``)."""
    app = Segflow(templates=tmp_path)
    write_templates(app, tmp_path)
    spawns = _Spawns(allowed=3)
    monkeypatch.setattr(renderpool, "_Worker", spawns)
    pool = RenderPool(app, 3, render_timeout=TIMEOUT)
    try:
        with contextlib.suppress(OSError):  # today it raises; failing the messages is fine too
            pool.render_many([job("hang", "a"), job("hang", "b"), job("hang", "c")])
        spawns.refuse = False  # the resources are back
        out: list[list[Rendered | TemplateError]] = []

        def render() -> None:
            # RenderPoolClosed: still waiting when close() below woke it
            with contextlib.suppress(renderpool.RenderPoolClosed):
                out.append(pool.render_many([job("ok", "d")]))

        worker = threading.Thread(target=render, daemon=True)
        worker.start()
        worker.join(GUARD)
        assert not worker.is_alive(), "the next batch waits for ever on a leaked worker"
        assert [r.subject for r in out[0] if isinstance(r, Rendered)] == ["For d"]
    finally:
        pool.close()


@pytest.mark.anyio
async def test_a_message_that_killed_its_worker_is_never_rendered_in_the_daemon(
        sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The message kills its worker; the replacements die starting (memory pressure, a
    broken install), so the pool refuses the batch. Delivery must not then render the
    killing message in its own process (it would kill the daemon)."""
    store = Store.open(sqlite_url)
    await store.migrate()
    try:
        setup = delivery_setup(store, tmp_path)
        await _users(setup, "u1", "u2")
        in_daemon: list[str] = []

        def render_here(renderer: object, jobs: list[tuple[str, object]]) -> list[object]:
            in_daemon.extend(name for name, _ in jobs)
            return [TemplateError("not rendered in this test") for _ in jobs]

        monkeypatch.setattr(prepare_module, "render_jobs", render_here)
        provider = ScriptedProvider()
        svc = service(setup, provider)
        assert svc.render_pool is not None
        svc.render_pool.render_timeout = TIMEOUT
        real = renderpool._Worker
        made: list[int] = []

        def worker(init_args: tuple[str, list[TemplateDef]]) -> renderpool._Worker:
            made.append(1)
            return real(init_args) if len(made) == 1 else _DiesStarting(init_args)

        monkeypatch.setattr(renderpool, "_Worker", worker)
        await queue(setup, "exit", "u1")
        await queue(setup, "ok", "u2")
        try:
            with anyio.fail_after(GUARD * 2):
                assert await svc.run_once() == 2
        finally:
            await anyio.to_thread.run_sync(svc.render_pool.close)
        assert "exit" not in in_daemon, in_daemon
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_forget_during_a_flush_leaves_no_engagement_row_naming_the_user(
        mariadb_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder reads the message (user u1), a forget of u1 commits, the recorder
    inserts its row: on MariaDB that row names u1 and keeps the clicked URL."""
    store = Store.open(mariadb_url)
    await store.migrate()
    try:
        async with environment(store, tmp_path) as env:
            mid = await env.send()
            real = tracking_module._upsert
            forgotten: list[bool] = []

            async def forget_u1() -> None:  # another request's transaction
                async with store.begin() as conn:
                    await forget(conn, "u1", env.setup.clock.now())

            async with anyio.create_task_group() as tg:
                async def upsert(*args: object, **kwargs: object) -> None:
                    if not forgotten:  # between the recorder's read and its insert
                        forgotten.append(True)
                        tg.start_soon(forget_u1)
                        await anyio.sleep(0.3)  # it runs now, or waits for our locks
                    await real(*args, **kwargs)  # type: ignore[arg-type]

                monkeypatch.setattr(tracking_module, "_upsert", upsert)
                await env.svc.engagement.record(
                    Hit("click", mid, "https://example.com/?who=ann@example.org", False,
                        env.setup.clock.now()))
            assert forgotten
            e = engagement.c
            async with store.connect() as conn:
                rows = (await conn.execute(sa.select(e.user_id, e.url))).all()
            assert rows, "the hit was not written at all"
            assert all(r.user_id is None and r.url is None for r in rows), rows
    finally:
        await store.close()
