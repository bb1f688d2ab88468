"""DirectFlow data sources: discovery, audience and preload queries over a source.

A data source is three SQL queries on one ``[sources.NAME]`` database:

* **discovery** lists the audiences one can choose (e.g. communities and their sizes);
* **audience**, given a chosen discovery row's values, returns ``profile_id`` plus
  ``email`` and/or ``phone`` and any other columns (a result without them is an error);
* **preload** runs per profile at send time with ``profile_id`` and the audience's
  values; its columns are the template's ``profile``.

The definitions (:class:`DataSourceDef`, :class:`AudienceDef`) are made by
``app.data_source`` and ``app.audience_segment``; :class:`DataSources` runs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

import sqlalchemy as sa
import structlog

from .errors import SourceError
from .placeholders import Placeholders, parse
from .schema import audience_members
from .sources import Row, SourceLookup, json_value

if TYPE_CHECKING:
    from .store import Store

__all__ = ["AUDIENCE_SQL", "AudienceDef", "DataSourceDef", "DataSources", "PreloadContext",
           "check_definitions", "check_sources", "parse_query"]

log = structlog.get_logger("segflowd.datasources")

DISCOVERY_LIMIT = 1000  # rows of a discovery query shown to a person at most
CONTACT_COLUMNS = ("email", "phone")

# The segment an audience is: its synced members (the segment engine evaluates it).
AUDIENCE_SQL = "SELECT user_id AS id FROM audience_members WHERE audience = :audience"


@dataclasses.dataclass(frozen=True)
class DataSourceDef:
    """``app.data_source(name, source=, discovery=, audience=, preload=)``."""

    name: str
    source: str  # a [sources.NAME] table
    discovery: Placeholders | None
    audience: Placeholders
    preload: Placeholders | None
    origin: str  # file:line of the definition


@dataclasses.dataclass(frozen=True)
class AudienceDef:
    """An audience of a data source with chosen values, kept as a segment named ``name``."""

    name: str
    data_source: str
    values: Mapping[str, object]
    refresh: float  # seconds between syncs
    origin: str


def check_sources(data_sources: Mapping[str, DataSourceDef],
                  sources: Mapping[str, object]) -> list[str]:
    """The data sources naming a ``[sources.NAME]`` that segflow.toml does not configure."""
    out: list[str] = []
    for d in data_sources.values():
        if d.source not in sources:
            known = ", ".join(sorted(sources)) or "none configured"
            out.append(f"{d.origin}: data source {d.name!r} names source {d.source!r}, which "
                       f"is not configured: add [sources.{d.source}] (sources: {known})")
    return out


def check_definitions(data_sources: Mapping[str, DataSourceDef],
                      audiences: Mapping[str, AudienceDef]) -> list[str]:
    """Every problem knowable from the app alone: unknown names, unbound placeholders."""
    out: list[str] = []
    for d in data_sources.values():
        if d.discovery is not None and d.discovery.names:
            out.append(f"{d.origin}: data source {d.name!r}: the discovery query takes no "
                       f"placeholders, but uses <%= {d.discovery.names[0]} %>")
    for a in audiences.values():
        ds = data_sources.get(a.data_source)
        if ds is None:
            out.append(f"{a.origin}: audience segment {a.name!r} names unknown data source "
                       f"{a.data_source!r}")
            continue
        for name in ds.audience.missing(a.values):
            out.append(f"{a.origin}: audience segment {a.name!r}: the audience query of "
                       f"{ds.name!r} uses <%= {name} %>, which values= does not give")
        if ds.preload is not None:
            for name in ds.preload.missing([*a.values, "profile_id"]):
                out.append(f"{a.origin}: audience segment {a.name!r}: the preload query of "
                           f"{ds.name!r} uses <%= {name} %>, which is neither profile_id "
                           f"nor in values=")
    return out


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
        rows = await self.sources.get(d.source).fetch(
            d.discovery.sql, {}, what=f"discovery query of data source {name!r}", limit=limit)
        return [{k: json_value(v) for k, v in r.items()} for r in rows]

    async def audience(self, name: str, values: Mapping[str, object]
                       ) -> AsyncIterator[list[Row]]:
        """The audience rows for ``values``, in batches; SourceError if a row lacks a column.

        Each row has ``profile_id`` as text, and JSON-able values.
        """
        d = self.get(name)
        what = f"audience query of data source {name!r}"
        src = self.sources.get(d.source)
        stmt = d.audience.bind(values, source=d.source, what=what)
        checked = False
        async for batch in src.stream(stmt, what=what):
            if batch and not checked:
                _check_audience_columns(name, d.source, batch[0])
                checked = True
            out: list[Row] = []
            for r in batch:
                pid = r["profile_id"]
                if pid is None or str(pid) == "":
                    continue  # a profile without an id cannot be a user
                row = {k: json_value(v) for k, v in r.items()}
                row["profile_id"] = str(pid)
                out.append(row)
            yield out

    async def preload(self, name: str, profile_id: str,
                      values: Mapping[str, object]) -> Row | None:
        """The preload row of one profile (None: no preload query, or no row)."""
        d = self.get(name)
        if d.preload is None:
            return None
        rows = await self.sources.get(d.source).fetch(
            d.preload.sql, {**values, "profile_id": profile_id},
            what=f"preload query of data source {name!r}", limit=1)
        return {k: json_value(v) for k, v in rows[0].items()} if rows else None


class PreloadContext:
    """ContextProvider: the preload row of the user's audiences as template ``profile``.

    The user's audiences are their ``audience_members`` rows; a data source is preloaded
    once even if the user is in several of its audiences. A failing preload fails that
    message's render (the SourceError names the source), never the daemon.
    """

    def __init__(self, data_sources: DataSources, store: Store) -> None:
        self.ds = data_sources
        self.store = store
        self.preloads = 0

    async def context_for(self, user_id: str,
                          data: Mapping[str, object]) -> Mapping[str, object]:
        audiences = self.ds.audiences
        if not audiences:
            return {}
        am = audience_members.c
        async with self.store.connect() as conn:
            names = [r[0] for r in await conn.execute(
                sa.select(am.audience).where(am.user_id == user_id).order_by(am.audience))]
        profile: dict[str, object] = {}
        done: set[str] = set()
        for name in names:
            a = audiences.get(name)
            if a is None or a.data_source in done:
                continue
            done.add(a.data_source)
            row = await self.ds.preload(a.data_source, user_id, a.values)
            self.preloads += 1
            if row:
                profile.update(row)
        if not done:
            return {}
        return {"profile": profile}


def parse_query(kind: str, name: str, sql: object, origin: str) -> Placeholders:
    """Parse one of a data source's queries for app registration (ValueError → message)."""
    if not isinstance(sql, str):
        raise ValueError(f"{origin}: data source {name!r}: {kind}= must be SQL text")
    try:
        return parse(sql)
    except ValueError as exc:
        raise ValueError(f"{origin}: data source {name!r}: {kind} query: {exc}") from None


def _check_audience_columns(name: str, source: str, row: Row) -> None:
    cols = list(row)
    if "profile_id" not in row or not any(c in row for c in CONTACT_COLUMNS):
        raise SourceError(source, f"the audience query of data source {name!r} must return "
                                  f"profile_id plus email and/or phone; it returned: "
                                  f"{', '.join(cols)}")
