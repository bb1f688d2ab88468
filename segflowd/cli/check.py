"""``segflowd check``: everything that can be known before starting, as a list of problems.

It never changes the store. An empty store is probed on its own dialect all the same:
SQLite through a scratch in-memory copy of the schema, MySQL/MariaDB through the schema
created as TEMPORARY tables of one session (seen by no other session, gone when it
closes). A store at an older schema is reported as "will migrate at start", not
migrated. The checks of templates and data sources live in :mod:`.checktemplates` and
:mod:`.checksources`; what they know of the flows comes from :mod:`.flowscan`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import sqlalchemy as sa

from .. import schema
from ..app import Segflow, evaluating_at
from ..clock import utcnow
from ..config import Config
from ..errors import AppError, SegflowError
from ..flows.localwait import local_wait_problems
from ..flows.split import split_problems
from ..providers import ProviderContext, load_provider, load_sms_provider
from ..segments.query import db_message, probe_segment, segment_select
from ..store import Store
from .checksources import check_data_sources
from .checktemplates import template_problems, unknown_templates
from .flowscan import scan_app
from .smscheck import sms_template_problems, unknown_sms_templates
from .webhookcheck import webhook_problems

__all__ = ["public_url_warnings", "run_check"]

SCRATCH_URL = "sqlite+aiosqlite:///:memory:"
_MYSQL_CANT_REOPEN = 1137  # MySQL reads a TEMPORARY table once per query


async def run_check(config: Config, app: Segflow, out: Callable[[str], None], *,
                    strict: bool = False, fail_on_divergence: bool = False) -> list[str]:
    """Check the app, providers, store and templates; return every problem found.

    ``strict``: an unreachable data source is a problem, not a warning.
    ``fail_on_divergence``: an in-flight instance that would diverge is a problem.
    """
    problems = list(app.problems())
    out(f"app: {len(app.segments)} segments, {len(app.campaigns)} campaigns, "
        f"{len(app.templates)} templates, {len(app.transactions)} transactions")
    calls = scan_app(app)
    problems.extend(unknown_templates(app, calls))
    problems.extend(unknown_sms_templates(app, calls))
    problems.extend(webhook_problems(config, calls))  # literal URLs the allow-list refuses
    problems.extend(local_wait_problems(calls))  # rt.wait_until_local's hours, days, zones
    problems.extend(split_problems(calls))  # rt.split's literal weights
    for line in public_url_warnings(config):
        out(line)

    for name, table in config.providers.items():
        ctx = ProviderContext(name, table.options, config.base_dir)
        try:  # the [sms] provider's table is an SMS plugin's, every other a mail one's
            sms = name == config.sms.provider
            provider = load_sms_provider(ctx) if sms else load_provider(ctx)
            await provider.aclose()
        except SegflowError as exc:
            problems.append(str(exc))
    if (app.sms_templates or any(c.command == "send_sms" for c in calls)) \
            and not config.sms.provider:
        problems.append("the app sends SMS (rt.send_sms, SMS templates) but no [sms] "
                        "provider is configured: its SMS would all fail")

    problems.extend(await _check_store_and_segments(config, app, out, fail_on_divergence))
    sources = await check_data_sources(config, app, calls, out, strict=strict)
    problems.extend(sources.problems)
    problems.extend(template_problems(app, calls, sources.profile))
    problems.extend(sms_template_problems(app, calls))
    return problems


def public_url_warnings(config: Config) -> list[str]:
    """What ``[http] public_url`` costs the mail sent: links to the listen address
    (none given, the outbox only), or no one-click unsubscribe (not https)."""
    url = config.http.public_url
    if not url:
        return [f"warning: http.public_url is not set: links in messages point at "
                f"http://{config.http.listen}, which only this machine can open"]
    if not url.lower().startswith("https://"):
        return [f"warning: http.public_url {url!r} is not https: messages go out without "
                "List-Unsubscribe-Post (RFC 8058 one-click unsubscribe), which Gmail and "
                "Yahoo require of bulk senders"]
    return []


async def _check_store_and_segments(config: Config, app: Segflow,
                                    out: Callable[[str], None],
                                    fail_on_divergence: bool) -> list[str]:
    problems: list[str] = []
    store = Store.open(config.store.url, connect_timeout=config.store.connect_timeout)
    try:
        try:
            version = await store.read_schema_version()
        except Exception as exc:
            return [f"store {store.safe_url} is unreachable: {exc}"]
        now = utcnow()
        if version is None:
            out(f"store {store.safe_url}: empty; it will be created at start "
                "(segments probed against the schema created for this check only)")
            return await _probe_empty(store, app, now, out)
        if version > schema.SCHEMA_VERSION:
            return [f"store {store.safe_url}: schema version {version} is newer than this "
                    f"segflowd knows ({schema.SCHEMA_VERSION}): upgrade segflowd"]
        if version < schema.SCHEMA_VERSION:
            out(f"store {store.safe_url}: schema {version}, will migrate to "
                f"{schema.SCHEMA_VERSION} at start")
        else:
            out(f"store {store.safe_url}: schema version {version}")
        for defn in app.segments.values():
            try:
                await probe_segment(store, defn, now)
            except AppError as exc:
                problems.append(str(exc))
        if version == schema.SCHEMA_VERSION:
            problems.extend(await _deploy_preview(store, app, now, out, fail_on_divergence))
    finally:
        await store.close()
    return problems


async def _deploy_preview(store: Store, app: Segflow, now: dt.datetime,
                          out: Callable[[str], None], fail_on_divergence: bool) -> list[str]:
    """What starting with this code does to in-flight flows; with ``fail_on_divergence``,
    a problem per campaign whose instances would diverge, naming the first mismatch."""
    from ..flows.versions import preview_lines, reconcile_versions

    try:
        reports = await reconcile_versions(store, app, now, apply=False)
    except SegflowError as exc:
        return [f"deploy preview: {exc}"]
    for line in preview_lines(reports):
        out(line)
    if not fail_on_divergence:
        return []
    return [f"deploy preview: campaign {r.campaign!r}: {r.diverged} in-flight "
            f"instance{'s' if r.diverged != 1 else ''} would diverge; the first, instance "
            f"{r.diverged_instances[0][0]}: {r.diverged_instances[0][1]}"
            for r in reports if r.diverged and r.diverged_instances]


async def _probe_empty(store: Store, app: Segflow, now: dt.datetime,
                       out: Callable[[str], None]) -> list[str]:
    """Probe every segment against the schema, created for this check only."""
    if store.dialect == "sqlite":
        scratch = Store.open(SCRATCH_URL)
        try:
            await scratch.migrate()
            problems: list[str] = []
            for defn in app.segments.values():
                try:
                    await probe_segment(scratch, defn, now)
                except AppError as exc:
                    problems.append(str(exc))
            return problems
        finally:
            await scratch.close()
    temporary = sa.MetaData()
    for t in schema.metadata.sorted_tables:  # columns only: no index, key or default
        sa.Table(t.name, temporary, *[sa.Column(c.name, c.type, primary_key=c.primary_key)
                                      for c in t.columns], prefixes=["TEMPORARY"])
    problems = []
    async with store.connect() as conn:
        try:
            try:
                await conn.run_sync(temporary.create_all, checkfirst=False)
            except sa.exc.SQLAlchemyError as exc:
                out(f"note: segments not probed: this check cannot create temporary tables "
                    f"on the store ({db_message(exc)}); they are probed at start")
                return []
            for defn in app.segments.values():
                try:
                    with evaluating_at(now):
                        await conn.execute(segment_select(defn).limit(0))
                except AppError as exc:
                    problems.append(str(exc))
                except sa.exc.SQLAlchemyError as exc:
                    code = (getattr(getattr(exc, "orig", None), "args", None) or (None,))[0]
                    if code == _MYSQL_CANT_REOPEN:
                        out(f"note: segment {defn.name!r} reads a table twice, which MySQL "
                            "cannot do on this check's temporary schema: probed at start")
                        continue
                    problems.append(f"{defn.origin}: segment {defn.name!r} fails on the "
                                    f"store: {db_message(exc)}")
        finally:
            # The temporary tables end with the session: never a DROP TABLE, which on a
            # store holding tables of the same names could reach those.
            await conn.invalidate()
    return problems
