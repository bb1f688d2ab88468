"""What the store bounds and the HTTP connection limits cost single-event ingest.

    .venv/bin/python bench/bounds.py --stores sqlite,mariadb     # 15 s per route
    .venv/bin/python bench/bounds.py --quick                     # 4 s

Two full daemons (``segflowd run``, each on a store of its own) take the same
single-event load (``POST /v1/users/{id}/events``, as ``bench/ingest.py`` sends it) in
alternating phases, so drift in the machine's load hits both alike:

* the daemon as shipped: every wait for a MySQL/MariaDB server bounded
  (:mod:`segflowd.storebounds`: the connect, each read made for a request, the group
  commit) and the HTTP server's guard (:mod:`segflowd.httpguard`: header, body and
  keep-alive timeouts, the connection cap, header caps);
* the baseline: the same daemon in this script's ``--serve-unbounded`` mode, with those
  taken out (uvicorn's own httptools protocol, no read bound, no connect bound, no bound
  on the commit).

Figure (one JSON line per store): ``bounded_single_server_cpu_us``, the server's CPU time
(``/proc``, all threads) per answered request, against the baseline's. Target: at most
1.05x (the bounds cost at most 5% of single-event ingest CPU). ``ratio`` is the median of
the rounds' ratios (each round runs both daemons back to back), so a burst of other load
on the machine during one phase moves one round, not the figure; ``ratio_total`` is the
ratio of the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ingest import (  # bench/ is on sys.path when run as a script
    Load,
    _free_port,
    mariadb_database,
    run_load,
    segflowd,
    server,
    single_event,
)

ROUNDS = 6  # alternations of the two daemons
CONNECTIONS = 32


def serve_unbounded(config_path: str) -> None:
    """``segflowd run`` with the store bounds and the HTTP guard taken out."""
    import segflowd.daemon as daemon_module
    import segflowd.store as store_module
    from segflowd.cli.commands import cmd_run

    def no_listener(*_args: Any) -> None:
        return None

    daemon_module.guarded_protocol = lambda _limits: "httptools"  # type: ignore[assignment,return-value]
    daemon_module.REQUEST_BOUND = contextvars.ContextVar("unbounded", default=None)
    store_module.bounded_connect = lambda *_args: no_listener  # type: ignore[assignment]
    opened = store_module.Store.open

    def open_unbounded(*args: Any, **kwargs: Any) -> Any:
        store = opened(*args, **kwargs)
        store.timeout = None  # the committer's bound: asyncio.timeout(None) waits forever
        return store

    store_module.Store.open = open_unbounded  # type: ignore[method-assign]
    sys.exit(cmd_run(config_path))


@contextlib.contextmanager
def store_of(kind: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{folder / 'store.db'}"
    else:
        with mariadb_database() as url:
            yield url


@contextlib.contextmanager
def unbounded(store_url: str, bounded_dir: Path, workdir: Path) -> Iterator[tuple[int, int]]:
    """The baseline daemon: the bounded one's config with its own store and port."""
    port = _free_port()
    shutil.copy(bounded_dir / "app.py", workdir / "app.py")
    text = (bounded_dir / "segflow.toml").read_text()
    lines = [f'url = "{store_url}"' if line.startswith("url = ") else
             f'listen = "127.0.0.1:{port}"' if line.startswith("listen = ") else line
             for line in text.splitlines()]
    config = workdir / "segflow.toml"
    config.write_text("\n".join(lines) + "\n")
    here = str(Path(__file__).resolve())
    with server([sys.executable, here, "--serve-unbounded", str(config)], port, "/healthz",
                workdir, "unbounded") as pid:
        yield port, pid


def cpu_per_request(load: Load) -> float:
    value = load.cpu_us_per_request()
    if value is None:
        raise SystemExit("no server CPU figure (is /proc there?)")
    return value


def bench_store(kind: str, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "bounded", Path(tmp) / "unbounded"
        a.mkdir()
        b.mkdir()
        run_id = uuid.uuid4().hex[:8]
        with store_of(kind, a) as url_a, store_of(kind, b) as url_b:
            port_a = _free_port()
            with segflowd(url_a, port_a, a, False) as pid_a, \
                    unbounded(url_b, a, b) as (port_b, pid_b):
                totals = {"bounded": Load(), "unbounded": Load()}
                ratios: list[float] = []
                for _ in range(ROUNDS):
                    this: dict[str, float] = {}
                    for name, port, pid in (("unbounded", port_b, pid_b),
                                            ("bounded", port_a, pid_a)):
                        load, _s = run_load(port, single_event(f"{run_id}-{name}"),
                                            seconds / ROUNDS, CONNECTIONS, pid)
                        total = totals[name]
                        total.ok, total.failed = total.ok + load.ok, total.failed + load.failed
                        total.server_cpu = (total.server_cpu or 0.0) + (load.server_cpu or 0.0)
                        this[name] = cpu_per_request(load)
                    ratios.append(this["bounded"] / this["unbounded"])
    value, baseline = cpu_per_request(totals["bounded"]), cpu_per_request(totals["unbounded"])
    print(json.dumps({"bench": "bounds", "figure": "bounded_single_server_cpu_us",
                      "store": kind, "value": round(value, 1), "unit": "us/req",
                      "baseline": round(baseline, 1),
                      "ratio": round(statistics.median(ratios), 3),
                      "ratio_total": round(value / baseline, 3),
                      "round_ratios": [round(r, 3) for r in ratios],
                      "target": 1.05, "requests": totals["bounded"].ok,
                      "baseline_requests": totals["unbounded"].ok,
                      "failed": totals["bounded"].failed + totals["unbounded"].failed}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 s per daemon, not 15 s")
    parser.add_argument("--stores", default="sqlite,mariadb")
    parser.add_argument("--serve-unbounded", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_unbounded:
        serve_unbounded(args.serve_unbounded)
    for kind in args.stores.split(","):
        bench_store(kind.strip(), 4.0 if args.quick else 15.0)


if __name__ == "__main__":
    main()
