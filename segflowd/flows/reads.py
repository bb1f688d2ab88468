"""The flow commands that read rather than write: a DirectFlow ``condition`` on a
customer database, and the engagement conditions ``opened`` / ``clicked``."""

from __future__ import annotations

import sqlalchemy as sa

from ..errors import FlowError
from ..hooks import ConditionRunner
from ..schema import engagement, messages
from ..store import Store
from .runtime import Command

__all__ = ["engaged", "run_condition"]


async def run_condition(runner: ConditionRunner | None, cmd: Command, user_id: str
                        ) -> tuple[object, str | None]:
    """``rt.condition(source, sql, **params)``: (result, None), or (None, the error) when
    the source failed; FlowError when there is no such source."""
    source = str(cmd.name)
    if runner is None:
        raise FlowError(f"condition on source {source!r}: no data sources are configured "
                        f"(add [sources.{source}] to segflow.toml)")
    params = cmd.args.get("params")
    # DirectFlow's conditions name the user <%= profile_id %>: the flow's user, unless
    # the flow passes its own.
    values = {"profile_id": user_id, **(params if isinstance(params, dict) else {})}
    try:
        ok = await runner.condition(source, str(cmd.args["sql"]), values)
    except KeyError:
        raise FlowError(f"condition on unknown source {source!r}: add [sources.{source}]"
                        " to segflow.toml") from None
    except Exception as exc:
        return None, f"condition on {source!r} failed: {exc}"
    return bool(ok), None


async def engaged(store: Store, user_id: str, template: str, kind: str) -> bool:
    """Whether the user opened / clicked (``kind``) a message of ``template``.

    Only hits of a person count: a machine's (an Apple Mail Privacy Protection prefetch,
    a mail-security link scanner; see :func:`segflowd.delivery.tracking.is_machine`)
    do not, nor does a ``HEAD``, which is never stored.
    """
    m, e = messages.c, engagement.c
    async with store.connect() as conn:
        row = (await conn.execute(sa.select(e.id).select_from(
            engagement.join(messages, e.message_id == m.id)).where(
            m.user_id == user_id, m.template == template, e.kind == kind,
            e.machine == sa.false()).limit(1))).first()
    return row is not None
