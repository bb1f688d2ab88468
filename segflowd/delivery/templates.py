"""Email rendering: Jinja2 (autoescaped HTML, strict undefined), CSS inlined, text part.

Templates come from the app's folder; the shipped component library is under the
``segflow/`` prefix (``{% import "segflow/components.html" as ui %}``,
``{% extends "segflow/layout.html" %}``). :func:`add_tracking` rewrites a rendered
message's links for click tracking and adds the open pixel.
"""

from __future__ import annotations

import dataclasses
import html as html_lib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import css_inline
import jinja2

from ..app import Segflow, TemplateDef
from ..errors import TemplateError
from .htmltext import html_to_text

__all__ = ["COMPONENTS_DIR", "Rendered", "Renderer", "SampleData", "SampleValue",
           "add_tracking", "event_context", "html_to_text", "sample_user"]

COMPONENTS_DIR = Path(__file__).with_name("components")  # shipped as package data
COMPONENTS_PREFIX = "segflow"
NO_TRACK_ATTR = "data-segflow-notrack"  # an <a> with it keeps its own href (unsubscribe)

_ANCHOR = re.compile(r"<a\b[^>]*>", re.IGNORECASE)
_HREF = re.compile(r"""(\shref\s*=\s*)(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
# A whole start tag, attribute values may hold ">"; only such tags are touched.
_START_TAG = re.compile(r"""<[A-Za-z][^\s/>"']*(?:\s+[^\s=/>"']+(?:\s*=\s*(?:"[^"]*"|'[^']*'"""
                        r"""|[^\s>"']+))?)*\s*/?>""")
_QUOTED = re.compile(r'"[^"]*"')
# Cheap test that _START_TAG's rewrite can change nothing: a tag it changes holds a double
# quoted value with "<" or ">" (found from its "="), or a single-quoted value (whose '"'
# would shift the pairing): neither present, no tag changes.
_MAYBE_ANGLE_VALUE = re.compile(r"""=\s*+(?:"[^"<>]*+[<>]|')""")


def _escape_angles(m: re.Match[str]) -> str:
    tag = m.group(0)
    if "<" not in tag[1:] and ">" not in tag[:-1]:
        return tag
    return tag[0] + _QUOTED.sub(lambda q: q.group(0).replace("<", "&lt;").replace(">", "&gt;"),
                                tag[1:-1]) + tag[-1]

_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Rendered:
    subject: str
    html: str
    text: str


class SampleValue(str):
    """A sample attribute's value: text, whose own attributes are samples too
    (``user.address.city``), since the shape of a team's data cannot be known."""

    def __getattr__(self, name: str) -> SampleValue:
        if name.startswith("_"):  # markupsafe's __html__ and the like: a plain str
            raise AttributeError(name)
        return SampleValue(f"<{name}>")


class SampleData(dict[str, Any]):
    """Stands in for free-form user/event data at check time: any key has a value.

    Attribute names are the team's own, so they cannot be checked; what *can* be caught
    is a misspelt top-level variable (``usr.name``), which stays undefined.
    """

    def __missing__(self, key: str) -> SampleValue:
        return SampleValue(f"<{key}>")


def event_context(event: Mapping[str, object]) -> dict[str, object]:
    """An event as templates see it: its attributes directly (``{{ event.order_id }}``,
    as in the original Segflow and Customer.io), beside ``id``, ``name``, ``created_at``
    and ``attributes``, which an attribute of the same name never shadows."""
    attributes = event.get("attributes")
    if not isinstance(attributes, Mapping):
        return dict(event)
    return {**attributes, **event}


def sample_user() -> SampleData:
    return SampleData(id="sample-user", email="sample@example.com", name="Sample User")


class Renderer:
    """Renders an app's templates. One per app; Jinja2 caches the compiled templates."""

    def __init__(self, app: Segflow) -> None:
        self.app = app
        self.env = jinja2.Environment(
            loader=jinja2.ChoiceLoader([
                jinja2.FileSystemLoader(str(app.templates_dir)),
                jinja2.PrefixLoader({
                    COMPONENTS_PREFIX: jinja2.FileSystemLoader(str(COMPONENTS_DIR))}),
            ]),
            autoescape=jinja2.select_autoescape(["html", "htm", "xml", "j2"],
                                                default_for_string=False),
            undefined=jinja2.StrictUndefined,
            auto_reload=False,
        )
        # Subjects are text: no HTML escaping of "Tom & Jerry".
        self.text_env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        self._subjects: dict[str, jinja2.Template] = {}
        self.inliner = css_inline.CSSInliner(load_remote_stylesheets=False, keep_at_rules=True)

    def _subject(self, source: str) -> jinja2.Template:
        compiled = self._subjects.get(source)
        if compiled is None:  # compiling costs more than rendering: once per subject
            compiled = self._subjects[source] = self.text_env.from_string(source)
        return compiled

    def render(self, name: str, context: Mapping[str, object]) -> Rendered:
        """The message of template ``name``; TemplateError saying what went wrong.

        An ``event`` in the context shows its attributes directly (:func:`event_context`).
        """
        tpl = self.app.templates.get(name)
        if tpl is None:
            raise TemplateError(f"unknown template {name!r}")
        event = context.get("event")
        if isinstance(event, dict) and not isinstance(event, SampleData):
            context = {**context, "event": event_context(event)}
        return self._render(tpl, context)

    def _render(self, tpl: TemplateDef, context: Mapping[str, object]) -> Rendered:
        where = f"template {tpl.name!r}"
        try:
            subject = self._subject(tpl.subject).render(context)
            html = self.env.get_template(tpl.html).render(context)
            text = (self.env.get_template(tpl.text).render(context) if tpl.text
                    else html_to_text(html))
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{where}: {exc.filename or tpl.html}:{exc.lineno}: "
                                f"{exc.message}") from None
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"{where}: file {exc.name!r} not found in "
                                f"{self.app.templates_dir}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"{where}: {exc.message}") from None
        except Exception as exc:
            raise TemplateError(f"{where}: {type(exc).__name__}: {exc}") from None
        try:
            inlined = self.inliner.inline(html)
        except Exception as exc:
            raise TemplateError(f"{where}: CSS inlining failed: {exc}") from None
        # The inliner re-serializes HTML5-style, leaving "<" raw inside quoted attributes:
        # harmless to browsers, but escaped again here so no client ever sees a "<script".
        if _MAYBE_ANGLE_VALUE.search(inlined) is not None:
            inlined = _START_TAG.sub(_escape_angles, inlined)
        # A subject is one line: a CR/LF from data can never start a new header.
        subject = " ".join(subject.split())
        return Rendered(subject=subject, html=inlined, text=text)


def add_tracking(html: str, click_url: Callable[[str], str], pixel_url: str | None) -> str:
    """Point each http(s) link at ``click_url(original)`` and add the open pixel.

    Links marked ``data-segflow-notrack`` (the unsubscribe link) and non-web links
    (``mailto:``, ``#anchor``) are left alone.
    """

    def anchor(m: re.Match[str]) -> str:
        tag = m.group(0)
        if NO_TRACK_ATTR in tag:
            return tag

        def href(h: re.Match[str]) -> str:
            raw = h.group(2) if h.group(2) is not None else (h.group(3) or "")
            url = html_lib.unescape(raw).strip()
            if not re.match(r"^https?://", url, re.IGNORECASE):
                return h.group(0)
            return f'{h.group(1)}"{html_lib.escape(click_url(url), quote=True)}"'

        return _HREF.sub(href, tag, count=1)

    out = _ANCHOR.sub(anchor, html)
    if pixel_url:
        pixel = (f'<img src="{html_lib.escape(pixel_url, quote=True)}" width="1" height="1" '
                 'alt="" style="display:block;border:0;width:1px;height:1px">')
        found = list(_BODY_END.finditer(out))
        if found:
            at = found[-1].start()
            out = out[:at] + pixel + out[at:]
        else:
            out += pixel
    return out
