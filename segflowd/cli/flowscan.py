"""What ``segflowd check`` can learn of the flows without running them.

Each campaign's flow function is read back (``inspect``) and parsed (``ast``); every call
``rt.<command>(...)`` on its runtime parameter is noted with its literal arguments: the
template a ``send_email`` names and the keywords it passes, the source and SQL of a
``condition``. A literal is a string written in the call or a module-level string the
name refers to. What cannot be known this way (a computed name, ``**data``, a command
yielded by a helper function) is left out or marked open, never guessed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Mapping

from ..app import CampaignDef, Segflow

__all__ = ["SEND_COMMANDS", "TEMPLATE_COMMANDS", "FlowCall", "scan_app", "scan_campaign"]

SEND_COMMANDS = frozenset({"send_email"})  # commands that send a template (first argument)
TEMPLATE_COMMANDS = SEND_COMMANDS | {"opened", "clicked"}  # ... or name one
_SCANNED = TEMPLATE_COMMANDS | {"condition", "send_sms", "webhook", "wait_until_local",
                                 "split"}


@dataclasses.dataclass(frozen=True)
class FlowCall:
    """One ``rt.<command>(...)`` call written in a campaign's flow."""

    campaign: str
    command: str
    where: str  # file:line of the call
    name: str | None  # the literal first argument (template, source); None if computed
    keywords: Mapping[str, object]  # literal keyword arguments; a computed value is None
    open_keywords: bool  # a ``**mapping`` passes keywords not known here
    sql: str | None = None  # a condition's literal SQL


def scan_app(app: Segflow) -> list[FlowCall]:
    """The calls of every campaign's flow, in campaign and then source order."""
    return [call for c in app.campaigns.values() for call in scan_campaign(c)]


def scan_campaign(c: CampaignDef) -> list[FlowCall]:
    """The calls written in ``c``'s flow; none when its source cannot be read."""
    fn = c.flow
    try:
        lines, start = inspect.getsourcelines(fn)
        file = inspect.getsourcefile(fn) or c.origin.file
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return []
    func = next((n for n in tree.body if isinstance(n, ast.FunctionDef)), None)
    if func is None:
        return []
    params = [a.arg for a in (*func.args.posonlyargs, *func.args.args)]
    rt = params[1] if len(params) > 1 else None
    names: Mapping[str, object] = getattr(fn, "__globals__", {})
    out: list[FlowCall] = []
    for node in ast.walk(func):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _SCANNED and isinstance(node.func.value, ast.Name)):
            continue
        if rt is not None and node.func.value.id != rt:
            continue
        args = [_literal(a, names) for a in node.args]
        keywords = {k.arg: _value(k.value, names) for k in node.keywords if k.arg is not None}
        first = args[0] if args and isinstance(args[0], str) else None
        sql = args[1] if len(args) > 1 and isinstance(args[1], str) else None
        if node.func.attr == "condition":
            sql = sql if sql is not None else _str(keywords.pop("sql", None))
            first = first if first is not None else _str(keywords.pop("source", None))
        elif node.func.attr == "split" and len(node.args) > 1:  # weights as written
            keywords.setdefault("weights", _value(node.args[1], names))
        elif first is None and "template" in keywords:
            first = _str(keywords.pop("template"))
        out.append(FlowCall(
            campaign=c.name, command=node.func.attr, where=f"{file}:{start + node.lineno - 1}",
            name=first, keywords=keywords, sql=sql,
            open_keywords=any(k.arg is None for k in node.keywords)))
    out.sort(key=lambda call: int(call.where.rsplit(":", 1)[1]))
    return out


def _literal(node: ast.expr, names: Mapping[str, object]) -> object:
    """A string written in the call, or the module-level string a bare name refers to."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and isinstance(names.get(node.id), str):
        return names[node.id]
    return None


def _value(node: ast.expr, names: Mapping[str, object]) -> object:
    """A keyword's value when it is a literal (``attempt=1``), else None."""
    found = _literal(node, names)
    if found is not None:
        return found
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
