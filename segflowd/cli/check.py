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
from ..errors import AppError, SegflowError, TemplateError
from ..providers import ProviderContext, load_provider
from ..schema import SCHEMA_VERSION
from ..segments.query import probe_segment
from ..store import Store

__all__ = ["run_check"]

SCRATCH_URL = "sqlite+aiosqlite:///:memory:"


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
