"""Delivery's memory stays bounded however many messages it sends, TUI attached or not."""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from delivery_harness import ScriptedProvider, Setup, add_user, make_kernel, service

from segflowd.delivery.outbox import enqueue
from segflowd.store import Store

pytestmark = pytest.mark.anyio

SENDS = 100_000
PER_SECOND = 1_000  # the simulated send rate
BOUND = 256 * 1024  # bytes delivery may grow by between 10k and 100k sends (was ~8 MB)


@pytest.fixture
def setup(store: Store, tmp_path: Path) -> Setup:
    return make_kernel(store, tmp_path)


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """Info lines off for speed (100k ``message.sent`` lines take seconds to format)."""
    config = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**config)


def delivery_bytes() -> int:
    """Bytes held by objects that delivery's code (and the provider interface) allocated."""
    snapshot = tracemalloc.take_snapshot().filter_traces([
        tracemalloc.Filter(True, "*/segflowd/delivery/*"),
        tracemalloc.Filter(True, "*/segflowd/providers.py"),
    ])
    return sum(stat.size for stat in snapshot.statistics("filename"))


@pytest.mark.usefixtures("quiet_logs")
async def test_100k_sends_keep_delivery_bookkeeping_bounded(setup: Setup) -> None:
    """Each recorded send goes through the bookkeeping every outcome goes through
    (``Outcomes.count``, as ``Outcomes.record`` calls it), at 1,000 messages a second on
    the injected clock, with nobody reading statistics until the end."""
    await add_user(setup.kernel.store, "u1", "ann@example.org", name="Ann")
    svc = service(setup, ScriptedProvider())
    async with setup.kernel.store.begin() as conn:  # one real send first: the whole path
        await enqueue(conn, kind="campaign", template="welcome", now=setup.clock.now(),
                      user_id="u1", dedupe_key=None, data={"plan": "pro"})
    assert await svc.run_once() == 1
    outcomes = svc._outcomes
    data = {"message": 1, "user_id": "u1", "template": "welcome"}

    async def send(n: int) -> None:
        for i in range(n):
            outcomes.count("message.sent", data)
            if (i + 1) % PER_SECOND == 0:
                await setup.clock.advance(1.0)

    tracemalloc.start()
    try:
        await send(10_000)
        before = delivery_bytes()
        await send(SENDS - 10_000)
        after = delivery_bytes()
    finally:
        tracemalloc.stop()
    assert after - before < BOUND, f"delivery grew by {after - before} bytes over 90k sends"
    stats = svc.statistics()
    assert stats.sent == SENDS + 1
    assert stats.sent_per_second == pytest.approx(PER_SECOND, rel=0.05)


def self_signed_pem() -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


async def test_the_sns_certificate_cache_is_bounded() -> None:
    """However many signing-certificate URLs webhooks name, a bounded number is kept."""
    import base64

    from segflowd.delivery.webhooks import CERT_CACHE, SnsVerifier

    pem = self_signed_pem()

    async def fetch(url: str) -> bytes:  # the verifier's fetch seam: SNS's certificate host
        return pem

    verifier = SnsVerifier(fetch)
    for i in range(CERT_CACHE * 4):
        msg = {"Type": "Notification", "SignatureVersion": "2", "Message": "{}",
               "MessageId": str(i), "Timestamp": "2026-01-01T00:00:00Z", "TopicArn": "arn",
               "SigningCertURL": f"https://sns.eu-west-1.amazonaws.com/SNS-{i}.pem",
               "Signature": base64.b64encode(b"not a signature").decode()}
        with pytest.raises(ValueError, match="does not verify"):
            await verifier.verify(msg)
    assert 0 < len(verifier._certs) <= CERT_CACHE
