"""The render pool under faults: a message that hangs, kills or crashes its worker fails
alone, the rest of its batch renders, the pool keeps serving, and close() never waits on a
hung render. Real worker processes throughout; the templates misbehave on purpose."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from delivery_harness import ScriptedProvider, Setup, add_user, make_kernel, message_row, service

from segflowd.app import Segflow
from segflowd.delivery import prepare as prepare_module
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.renderpool import RenderJob, RenderPool, RenderPoolClosed
from segflowd.delivery.templates import Rendered
from segflowd.errors import TemplateError
from segflowd.store import Store

TIMEOUT = 3.0  # seconds: the per-render timeout of these pools (the default is longer)
HUNG = 60  # seconds a hanging template sleeps: far past TIMEOUT, inside pytest's timeout
GUARD = 30.0  # seconds: a hang guard, not a speed assertion

# Templates are trusted code, and Jinja2 reaches Python from them; that is how these hang,
# exit or crash the process that renders them. Each first touches ``user.marker`` (a file
# path), so a test can wait until the render is under way.
_OS = "{% set os = cycler.__init__.__globals__.os %}"
_MARK = ("{% if user.marker %}"
         "{% set _ = os.close(os.open(user.marker, os.O_CREAT + os.O_WRONLY)) %}{% endif %}")
TEMPLATES = {
    "ok": "<p>Hello {{ user.name }}</p>",
    "hang": _OS + _MARK + f"{{{{ os.sys.modules.time.sleep(user.pause or {HUNG}) }}}}",
    "exit": _OS + _MARK + "{{ os._exit(3) }}",
    "raise": "<p>{{ 1 // user.zero }}</p>",
}


def write_templates(app: Segflow, folder: Path) -> None:
    for name, body in TEMPLATES.items():
        (folder / f"{name}.html").write_text(body)
        app.template(name, subject="For {{ user.name }}", html=f"{name}.html")


@pytest.fixture
def app(tmp_path: Path) -> Segflow:
    app = Segflow(templates=tmp_path)
    write_templates(app, tmp_path)
    return app


@pytest.fixture
def pool(app: Segflow) -> Iterator[RenderPool]:
    pool = RenderPool(app, 1, render_timeout=TIMEOUT)  # one worker: every fault in one chunk
    try:
        yield pool
    finally:
        pool.close()


def job(template: str, name: str, **user: object) -> RenderJob:
    return (template, {"user": {"name": name, "marker": "", "pause": 0, "zero": 0, **user}})


class _Segfault:
    """Context data whose unpickling crashes the process reading it (SIGSEGV)."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return ctypes.string_at, (0,)


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + GUARD
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rendered_names(out: list[Rendered | TemplateError]) -> list[str]:
    return [r.subject if isinstance(r, Rendered) else "error" for r in out]


def test_a_hung_render_fails_alone_with_a_timeout_and_the_batch_renders(
        pool: RenderPool) -> None:
    before = pool.worker_pids() or None
    out = pool.render_many([job("ok", "a"), job("hang", "b"), job("ok", "c"), job("ok", "d")])
    assert rendered_names(out) == ["For a", "error", "For c", "For d"]
    assert str(out[1]) == f"template 'hang': render timed out after {TIMEOUT:g} s"
    assert pool.statistics().timeouts == 1
    assert pool.worker_pids() != before  # the hung worker was killed and replaced
    assert rendered_names(pool.render_many([job("ok", "e")])) == ["For e"]


def test_a_message_that_kills_its_worker_fails_alone_and_the_pool_serves_on(
        pool: RenderPool) -> None:
    out = pool.render_many([job("ok", "a"), job("exit", "b"), job("ok", "c")])
    assert rendered_names(out) == ["For a", "error", "For c"]
    assert str(out[1]) == ("template 'exit': the render worker died rendering this "
                           "message (exit code 3)")
    stats = pool.statistics()
    assert (stats.crashes, stats.fallbacks) == (1, 0)
    assert stats.restarts == 2  # rendered once more, alone, before it was failed
    assert len(pool.worker_pids()) == 1
    assert rendered_names(pool.render_many([job("ok", "d")])) == ["For d"]


def test_data_that_crashes_the_worker_fails_only_its_message(pool: RenderPool) -> None:
    out = pool.render_many([job("ok", "a"), job("ok", "b", crash=_Segfault()),
                            job("ok", "c")])
    assert rendered_names(out) == ["For a", "error", "For c"]
    assert "the render worker died rendering this message (killed by signal SIGSEGV)" in str(
        out[1])


def test_every_fault_in_one_batch_on_two_workers(app: Segflow) -> None:
    pool = RenderPool(app, 2, render_timeout=TIMEOUT)
    try:
        batch = [job("ok", f"u{i}") for i in range(12)]
        batch[2] = job("hang", "h")
        batch[5] = job("exit", "x")
        batch[7] = job("raise", "r")
        out = pool.render_many(batch)
        assert [i for i, r in enumerate(out) if not isinstance(r, Rendered)] == [2, 5, 7]
        assert "render timed out after" in str(out[2])
        assert "render worker died" in str(out[5])
        assert "ZeroDivisionError" in str(out[7])
        assert all(r.subject == f"For u{i}" for i, r in enumerate(out)
                   if isinstance(r, Rendered))
        assert len(pool.worker_pids()) == 2
    finally:
        pool.close()


def test_a_worker_killed_from_outside_fails_no_message(
        app: Segflow, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Killed mid-render (an operator, the OOM killer): the message renders again, alone."""
    pool = RenderPool(app, 1)  # the default timeout: longer than the pause
    request.addfinalizer(pool.close)
    pool.render_many([job("ok", "warm")])
    marker = tmp_path / "started"
    results: list[list[Rendered | TemplateError]] = []
    worker = threading.Thread(target=lambda: results.append(pool.render_many(
        [job("ok", "a"), job("hang", "b", marker=str(marker), pause=TIMEOUT), job("ok", "c")])))
    worker.start()
    wait_for(marker)
    [pid] = pool.worker_pids()
    os.kill(pid, signal.SIGKILL)
    worker.join(GUARD)
    assert not worker.is_alive()
    [out] = results
    assert rendered_names(out) == ["For a", "For b", "For c"]
    assert pool.statistics().crashes == 0


def test_an_idle_worker_that_died_is_replaced_and_the_batch_renders(pool: RenderPool) -> None:
    pool.render_many([job("ok", "warm")])
    [pid] = pool.worker_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + GUARD
    while alive(pid):  # until the kill has landed: the worker is dead while idle
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert rendered_names(pool.render_many([job("ok", "a"), job("ok", "b")])) == [
        "For a", "For b"]
    assert pool.worker_pids() != [pid]


def test_close_returns_while_a_render_hangs(app: Segflow, tmp_path: Path) -> None:
    pool = RenderPool(app, 1, render_timeout=10 * HUNG)  # the timeout will not save it
    marker = tmp_path / "started"
    errors: list[BaseException] = []

    def render() -> None:
        try:
            pool.render_many([job("hang", "h", marker=str(marker))])
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=render)
    worker.start()
    wait_for(marker)
    [pid] = pool.worker_pids()
    closer = threading.Thread(target=pool.close)
    closer.start()
    closer.join(GUARD)
    assert not closer.is_alive(), "close() waited on a hung render"
    worker.join(GUARD)
    assert not worker.is_alive()
    assert [type(e) for e in errors] == [RenderPoolClosed]
    assert not alive(pid)
    assert pool.worker_pids() == []
    with pytest.raises(RenderPoolClosed):
        pool.render_many([job("ok", "late")])


# -- through delivery: the outbox row of the offending message fails, the rest go out --

def delivery_setup(store: Store, tmp_path: Path) -> Setup:
    setup = make_kernel(store, tmp_path, options="render_processes = 1")
    write_templates(setup.kernel.app, setup.kernel.app.templates_dir)
    return setup


async def queue(setup: Setup, template: str, user: str) -> int:
    async with setup.kernel.store.begin() as conn:
        mid = await enqueue(conn, kind="transaction", template=template,
                            now=setup.clock.now(), user_id=user, dedupe_key=None,
                            to_address=None, data={}, campaign=None)
    assert mid is not None
    return mid


@pytest.mark.anyio
async def test_delivery_fails_the_messages_that_hang_or_kill_and_sends_the_rest(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def in_this_process(*args: object) -> object:
        raise AssertionError("a batch was rendered in the daemon's process")

    monkeypatch.setattr(prepare_module, "render_jobs", in_this_process)
    setup = delivery_setup(store, tmp_path)
    for uid in ("u1", "u2", "u3", "u4"):
        await add_user(setup.kernel.store, uid, f"{uid}@example.org", name=uid.upper(),
                       marker="", pause=0, zero=0)
    provider = ScriptedProvider()
    svc = service(setup, provider)
    assert svc.render_pool is not None
    svc.render_pool.render_timeout = TIMEOUT
    try:
        ok = await queue(setup, "ok", "u1")
        hang = await queue(setup, "hang", "u2")
        dies = await queue(setup, "exit", "u3")
        ok2 = await queue(setup, "ok", "u4")
        with anyio.fail_after(GUARD * 2):
            assert await svc.run_once() == 4
    finally:
        await anyio.to_thread.run_sync(svc.render_pool.close)
    assert sorted(m.id for m in provider.sent) == [ok, ok2]
    for mid, error in ((hang, f"render timed out after {TIMEOUT:g} s"),
                       (dies, "the render worker died rendering this message")):
        row = await message_row(setup.kernel.store, mid)
        assert row["status"] == "failed"
        assert error in row["last_error"]
        assert row["attempts"] == 1  # failed at once, not retried


@pytest.mark.anyio
async def test_stopping_delivery_does_not_wait_on_a_hung_render(
        store: Store, tmp_path: Path) -> None:
    setup = delivery_setup(store, tmp_path)
    marker = tmp_path / "started"
    await add_user(setup.kernel.store, "u1", "u1@example.org", name="U1", marker=str(marker),
                   pause=0, zero=0)
    provider = ScriptedProvider()
    svc = service(setup, provider)
    assert svc.render_pool is not None
    svc.render_pool.render_timeout = 10 * HUNG  # the timeout will not save it
    mid = await queue(setup, "hang", "u1")
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(svc.run)
            svc.wake()
            await anyio.to_thread.run_sync(wait_for, marker)
            [pid] = svc.render_pool.worker_pids()
            tg.cancel_scope.cancel()  # a drain cut short, as the daemon does
    assert not alive(pid)
    assert svc.render_pool.worker_pids() == []
    assert provider.sent == []
    row = await message_row(setup.kernel.store, mid)
    assert row["status"] == "queued"  # queued again, not failed: the daemon stopped
