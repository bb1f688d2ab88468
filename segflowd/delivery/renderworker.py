"""The worker side of :mod:`segflowd.delivery.renderpool`: what runs in a render process.

A worker starts its own :class:`~segflowd.delivery.templates.Renderer` over the app's
templates, says it is ready, then answers each job of each task one by one (so the pool
knows which message a worker that dies was on). :func:`render_jobs` is the same
rendering in the daemon's own process.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from ..app import Segflow, TemplateDef
from ..errors import TemplateError
from .templates import Rendered, Renderer

__all__ = ["PARENT_CHECK", "RenderJob", "RenderResult", "render_jobs", "worker_renderer"]

RenderJob = tuple[str, Mapping[str, object]]  # template name, context
RenderResult = Rendered | TemplateError
PARENT_CHECK = 1.0  # seconds between a worker's checks that its daemon still lives

_renderer: Renderer | None = None  # in a worker process: its own renderer


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


def _serve(conn: Connection, templates_dir: str, defs: list[TemplateDef]) -> None:
    """A worker's life: start, say so, then answer each task's jobs one by one."""
    try:
        _start_worker(templates_dir, defs)
    except Exception as exc:
        conn.send(("broken", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the daemon is gone
            return
        if task is None:
            return
        fn, blobs = task
        for blob in blobs:
            # Each job is unpickled here, so a job whose data kills the process while
            # being read is the job the daemon sees as the one in progress.
            try:
                reply: tuple[str, object] = ("done", fn([pickle.loads(blob)])[0])
            except Exception as exc:
                reply = ("error", f"{type(exc).__name__}: {exc}")
            try:
                conn.send(reply)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                conn.send(("error", f"the result cannot be returned: {exc}"))


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
