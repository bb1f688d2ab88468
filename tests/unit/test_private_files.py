"""Files that hold personal data are created 0600 whatever the umask (issue #25, item 17):
the SQLite store and the outbox provider's .eml files."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from segflow_plugins.outbox import OutboxProvider
from segflowd.errors import ProviderError
from segflowd.providers import OutgoingMessage, ProviderContext
from segflowd.store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The umask of a careless service account: everything readable by everyone."""
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_new_sqlite_store_is_readable_by_its_owner_only(
        tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "var" / "segflow.db"
    store = Store.open(f"sqlite+aiosqlite:///{path}")
    try:
        await store.migrate()
    finally:
        await store.close()
    assert mode(path) == 0o600
    assert all(mode(p) == 0o600 for p in path.parent.iterdir())  # -wal, -shm too


async def test_an_existing_store_keeps_the_mode_its_operator_gave_it(tmp_path: Path) -> None:
    path = tmp_path / "segflow.db"
    path.touch()
    path.chmod(0o640)
    store = Store.open(f"sqlite+aiosqlite:///{path}")
    try:
        await store.migrate()
    finally:
        await store.close()
    assert mode(path) == 0o640


async def test_outbox_files_are_readable_by_their_owner_only(
        tmp_path: Path, open_umask: None) -> None:
    provider = OutboxProvider(ProviderContext("outbox", {"path": "outbox"}, tmp_path))
    msg = OutgoingMessage(id=7, message_id="7.x@mail.example.com", sender="a@example.com",
                          to="ann@example.com", subject="Hi", mime=b"To: ann@example.com\r\n")
    assert [r.ok for r in await provider.send([msg])] == [True]
    files = list((tmp_path / "outbox").iterdir())
    assert [mode(f) for f in files] == [0o600]


async def test_group_readable_gives_the_group_read_access_and_no_more(
        tmp_path: Path, open_umask: None) -> None:
    """[store] group_readable and the outbox's group_readable: 0640 (a backup user in
    the daemon's group reads them), still nothing for others whatever the umask."""
    path = tmp_path / "segflow.db"
    store = Store.open(f"sqlite+aiosqlite:///{path}", group_readable=True)
    try:
        await store.migrate()
    finally:
        await store.close()
    assert mode(path) == 0o640
    provider = OutboxProvider(ProviderContext(
        "outbox", {"path": "outbox", "group_readable": True}, tmp_path))
    msg = OutgoingMessage(id=8, message_id="8.x@mail.example.com", sender="a@example.com",
                          to="ann@example.com", subject="Hi", mime=b"To: ann@example.com\r\n")
    assert [r.ok for r in await provider.send([msg])] == [True]
    assert [mode(f) for f in (tmp_path / "outbox").iterdir()] == [0o640]


def test_group_readable_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match=r"group_readable: must be true or false"):
        OutboxProvider(ProviderContext("outbox", {"group_readable": "yes"}, tmp_path))
