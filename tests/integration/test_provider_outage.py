"""A provider outage is not a message failure (#25 item 4).

When the provider refuses the account or cannot be reached (``SendResult.outage``), the
messages stay queued with their attempt given back, however few ``max_attempts`` allows;
the provider's lane stops claiming and probes it with one message after 5 s, then 10 s,
20 s, ... until it answers; the outage shows in the statistics, the metrics and
``segflowd status``. ``segflowd requeue`` puts failed messages back in bulk.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from delivery_harness import ScriptedProvider, Setup, add_user, make_kernel

from segflowd.cli.control import format_status
from segflowd.control.protocol import to_jsonable
from segflowd.delivery.outbox import enqueue
from segflowd.delivery.service import DeliveryService
from segflowd.providers import SendResult
from segflowd.schema import messages
from segflowd.store import Store

pytestmark = pytest.mark.anyio

DOWN = SendResult(ok=False, error="smtp 535 5.7.8 at AUTH: bad credentials", transient=False,
                  outage=True)


@pytest.fixture
def setup(store: Store, tmp_path: Path) -> Setup:
    return make_kernel(store, tmp_path)  # max_attempts = 3


async def queue(setup: Setup, n: int) -> list[int]:
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    ids = []
    async with setup.kernel.store.begin() as conn:
        for _ in range(n):
            mid = await enqueue(conn, kind="transaction", template="welcome",
                                now=setup.clock.now(), user_id="u1", dedupe_key=None,
                                to_address=None, data={"plan": "pro"})
            assert mid is not None
            ids.append(mid)
    return ids


def up(metrics: str) -> str:
    """The value of segflow_provider_up for the scripted provider, as /metrics shows it."""
    [line] = [ln for ln in metrics.splitlines() if ln.startswith("segflow_provider_up{")]
    return line.split()[-1].removesuffix(".0")


async def statuses(store: Store) -> list[tuple[str, int]]:
    async with store.connect() as conn:
        return [(str(s), int(a)) for s, a in await conn.execute(
            sa.select(messages.c.status, messages.c.attempts).order_by(messages.c.id))]


async def test_an_outage_holds_the_messages_and_probes_until_the_provider_answers(
        setup: Setup) -> None:
    await queue(setup, 3)
    provider = ScriptedProvider()
    provider.script = [DOWN] * 4  # the first batch, and the first probe
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    k, lane = setup.kernel, svc.lanes[0]

    assert await svc.run_once() == 3  # the first batch meets the outage
    assert await statuses(k.store) == [("queued", 0)] * 3  # no attempt spent
    [stats] = svc.statistics().providers
    assert stats.outage_since == setup.clock.now()
    assert "535" in stats.outage_error
    assert up(k.metrics.render()) == "0"
    assert "ALARM:  provider scripted (scripted) is down" in format_status(
        {"stats": {"delivery": to_jsonable(svc.statistics())}})

    assert await svc.run_once() == 0  # nothing is claimed until the probe is due
    await setup.clock.advance(5.0)
    assert await svc.run_once() == 1  # one message probes; still down
    assert lane.circuit.probes == 1
    await setup.clock.advance(5.0)
    assert await svc.run_once() == 0  # the next probe waits twice as long
    await setup.clock.advance(5.0)
    assert await svc.run_once() == 1  # the provider answers again (the script is spent)
    assert svc.statistics().providers[0].outage_since is None
    assert up(k.metrics.render()) == "1"
    assert await svc.run_once() == 2  # and the lane claims whole batches again
    assert await statuses(k.store) == [("sent", 1)] * 3
    assert len(provider.sent) == 3 + 1 + 1 + 2


async def test_an_outage_never_fails_a_message_whatever_max_attempts_says(
        setup: Setup) -> None:
    [mid] = await queue(setup, 1)
    provider = ScriptedProvider()
    provider.script = [DOWN] * 10  # more outages than [email] max_attempts = 3
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    for _ in range(10):
        await setup.clock.advance(400.0)  # past the longest wait between probes
        assert await svc.run_once() == 1
    async with setup.kernel.store.connect() as conn:
        row = (await conn.execute(sa.select(messages).where(messages.c.id == mid))
               ).mappings().one()
    assert (row["status"], row["attempts"]) == ("queued", 0)
    assert "535" in str(row["last_error"])
    assert svc.statistics().failed == 0


async def test_a_message_refused_for_its_own_sake_closes_no_circuit_it_did_not_open(
        setup: Setup) -> None:
    await queue(setup, 2)
    provider = ScriptedProvider()
    provider.script = [SendResult(ok=False, error="550 5.1.1 no such user"),
                       SendResult(ok=True, provider_message_id="x")]
    svc = DeliveryService(setup.kernel, providers={"scripted": provider})
    assert await svc.run_once() == 2
    assert svc.lanes[0].circuit.outages == 0
    assert await statuses(setup.kernel.store) == [("failed", 1), ("sent", 1)]


# -- segflowd requeue -------------------------------------------------------------------

def requeue(config: Path, *args: str, answer: str = "",
            command: str = "requeue") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segflowd.cli", command, *args, "--config", str(config)],
        input=answer, capture_output=True, text=True, timeout=60, check=False)


async def test_requeue_puts_matching_failed_messages_back_after_a_yes(
        store: Store, store_url: str, tmp_path: Path) -> None:
    t0 = dt.datetime(2026, 3, 1, 9, 0)
    async with store.begin() as conn:
        for i, (status, error, at) in enumerate([
                ("failed", "smtp 535 5.7.8 at AUTH: bad credentials", t0),
                ("failed", "smtp 535 5.7.8 at AUTH: bad credentials", t0 - dt.timedelta(days=2)),
                ("failed", "smtp 550 5.1.1 at RCPT TO: no such user", t0),
                ("unknown", "smtp 535 at AUTH", t0), ("sent", None, t0)]):
            await conn.execute(sa.insert(messages).values(
                id=i + 1, kind="transaction", template="welcome", to_address="a@example.org",
                status=status, attempts=3, last_error=error, created_at=at, updated_at=at,
                next_attempt_at=at, data={}))
    config = tmp_path / "segflow.toml"
    config.write_text(f'[daemon]\napp = "app.py:app"\n[store]\nurl = "{store_url}"\n',
                      encoding="utf-8")
    args = ("--status", "failed", "--since", "2026-03-01T00:00:00Z", "--error-like", "535")
    refused = requeue(config, *args, answer="n\n")
    assert refused.returncode == 1
    assert "1 failed message since 2026-03-01T00:00:00Z with an error containing '535'" \
        in refused.stderr
    done = requeue(config, *args, answer="y\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "queued 1 message again"
    async with store.connect() as conn:
        rows = {int(r.id): (r.status, r.attempts, r.last_error) for r in await conn.execute(
            sa.select(messages.c.id, messages.c.status, messages.c.attempts,
                      messages.c.last_error))}
    assert rows[1] == ("queued", 0, None)
    assert [rows[i][0] for i in (2, 3, 4, 5)] == ["failed", "failed", "unknown", "sent"]
    nothing = requeue(config, "--status", "failed", "--error-like", "no match", "--yes")
    assert (nothing.returncode, nothing.stdout.strip()) == (
        0, "no failed message matches: nothing to requeue")
    bad = requeue(config, "--status", "failed", "--since", "yesterday", "--yes")
    assert bad.returncode == 2
    assert "--since: not an ISO 8601 time" in bad.stderr
    asked = requeue(config, answer="yes\n", command="retry-unknown")
    assert asked.returncode == 0, asked.stderr
    assert "may arrive twice" in asked.stderr  # an unknown message may have gone out
    assert asked.stdout.strip() == "queued 1 message again"
    async with store.connect() as conn:
        assert (await conn.execute(sa.select(messages.c.status).where(
            messages.c.id == 4))).scalar() == "queued"
