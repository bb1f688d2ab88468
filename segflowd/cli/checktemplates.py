"""``segflowd check``: template names in the flows, and templates rendered with the context
they will really have.

Every template is rendered with a sample of its documented context: ``user``,
``message``, ``unsubscribe_url``, ``event`` (a transaction's, or one a flow passes),
``data`` and the keywords of each literal ``rt.send_email(NAME, key=...)`` of that
template, and ``profile`` where the app preloads one (its columns when the data source
was reachable). What cannot be known statically is never a problem: a template sent with
``**data``, by a computed name or only by broadcasts (whose data an operator gives at
launch) accepts any top-level name. What is reported: syntax errors, missing files, and
variables that are undefined in that context, with the template file and line; and, in
an HTML template or anything it includes, imports or extends, what turns escaping off:
an ``{% autoescape %}`` block whose value is not a literal true, and ``|safe`` (also
``{% filter safe %}``) over anything that reads a variable other than ``message`` or
``unsubscribe_url``, since user data is the one thing a template cannot vouch for.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, Sequence

import jinja2
import jinja2.meta
from jinja2 import nodes

from ..app import Segflow, TemplateDef
from ..delivery.templates import Renderer, SampleData, SampleValue, sample_user
from .flowscan import SEND_COMMANDS, TEMPLATE_COMMANDS, FlowCall

__all__ = ["template_problems", "unknown_templates"]

SAMPLE_UNSUBSCRIBE = "https://segflow.invalid/u/sample"
# Names whose values segflowd makes itself, never user data: ``|safe`` on them is no risk.
OWN_NAMES = frozenset({"message", "unsubscribe_url", "caller", "loop", "super", "self",
                       "varargs", "kwargs"})


def unknown_templates(app: Segflow, calls: Sequence[FlowCall]) -> list[str]:
    """A problem per literal template name in a flow that the app does not define."""
    known = ", ".join(sorted(app.templates)) or "none defined"
    return [f"{c.where}: campaign {c.campaign!r}: {c.command}({c.name!r}) names unknown "
            f"template {c.name!r} (templates: {known})"
            for c in calls
            if c.command in TEMPLATE_COMMANDS and c.name is not None
            and c.name not in app.templates]


def template_problems(app: Segflow, calls: Sequence[FlowCall],
                      profile: Mapping[str, object] | None) -> list[str]:
    """Render every template with its sample context; a problem per template that fails.

    ``profile`` is the sample preload row (None: the app preloads nothing).
    """
    renderer = Renderer(app)
    sends = [c for c in calls if c.command in SEND_COMMANDS]
    computed = [c for c in sends if c.name is None]
    sent_by_tx = {t.template for t in app.transactions.values()}
    problems: list[str] = []
    for tpl in app.templates.values():
        if any(not (app.templates_dir / f).is_file() for f in (tpl.html, tpl.text) if f):
            continue  # its file is missing: app.problems() said so
        named = [c for c in sends if c.name == tpl.name]
        keywords: dict[str, object] = {}
        for c in (*named, *computed):
            keywords.update({k: SampleValue(f"<{k}>") if v is None else v
                             for k, v in c.keywords.items()})
        # Known: every way it is sent is written down (a literal send, a transaction).
        known = bool(named) or tpl.name in sent_by_tx
        open_names = not known or any(c.open_keywords for c in (*named, *computed))
        data: dict[str, object] = SampleData(keywords) if open_names else dict(keywords)
        context: dict[str, object] = {
            **data, "data": data, "user": sample_user(),
            "message": {"id": 0, "kind": "campaign", "campaign": "sample",
                        "template": tpl.name},
            "unsubscribe_url": SAMPLE_UNSUBSCRIBE, "event": _sample_event()}
        if profile is not None:
            context["profile"] = profile
        if open_names:
            for name in _names_used(renderer, tpl):
                context.setdefault(name, SampleValue(f"<{name}>"))
        problems.extend(_render(renderer, tpl, context))
        problems.extend(escaping_problems(renderer.env, tpl))
    return problems


def escaping_problems(env: jinja2.Environment, tpl: TemplateDef) -> list[str]:
    """A problem per place in ``tpl``'s HTML (and what it pulls in) that is not escaped.

    ``file:line: template 'NAME': ...`` for an ``{% autoescape %}`` block that may turn
    escaping off and for ``|safe`` over data; each file is reported once per template.
    """
    where = f"template {tpl.name!r}"
    out: list[str] = []
    try:
        for filename, ast in _parsed(env, [tpl.html]):
            for line, what in _unescaped(ast):
                out.append(f"{filename}:{line}: {where}: {what}")
    except (jinja2.TemplateError, OSError):
        pass  # a file that does not load or parse is reported when it renders
    return out


def _unescaped(ast: nodes.Template) -> Iterator[tuple[int, str]]:
    for block in ast.find_all(nodes.EvalContextModifier):
        for option in block.options:
            if option.key == "autoescape" and not (
                    isinstance(option.value, nodes.Const) and option.value.value is True):
                yield (block.lineno, "{% autoescape %} turns HTML escaping off: user data "
                       "would go into the message as HTML; remove the block")
    for f in ast.find_all(nodes.Filter):
        if f.name != "safe" or f.node is None:
            continue
        read = _data_names(f.node)
        if read:
            yield (f.lineno, f"|safe on {', '.join(sorted(read))} puts data into the "
                   "message as HTML, unescaped; remove |safe (write the markup in the "
                   "template and let the values be escaped)")
    for fb in ast.find_all(nodes.FilterBlock):
        if fb.filter.name == "safe":
            read = set().union(*(_data_names(n) for n in fb.body))
            if read:
                yield (fb.lineno, f"{{% filter safe %}} over {', '.join(sorted(read))} "
                       "puts data into the message as HTML, unescaped; remove it")


def _data_names(node: nodes.Node) -> set[str]:
    return {n.name for n in node.find_all(nodes.Name)
            if n.ctx == "load" and n.name not in OWN_NAMES}


def _parsed(env: jinja2.Environment, names: list[str]
            ) -> Iterator[tuple[str, nodes.Template]]:
    """``(file, parse)`` of each template ``names`` reach through include/import/extends."""
    seen: set[str] = set()
    while names:
        name = names.pop()
        if name in seen or env.loader is None:
            continue
        seen.add(name)
        source, filename, _ = env.loader.get_source(env, name)
        ast = env.parse(source, name, filename)
        yield filename or name, ast
        names.extend(n for n in jinja2.meta.find_referenced_templates(ast) if n is not None)


def _sample_event() -> SampleData:
    """Shaped like the ``event`` a template gets: its attributes are free-form."""
    return SampleData(id=0, name="sample", attributes=SampleData(),
                      created_at="2026-01-01T00:00:00Z")


def _render(renderer: Renderer, tpl: TemplateDef, context: Mapping[str, object]
            ) -> list[str]:
    where = f"template {tpl.name!r}"
    parts: list[tuple[str, jinja2.Template | None]] = []
    try:
        parts.append((f"{tpl.origin}: {where}: subject",
                      renderer.text_env.from_string(tpl.subject)))
        parts.append((f"{where}: {tpl.html}", renderer.env.get_template(tpl.html)))
        if tpl.text:  # a text= part is plain text: rendered unescaped
            parts.append((f"{where}: {tpl.text}", renderer.plain_env.get_template(tpl.text)))
    except jinja2.TemplateSyntaxError as exc:
        at = f"{exc.filename}:{exc.lineno}" if exc.filename else f"{tpl.origin}"
        return [f"{at}: {where}: {exc.message}"]
    except jinja2.TemplateNotFound as exc:
        return [f"{tpl.origin}: {where}: file {exc.name!r} not found in "
                f"{renderer.app.templates_dir}"]
    out: list[str] = []
    for label, template in parts:
        assert template is not None
        try:
            template.render(context)
        except jinja2.UndefinedError as exc:
            line = _template_line(exc.__traceback__)
            prefix = f"{line}: {where}" if line else label
            out.append(f"{prefix}: {exc.message}")
        except jinja2.TemplateSyntaxError as exc:  # an included file's
            out.append(f"{exc.filename or label}:{exc.lineno}: {where}: {exc.message}")
        except jinja2.TemplateNotFound as exc:
            out.append(f"{label}: file {exc.name!r} not found")
        except Exception:  # an operation on a sample value: not knowable
            pass
    return out


def _template_line(tb: types.TracebackType | None) -> str | None:
    """``file:line`` of the innermost template frame (Jinja2 rewrites tracebacks so each
    template's frame carries its file and line), or None for a subject."""
    found: str | None = None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not name.endswith(".py") and not name.startswith("<"):
            found = f"{name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _names_used(renderer: Renderer, tpl: TemplateDef) -> set[str]:
    """The top-level names the template (and what it includes or extends) reads."""
    names: set[str] = set()
    try:
        names |= jinja2.meta.find_undeclared_variables(renderer.text_env.parse(tpl.subject))
        for source in _sources(renderer.env, [f for f in (tpl.html, tpl.text) if f]):
            names |= jinja2.meta.find_undeclared_variables(renderer.env.parse(source))
    except jinja2.TemplateError:
        pass  # reported when it renders
    return names


def _sources(env: jinja2.Environment, names: list[str]) -> Iterator[str]:
    seen: set[str] = set()
    while names:
        name = names.pop()
        if name in seen or env.loader is None:
            continue
        seen.add(name)
        source = env.loader.get_source(env, name)[0]
        yield source
        names.extend(n for n in jinja2.meta.find_referenced_templates(env.parse(source))
                     if n is not None)
