"""Rendering on worker processes, so more than one core renders email.

Rendering (Jinja2, css-inline, the text part) is CPU work that holds the GIL, so threads
cannot spread it. A :class:`RenderPool` keeps ``processes`` worker processes, each with
its own :class:`~segflowd.delivery.templates.Renderer` over the app's templates (the folder and
the template definitions; no Python code of the app runs there). Delivery hands it a
batch of (template, context) jobs and gets back, in order, a
:class:`~segflowd.delivery.templates.Rendered` or the :class:`~segflowd.errors.TemplateError`
each job raised: the same results as rendering in the daemon's process.

The pool lives and dies with the delivery service (``start`` in ``run``, ``close`` in
its ``finally``). Workers are started with ``spawn`` (a fresh interpreter, nothing
inherited from a process that runs threads and an event loop), ignore SIGINT/SIGTERM
(the daemon drains first, then stops them) and exit within ``PARENT_CHECK`` seconds of
the daemon's death. A pool that breaks (a worker killed) or a context that cannot be
pickled makes :meth:`render_many` raise :class:`RenderPoolError`; delivery then renders
that batch itself, and a broken pool is replaced at the next batch.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..app import Segflow, TemplateDef
from ..errors import SegflowError, TemplateError
from .templates import Rendered, Renderer

__all__ = ["PARENT_CHECK", "RenderJob", "RenderPool", "RenderPoolError", "RenderResult",
           "render_jobs", "worker_renderer"]

RenderJob = tuple[str, Mapping[str, object]]  # template name, context
RenderResult = Rendered | TemplateError
CHUNK = 50  # jobs per task sent to a worker: big enough to amortise pickling
PARENT_CHECK = 1.0  # seconds between a worker's checks that its daemon still lives

_renderer: Renderer | None = None  # in a worker process: its own renderer


class RenderPoolError(SegflowError):
    """The pool could not render a batch (a worker died, a context did not pickle)."""


def _start_worker(templates_dir: str, defs: list[TemplateDef]) -> None:
    global _renderer
    # Ctrl-C and systemd's SIGTERM reach the whole process group: the daemon drains and
    # then stops its workers itself; a worker whose daemon was killed stops on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                     name="segflow-render-parent-watch").start()
    app = Segflow(templates=Path(templates_dir))
    app.templates.update({d.name: d for d in defs})
    _renderer = Renderer(app)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK)
    os._exit(0)


def worker_renderer() -> Renderer:
    """In a worker process, its renderer (for a task given to :meth:`RenderPool.map`)."""
    if _renderer is None:
        raise RuntimeError("not in a render worker process")
    return _renderer


def _render_chunk(jobs: Sequence[RenderJob]) -> list[RenderResult]:
    return render_jobs(worker_renderer(), jobs)


def render_jobs(renderer: Renderer, jobs: Sequence[RenderJob]) -> list[RenderResult]:
    """Each job rendered, or the :class:`TemplateError` it raised, in order."""
    out: list[RenderResult] = []
    for name, context in jobs:
        try:
            out.append(renderer.render(name, context))
        except TemplateError as exc:
            out.append(exc)
    return out


class RenderPool:
    """``processes`` worker processes rendering the app's templates."""

    def __init__(self, app: Segflow, processes: int) -> None:
        if processes < 1:
            raise ValueError("a render pool needs at least one process")
        self.processes = processes
        self._init_args = (str(app.templates_dir), list(app.templates.values()))
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.batches = 0  # batches rendered by the workers
        self.fallbacks = 0  # batches the pool refused (the caller rendered them)
        self.restarts = 0  # pools replaced after a worker died

    def start(self) -> None:
        """Start the worker processes (in the background: the first batch waits for them)."""
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker, initargs=self._init_args)
                # One no-op per worker now, so processes spawn while nothing waits.
                for _ in range(self.processes):
                    self._executor.submit(int)

    def _pool(self) -> Executor:
        self.start()
        assert self._executor is not None
        return self._executor

    def map(self, fn: Callable[[Sequence[RenderJob]], list[RenderResult]],
            jobs: Sequence[RenderJob]) -> list[RenderResult]:
        """``fn`` over chunks of ``jobs`` on the workers, results in order (blocking)."""
        if not jobs:
            return []
        size = max(1, min(CHUNK, -(-len(jobs) // self.processes)))
        try:
            futures = [self._pool().submit(fn, jobs[i:i + size])
                       for i in range(0, len(jobs), size)]
            results = [r for f in futures for r in f.result()]
        except BrokenProcessPool as exc:  # a worker died: the next batch gets a new pool
            self._discard()
            raise RenderPoolError(f"render pool: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # a context that does not pickle: the caller renders it
            self.fallbacks += 1
            raise RenderPoolError(f"render pool: {type(exc).__name__}: {exc}") from exc
        self.batches += 1
        return results

    def render_many(self, jobs: Sequence[RenderJob]) -> list[RenderResult]:
        """Each job's :class:`Rendered` or :class:`TemplateError`, in order (blocking)."""
        return self.map(_render_chunk, jobs)

    def _discard(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        self.fallbacks += 1
        self.restarts += 1
        if executor is not None:  # a broken pool is replaced at the next batch
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers; waits for the batch in progress (blocking)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
