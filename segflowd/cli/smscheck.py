"""SMS templates in ``segflowd check`` and ``segflowd preview``.

``check`` renders every SMS template with a sample context (``user``, ``event``,
``data``, ``message`` and the keywords of each literal ``rt.send_sms(NAME, key=...)``;
a template sent with ``**data``, by a computed name or by a transaction accepts any
top-level name) and reports syntax errors and undefined variables, naming the template
and where it was defined. ``preview`` shows an SMS template rendered for a user: its
text, length, encoding (GSM-7 or UCS-2) and segment count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jinja2
import jinja2.meta

from ..app import Segflow
from ..delivery.sms import SmsRenderer
from ..delivery.templates import SampleData, SampleValue, sample_user
from ..errors import TemplateError
from ..smstext import sms_parts
from .flowscan import FlowCall

__all__ = ["sms_preview", "sms_template_problems", "unknown_sms_templates"]


def unknown_sms_templates(app: Segflow, calls: Sequence[FlowCall]) -> list[str]:
    """A problem per literal ``rt.send_sms(NAME)`` whose NAME is no SMS template."""
    known = ", ".join(sorted(app.sms_templates)) or "none defined"
    return [f"{c.where}: campaign {c.campaign!r}: send_sms({c.name!r}) names unknown SMS "
            f"template {c.name!r} (SMS templates: {known})"
            for c in calls
            if c.command == "send_sms" and c.name is not None
            and c.name not in app.sms_templates]


def sms_template_problems(app: Segflow, calls: Sequence[FlowCall]) -> list[str]:
    renderer = SmsRenderer(app)
    sends = [c for c in calls if c.command == "send_sms"]
    computed = [c for c in sends if c.name is None]
    by_tx = {t.template for t in app.transactions.values()}
    problems: list[str] = []
    for tpl in app.sms_templates.values():
        named = [c for c in sends if c.name == tpl.name]
        keywords: dict[str, object] = {}
        for c in (*named, *computed):
            keywords.update({k: SampleValue(f"<{k}>") if v is None else v
                             for k, v in c.keywords.items()})
        open_names = not (named or tpl.name in by_tx) or any(
            c.open_keywords for c in (*named, *computed))
        data: dict[str, object] = SampleData(keywords) if open_names else dict(keywords)
        context: dict[str, object] = {
            **data, "data": data, "user": sample_user(), "event": SampleData(),
            "message": {"id": 0, "kind": "campaign", "campaign": "sample",
                        "template": tpl.name}}
        try:
            names = jinja2.meta.find_undeclared_variables(renderer.env.parse(tpl.text))
        except jinja2.TemplateSyntaxError as exc:
            problems.append(f"{tpl.origin}: SMS template {tpl.name!r}: line {exc.lineno}: "
                            f"{exc.message}")
            continue
        if open_names:
            for name in names:
                context.setdefault(name, SampleValue(f"<{name}>"))
        try:
            renderer.render(tpl.name, context)
        except TemplateError as exc:
            problems.append(f"{tpl.origin}: {exc}")
    return problems


def sms_preview(app: Segflow, name: str, user: Mapping[str, object],
                data: Mapping[str, object], kind: str) -> list[str]:
    """The lines ``segflowd preview`` prints for SMS template ``name``; TemplateError."""
    context = {**data, "data": dict(data), "user": dict(user),
               "message": {"id": 0, "kind": kind, "campaign": None, "template": name}}
    text = SmsRenderer(app).render(name, context)
    parts = sms_parts(text)
    return [f"to: {user.get('phone') or '(no phone attribute)'}",
            f"length: {parts.characters} ({parts.encoding}), segments: {parts.segments}",
            "", text]
