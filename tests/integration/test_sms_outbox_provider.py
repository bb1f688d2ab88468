"""The SMS outbox provider on a real folder: each SMS a whole JSON file, or nothing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from segflow_plugins.smsoutbox import SmsOutboxProvider
from segflowd.errors import ProviderError
from segflowd.providers import (
    ForgettingProvider,
    OutgoingSms,
    ProviderContext,
    SmsProvider,
    load_sms_provider,
)

pytestmark = pytest.mark.anyio


def outbox(tmp_path: Path, **options: object) -> SmsOutboxProvider:
    return SmsOutboxProvider(ProviderContext("outbox", {"path": "sms", **options}, tmp_path))


async def test_each_sms_is_a_json_file_with_its_cost(tmp_path: Path) -> None:
    p = outbox(tmp_path)
    results = await p.send([
        OutgoingSms(1, "+14155550100", "Hi Ann, 20% off {today}", kind="campaign",
                    status_callback="https://segflow.example/v1/sms/status/1"),
        OutgoingSms(2, "+447700900123", "Привет 👋 " * 10, kind="transaction"),
    ])
    assert [(r.ok, r.provider_message_id) for r in results] == [
        (True, "00000001-sms.json"), (True, "00000002-sms.json")]
    assert sorted(f.name for f in (tmp_path / "sms").iterdir()) == [
        "00000001-sms.json", "00000002-sms.json"]
    first = json.loads((tmp_path / "sms" / "00000001-sms.json").read_text())
    assert first == {"id": 1, "to": "+14155550100", "body": "Hi Ann, 20% off {today}",
                     "kind": "campaign",
                     "status_callback": "https://segflow.example/v1/sms/status/1",
                     "encoding": "GSM-7", "characters": 25, "segments": 1}
    second = json.loads((tmp_path / "sms" / "00000002-sms.json").read_text(encoding="utf-8"))
    assert second["body"] == "Привет 👋 " * 10
    assert (second["encoding"], second["characters"], second["segments"]) == ("UCS-2", 100, 2)


async def test_files_are_private_unless_group_readable(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        await outbox(tmp_path).send([OutgoingSms(1, "+14155550100", "a")])
        await outbox(tmp_path, path="group", group_readable=True).send(
            [OutgoingSms(2, "+14155550100", "b")])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sms" / "00000001-sms.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "group" / "00000002-sms.json").stat().st_mode) == 0o640


async def test_a_file_that_cannot_be_written_is_certainly_not_sent_and_leaves_nothing(
        tmp_path: Path) -> None:
    folder = tmp_path / "sms"
    (folder / "00000001-sms.json").mkdir(parents=True)  # in the file's way
    results = await outbox(tmp_path).send([OutgoingSms(1, "+14155550100", "a"),
                                           OutgoingSms(2, "+14155550101", "b")])
    blocked, fine = results
    assert (blocked.ok, blocked.transient, blocked.maybe_sent) == (False, True, False)
    assert "cannot write" in (blocked.error or "")
    assert fine.ok
    assert sorted(f.name for f in folder.iterdir()) == ["00000001-sms.json",
                                                       "00000002-sms.json"]


async def test_a_folder_that_cannot_be_made_is_certainly_not_sent(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the folder should be")
    results = await outbox(tmp_path, path="taken/sms").send(
        [OutgoingSms(1, "+14155550100", "a"), OutgoingSms(2, "+14155550101", "b")])
    assert [(r.ok, r.transient, r.maybe_sent) for r in results] == [(False, True, False)] * 2


async def test_forget_messages_deletes_only_those_rows_files(tmp_path: Path) -> None:
    p = outbox(tmp_path)
    await p.send([OutgoingSms(i, f"+1415555010{i}", str(i)) for i in (1, 2, 3)])
    (tmp_path / "sms" / "00000003-sms.json.tmp").write_text("{")  # a write cut short
    assert await p.forget_messages([1, 3, 99]) == 2
    assert sorted(f.name for f in (tmp_path / "sms").iterdir()) == ["00000002-sms.json"]
    assert await p.forget_messages([1]) == 0


async def test_forget_before_any_send_finds_nothing(tmp_path: Path) -> None:
    assert await outbox(tmp_path).forget_messages([1, 2]) == 0


async def test_the_entry_point_builds_it_and_it_implements_the_protocols(
        tmp_path: Path) -> None:
    p = load_sms_provider(ProviderContext("sms", {"plugin": "outbox", "path": "sms",
                                                  "concurrency": 2}, tmp_path))
    assert isinstance(p, SmsOutboxProvider)
    assert p.path == tmp_path / "sms"
    assert isinstance(p, SmsProvider)
    assert isinstance(p, ForgettingProvider)
    assert outbox(tmp_path, path=str(tmp_path / "abs")).path == tmp_path / "abs"


@pytest.mark.parametrize(("options", "message"), [
    ({"folder": "x"}, "[providers.outbox]: unknown option(s) folder"),
    ({"group_readable": "yes"}, "[providers.outbox].group_readable: must be true or false"),
    ({"path": 5}, "[providers.outbox].path: must be a string"),
])
def test_bad_options_are_named(tmp_path: Path, options: dict[str, object],
                               message: str) -> None:
    with pytest.raises(ProviderError) as info:
        SmsOutboxProvider(ProviderContext("outbox", options, tmp_path))
    assert message in str(info.value)
