"""The JSON column type of ``users.attributes`` and ``events.attributes``.

SQLAlchemy's ``attributes["k"].as_boolean()``, ``as_integer()``, ``as_float()``,
``as_numeric()`` and ``as_string()`` are casts that each store bends its own way: on
MariaDB a missing key is false to ``as_boolean()`` and a cast of ``"pro"`` to an integer
fails an ``INSERT ... SELECT`` (a segment refresh) in strict mode; on SQLite ``"10"`` is
10 to ``as_integer()`` and ``1`` is true to ``as_boolean()``. With :class:`PortableJSON`
each accessor gives the value where the JSON value is of its type and NULL otherwise,
on both stores:

=============  ==================================================================
accessor       a value where the JSON value is
=============  ==================================================================
as_boolean()   ``true`` or ``false`` (not 0/1, not ``"true"``)
as_integer()   a number written without fraction or exponent (not 10.0, not "10")
as_float()     any number; as_numeric(p, s) too (rounded to ``s`` places on MariaDB)
as_string()    a string, compared byte for byte (``"pro "`` is not ``"pro"``)
=============  ==================================================================

A missing key, JSON null, an object or an array is NULL to every accessor. So a type
mismatch matches no comparison (``==``, ``!=``, ``<``, ``>``) and matches ``IS NULL``.
Nested keys (``attributes["a"]["b"]``) and paths (``attributes[("a", "b")]``) follow
the same rule. Integers must fit in 64 bits. Other dialects get SQLAlchemy's rendering.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BinaryExpression, ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

__all__ = ["JsonValue", "PortableJSON"]

_TraverseInternals = list[tuple[str, InternalTraversal]]

# json_type() of a number, as each store spells it (MySQL's own JSON adds the last two).
_SQLITE_NUMBERS = ("integer", "real")
_MYSQL_NUMBERS = ("INTEGER", "DOUBLE", "UNSIGNED INTEGER", "DECIMAL")
# MariaDB's JSON_TYPE() calls 1e3 an INTEGER; JSON and SQLite call it a real.
_INTEGER_TEXT = "^-?[0-9]+$"
# JSON text is utf8mb4_bin, which pads ("pro " = "pro"); strings compare in its NO PAD
# sibling, as on SQLite.
_MARIADB_NOPAD = "utf8mb4_nopad_bin"
_MYSQL_NOPAD = "utf8mb4_0900_bin"


class JsonValue(ColumnElement[Any]):
    """``doc[path]`` read as one SQL type: ``kind`` is one of boolean, integer, float,
    numeric, string; NULL where the JSON value is not of that type."""

    __visit_name__ = "segflow_json_value"
    inherit_cache = True
    _traverse_internals: _TraverseInternals = [  # noqa: RUF012 - SQLAlchemy reads it per class
        ("item", InternalTraversal.dp_clauseelement),
        ("kind", InternalTraversal.dp_string),
    ]

    def __init__(self, item: BinaryExpression[Any], kind: str) -> None:
        self.item = item  # SQLAlchemy's typed ``doc[path]``: the path's bind and the type
        self.kind = kind
        self.type = item.type

    @property
    def _from_objects(self) -> list[Any]:
        return self.item._from_objects


class _Comparator(sa.JSON.Comparator[Any]):
    def as_boolean(self) -> JsonValue:
        return self._value("as_boolean", "boolean")

    def as_integer(self) -> JsonValue:
        return self._value("as_integer", "integer")

    def as_float(self) -> JsonValue:
        return self._value("as_float", "float")

    def as_numeric(self, precision: int, scale: int, asdecimal: bool = True) -> JsonValue:
        return self._value("as_numeric", "numeric", precision, scale, asdecimal)

    def as_string(self) -> JsonValue:
        return self._value("as_string", "string")

    def _value(self, accessor: str, kind: str, *args: object) -> JsonValue:
        # SQLAlchemy's own accessor checks that the expression is ``doc[path]`` and gives
        # it the accessor's type (it is untyped, hence getattr).
        item: BinaryExpression[Any] = getattr(super(), accessor)(*args)
        return JsonValue(item, kind)


class PortableJSON(sa.JSON):
    """``sa.JSON`` whose ``as_*()`` accessors agree across stores (see the module)."""

    comparator_factory = _Comparator


@compiles(JsonValue)
def _render_default(element: JsonValue, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.item, **kw)


@compiles(JsonValue, "sqlite")
def _render_sqlite(element: JsonValue, compiler: SQLCompiler, **kw: Any) -> str:
    doc, path = element.item.left, element.item.right
    kind = sa.func.json_type(doc, path)  # NULL for a missing key, 'null' for JSON null
    value = sa.func.json_extract(doc, path)
    expr: ColumnElement[Any]
    if element.kind == "boolean":
        expr = sa.case((kind == "true", sa.true()), (kind == "false", sa.false()))
    elif element.kind == "integer":
        expr = sa.case((kind == "integer", value))
    elif element.kind == "string":
        expr = sa.case((kind == "text", value))
    else:  # float, numeric
        expr = sa.case((kind.in_(_SQLITE_NUMBERS), sa.cast(value, element.type)))
    return compiler.process(sa.type_coerce(expr, element.type), **kw)


@compiles(JsonValue, "mysql")
@compiles(JsonValue, "mariadb")
def _render_mysql(element: JsonValue, compiler: SQLCompiler, **kw: Any) -> str:
    value = sa.func.json_extract(element.item.left, element.item.right)  # NULL if missing
    kind = sa.func.json_type(value)
    text = sa.func.json_unquote(value, type_=sa.String())
    expr: ColumnElement[Any]
    if element.kind == "boolean":
        expr = sa.case((kind == "BOOLEAN", text == "true"))
    elif element.kind == "integer":
        # Only what casts cleanly: a warning would fail an INSERT ... SELECT (strict mode).
        expr = sa.case((sa.and_(kind.in_(_MYSQL_NUMBERS), text.regexp_match(_INTEGER_TEXT)),
                        sa.cast(value, sa.Integer())))
    elif element.kind == "string":
        nopad = _MARIADB_NOPAD if getattr(compiler.dialect, "is_mariadb", False) \
            else _MYSQL_NOPAD
        expr = sa.collate(sa.case((kind == "STRING", text)), nopad)
    else:  # float, numeric
        target = mysql.DOUBLE() if element.kind == "float" else element.type
        expr = sa.case((kind.in_(_MYSQL_NUMBERS), sa.cast(value, target)))
    return compiler.process(sa.type_coerce(expr, element.type), **kw)
