"""What a user's app declares of DirectFlow data sources, apart from the pools that run them.

``app.data_source`` and ``app.audience_segment`` make these definitions, and ``check``
validates them, without importing any connection code: the runner is
:class:`segflowd.sources.datasources.DataSources`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .placeholders import Placeholders, parse

__all__ = ["AUDIENCE_SQL", "CONTACT_COLUMNS", "AudienceDef", "DataSourceDef",
           "check_definitions", "check_sources", "parse_query"]

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


def parse_query(kind: str, name: str, sql: object, origin: str) -> Placeholders:
    """Parse one of a data source's queries for app registration (ValueError → message)."""
    if not isinstance(sql, str):
        raise ValueError(f"{origin}: data source {name!r}: {kind}= must be SQL text")
    try:
        return parse(sql)
    except ValueError as exc:
        raise ValueError(f"{origin}: data source {name!r}: {kind} query: {exc}") from None
