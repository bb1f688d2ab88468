"""Rendering on worker processes, so more than one core renders email.

Rendering (Jinja2, css-inline, the text part) is CPU work that holds the GIL, so threads
cannot spread it. A :class:`RenderPool` keeps ``processes`` worker processes, each with
its own :class:`~segflowd.delivery.templates.Renderer` over the app's templates (the folder and
the template definitions; no Python code of the app runs there). Delivery hands it a
batch of (template, context) jobs and gets back, in order, a
:class:`~segflowd.delivery.templates.Rendered` or the :class:`~segflowd.errors.TemplateError`
each job raised: the same results as rendering in the daemon's process.

One message cannot take the batch, the pool or the daemon down with it. A worker answers
message by message, so the pool knows which message each worker is on:

- a message that renders for longer than ``render_timeout`` (:data:`RENDER_TIMEOUT`)
  seconds fails with ``render timed out after N s``; its worker is killed and replaced;
- a worker that dies (killed, ``os._exit``, a crash in C code) has the message it was on
  rendered once more, alone, in a fresh worker; if that kills its worker too the message
  fails (``the render worker died rendering this message``). Such a message is never
  rendered in the daemon's own process.

The rest of the batch renders either way. :meth:`RenderPool.render_many` raises
:class:`RenderPoolError` only when nothing went wrong with a message (a context that
cannot be pickled, workers that cannot start): delivery renders that batch itself; but
:class:`RenderPoolRetry` when a message of the batch had hung or killed a worker first:
the batch is queued again, never rendered in the daemon. A worker that cannot be
replaced (fork refused) leaves the pool short until a later batch starts one.

Workers are started with ``spawn`` (nothing inherited from a process that runs threads
and an event loop), ignore SIGINT/SIGTERM and exit within ``PARENT_CHECK`` seconds of
the daemon's death. :meth:`RenderPool.close` returns within ``CLOSE_GRACE`` seconds: a
worker still rendering is killed, a batch still waiting gets :class:`RenderPoolClosed`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import multiprocessing
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import structlog

from ..app import Segflow, TemplateDef
from ..errors import SegflowError, TemplateError
from .renderworker import (
    PARENT_CHECK,
    RenderJob,
    RenderResult,
    _render_chunk,
    _serve,
    render_jobs,
    worker_renderer,
)

__all__ = ["CLOSE_GRACE", "PARENT_CHECK", "RENDER_TIMEOUT", "RenderJob", "RenderPool",
           "RenderPoolClosed", "RenderPoolError", "RenderPoolRetry", "RenderPoolStatistics",
           "RenderResult", "render_jobs", "worker_renderer"]

log = structlog.get_logger("segflowd.delivery")

CHUNK = 50  # jobs per task sent to a worker: big enough to amortise the round trips
RENDER_TIMEOUT = 30.0  # seconds one message may render before it fails and its worker dies
START_TIMEOUT = 60.0  # seconds a new worker may take to start (imports, the templates)
START_RETRIES = 2  # workers a batch replaces when they die starting, before giving up
CLOSE_GRACE = 5.0  # seconds close() gives idle workers to exit before it kills them
KILL_WAIT = 5.0  # seconds to reap a killed worker (SIGKILL: at once in practice)

class RenderPoolError(SegflowError):
    """The pool could not render a batch (a context did not pickle, workers did not start)."""


class RenderPoolRetry(RenderPoolError):
    """The pool gave up on a batch that is no message's fault, after a message of it hung
    or killed its worker: the batch goes back to the queue, and is never rendered in the
    daemon's own process (that message may kill or hang it)."""


class RenderPoolClosed(RenderPoolRetry):
    """The pool was closed before the batch was rendered (the daemon is stopping)."""


@dataclasses.dataclass(frozen=True)
class RenderPoolStatistics:
    processes: int
    batches: int  # batches rendered by the workers
    fallbacks: int  # batches the pool refused (the caller rendered them)
    restarts: int  # workers replaced (died, killed on a timeout)
    timeouts: int  # messages failed for rendering longer than the timeout
    crashes: int  # messages failed for killing their worker twice


class _Worker:
    def __init__(self, init_args: tuple[str, list[TemplateDef]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(
            target=_serve, args=(child, *init_args), name="segflow-render")
        self.process.start()
        child.close()  # so the worker's death reads as end-of-file here
        self.ready = False

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()  # SIGTERM is ignored by design
        self.process.join(KILL_WAIT)

    def death(self) -> str:
        self.process.join(KILL_WAIT)
        code = self.process.exitcode
        if code is None:
            return "its pipe closed"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"


@dataclasses.dataclass
class _Task:
    jobs: list[int]  # indices into the batch
    alone: bool = False  # re-run alone after its worker died: a second death fails it
    pos: int = 0  # the job the worker is on
    deadline: float = 0.0


_pools: weakref.WeakSet[RenderPool] = weakref.WeakSet()


@atexit.register
def _close_pools() -> None:  # before multiprocessing joins its children (LIFO): never waits
    for pool in list(_pools):
        pool.close()


class RenderPool:
    """``processes`` worker processes rendering the app's templates.

    ``render_many`` and ``map`` may be called from several threads at once; each batch
    takes the workers that are free. ``render_timeout`` is seconds per message.
    """

    def __init__(self, app: Segflow, processes: int, *,
                 render_timeout: float = RENDER_TIMEOUT) -> None:
        if processes < 1:
            raise ValueError("a render pool needs at least one process")
        if render_timeout <= 0:
            raise ValueError("a render timeout must be positive")
        self.processes = processes
        self.render_timeout = render_timeout
        self._init_args = (str(app.templates_dir), list(app.templates.values()))
        self._cond = threading.Condition()
        self._workers: set[_Worker] = set()
        self._idle: list[_Worker] = []
        self._closed = False
        self.batches = 0  # batches rendered by the workers
        self.fallbacks = 0  # batches the pool refused (the caller rendered them)
        self.restarts = 0  # workers replaced after they died or were killed
        self.timeouts = 0
        self.crashes = 0
        _pools.add(self)

    def statistics(self) -> RenderPoolStatistics:
        return RenderPoolStatistics(self.processes, self.batches, self.fallbacks,
                                    self.restarts, self.timeouts, self.crashes)

    def worker_pids(self) -> list[int]:
        """The process ids of the current workers."""
        with self._cond:
            return sorted(w.process.pid for w in self._workers if w.process.pid is not None)

    def start(self) -> None:
        """Start the worker processes (they load in the background; a batch waits for them).

        After :meth:`close`, starts the pool again."""
        with self._cond:
            self._closed = False
            while len(self._workers) < self.processes:
                self._spawn()

    def _spawn(self) -> None:  # with self._cond held
        worker = _Worker(self._init_args)
        self._workers.add(worker)
        self._idle.append(worker)
        self._cond.notify()

    def _checkout(self, block: bool) -> _Worker | None:
        with self._cond:
            while True:
                if self._closed:
                    raise RenderPoolClosed("render pool: closed")
                if len(self._workers) < self.processes:  # first use, or a spawn failed
                    try:
                        while len(self._workers) < self.processes:
                            self._spawn()
                    except OSError as exc:  # fork refused (EAGAIN, ENOMEM, EMFILE)
                        if not self._workers:
                            raise RenderPoolError(
                                f"render pool: no worker can be started: {exc}") from exc
                        log.warning("render_pool.spawn_failed", error=str(exc),
                                    workers=len(self._workers))
                if self._idle:
                    worker = self._idle.pop()
                    if worker.process.exitcode is None:
                        return worker
                    self._replace(worker)  # died while idle: not a message's fault
                    continue
                if not block:
                    return None
                self._cond.wait()

    def _checkin(self, worker: _Worker) -> None:
        with self._cond:
            if worker in self._workers and not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
        worker.kill()
        worker.conn.close()

    def _retire(self, worker: _Worker) -> None:
        """Kill a worker this thread holds and start another in its place."""
        worker.kill()
        worker.conn.close()
        with self._cond:
            if worker in self._workers:
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:  # with self._cond held
        self._workers.discard(worker)
        if not self._closed:
            self.restarts += 1
            try:
                self._spawn()
            except OSError as exc:  # the next checkout tries again; no batch fails for it
                log.warning("render_pool.spawn_failed", error=str(exc),
                            workers=len(self._workers))

    def map(self, fn: Callable[[Sequence[RenderJob]], list[RenderResult]],
            jobs: Sequence[RenderJob]) -> list[RenderResult]:
        """``fn`` over ``jobs`` on the workers, results in order (blocking).

        ``fn`` gets a list of one job and returns a list of one result; it must be
        importable by a worker (a module-level function).
        """
        if not jobs:
            return []
        try:
            blobs = [pickle.dumps(job, pickle.HIGHEST_PROTOCOL) for job in jobs]
            pickle.dumps(fn)
        except Exception as exc:  # nothing was sent: the caller renders this batch itself
            self.fallbacks += 1
            raise RenderPoolError(f"render pool: {type(exc).__name__}: {exc}") from exc
        size = max(1, min(CHUNK, -(-len(jobs) // self.processes)))
        pending = deque(_Task(list(range(i, min(i + size, len(jobs)))))
                        for i in range(0, len(jobs), size))
        results: list[RenderResult | None] = [None] * len(jobs)
        active: dict[Connection, tuple[_Worker, _Task]] = {}
        batch = _Batch(self, fn, jobs, blobs, pending, results, active)
        try:
            batch.run()
        except BaseException as exc:
            for worker, _ in active.values():  # their answers would reach the next batch
                with contextlib.suppress(Exception):  # each one, whatever another does
                    self._retire(worker)
            if batch.tainted and isinstance(exc, RenderPoolError) and not isinstance(
                    exc, RenderPoolRetry):
                raise RenderPoolRetry(f"{exc} (after a message of the batch hung or killed "
                                      "its worker: the batch is queued again)") from exc
            raise
        self.batches += 1
        done = [r for r in results if r is not None]
        assert len(done) == len(jobs)  # every job answered, failed or timed out
        return done

    def render_many(self, jobs: Sequence[RenderJob]) -> list[RenderResult]:
        """Each job's :class:`Rendered` or :class:`TemplateError`, in order (blocking)."""
        return self.map(_render_chunk, jobs)

    def close(self) -> None:
        """Stop the workers, killing any still rendering; returns within ``CLOSE_GRACE`` s.

        A batch still in progress gets :class:`RenderPoolClosed`. Safe to call twice.
        """
        with self._cond:
            self._closed = True
            workers, self._workers = list(self._workers), set()
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            with contextlib.suppress(OSError):  # already dead
                worker.conn.send(None)
        deadline = time.monotonic() + CLOSE_GRACE
        for worker in idle:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            worker.conn.close()
        # A worker that is busy is killed; the thread waiting on it sees it die and
        # closes its pipe (closing it here could pull it from under that thread).
        for worker in workers:
            worker.kill()


class _Batch:
    """One call of :meth:`RenderPool.map`: hands tasks to free workers, reads the answers."""

    def __init__(self, pool: RenderPool, fn: Callable[[Sequence[RenderJob]], list[RenderResult]],
                 jobs: Sequence[RenderJob], blobs: list[bytes], pending: deque[_Task],
                 results: list[RenderResult | None],
                 active: dict[Connection, tuple[_Worker, _Task]]) -> None:
        self.pool, self.fn, self.jobs, self.blobs = pool, fn, jobs, blobs
        self.pending, self.results, self.active = pending, results, active
        self.start_failures = 0
        self.tainted = False  # a message hung or killed its worker: never render in-process

    def run(self) -> None:
        while self.pending or self.active:
            while self.pending:
                worker = self.pool._checkout(block=not self.active)
                if worker is None:
                    break
                self._hand(worker, self.pending.popleft())
            if not self.active:
                continue
            now = time.monotonic()
            timeout = max(0.0, min(t.deadline for _, t in self.active.values()) - now)
            for conn in wait(list(self.active), timeout):
                assert isinstance(conn, Connection)
                self._read(conn)
            now = time.monotonic()
            for conn, (worker, task) in list(self.active.items()):
                if task.deadline <= now:
                    del self.active[conn]
                    self._timed_out(worker, task)

    def _hand(self, worker: _Worker, task: _Task) -> None:
        self.active[worker.conn] = (worker, task)
        if not worker.ready:  # sent once the worker says it is ready
            task.deadline = time.monotonic() + START_TIMEOUT
            return
        try:
            worker.conn.send((self.fn, [self.blobs[i] for i in task.jobs[task.pos:]]))
        except OSError:  # died while idle: the task waits for another worker
            del self.active[worker.conn]
            self.pending.appendleft(task)
            self.pool._retire(worker)
            return
        task.deadline = time.monotonic() + self.pool.render_timeout

    def _read(self, conn: Connection) -> None:
        worker, task = self.active[conn]
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            del self.active[conn]
            self._died(worker, task)
            return
        except Exception as exc:  # an answer that does not unpickle here
            reply = ("error", f"the result cannot be read: {type(exc).__name__}: {exc}")
        if reply[0] == "ready":
            worker.ready = True
            self._hand(worker, task)
            return
        if reply[0] == "broken":
            del self.active[conn]
            self.pool._retire(worker)
            self.pool.fallbacks += 1
            raise RenderPoolError(f"render pool: a worker could not start: {reply[1]}")
        index = task.jobs[task.pos]
        if reply[0] == "done":
            self.results[index] = reply[1]
        else:
            self.results[index] = TemplateError(f"{self._where(index)}: {reply[1]}")
        task.pos += 1
        task.deadline = time.monotonic() + self.pool.render_timeout
        if task.pos == len(task.jobs):
            del self.active[conn]
            self.pool._checkin(worker)

    def _where(self, index: int) -> str:
        return f"template {self.jobs[index][0]!r}"

    def _rest(self, task: _Task) -> None:
        rest = task.jobs[task.pos + 1:]
        if rest:
            self.pending.appendleft(_Task(rest))

    def _start_failed(self, worker: _Worker, what: str) -> None:
        self.pool._retire(worker)
        self.start_failures += 1
        if self.start_failures > START_RETRIES:
            self.pool.fallbacks += 1
            raise RenderPoolError(f"render pool: workers do not start ({what})")

    def _lost(self, worker: _Worker, task: _Task, starting: str) -> int | None:
        """A worker that died or overran on ``task``: retired, the rest of the task queued
        again; the job it was on, or None when it never started (``starting`` says how:
        the whole task waits for another worker)."""
        if not worker.ready:
            self.pending.appendleft(task)
            self._start_failed(worker, starting)
            return None
        self.tainted = True
        self.pool._retire(worker)
        index = task.jobs[task.pos]
        self._rest(task)
        return index

    def _died(self, worker: _Worker, task: _Task) -> None:
        how = worker.death()
        if self.pool._closed:
            self.pool._retire(worker)
            raise RenderPoolClosed("render pool: closed while rendering")
        index = self._lost(worker, task, f"one died starting: {how}")
        if index is None:
            return
        if not task.alone:  # maybe not this message's doing (the OOM killer, an operator)
            log.warning("render_pool.worker_died", template=self.jobs[index][0], death=how)
            self.pending.appendleft(_Task([index], alone=True))
            return
        self.pool.crashes += 1
        log.warning("render_pool.message_failed", template=self.jobs[index][0], death=how)
        self.results[index] = TemplateError(
            f"{self._where(index)}: the render worker died rendering this message ({how})")

    def _timed_out(self, worker: _Worker, task: _Task) -> None:
        index = self._lost(worker, task, f"one did not start within {START_TIMEOUT:g} s")
        if index is None:
            return
        self.pool.timeouts += 1
        log.warning("render_pool.message_timeout", template=self.jobs[index][0],
                    timeout=self.pool.render_timeout)
        self.results[index] = TemplateError(
            f"{self._where(index)}: render timed out after {self.pool.render_timeout:g} s")
