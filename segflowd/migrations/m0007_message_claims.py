"""Version 7: ``messages.claim``, the token of the claim that made a row ``sending``.

Delivery records a batch's outcomes only on rows still under the claim that sent them
(see :mod:`segflowd.delivery.outcomes`): a record retried after a lost COMMIT reply can
then never undo a later claim of the same row. Rows from before have none; a row
``sending`` at the upgrade is made ``unknown`` at start as always.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def upgrade(conn: Connection) -> None:
    # MariaDB commits an ALTER at once: a step killed after it runs again from here
    columns = {c["name"] for c in sa.inspect(conn).get_columns("messages")}
    if "claim" not in columns:
        conn.execute(sa.text("ALTER TABLE messages ADD COLUMN claim VARCHAR(32) NULL"))
