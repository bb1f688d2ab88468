"""``segflowd check``: the data sources, their SQL run on the customer's own database.

For every reachable ``[sources.NAME]``, each discovery, audience and preload query of
its data sources, and each literal ``rt.condition(NAME, SQL, ...)`` of a flow, runs in
the source's read-only session with its placeholders bound (the audience segment's
values, a literal keyword's value, else NULL) and no row fetched (``SELECT * FROM (...)
AS q LIMIT 0``). A failure is a problem naming the data source, the query and the
database's message; so are an audience without ``profile_id`` and ``email``/``phone``,
and a condition without a ``result`` column. An unreachable source is a warning saying
what was skipped (``--strict``: a problem). The preload's columns are the ``profile``
the templates are then checked with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from ..app import Segflow
from ..config import Config
from ..delivery.templates import SampleData, SampleValue
from ..errors import SourceError
from ..placeholders import Placeholders, parse
from ..sourcedefs import CONTACT_COLUMNS, check_sources
from ..sources.pools import Source, open_source
from .flowscan import FlowCall

__all__ = ["SourcesReport", "check_data_sources"]

# Can the source's role write? Superuser, or any write privilege on a table it can see.
_PG_ROLE = """SELECT r.rolsuper AS superuser, (SELECT count(*) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND (has_table_privilege(c.oid, 'INSERT') OR has_table_privilege(c.oid, 'UPDATE')
       OR has_table_privilege(c.oid, 'DELETE') OR has_table_privilege(c.oid, 'TRUNCATE'))
  ) AS writable FROM pg_roles r WHERE r.rolname = current_user"""
_MYSQL_WRITES = ("ALL", "INSERT", "UPDATE", "DELETE", "DROP", "CREATE", "ALTER", "SUPER")


@dataclasses.dataclass
class SourcesReport:
    problems: list[str]
    profile: Mapping[str, object] | None  # the templates' sample ``profile``; None: none


@dataclasses.dataclass(frozen=True)
class _Query:
    where: str  # file:line of the data source or the condition
    kind: str  # discovery | audience | preload | condition
    what: str  # "audience query of data source 'members'", for messages
    sql: str
    values: Mapping[str, object]


async def check_data_sources(config: Config, app: Segflow, calls: Sequence[FlowCall],
                             out: Callable[[str], None], *, strict: bool = False
                             ) -> SourcesReport:
    """Every problem of the data sources and conditions, and the templates' ``profile``."""
    problems = check_sources(app.data_sources, config.sources)
    queries: dict[str, list[_Query]] = {name: [] for name in config.sources}
    for q, source in _queries(app, calls):
        if source in queries:
            queries[source].append(q)
        elif q.kind == "condition":
            problems.append(f"{q.where}: {q.what} names source {source!r}, which is not "
                            f"configured: add [sources.{source}]")
    preloaded = {d.source for d in app.data_sources.values() if d.preload is not None}
    columns: set[str] = set()
    known = True
    opened: dict[str, Source] = {}
    try:
        for name, table in config.sources.items():
            try:
                opened[name] = open_source(table)
            except SourceError as exc:
                problems.append(str(exc))
                known = known and name not in preloaded
        for src in opened.values():
            try:
                await src.fetch("SELECT 1", {}, what="connection check", limit=1)
            except SourceError as exc:
                skipped = (", ".join(q.what for q in queries[src.name])
                           or "no query of the app uses it")
                line = f"source {src.name!r}: not checked ({skipped}): {exc}"
                if strict:
                    problems.append(line)
                else:
                    out(f"warning: {line} (--strict makes this a problem)")
                known = known and src.name not in preloaded
                continue
            for line in await _role_warnings(src):
                out(line)
            for q in queries[src.name]:
                found = await _probe(src, q)
                if isinstance(found, str):
                    problems.append(found)
                    known = known and q.kind != "preload"
                elif q.kind == "preload":
                    columns.update(found)
    finally:
        for src in opened.values():
            await src.close()
    profile: Mapping[str, object] | None = None
    if preloaded:
        profile = ({c: SampleValue(f"<{c}>") for c in columns} if known else SampleData())
    return SourcesReport(problems, profile)


def _queries(app: Segflow, calls: Sequence[FlowCall]) -> list[tuple[_Query, str]]:
    """Each query ``check`` can run, with the source it runs on."""
    out: list[tuple[_Query, str]] = []
    for d in app.data_sources.values():
        chosen: dict[str, object] = {}
        for a in app.audiences.values():
            if a.data_source == d.name:
                chosen = dict(a.values)
                break
        kinds: tuple[tuple[str, Placeholders | None, dict[str, object]], ...] = (
            ("discovery", d.discovery, {}), ("audience", d.audience, chosen),
                 ("preload", d.preload, {**chosen, "profile_id": None}))
        for kind, parsed, values in kinds:
            if parsed is not None:
                out.append((_Query(d.origin, kind, f"{kind} query of data source {d.name!r}",
                                   parsed.sql, {**dict.fromkeys(parsed.names), **values}),
                            d.source))
    for c in calls:
        if c.command != "condition" or c.name is None or c.sql is None:
            continue
        try:
            names = parse(c.sql).names
        except ValueError:
            continue  # refused at run time with the same message; not this check's
        values = {**dict.fromkeys(names), **{k: v for k, v in c.keywords.items()
                                             if k in names}}
        out.append((_Query(c.where, "condition", f"condition of campaign {c.campaign!r}",
                           c.sql, values), c.name))
    return out


async def _probe(src: Source, q: _Query) -> list[str] | str:
    """The query's columns, or the problem that running it found."""
    sql = q.sql.rstrip().removesuffix(";")
    try:
        cols = await src.columns(src.statement(sql, q.values, what=q.what), what=q.what)
    except SourceError as exc:
        return f"{q.where}: {exc}"
    if q.kind == "audience" and ("profile_id" not in cols
                                 or not any(c in cols for c in CONTACT_COLUMNS)):
        return (f"{q.where}: the {q.what} on data source {src.name!r} must return "
                f"profile_id plus email and/or phone; it returns: {', '.join(cols)}")
    if q.kind == "condition" and "result" not in cols:
        return (f"{q.where}: the {q.what} on data source {src.name!r} must return a "
                f"'result' column; it returns: {', '.join(cols)}")
    return cols


async def _role_warnings(src: Source) -> list[str]:
    what = f"source {src.name!r} ({src.safe_url})"
    try:
        if src.dialect == "postgresql":
            rows = await src.fetch(_PG_ROLE, {}, what="role check", limit=1)
            superuser = bool(rows and rows[0]["superuser"])
            writable = bool(rows and int(str(rows[0]["writable"])))
        else:
            grants = [str(v) for r in await src.fetch("SHOW GRANTS", {}, what="role check")
                      for v in r.values()]
            # "GRANT SELECT, INSERT ON `db`.* TO ...": the words before ON
            privileges = [set(g.upper().split(" ON ", 1)[0].replace(",", " ").split())
                          for g in grants if " ON " in g]
            superuser = any("SUPER" in p or ("ALL" in p and "ON *.*" in g.upper())
                            for p, g in zip(privileges, [g for g in grants if " ON " in g],
                                            strict=True))
            writable = any(p & set(_MYSQL_WRITES) for p in privileges)
    except SourceError as exc:
        return [f"warning: {what}: could not check the role's privileges: {exc}"]
    if superuser:
        return [f"warning: {what}: the role is a superuser; read-only sessions do not hold "
                "against it (dblink_exec, COPY ... TO PROGRAM): use a role with SELECT only"]
    if writable:
        return [f"warning: {what}: the role can write to tables; reads are kept read-only "
                "by the session, but only the role's privileges are a real boundary: "
                "grant it SELECT only"]
    return []
