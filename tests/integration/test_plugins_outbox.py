"""The outbox provider on a real folder: each message a whole .eml file, or nothing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from segflow_plugins.outbox import OutboxProvider
from segflowd.delivery.mime import MessageParts, build_message
from segflowd.providers import OutgoingMessage, ProviderContext

pytestmark = pytest.mark.anyio


def outgoing(i: int) -> OutgoingMessage:
    return build_message(MessageParts(
        row_id=i, kind="transaction", sender="hello@example.com", to=f"u{i}@example.org",
        subject=f"m{i}", html=f"<p>{i}</p>", text=str(i), message_id=f"{i}.x@example.com",
        date=dt.datetime(2026, 1, 1)))


async def test_a_file_that_cannot_be_written_is_certainly_not_sent_and_leaves_nothing(
        tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    (folder / "00000001-1.x_example.com.eml").mkdir(parents=True)  # in the file's way
    p = OutboxProvider(ProviderContext("outbox", {"path": str(folder)}, tmp_path))
    second = outgoing(2)
    blocked, fine = await p.send([outgoing(1), second])
    assert (blocked.ok, blocked.transient, blocked.maybe_sent) == (False, True, False)
    assert fine.ok
    assert sorted(f.name for f in folder.iterdir()) == [
        "00000001-1.x_example.com.eml", "00000002-2.x_example.com.eml"]
    assert (folder / "00000002-2.x_example.com.eml").read_bytes() == second.mime


async def test_a_folder_that_cannot_be_made_is_certainly_not_sent(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the folder should be")
    p = OutboxProvider(ProviderContext("outbox", {"path": "taken/outbox"}, tmp_path))
    results = await p.send([outgoing(1), outgoing(2)])
    assert [(r.ok, r.transient, r.maybe_sent) for r in results] == [(False, True, False)] * 2
    assert "cannot" in (results[0].error or "")
