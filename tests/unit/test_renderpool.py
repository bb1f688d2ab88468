"""The render pool: worker processes give the same results as rendering in-process."""

from __future__ import annotations

import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from segflowd.app import Segflow
from segflowd.delivery.renderpool import (
    PARENT_CHECK,
    RenderJob,
    RenderPool,
    RenderPoolError,
    render_jobs,
)
from segflowd.delivery.templates import Rendered, Renderer
from segflowd.errors import TemplateError

PAGE = """\
{% extends "segflow/layout.html" %}
{% import "segflow/components.html" as ui %}
{% block content %}{{ ui.heading("Hello " ~ user.name) }}
{% call ui.text() %}<a href="https://example.com/{{ user.id }}">Open</a>{% endcall %}
{% endblock %}
"""


@pytest.fixture
def app(tmp_path: Path) -> Segflow:
    (tmp_path / "page.html").write_text(textwrap.dedent(PAGE))
    (tmp_path / "broken.html").write_text("<p>{{ usr.name }}</p>")
    app = Segflow(templates=tmp_path)
    app.template("page", subject="Hi {{ user.name }}", html="page.html")
    app.template("broken", subject="x", html="broken.html")
    return app


@pytest.fixture
def pool(app: Segflow) -> Iterator[RenderPool]:
    pool = RenderPool(app, 2)
    try:
        yield pool
    finally:
        pool.close()


def jobs(n: int) -> list[RenderJob]:
    return [("page", {"user": {"id": f"u{i}", "name": f"<User {i}>"},
                      "unsubscribe_url": f"https://h/u/{i}"}) for i in range(n)]


def test_pool_renders_what_the_process_itself_renders_in_order(
        app: Segflow, pool: RenderPool) -> None:
    work = jobs(120)  # more than one chunk per worker
    pooled = pool.render_many(work)
    local = render_jobs(Renderer(app), work)
    assert pooled == local
    assert all(isinstance(r, Rendered) for r in pooled)
    first = pooled[0]
    assert isinstance(first, Rendered)
    assert first.subject == "Hi <User 0>"
    assert "Hello &lt;User 0&gt;" in first.html
    assert "Open (https://example.com/u0)" in first.text
    assert pool.batches == 1


def test_template_errors_come_back_per_job(pool: RenderPool) -> None:
    out = pool.render_many([*jobs(1), ("broken", {"user": {}}), ("nope", {})])
    assert isinstance(out[0], Rendered)
    assert isinstance(out[1], TemplateError)
    assert "'usr' is undefined" in str(out[1])
    assert isinstance(out[2], TemplateError)
    assert "unknown template 'nope'" in str(out[2])


def test_a_context_that_cannot_be_pickled_is_a_pool_error_and_the_pool_stays(
        pool: RenderPool) -> None:
    pool.render_many(jobs(1))
    workers = pool.worker_pids()
    with pytest.raises(RenderPoolError, match="render pool"):
        pool.render_many([("page", {"user": {"name": threading.Lock()}})])
    assert (pool.fallbacks, pool.restarts) == (1, 0)
    assert pool.worker_pids() == workers  # nothing was sent: the workers are kept
    out = pool.render_many(jobs(2))
    assert [isinstance(r, Rendered) for r in out] == [True, True]


def test_killed_workers_are_replaced_and_the_batch_renders(pool: RenderPool) -> None:
    import os
    import signal

    pool.render_many(jobs(1))
    killed = pool.worker_pids()
    assert len(killed) == 2
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    out = pool.render_many(jobs(4))  # no message is at fault: none fails
    assert [isinstance(r, Rendered) for r in out] == [True] * 4
    assert pool.restarts >= 1
    assert pool.fallbacks == 0
    assert not set(pool.worker_pids()) & set(killed)


def test_an_empty_batch_needs_no_worker_and_close_is_idempotent(app: Segflow) -> None:
    pool = RenderPool(app, 1)
    assert pool.render_many([]) == []
    pool.close()
    pool.close()
    with pytest.raises(ValueError, match="at least one process"):
        RenderPool(app, 0)


_KILLED_PARENT = """\
import os, signal, sys
from pathlib import Path
from segflowd.app import Segflow
from segflowd.delivery.renderpool import RenderPool
if __name__ == "__main__":
    app = Segflow(templates=Path(sys.argv[1]))
    app.template("page", subject="s", html="page.html")
    pool = RenderPool(app, 1)
    pool.render_many([("page", {"user": {"id": 1, "name": "A"}})])
    print(*pool.worker_pids(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_exit_when_their_daemon_is_killed(app: Segflow, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(_KILLED_PARENT)
    out = subprocess.run([sys.executable, str(script), str(app.templates_dir)],
                         capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, out.stderr
    deadline = time.monotonic() + 10 * PARENT_CHECK
    alive = True
    while alive and time.monotonic() < deadline:
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            alive = False
        else:
            time.sleep(0.1)
    assert not alive, "a render worker outlived its daemon"
