"""The cost of marking each message ``sending`` just before its own provider call.

    .venv/bin/python bench/handover.py --store sqlite,mariadb     # 4,000 messages each
    .venv/bin/python bench/handover.py --quick                    # 1,000

Delivery marks a claimed row ``sending`` in a commit right before the call that hands it
over (:func:`segflowd.delivery.sending.hand_over`). A provider that makes one call per
message (``parallel_calls``: smtp, ses, outbox) pays one such commit per message; a
batching one, one per batch. Figure (one JSON line per store):

* ``outbox_sent_per_s_marked_per_message``: messages the real delivery service (claim,
  render, mark, send, record) sends through the ``outbox`` provider (an .eml file each,
  fsynced) with its ``parallel_calls = 1``. Baseline: the same provider with
  ``parallel_calls`` taken away, so each claimed batch of 100 is marked in one commit.
  The ratio is the price of leaving at most one message per worker ``unknown`` after a
  crash instead of a batch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import anyio
import sqlalchemy as sa
from _stores import KINDS, store_url  # bench/ is on sys.path when run as a script

from segflow_plugins.outbox import OutboxProvider
from segflowd.app import Segflow
from segflowd.bus import Bus
from segflowd.clock import SystemClock
from segflowd.config import load_config
from segflowd.delivery.outbox import Queued, enqueue_many
from segflowd.delivery.service import DeliveryService
from segflowd.kernel import Kernel
from segflowd.logs import configure_logging
from segflowd.metrics import Metrics
from segflowd.providers import ProviderContext
from segflowd.schema import users
from segflowd.store import Store

TEMPLATE = "<html><body><p>Hello {{ user.name }}, you have {{ points }} points.</p>" \
           '<a href="https://example.com/x">open</a></body></html>'


class BatchedOutbox(OutboxProvider):
    """The outbox provider as a batching one: no ``parallel_calls``."""

    parallel_calls = None  # type: ignore[assignment]


def emit(store: str, value: float, baseline: float, n: int) -> None:
    print(json.dumps({"bench": "handover", "figure": "outbox_sent_per_s_marked_per_message",
                      "store": store, "value": round(value, 1), "unit": "messages/s",
                      "baseline": round(baseline, 1), "ratio": round(value / baseline, 3),
                      "messages": n, "target": None}), flush=True)


def kernel(store: Store, folder: Path) -> Kernel:
    (folder / "hello.html").write_text(TEMPLATE)
    app = Segflow(templates=folder)
    app.template("hello", subject="Hello {{ user.name }}", html="hello.html")
    cfg = folder / "segflow.toml"
    cfg.write_text('[daemon]\napp = "app.py:app"\n[email]\nfrom = "hi@example.com"\n'
                   'provider = "outbox"\nsecret = "bench-secret"\n'
                   '[providers.outbox]\nplugin = "outbox"\n')
    return Kernel(config=load_config(cfg, environ={}), app=app, store=store,
                  clock=SystemClock(), bus=Bus(), metrics=Metrics())


async def seed(k: Kernel, n: int, offset: int) -> None:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    async with k.store.begin() as conn:
        await conn.execute(sa.insert(users), [
            {"id": f"u{offset + i}", "email": f"u{offset + i}@example.org",
             "attributes": {"name": f"User {i}"}, "created_at": now, "updated_at": now}
            for i in range(n)])
        await enqueue_many(conn, [Queued(
            kind="campaign", template="hello", user_id=f"u{offset + i}",
            dedupe_key=f"bench:{offset + i}", data={"points": i}) for i in range(n)], now=now)


async def drain(k: Kernel, provider: OutboxProvider) -> float:
    """Seconds the delivery service (one worker) takes to send every queued message."""
    svc = DeliveryService(k, providers={"outbox": provider})
    t0 = time.perf_counter()
    while await svc.run_once():
        pass
    return time.perf_counter() - t0


async def bench_store(kind: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, store_url(kind, Path(tmp)) as url:
        folder = Path(tmp)
        store = Store.open(url, pool_size=4)
        try:
            await store.migrate()
            k = kernel(store, folder)
            ctx = ProviderContext("outbox", {"path": str(folder / "out")}, folder)
            await seed(k, 200, 0)  # warm: templates compiled, files and pool open
            await drain(k, OutboxProvider(ctx))
            seconds: dict[str, float] = {}
            for i, (name, provider) in enumerate([("batch", BatchedOutbox(ctx)),
                                                  ("each", OutboxProvider(ctx))]):
                await seed(k, n, 1000 + i * n)
                seconds[name] = await drain(k, provider)
        finally:
            await store.close()
    emit(kind, n / seconds["each"], n / seconds["batch"], n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite", help=f"comma-separated: {', '.join(KINDS)}")
    parser.add_argument("--quick", action="store_true", help="1,000 messages, not 4,000")
    args = parser.parse_args()
    configure_logging("console", "warning")  # stdout carries only the JSON figures
    for kind in args.store.split(","):
        anyio.run(bench_store, kind.strip(), 1000 if args.quick else 4000)
    sys.exit(0)


if __name__ == "__main__":
    main()
