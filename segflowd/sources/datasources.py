"""DirectFlow data sources: discovery, audience and preload queries over a source.

A data source is three SQL queries on one ``[sources.NAME]`` database:

* **discovery** lists the audiences one can choose (e.g. communities and their sizes);
* **audience**, given a chosen discovery row's values, returns ``profile_id`` plus
  ``email`` and/or ``phone`` and any other columns (a result without them is an error);
* **preload** runs per profile at send time with ``profile_id`` and the audience's
  values; its columns are the template's ``profile``.

The definitions (:class:`~segflowd.sourcedefs.DataSourceDef`,
:class:`~segflowd.sourcedefs.AudienceDef`) are made by ``app.data_source`` and
``app.audience_segment`` in the core; :class:`DataSources` runs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

import sqlalchemy as sa
import structlog

from ..errors import SourceError
from ..schema import audience_members
from ..sourcedefs import CONTACT_COLUMNS, AudienceDef, DataSourceDef
from .picked import parse_name
from .pools import Row, SourceLookup
from .values import json_row

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["DataSources", "PreloadContext"]

log = structlog.get_logger("segflowd.datasources")

DISCOVERY_LIMIT = 1000  # rows of a discovery query shown to a person at most


class DataSources:
    """Runs the app's data source queries on the configured sources."""

    def __init__(self, sources: SourceLookup, data_sources: Mapping[str, DataSourceDef],
                 audiences: Mapping[str, AudienceDef]) -> None:
        self.sources = sources
        self.defs = data_sources
        self.audiences = audiences

    def get(self, name: str) -> DataSourceDef:
        try:
            return self.defs[name]
        except KeyError:
            known = ", ".join(sorted(self.defs)) or "none defined"
            raise SourceError(name, f"no data source {name!r} in the app "
                                    f"(data sources: {known})") from None

    async def discover(self, name: str, *, limit: int = DISCOVERY_LIMIT) -> list[Row]:
        """The discovery rows of data source ``name`` (JSON-able values)."""
        d = self.get(name)
        if d.discovery is None:
            raise SourceError(d.source, f"data source {name!r} has no discovery query")
        what = f"discovery query of data source {name!r}"
        rows = await self.sources.get(d.source).fetch(d.discovery.sql, {}, what=what,
                                                      limit=limit)
        return [json_row(r, source=d.source, what=what) for r in rows]

    async def audience(self, name: str, values: Mapping[str, object]
                       ) -> AsyncIterator[list[Row]]:
        """The audience rows for ``values``, in batches; SourceError if a row lacks a column.

        Each row has ``profile_id`` as text, and JSON-able values.
        """
        d = self.get(name)
        what = f"audience query of data source {name!r}"
        src = self.sources.get(d.source)
        stmt = src.statement(d.audience.sql, values, what=what)
        checked = False
        # aclosing: a bad row, or a consumer that stops, closes the cursor and returns
        # the connection now, not whenever the generator is collected.
        async with contextlib.aclosing(src.stream(stmt, what=what)) as batches:
            async for batch in batches:
                if batch and not checked:
                    _check_audience_columns(name, d.source, batch[0])
                    checked = True
                out: list[Row] = []
                for r in batch:
                    pid = r["profile_id"]
                    if pid is None or str(pid) == "":
                        continue  # a profile without an id cannot be a user
                    row = json_row(r, source=d.source, what=what)
                    row["profile_id"] = str(pid)
                    out.append(row)
                yield out

    async def preload(self, name: str, profile_id: str,
                      values: Mapping[str, object]) -> Row | None:
        """The preload row of one profile (None: no preload query, or no row)."""
        d = self.get(name)
        if d.preload is None:
            return None
        what = f"preload query of data source {name!r}"
        rows = await self.sources.get(d.source).fetch(
            d.preload.sql, {**values, "profile_id": profile_id}, what=what, limit=1)
        return json_row(rows[0], source=d.source, what=what) if rows else None


class PreloadContext:
    """ContextProvider: the preload row of the user's audiences as template ``profile``.

    The user's audiences are their ``audience_members`` rows: declared audience segments,
    and picked audiences, whose generated names record their data source and values
    (:mod:`segflowd.sources.picked`). A data source is preloaded once even if the user is
    in several of its audiences (declared ones first). A failing preload fails that
    message's render (the SourceError names the source), never the daemon.
    """

    def __init__(self, data_sources: DataSources, store: Store) -> None:
        self.ds = data_sources
        self.store = store
        self.preloads = 0

    async def context_for(self, user_id: str,
                          data: Mapping[str, object]) -> Mapping[str, object]:
        audiences = self.ds.audiences
        if not audiences and not self.ds.defs:
            return {}
        am = audience_members.c
        async with self.store.connect() as conn:
            names = [r[0] for r in await conn.execute(
                sa.select(am.audience).where(am.user_id == user_id).order_by(am.audience))]
        profile: dict[str, object] = {}
        done: set[str] = set()
        picks = [p for n in names if n not in audiences
                 for p in [parse_name(n, self.ds.defs)] if p is not None]
        declared = [(a.data_source, a.values) for n in names
                    for a in [audiences.get(n)] if a is not None]
        for data_source, values in declared + picks:
            if data_source in done:
                continue
            done.add(data_source)
            row = await self.ds.preload(data_source, user_id, values)
            self.preloads += 1
            if row:
                profile.update(row)
        if not done:
            return {}
        return {"profile": profile}


def _check_audience_columns(name: str, source: str, row: Row) -> None:
    cols = list(row)
    if "profile_id" not in row or not any(c in row for c in CONTACT_COLUMNS):
        raise SourceError(source, f"the audience query of data source {name!r} must return "
                                  f"profile_id plus email and/or phone; it returned: "
                                  f"{', '.join(cols)}")
