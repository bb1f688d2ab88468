"""Commands that work on the store directly (no daemon needed): opening it safely.

:func:`with_store` runs a function on the configured store, which must exist and must
not be newer than this segflowd; it never creates or migrates anything. Every error of
the store becomes one line naming it (a :class:`~segflowd.errors.StoreError`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import sqlalchemy as sa

from .. import schema
from ..config import Config
from ..errors import SchemaTooNew, SegflowError, StoreError, StoreUnavailable
from ..store import Store

__all__ = ["NotFound", "Use", "with_store"]

Use = Callable[[Store], Awaitable[None]]  # what is done with the open store


class NotFound(SegflowError):
    """What a command was asked to change is not in the store."""


def with_store(config: Config, fn: Use, *, empty: str | None = None) -> None:
    """Run ``fn`` on the store, which must exist; an empty store has nothing in it
    (``empty`` is then the :class:`NotFound` to raise, if any)."""
    url = sa.engine.make_url(config.store.url)
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database and not database.startswith(
            ":memory:") and not Path(database).exists():
        raise StoreError(f"store {url.render_as_string(hide_password=True)}: no such "
                         "database file (check [store] url)")

    async def main() -> None:
        store = Store.open(config.store.url, connect_timeout=config.store.connect_timeout)
        try:
            version = await store.read_schema_version()
            if version is None:
                if empty is not None:
                    raise NotFound(empty)
                return
            if version > schema.SCHEMA_VERSION:
                raise SchemaTooNew(f"store {store.safe_url}: schema version {version} is "
                                   f"newer than this segflowd knows ({schema.SCHEMA_VERSION})"
                                   ": upgrade segflowd")
            await fn(store)
        except StoreUnavailable as exc:
            raise StoreError(f"store {store.safe_url} is unreachable: "
                             f"{str(exc).removeprefix('store unavailable: ')}") from None
        except SegflowError:
            raise
        except Exception as exc:  # the driver's own error: unreachable, access denied, ...
            reason = str(getattr(exc, "orig", None) or exc).split("\n", 1)[0]
            raise StoreError(f"store {store.safe_url}: {reason}") from None
        finally:
            await store.close()

    anyio.run(main)
