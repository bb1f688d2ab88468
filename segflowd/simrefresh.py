"""The segment refresh schedule of a simulation, and the look before each refresh.

The daemon refreshes each segment on its interval (``refresh="15m"``): over forty
simulated days that is thousands of refreshes, nearly all of which change nothing. At
each due time the simulation therefore first asks the store, read-only, whether the
refresh would change anything (a user the segment returns who is not a member, or a
member it no longer returns); only then does the segment engine refresh for real.
The question is asked generously (it may answer yes where the real refresh then finds
nothing, never no where it would find something), so the entries and exits, and all
that follows from them, are the daemon's; what a skipped refresh would have written is
its bookkeeping (``segment_state``'s times), which no campaign reads.

Even the look is skipped while its answer cannot have changed. After a look that found
nothing, the segment returns exactly its members; until something is committed to the
store (``PRAGMA data_version``), what it returns can change only with time, and time
reaches a segment only through its ``ago()`` binds. When every such bind is compared
directly (``<``, ``<=``, ``>``, ``>=``; ``=`` and ``!=`` too in a Core query) with a
stored date column, or with ``MIN``/``MAX`` of one, and nothing else could stand in
(no ``SELECT *``, no alias of that column's name, no date function), the answer of
each comparison (and so the whole query) stays the same until the bind, moving with
the clock, reaches the next stored value of that column: :func:`time_binds` finds those
binds, and the next look is due no earlier than that moment. A segment without
``ago()`` binds is looked at only after a commit; one whose time the analysis cannot
follow (a bind inside arithmetic or a function, SQL reading the database's own clock)
at every refresh.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import re
from pathlib import Path

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, BindParameter
from sqlalchemy.sql.functions import max as sql_max
from sqlalchemy.sql.functions import min as sql_min
from sqlalchemy.sql.selectable import AliasedReturnsRows

from .app import Ago, Segflow, SegmentDef, evaluating_at
from .errors import AppError
from .schema import metadata, segment_members, users
from .segments.query import CompiledSegment, compile_segment

__all__ = ["RefreshSchedule", "TimeBind", "time_binds"]

log = structlog.get_logger("segflowd.simulation")

Column = tuple[str, str]  # (table, column) of the store's schema
FOREVER = dt.datetime.max


@dataclasses.dataclass(frozen=True)
class TimeBind:
    """An ``ago(delta)`` bind that the segment compares only with stored ``columns``."""

    delta: dt.timedelta
    columns: frozenset[Column]


class RefreshSchedule:
    """When each segment of ``app`` is next due, from ``start``; see the module docstring."""

    def __init__(self, app: Segflow, database: Path, start: dt.datetime) -> None:
        self.app = app
        self.next: dict[str, dt.datetime] = dict.fromkeys(app.segments, start)
        self.looked = 0  # due refreshes looked at
        self.probed = 0  # of them, asked of the store (the others could not have changed)
        self.refreshed = 0  # of them, handed to the segment engine
        self._engine = sa.create_engine(f"sqlite:///{database}", poolclass=sa.pool.StaticPool)
        self._conn: sa.Connection | None = None  # one, its read ended after each look
        self._probes: dict[str, sa.Select[tuple[bool]] | None] = {}
        self._binds: dict[str, tuple[TimeBind, ...] | None] = {}
        # Per segment, after a look that found nothing: the store's data_version then,
        # and the moment from which time alone may change the segment.
        self._stable: dict[str, tuple[int, dt.datetime]] = {}
        for name, defn in app.segments.items():
            try:
                seg = compile_segment(defn)
            except AppError:
                self._probes[name] = None  # broken: the engine says so when it refreshes
                continue
            self._probes[name] = _probe(seg)
            self._binds[name] = time_binds(seg)

    def due(self, now: dt.datetime) -> list[str]:
        """The segments due at ``now``, in order of name; each is scheduled on."""
        names = sorted(n for n, t in self.next.items() if t <= now)
        for name in names:
            self.next[name] = now + dt.timedelta(seconds=self.app.segments[name].refresh)
        return names

    def next_time(self) -> dt.datetime | None:
        return min(self.next.values(), default=None)

    def would_change(self, name: str, now: dt.datetime) -> bool:
        """Whether refreshing ``name`` at ``now`` may change its membership."""
        self.looked += 1
        probe = self._probes.get(name)
        if probe is None:
            self.refreshed += 1
            return True
        conn = self._connection()
        try:
            version = int(conn.exec_driver_sql("PRAGMA data_version").scalar() or 0)
            stable = self._stable.get(name)
            if stable is not None and stable[0] == version and now < stable[1]:
                return False
            self.probed += 1
            with evaluating_at(now):
                found = bool(conn.execute(probe).scalar())
            binds = self._binds.get(name)
            if found or binds is None:
                self._stable.pop(name, None)
            else:
                self._stable[name] = (version, _next_change(conn, binds, now))
        except (sa.exc.SQLAlchemyError, ValueError) as exc:  # a refresh records the error
            log.debug("simulation.probe_failed", segment=name, error=str(exc)[:200])
            self._stable.pop(name, None)
            found = True
        finally:
            conn.rollback()  # no snapshot kept: the next look sees every commit
        self.refreshed += found
        return found

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            self._conn = self._engine.connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._engine.dispose()


def _probe(seg: CompiledSegment) -> sa.Select[tuple[bool]]:
    """Whether there is an entry or an exit, as refresh_diff would find them, less its
    ``evaluated_at`` guard (so an exit may be found that the refresh then skips); one
    statement, the segment evaluated once."""
    m, name = segment_members, seg.name
    cte = seg.query.cte("seg")
    sid = next(iter(cte.c))
    returned = sa.select(sid).select_from(cte.join(users, users.c.id == sid))
    entry = sa.exists(returned.where(~sa.exists(
        sa.select(m.c.user_id).where(m.c.segment == name, m.c.user_id == sid))))
    leaving = sa.exists(sa.select(m.c.user_id).where(m.c.segment == name,
                                                       m.c.user_id.not_in(returned)))
    return sa.select(sa.or_(entry, leaving))


def _next_change(conn: sa.Connection, binds: tuple[TimeBind, ...],
                 now: dt.datetime) -> dt.datetime:
    """The first moment from ``now`` at which a bind reaches a stored value it is
    compared with (FOREVER if none is ahead of any): until then the segment returns
    what it returns at ``now``, unless the store changes."""
    first = FOREVER
    for bind in binds:
        at = now - bind.delta
        for table, column in sorted(bind.columns):
            col = metadata.tables[table].c[column]
            value = conn.execute(sa.select(sa.func.min(col)).where(col >= at)).scalar()
            if isinstance(value, dt.datetime) and value < FOREVER - bind.delta:
                first = min(first, value + bind.delta)
    return first


# -- which binds carry time, and what they are compared with ---------------------------

# SQL that reads the database's own clock (or anything else that changes by itself).
# The date functions too: with no time argument, or one computed ('n' || 'ow'), they
# read the clock, and nothing short of evaluating the SQL tells which they do.
_CLOCK = re.compile(r"\b(now|current_(timestamp|date|time)|localtime|utc|unixepoch|"
                    r"date|time|datetime|julianday|strftime|timediff|"
                    r"random|randomblob|changes|total_changes|"
                    r"last_insert_rowid|sysdate)\b", re.IGNORECASE | re.ASCII)
_CORE_COMPARISONS = {operators.lt, operators.le, operators.gt, operators.ge,
                     operators.eq, operators.ne}


def time_binds(seg: CompiledSegment) -> tuple[TimeBind, ...] | None:
    """The segment's ``ago()`` binds and the stored date columns each is compared with,
    or None when time may reach the query another way (see the module docstring)."""
    compiled = seg.query.compile(dialect=sqlite.dialect())
    if _CLOCK.search(str(compiled)) or any(
            isinstance(b.value, str) and b.value.strip().lower() == "now"  # date(:v)
            for b in compiled.binds.values()):
        return None
    if seg.defn.sql is not None:
        return _raw_binds(seg.defn)
    found = _core_binds(seg.query)
    if found is None:
        return None
    binds, seen = found
    if any(b.callable is not None and id(b) not in seen for b in compiled.binds.values()):
        return None  # a bind the tree walk did not reach: nothing can be said
    return binds


def _core_binds(query: sa.Select[tuple[str]]
                ) -> tuple[tuple[TimeBind, ...], set[int]] | None:
    """The binds of a Core query and the ids of the bind objects the walk saw."""
    agos: dict[int, Ago] = {}
    uses: collections.Counter[int] = collections.Counter()  # each place a bind is used
    compared: dict[int, set[Column]] = {}
    comparisons: collections.Counter[int] = collections.Counter()
    for el in visitors.iterate(query):  # every occurrence, a shared element each time
        if isinstance(el, AliasedReturnsRows) and el.name in metadata.tables:
            return None  # WITH users AS (...): "users.created_at" is not the stored one
        if isinstance(el, BindParameter) and el.callable is not None:
            owner = getattr(el.callable, "__self__", None)
            if not isinstance(owner, Ago):
                return None  # a bind computed at execution by something else
            agos[id(el)] = owner
            uses[id(el)] += 1
        elif isinstance(el, BinaryExpression) and el.operator in _CORE_COMPARISONS:
            for bind, other in ((el.right, el.left), (el.left, el.right)):
                column = _stored_column(other)
                if isinstance(bind, BindParameter) and column is not None:
                    compared.setdefault(id(bind), set()).add(column)
                    comparisons[id(bind)] += 1
    binds = []
    for key, owner in agos.items():
        if comparisons[key] != uses[key]:
            return None  # an ago() used some other way too
        binds.append(TimeBind(owner.delta, frozenset(compared[key])))
    return tuple(binds), set(agos)


def _stored_column(el: object) -> Column | None:
    """(table, column) when ``el`` is a stored date column, or MIN/MAX of one."""
    if isinstance(el, sql_max | sql_min):
        args = list(el.clauses)
        if len(args) != 1:
            return None
        el = args[0]
    if (isinstance(el, sa.Column) and isinstance(el.table, sa.Table)
            and metadata.tables.get(el.table.name) is el.table  # the store's, not a lookalike
            and isinstance(el.type, sa.DateTime)):
        return (el.table.name, el.name)
    return None


# Raw SQL: a small tokenizer, enough to see what each :bind is an operand of.
_TOKEN = re.compile(r"""
    (?P<string>'(?:[^']|'')*')
  | (?P<bind>:[A-Za-z_]\w*)
  | (?P<ident>(?:[A-Za-z_]\w*|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\])
       (?:\s*\.\s*(?:[A-Za-z_]\w*|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]))*)
  | (?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<op><=|>=|<>|!=|==|\|\||<<|>>|[-+*/%<>=(),;&|~.])
  | (?P<space>[ \t\r\n\f]+)
""", re.VERBOSE | re.ASCII)  # SQLite takes other characters (a no-break space) into names
_INEQUALITIES = {"<", "<=", ">", ">="}
# What may stand right before a comparison's left operand, and right after its right
# one, without taking part in it (a tighter operator there would change the operand).
_BEFORE = {"(", ",", "and", "or", "not", "where", "having", "on", "when", "then", "else",
           "select", "case", None}
_AFTER = {")", ",", ";", "and", "or", "then", "else", "end", "when", "group", "order",
          "limit", "having", "union", "except", "intersect", "window", None}


def _raw_binds(defn: SegmentDef) -> tuple[TimeBind, ...] | None:
    assert defn.sql is not None
    tokens = _tokens(defn.sql)
    if tokens is None:
        return None
    agos = {f":{k}": v for k, v in defn.params.items() if isinstance(v, Ago)}
    # SQLite also takes a string where a name goes (AS 'created_at', FROM 'events'): a
    # string counts as a name here, which only ever refuses more.
    words = [t.lower() for kind, t in tokens if kind in ("ident", "string")]
    for i, (_, text) in enumerate(tokens):
        if text == "*" and not (i >= 2 and tokens[i - 1][1] == "("
                                and tokens[i - 2][1].lower() == "count"
                                and i + 1 < len(tokens) and tokens[i + 1][1] == ")"):
            return None  # SELECT * brings columns in without naming them
    compared: dict[str, set[Column]] = {}
    operands: list[str] = []  # the column of every comparison found
    for i, (kind, text) in enumerate(tokens):
        if kind != "bind" or text not in agos:
            continue
        found = _operand(tokens, i)
        if found is None:
            return None
        columns = _schema_columns(found, words)
        if not columns:
            return None
        compared.setdefault(text, set()).update(columns)
        operands.append(found)
    # A compared column that appears anywhere else might be an alias of something
    # computed (``julianday(x) + 1 AS created_at``): then its values are not stored ones.
    for name in set(operands):
        if sum(_last(w) == name for w in words) != operands.count(name):
            return None
    return tuple(TimeBind(agos[b].delta, frozenset(cols)) for b, cols in compared.items())


def _tokens(sql: str) -> list[tuple[str, str]] | None:
    """(kind, text) of each token, spaces left out; None if anything is not understood
    (a comment, a character the tokenizer does not know)."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(sql):
        match = _TOKEN.match(sql, pos)
        if match is None or sql.startswith(("--", "/*"), pos):
            return None
        kind = match.lastgroup or ""
        if kind != "space":
            out.append((kind, match.group()))
        pos = match.end()
    return out


def _operand(tokens: list[tuple[str, str]], i: int) -> str | None:
    """The bare column that the bind at ``tokens[i]`` is directly compared with (inside
    MIN/MAX or not), or None when it is an operand of anything else."""
    def word(j: int) -> str | None:
        return tokens[j][1].lower() if 0 <= j < len(tokens) else None

    def ident(j: int) -> bool:
        return 0 <= j < len(tokens) and tokens[j][0] == "ident"

    if word(i - 1) in _INEQUALITIES and word(i + 1) in _AFTER:
        end = i - 2  # the left operand ends here
        if ident(end) and word(end - 1) in _BEFORE:
            return _last(tokens[end][1])
        if (word(end) == ")" and ident(end - 1) and word(end - 2) == "("
                and word(end - 3) in ("max", "min") and word(end - 4) in _BEFORE):
            return _last(tokens[end - 1][1])
    if word(i + 1) in _INEQUALITIES and word(i - 1) in _BEFORE:
        start = i + 2  # the right operand starts here
        if ident(start) and word(start + 1) in _AFTER:
            return _last(tokens[start][1])
        if (word(start) in ("max", "min") and word(start + 1) == "(" and ident(start + 2)
                and word(start + 3) == ")" and word(start + 4) in _AFTER):
            return _last(tokens[start + 2][1])
    return None


def _last(ident: str) -> str:
    """The column part of a (qualified, maybe quoted) identifier, lower-case."""
    part = re.split(r"\s*\.\s*", ident)[-1]
    return part.strip("\"`[]'").lower()


def _schema_columns(column: str, words: list[str]) -> set[Column]:
    """The date columns named ``column`` of the store tables the SQL names."""
    named = {_last(w) for w in words}
    return {(t.name, column) for t in metadata.tables.values()
            if t.name in named and column in t.c and isinstance(t.c[column].type, sa.DateTime)}
