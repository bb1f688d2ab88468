"""Journal rows and replay: how an instance's generator is rebuilt after any pause.

Generators cannot be pickled, so an instance is its input plus its journal. To resume,
:class:`Replay` makes a fresh generator and walks the journal once, in order: each
yielded command must match the row at the same position (kind, name, argument hash);
each row's result is fed back with ``send()`` (or ``throw()`` for a journaled error);
``ctx`` reads are answered from the row's recorded reads. Walking the journal is one
pass, so replay cost is linear in its length. A command that does not match, or a read
the journal cannot answer, is a :class:`Divergence`: the caller stops taking effects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Callable, Generator, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..app import CampaignDef
from ..errors import FlowError
from ..schema import flow_journal
from .runtime import Command, Context, FlowEvent, Runtime, WebhookResponse, flow_error

__all__ = ["Divergence", "FlowCrashed", "JournalRow", "Replay", "load_journals",
           "result_for_flow"]

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class JournalRow:
    """One journaled command: position, identity, result (JSON) and the reads before it."""

    seq: int
    kind: str
    name: str | None
    args_hash: str
    result: object  # {"value": v} | {"error": message} | None while pending
    reads: Mapping[str, object]  # read key -> [present, value]


async def load_journals(conn: AsyncConnection, instance_ids: Sequence[int]
                        ) -> dict[int, list[JournalRow]]:
    """The journals of ``instance_ids`` in one query, each in seq order (an instance
    with no rows has no entry). Only the columns replay reads are fetched."""
    fj = flow_journal.c
    journals: dict[int, list[JournalRow]] = {}
    for j in await conn.execute(sa.select(
            fj.instance_id, fj.seq, fj.kind, fj.name, fj.args_hash, fj.result, fj.reads
            ).where(fj.instance_id.in_(instance_ids)).order_by(fj.instance_id, fj.seq)):
        journals.setdefault(int(j.instance_id), []).append(
            JournalRow(j.seq, j.kind, j.name, j.args_hash, j.result, j.reads or {}))
    return journals


class Divergence(Exception):
    """The code no longer retraces the journal; ``reason`` says where and how."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"step {seq}: {reason}")
        self.seq = seq
        self.reason = reason


class FlowCrashed(Exception):
    """The flow raised while running live; ``text`` is the formatted traceback."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.text = "".join(traceback.format_exception(exc))


class _ReplayMiss(BaseException):
    pass


# What a flow's own code may raise and fail only its instance with: every exception, and
# SystemExit and KeyboardInterrupt raised by the flow itself (a flow runs synchronously,
# between two awaits, so a real Ctrl-C or sys.exit() of the process is never one of these).
_FLOW_RAISES = (Exception, SystemExit, KeyboardInterrupt)


def result_for_flow(kind: str, stored: object) -> object:
    """The Python value a flow receives for a journaled result."""
    if not isinstance(stored, dict) or "value" not in stored:
        return None
    value = stored["value"]
    if kind == "wait_for_event":
        return FlowEvent.from_json(value)
    if kind == "webhook":
        return WebhookResponse.from_json(value)
    return value


class Replay:
    """One instance's generator, replayed from ``journal`` and then run live.

    ``live`` answers a read once the journal is exhausted (fresh user data); the reads
    made live are collected and handed out with :meth:`take_reads` for the next row.
    """

    def __init__(self, campaign: CampaignDef, user_id: str, journal: Sequence[JournalRow],
                 live: Callable[[str], tuple[bool, object]] | None) -> None:
        self._journal = journal
        self._live = live
        self._pos = 0  # the row whose reads answer reads now (the next row to match)
        self._merged: dict[str, object] = {}  # every read the journal recorded so far
        self._reads: dict[str, object] = {}  # live reads since the last yield
        self._miss: str | None = None
        ctx = Context(self._answer, user_id, campaign.name)
        rt = Runtime(self._patched)
        self._gen: Generator[object, object, object] = campaign.flow(ctx, rt)
        self._started = False
        self._pending: str | None = None  # the kind of the command last yielded
        self.finished = False

    @property
    def replaying(self) -> bool:
        return self._pos < len(self._journal)

    # -- reads -----------------------------------------------------------------------

    def _answer(self, key: str) -> tuple[bool, object]:
        if self.replaying:
            row = self._journal[self._pos]
            found = row.reads.get(key, _MISSING)
            if found is _MISSING:
                found = self._merged.get(key, _MISSING)
            for whole_key in ("user", "data"):
                if (found is _MISSING and key.startswith(whole_key + ".")
                        and whole_key in self._merged):
                    found = _pair(self._merged[whole_key], key[len(whole_key) + 1:])
            if found is _MISSING:
                if key.startswith("patched."):
                    return True, False  # the journal predates the patch: the old path
                self._miss = f"reads ctx.{key} which the journal never recorded"
                raise _ReplayMiss(self._miss)
            present, value = found if isinstance(found, list) and len(found) == 2 else (
                False, None)
            return bool(present), value
        if self._live is None:
            raise _ReplayMiss("no live data")
        if key.startswith("patched."):
            present, value = True, True
        else:
            present, value = self._live(key)
        self._reads[key] = [present, value]
        return present, value

    def _patched(self, name: str) -> bool:
        return bool(self._answer(f"patched.{name}")[1])

    def take_reads(self) -> dict[str, object]:
        reads, self._reads = self._reads, {}
        return reads

    # -- driving ---------------------------------------------------------------------

    def _step(self, value: object, error: str | None) -> Command | None:
        """Advance the generator; None when it returned."""
        try:
            if not self._started:
                self._started = True
                out = next(self._gen)
            elif error is not None:
                out = self._gen.throw(flow_error(self._pending, error))
            else:
                out = self._gen.send(value)
        except StopIteration:
            self.finished = True
            return None
        if not isinstance(out, Command):
            raise FlowError(f"a flow must yield rt commands (rt.send_email(...), rt.wait(...)),"
                            f" not {out!r}")
        self._pending = out.kind
        return out

    def replay(self) -> None:
        """Retrace the whole journal; afterwards the generator waits on the last row.

        Raises :class:`Divergence` when the code does not retrace it.
        """
        value: object = None
        error: str | None = None
        for row in self._journal:
            try:
                cmd = self._step(value, error)
            except _ReplayMiss:
                raise Divergence(row.seq, self._miss or "read the journal cannot answer"
                                 ) from None
            except _FLOW_RAISES as exc:
                raise Divergence(row.seq, f"raised {type(exc).__name__}: {exc} during replay"
                                 ) from None
            if self._miss is not None:  # a bare ``except:`` in the flow swallowed the miss
                raise Divergence(row.seq, self._miss)
            if cmd is None:
                raise Divergence(row.seq, f"the flow now ends before step {row.seq} "
                                 f"({row.kind} {row.name or ''})".rstrip())
            if (cmd.kind, cmd.name) != (row.kind, row.name):
                raise Divergence(row.seq, f"yields {cmd.describe()} where the journal has "
                                 f"{row.kind}({row.name!r})")
            if cmd.hash != row.args_hash:
                raise Divergence(row.seq, f"{cmd.describe()} now has different arguments")
            self._merged.update(row.reads)
            stored = row.result
            error = stored.get("error") if isinstance(stored, dict) else None
            value = result_for_flow(row.kind, stored)
            self._pos += 1

    def resume(self, result: object = None, error: str | None = None) -> Command | None:
        """Feed the pending command's result and run live to the next command (None: done).

        A flow's own exception becomes :class:`FlowCrashed`.
        """
        if self.replaying:
            raise RuntimeError("resume() before replay()")
        try:
            return self._step(result, error)
        except _ReplayMiss as exc:  # pragma: no cover - live reads always answer
            raise FlowError(str(exc)) from None
        except FlowError:
            raise
        except _FLOW_RAISES as exc:
            raise FlowCrashed(exc) from exc

    def close(self) -> None:
        # a flow's own finally block must not break the engine
        with contextlib.suppress(Exception):
            self._gen.close()


def _pair(whole: object, key: str) -> object:
    if not isinstance(whole, list) or len(whole) != 2 or not isinstance(whole[1], dict):
        return _MISSING
    d = whole[1]
    return [key in d, d.get(key)]
