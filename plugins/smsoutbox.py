"""The ``outbox`` SMS provider: each SMS becomes a JSON file in a folder.

For local use and tests, as the email ``outbox`` is: ``<outbox row id>-sms.json`` holds
the message (``id``, ``to``, ``body``, ``kind``, ``status_callback``) and what it would
cost (``encoding``, ``characters``, ``segments`` from :mod:`segflowd.smstext`). A file
appears whole or not at all (written to a temporary name, then renamed), so a failure to
write one is certain: nothing was sent, the temporary file is removed and the message is
retried.

Options: ``path`` (default ``var/sms-outbox``, relative to the config file's folder),
``group_readable`` (files 0640 rather than 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import anyio

from segflowd.providers import OutgoingSms, ProviderContext, SendResult
from segflowd.smstext import sms_parts

from ._options import Options

__all__ = ["SmsOutboxProvider"]

DEFAULT_PATH = "var/sms-outbox"
MAX_BATCH = 100
FILE_MODE = 0o600  # a message holds a phone number and its text: the daemon's user only
GROUP_FILE_MODE = 0o640  # ... and its group (group_readable = true)
SUFFIX = "-sms.json"


class SmsOutboxProvider:
    """Writes ``<outbox row id>-sms.json`` files into ``path``."""

    max_batch = MAX_BATCH
    parallel_calls = 1  # one file per send() call, each row marked `sending` just before

    def __init__(self, ctx: ProviderContext) -> None:
        o = Options(ctx, "outbox", ("path", "group_readable"))
        path = Path(o.text("path", DEFAULT_PATH) or DEFAULT_PATH)
        self.path = path if path.is_absolute() else ctx.base_dir / path
        self.mode = GROUP_FILE_MODE if o.boolean("group_readable", False) else FILE_MODE

    def file_for(self, message_id: int) -> Path:
        """Where the SMS of outbox row ``message_id`` is written."""
        return self.path / f"{message_id:08d}{SUFFIX}"

    async def send(self, messages: Sequence[OutgoingSms]) -> list[SendResult]:
        return await anyio.to_thread.run_sync(self._write_all, list(messages))

    def _write_all(self, messages: list[OutgoingSms]) -> list[SendResult]:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return [SendResult(ok=False, error=f"cannot create {self.path}: {exc}",
                               transient=True)] * len(messages)
        return [self._write(msg) for msg in messages]

    def _write(self, msg: OutgoingSms) -> SendResult:
        parts = sms_parts(msg.body)
        record = {"id": msg.id, "to": msg.to, "body": msg.body, "kind": msg.kind,
                  "status_callback": msg.status_callback, "encoding": parts.encoding,
                  "characters": parts.characters, "segments": parts.segments}
        final = self.file_for(msg.id)
        tmp = final.with_name(final.name + ".tmp")
        try:
            # 0600 (0640) whatever the umask: a message holds a number and its text.
            fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, self.mode)
            with open(fd, "wb") as fh:
                os.fchmod(fh.fileno(), self.mode)
                fh.write(json.dumps(record, ensure_ascii=False, indent=2).encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the write's error is the one to report
                tmp.unlink(missing_ok=True)
            return SendResult(ok=False, error=f"cannot write {final}: {exc}", transient=True)
        return SendResult(ok=True, provider_message_id=final.name)

    async def forget_messages(self, message_ids: Sequence[int]) -> int:
        """Delete the files of these rows (a forgotten user's); how many there were."""
        return await anyio.to_thread.run_sync(self._delete_files, set(message_ids))

    def _delete_files(self, ids: set[int]) -> int:
        # The name is the row's id alone, so each file is found without listing the folder.
        deleted = 0
        for message_id in ids:
            final = self.file_for(message_id)
            with contextlib.suppress(FileNotFoundError):
                final.with_name(final.name + ".tmp").unlink()  # a write cut short
            try:
                final.unlink()
            except FileNotFoundError:
                continue
            deleted += 1
        return deleted

    async def aclose(self) -> None:
        return None
