"""``segflowd check``: everything that can be known before starting, as a list of problems.

It never changes the store: an empty store is probed through a scratch in-memory
SQLite copy of the schema instead, and a store at an older schema is reported as
"will migrate at start", not migrated.
"""

from __future__ import annotations

from collections.abc import Callable

from ..app import Segflow
from ..clock import utcnow
from ..config import Config
from ..delivery.templates import Renderer, SampleData, sample_user
from ..errors import AppError, SegflowError, SourceError, TemplateError
from ..providers import ProviderContext, load_provider
from ..schema import SCHEMA_VERSION
from ..segments.query import probe_segment
from ..sourcedefs import check_sources
from ..sources.pools import Source, open_source
from ..store import Store

__all__ = ["run_check"]

SCRATCH_URL = "sqlite+aiosqlite:///:memory:"
# Can the source's role write? Superuser, or any write privilege on a table it can see.
_PG_ROLE = """SELECT r.rolsuper AS superuser, (SELECT count(*) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND (has_table_privilege(c.oid, 'INSERT') OR has_table_privilege(c.oid, 'UPDATE')
       OR has_table_privilege(c.oid, 'DELETE') OR has_table_privilege(c.oid, 'TRUNCATE'))
  ) AS writable FROM pg_roles r WHERE r.rolname = current_user"""
_MYSQL_WRITES = ("ALL", "INSERT", "UPDATE", "DELETE", "DROP", "CREATE", "ALTER", "SUPER")


async def run_check(config: Config, app: Segflow, out: Callable[[str], None]) -> list[str]:
    """Check the app, providers, store and templates; return every problem found."""
    problems = list(app.problems())
    out(f"app: {len(app.segments)} segments, {len(app.campaigns)} campaigns, "
        f"{len(app.templates)} templates, {len(app.transactions)} transactions")

    for name, table in config.providers.items():
        try:
            provider = load_provider(ProviderContext(name, table.options, config.base_dir))
            await provider.aclose()
        except SegflowError as exc:
            problems.append(str(exc))

    problems.extend(await _check_store_and_segments(config, app, out))
    problems.extend(await _check_data_sources(config, app, out))

    renderer = Renderer(app)
    for tpl in app.templates.values():
        if any(f"'{tpl.name}'" in p and "not found" in p for p in problems):
            continue  # its file is missing; already reported
        try:
            renderer.render(tpl.name, {"user": sample_user(), "event": _sample_event()})
        except TemplateError as exc:
            problems.append(f"{tpl.origin}: {exc}")
    return problems


def _sample_event() -> SampleData:
    """Shaped like the ``event`` a transaction's template gets (see transactions.py)."""
    return SampleData(id=0, name="sample", attributes=SampleData(),
                      created_at="2026-01-01T00:00:00Z")


async def _check_store_and_segments(config: Config, app: Segflow,
                                    out: Callable[[str], None]) -> list[str]:
    problems: list[str] = []
    store = Store.open(config.store.url, connect_timeout=config.store.connect_timeout)
    scratch: Store | None = None
    try:
        try:
            version = await store.read_schema_version()
        except Exception as exc:
            return [f"store {store.safe_url} is unreachable: {exc}"]
        if version is None:
            out(f"store {store.safe_url}: empty; it will be created at start "
                "(segments probed against a scratch SQLite schema)")
            scratch = Store.open(SCRATCH_URL)
            await scratch.migrate()
            target = scratch
        elif version > SCHEMA_VERSION:
            return [f"store {store.safe_url}: schema version {version} is newer than this "
                    f"segflowd knows ({SCHEMA_VERSION}): upgrade segflowd"]
        else:
            if version < SCHEMA_VERSION:
                out(f"store {store.safe_url}: schema {version}, will migrate to "
                    f"{SCHEMA_VERSION} at start")
            else:
                out(f"store {store.safe_url}: schema version {version}")
            target = store
        now = utcnow()
        for defn in app.segments.values():
            try:
                await probe_segment(target, defn, now)
            except AppError as exc:
                problems.append(str(exc))
        if target is store and version == SCHEMA_VERSION:
            # The deploy preview: what starting with this code does to in-flight flows.
            from ..flows.versions import preview_lines, reconcile_versions

            try:
                reports = await reconcile_versions(store, app, now, apply=False)
            except SegflowError as exc:
                problems.append(f"deploy preview: {exc}")
            else:
                for line in preview_lines(reports):
                    out(line)
    finally:
        await store.close()
        if scratch is not None:
            await scratch.close()
    return problems


async def _check_data_sources(config: Config, app: Segflow,
                              out: Callable[[str], None]) -> list[str]:
    """Data sources naming an unconfigured source; a warning per source whose role could
    write (read-only sessions are not a boundary against such a role). The SQL itself was
    checked when the app loaded, under the rules of both databases."""
    problems = check_sources(app.data_sources, config.sources)
    opened: dict[str, Source] = {}
    try:
        for name, table in config.sources.items():
            try:
                opened[name] = open_source(table)
            except SourceError as exc:
                problems.append(str(exc))
        for src in opened.values():
            for line in await _role_warnings(src):
                out(line)
    finally:
        for src in opened.values():
            await src.close()
    return problems


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
