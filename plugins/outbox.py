"""The ``outbox`` provider: each message becomes an .eml file in a folder.

For local use and tests: open the files with any mail client. A file appears whole or
not at all (written to a temporary name, then renamed), so a failure to write one is
certain: nothing was sent, the temporary file is removed and the message is retried.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import anyio

from segflowd.errors import ProviderError
from segflowd.providers import OutgoingMessage, ProviderContext, SendResult

DEFAULT_PATH = "var/outbox"
MAX_BATCH = 100
FILE_MODE = 0o600  # an .eml file: readable by the daemon's user only
GROUP_FILE_MODE = 0o640  # ... and by its group (group_readable = true)


class OutboxProvider:
    """Writes ``<outbox row id>-<message id>.eml`` files into ``path``."""

    max_batch = MAX_BATCH
    parallel_calls = 1  # one file per send() call, each row marked `sending` just before

    def __init__(self, ctx: ProviderContext) -> None:
        unknown = set(ctx.options) - {"plugin", "path", "group_readable"}
        if unknown:
            raise ProviderError(f"[providers.{ctx.name}]: unknown option(s) "
                                f"{', '.join(sorted(unknown))} (outbox takes: path, "
                                "group_readable)")
        path = Path(str(ctx.options.get("path", DEFAULT_PATH)))
        self.path = path if path.is_absolute() else ctx.base_dir / path
        group = ctx.options.get("group_readable", False)
        if not isinstance(group, bool):
            raise ProviderError(f"[providers.{ctx.name}].group_readable: must be true or "
                                f"false (a TOML boolean), not {group!r}")
        self.mode = GROUP_FILE_MODE if group else FILE_MODE

    async def send(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        return await anyio.to_thread.run_sync(self._write_all, list(messages))

    def _write_all(self, messages: list[OutgoingMessage]) -> list[SendResult]:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return [SendResult(ok=False, error=f"cannot create {self.path}: {exc}",
                               transient=True)] * len(messages)
        results = []
        for msg in messages:
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", msg.message_id)[:120]
            final = self.path / f"{msg.id:08d}-{safe}.eml"
            tmp = final.with_suffix(".eml.tmp")
            try:
                # 0600 (0640) whatever the umask: a message holds an address and data.
                fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, self.mode)
                with open(fd, "wb") as fh:
                    os.fchmod(fh.fileno(), self.mode)
                    fh.write(msg.mime)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
            except OSError as exc:
                with contextlib.suppress(OSError):  # the write's error is the one to report
                    tmp.unlink(missing_ok=True)
                results.append(SendResult(ok=False, error=f"cannot write {final}: {exc}",
                                          transient=True))
                continue
            results.append(SendResult(ok=True, provider_message_id=final.name))
        return results

    async def forget_messages(self, message_ids: Sequence[int]) -> int:
        """Delete the files of these rows (a forgotten user's): one listing of the folder."""
        return await anyio.to_thread.run_sync(self._delete_files, set(message_ids))

    def _delete_files(self, ids: set[int]) -> int:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return 0
        deleted = 0
        for name in names:
            head, sep, _ = name.partition("-")
            if sep and head.isdigit() and int(head) in ids and ".eml" in name:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
                    deleted += 1
        return deleted

    async def aclose(self) -> None:
        return None
