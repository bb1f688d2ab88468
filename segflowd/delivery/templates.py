"""Email rendering: Jinja2 (autoescaped HTML, strict undefined), CSS inlined, text part.

Templates come from the app's folder; the shipped component library is under the
``segflow/`` prefix (``{% import "segflow/components.html" as ui %}``,
``{% extends "segflow/layout.html" %}``). Every HTML template, and everything it
includes, imports or extends, is autoescaped whatever its file name (``.html``,
``.jinja``, ``.mjml``, ...); only a template's ``text=`` part (and what *it* includes)
is rendered unescaped. :func:`add_tracking` rewrites a rendered message's links for
click tracking, from lxml's parse of the HTML, and adds the open pixel.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import css_inline
import jinja2
import jinja2.sandbox
from lxml import etree

from ..app import Segflow, TemplateDef
from ..errors import TemplateError
from .htmltext import html_to_text
from .mime import header_text

__all__ = ["COMPONENTS_DIR", "Rendered", "Renderer", "SampleData", "SampleValue",
           "add_tracking", "event_context", "html_to_text", "sample_user"]

COMPONENTS_DIR = Path(__file__).with_name("components")  # shipped as package data
COMPONENTS_PREFIX = "segflow"
NO_TRACK_ATTR = "data-segflow-notrack"  # an <a> with it keeps its own href (unsubscribe)

_WEB_SCHEMES = frozenset({"http", "https"})  # the only links ever signed for tracking
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")  # in a link: never signed, never redirected to
PIXEL_STYLE = "display:block;border:0;width:1px;height:1px"
# The context key of a send's own subject and body ({"subject": ..., "body": ...}): the App
# API's overrides (segflowd.ingest.sendapi), rendered in a sandbox (see Renderer.render).
OVERRIDES = "$overrides"


def override_problem(source: str) -> str | None:
    """Why ``source`` cannot be an override's Jinja2 template (its syntax error), or None."""
    try:
        _SANDBOX.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    return None


_SANDBOX = jinja2.sandbox.ImmutableSandboxedEnvironment()  # parsing only
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
            # Never by file name: a ".jinja" or ".mjml" file holds HTML all the same.
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            auto_reload=False,
        )
        # ``text=`` parts are plain text: the same files, compiled unescaped (an overlay
        # has its own template cache, so a file used by both is compiled once for each).
        self.plain_env = self.env.overlay(autoescape=False)
        # Subjects are text: no HTML escaping of "Tom & Jerry".
        self.text_env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        self._subjects: dict[str, jinja2.Template] = {}
        # A send's own subject and body come over HTTP, not from the app's files: they are
        # rendered sandboxed (no attribute of a Python object beyond plain data), with the
        # app's templates and the components still there to extend, import or include.
        self.sandbox = jinja2.sandbox.ImmutableSandboxedEnvironment(
            loader=self.env.loader, autoescape=True, undefined=jinja2.StrictUndefined)
        self.text_sandbox = jinja2.sandbox.ImmutableSandboxedEnvironment(
            undefined=jinja2.StrictUndefined, autoescape=False)
        self.inliner = css_inline.CSSInliner(load_remote_stylesheets=False, keep_at_rules=True)

    def _subject(self, source: str) -> jinja2.Template:
        compiled = self._subjects.get(source)
        if compiled is None:  # compiling costs more than rendering: once per subject
            compiled = self._subjects[source] = self.text_env.from_string(source)
        return compiled

    def render(self, name: str, context: Mapping[str, object]) -> Rendered:
        """The message of template ``name``; TemplateError saying what went wrong.

        An ``event`` in the context shows its attributes directly (:func:`event_context`).
        A context holding :data:`OVERRIDES` (a send's own ``subject`` and/or ``body``, both
        Jinja2 source) renders those instead of the template's, sandboxed; a body given
        makes the text part from its HTML.
        """
        tpl = self.app.templates.get(name)
        if tpl is None:
            raise TemplateError(f"unknown template {name!r}")
        event = context.get("event")
        if isinstance(event, dict) and not isinstance(event, SampleData):
            context = {**context, "event": event_context(event)}
        overrides: Mapping[str, object] = {}
        if OVERRIDES in context:
            given = context[OVERRIDES]
            overrides = given if isinstance(given, Mapping) else {}
            context = {k: v for k, v in context.items() if k != OVERRIDES}
        return self._render(tpl, context, overrides)

    def _render(self, tpl: TemplateDef, context: Mapping[str, object],
                overrides: Mapping[str, object]) -> Rendered:
        where = f"template {tpl.name!r}"
        subject_source, body_source = overrides.get("subject"), overrides.get("body")
        try:
            subject = (self.text_sandbox.from_string(subject_source).render(context)
                       if isinstance(subject_source, str)
                       else self._subject(tpl.subject).render(context))
            if isinstance(body_source, str):
                html = self.sandbox.from_string(body_source).render(context)
                text = html_to_text(html)
            else:
                html = self.env.get_template(tpl.html).render(context)
                text = (self.plain_env.get_template(tpl.text).render(context) if tpl.text
                        else html_to_text(html))
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{where}: {exc.filename or tpl.html}:{exc.lineno}: "
                                f"{exc.message}") from None
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"{where}: file {exc.name!r} not found in "
                                f"{self.app.templates_dir}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"{where}: {exc.message}") from None
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"{where}: the send's subject or body is not allowed: "
                                f"{exc}") from None
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
        # A subject is one line: a CR/LF from data can never start a new header, and no
        # control character (NUL, ESC, ...) reaches a header or a terminal showing it.
        subject = header_text(subject)
        return Rendered(subject=subject, html=inlined, text=text)


def add_tracking(html: str, click_url: Callable[[str], str], pixel_url: str | None) -> str:
    """Point each ``<a href>`` to an http(s) URL at ``click_url(url)``; add the open pixel.

    The links are the ``<a>`` elements of lxml's parse of ``html``, so text that only
    looks like a link (an ``href=`` inside another attribute's value, a comment, a
    script) is never signed. Links marked ``data-segflow-notrack`` (the unsubscribe
    link), links of any other scheme (``mailto:``, ``tel:``, ``javascript:``,
    ``data:``), relative links and ``#anchors`` keep their own ``href``. The document is
    re-serialized by lxml: the same HTML, though a link holding a space or non-ASCII
    character comes out percent-encoded and ``&nbsp;`` as the character itself.
    """
    root = _parse_document(html)
    if root is None:  # nothing an HTML parser finds an element in: no link to track
        return html + (_pixel_tag(pixel_url) if pixel_url else "")
    for a in root.iter("a"):
        href = a.get("href")
        if href is None or NO_TRACK_ATTR in a.attrib:
            continue
        url = href.strip()
        if _is_web_url(url):
            a.set("href", click_url(url))
    if pixel_url:
        body = root.find("body")
        etree.SubElement(root if body is None else body, "img", {
            "src": pixel_url, "width": "1", "height": "1", "alt": "", "style": PIXEL_STYLE})
    return etree.tostring(root.getroottree(), method="html", encoding="unicode")


_PARSERS = threading.local()  # an lxml parser is not to be shared between threads


def _parse_document(html: str) -> etree._Element | None:
    parser: etree.HTMLParser | None = getattr(_PARSERS, "html", None)
    if parser is None:  # no doctype added: a document without one stays without
        parser = _PARSERS.html = etree.HTMLParser(default_doctype=False)
    try:
        try:
            return etree.fromstring(html, parser)
        except ValueError:  # a str holding an XML encoding declaration: parse its bytes
            return etree.fromstring(html.encode("utf-8"),
                                    etree.HTMLParser(encoding="utf-8", default_doctype=False))
    except etree.XMLSyntaxError:  # lxml's answer to an empty document
        return None


def _is_web_url(url: str) -> bool:
    """An absolute http(s) URL with a host, and no control character anywhere."""
    if _CONTROLS.search(url) is not None:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return False
    return parts.scheme.lower() in _WEB_SCHEMES and bool(parts.netloc)


def _pixel_tag(pixel_url: str) -> str:
    img = etree.Element("img", {"src": pixel_url, "width": "1", "height": "1", "alt": "",
                                "style": PIXEL_STYLE})
    return etree.tostring(img, method="html", encoding="unicode")
