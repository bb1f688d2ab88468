"""Numbered schema migrations.

A fresh store is created straight at :data:`segflowd.schema.SCHEMA_VERSION` from the
table definitions in :mod:`segflowd.schema`, then stamped. A store at an older version
runs each step after its own: module ``mNNNN_<what>.py`` here defines
``upgrade(conn: sqlalchemy.engine.Connection) -> None`` that takes a store from version
NNNN-1 to NNNN, in portable Core DDL (dialect branches on ``conn.dialect.name`` where
they must differ). Version 1 is the initial schema, so there is no step for it.

Why not Alembic: the schema is owned by one program that migrates itself at start, on
two dialects, inside the store's own transaction and lock. Numbered steps run through
the same connection do that with no env.py, no second configuration and no extra
dependency; autogenerate is not needed because every change is written on purpose.
"""
