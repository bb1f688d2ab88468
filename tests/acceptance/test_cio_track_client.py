"""The official ``customerio`` Python library's device, suppression and merge calls against a
running segflowd (the daemon fixture of test_ingest_clients), on SQLite and MariaDB."""

from __future__ import annotations

import pytest
from customerio.constants import EMAIL, ID
from customerio.track import CustomerIO
from test_ingest_clients import SECRET, SITE, _count, daemon

pytestmark = pytest.mark.slow

__all__ = ["daemon"]  # the fixture, imported to be used here


def test_customerio_devices_suppress_and_merge_are_stored(daemon: str, store_url: str) -> None:
    cio = CustomerIO(site_id=SITE, api_key=SECRET, retries=1)
    cio.base_url = f"{daemon}/api/v1"  # the host: the library otherwise speaks https only
    cio.identify(id="p1", email="p1@example.com", plan="pro")
    cio.identify(id="s1", email="s1@example.com", plan="free", city="Oslo")
    cio.track(customer_id="s1", name="visited", id="v1")
    cio.add_device(customer_id="s1", device_id="tok-a", platform="ios", last_used=1767225600)
    cio.add_device(customer_id="s1", device_id="tok-b", platform="android")
    cio.delete_device(customer_id="s1", device_id="tok-b")
    assert _count(store_url, "SELECT COUNT(*) FROM devices WHERE user_id = 's1'") == 1

    cio.suppress(customer_id="p1")
    assert _count(store_url, "SELECT COUNT(*) FROM suppressions WHERE address = "
                             "'p1@example.com' AND reason = 'manual'") == 1
    cio.unsuppress(customer_id="p1")
    assert _count(store_url, "SELECT COUNT(*) FROM suppressions") == 0

    cio.merge_customers(ID, "p1", EMAIL, "s1@example.com")
    assert _count(store_url, "SELECT COUNT(*) FROM users") == 1
    assert _count(store_url, "SELECT COUNT(*) FROM events WHERE user_id = 'p1' "
                             "AND name = 'visited'") == 1
    assert _count(store_url, "SELECT COUNT(*) FROM devices WHERE user_id = 'p1' "
                             "AND token = 'tok-a'") == 1
    with pytest.raises(Exception, match="404"):  # the secondary is gone
        cio.merge_customers(ID, "p1", ID, "s1")
