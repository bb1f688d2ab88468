"""The plain-text part of an email, made from its HTML.

One pass over lxml's parse (libxml2's HTML parser, in C) that writes readable text:
paragraphs and headings as blocks separated by a blank line, ``<br>`` as a line break,
list items with ``*`` or ``1.`` and nested lists indented, tables row by row (cells of a
row on one line), links as ``text (url)``, ``<pre>`` as it is, entities decoded. Nothing
of ``<head>``, ``<style>``, ``<script>`` or an element hidden with ``display:none`` (the
preview text) or ``hidden`` is written.

It replaced inscriptis, which lays out the same documents faithfully but cost four
times the whole Jinja2 render per message (see docs/guides/performance.md).
"""

from __future__ import annotations

import re

from lxml import etree

__all__ = ["html_to_text"]

(_INLINE, _SKIPPED, _PARAGRAPH, _LINE, _CELL, _LIST, _ITEM, _QUOTE, _PRE, _BREAK, _LINK,
 _IMAGE, _OTHER) = range(13)
_KINDS: dict[object, int] = {
    etree.Comment: _OTHER, etree.ProcessingInstruction: _OTHER, etree.Entity: _OTHER,
    # never text a reader sees
    **dict.fromkeys(("head", "title", "style", "script", "template", "noscript", "svg",
                     "canvas", "iframe", "object", "map", "select", "datalist", "audio",
                     "video"), _SKIPPED),
    # blocks set apart by a blank line
    **dict.fromkeys(("p", "h1", "h2", "h3", "h4", "h5", "h6", "dl", "table", "hr", "figure",
                     "address", "fieldset", "form"), _PARAGRAPH),
    # blocks that only start a new line
    **dict.fromkeys(("div", "tr", "dt", "dd", "section", "article", "header", "footer",
                     "main", "nav", "aside", "center", "caption", "figcaption", "details",
                     "summary", "tbody", "thead", "tfoot", "legend", "html", "body"), _LINE),
    "td": _CELL, "th": _CELL, "ul": _LIST, "ol": _LIST, "li": _ITEM, "blockquote": _QUOTE,
    "pre": _PRE, "br": _BREAK, "a": _LINK, "img": _IMAGE,
}
_LINK_SCHEMES = ("http://", "https://", "mailto:", "tel:")
_CELL_SEPARATOR = "  "
# Characters mail templates put in preview text and spacers; invisible, so not text.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u034f\u00ad"))
_HIDDEN_STYLE = re.compile(r"(?:^|;)\s*display\s*:\s*none\b", re.IGNORECASE)
_AFTER_NAME = frozenset({" ", ">", "\t", "\n", "\r", "/"})
_BLANK_RUNS = re.compile(r"\n{3,}")


class _Writer:
    """Collects text with pending breaks, so blocks never stack up blank lines."""

    __slots__ = ("at_line_start", "break_", "indent", "marker", "out", "space")

    def __init__(self) -> None:
        self.out: list[str] = []
        self.break_ = 0  # newlines owed before the next text: 0, 1 or 2
        self.space = ""  # separator owed before the next text on the same line
        self.at_line_start = True
        self.indent = ""  # written at the start of each line (lists, quotes)
        self.marker = ""  # a list item's bullet, written instead of the next indent

    def block(self, newlines: int) -> None:
        if newlines > self.break_:
            self.break_ = newlines
        self.space = ""

    def _start(self) -> None:
        out = self.out
        if self.break_:
            if out:
                out.append("\n" * self.break_)
            self.at_line_start = True
            self.break_ = 0
        if self.at_line_start:
            if self.marker:
                out.append(self.marker)
                self.marker = ""
            elif self.indent:
                out.append(self.indent)
            self.at_line_start = False
            self.space = ""
        elif self.space:
            out.append(self.space)
            self.space = ""

    def text(self, raw: str) -> None:
        """Inline text: every whitespace run is one space, none at a line's start."""
        if raw.isspace():  # most text nodes of a mail template are the indentation
            if not self.space:
                self.space = " "
            return
        if not raw.isascii():
            raw = raw.translate(_INVISIBLE)
        words = raw.split()
        if not words:
            return
        if not self.space and raw[0].isspace():
            self.space = " "
        self._start()
        self.out.append(" ".join(words))
        self.space = " " if raw[-1].isspace() else ""

    def verbatim(self, raw: str) -> None:
        """Preformatted text: line breaks and spaces kept, each line indented."""
        lines = raw.translate(_INVISIBLE).split("\n")
        for i, line in enumerate(lines):
            if i:
                self.line_break()
            if line:
                self._start()
                self.out.append(line)

    def line_break(self) -> None:
        self.out.append("\n")
        self.at_line_start = True
        self.break_ = 0
        self.space = ""

    def result(self) -> str:
        lines = "".join(self.out).split("\n")
        text = "\n".join(line.rstrip() for line in lines)
        return _BLANK_RUNS.sub("\n\n", text).strip("\n") + "\n"


def _parse(html: str) -> etree._Element | None:
    # A closed <head> is never text: not parsing it saves a third of the parse (the
    # layout's stylesheet). Not where a comment or a script might hide a "<body".
    body = html.find("<body")
    if (body > 0 and html[body + 5:body + 6] in _AFTER_NAME
            and html.rfind("</head", 0, body) != -1 and html.find("<!--", 0, body) == -1
            and html.find("<script", 0, body) == -1):
        html = html[body:]
    try:
        return etree.HTML(html)
    except ValueError:  # a str holding an XML encoding declaration: parse its bytes
        parser = etree.HTMLParser(encoding="utf-8")
        return etree.HTML(html.encode("utf-8"), parser)


def html_to_text(html: str) -> str:
    """Readable plain text for ``html``; always ends with one newline."""
    root = _parse(html)
    w = _Writer()
    if root is None:
        return "\n"
    lists: list[list[int]] = []  # per open <ul>/<ol>: [ordered, next number]
    links: list[tuple[int, str]] = []  # per open <a>: (output position, url or "")
    saved_indent: list[str] = []
    pre = 0
    skipped = False
    kinds = _KINDS
    walk = etree.iterwalk(root, events=("start", "end"))
    for event, el in walk:
        tag = el.tag
        if event == "start":
            kind = kinds.get(tag, _INLINE)
            if kind == _SKIPPED or (kind != _OTHER and _hidden(el)):
                walk.skip_subtree()
                skipped = True  # the next event is this element's end: only its tail
                continue
            if kind == _PARAGRAPH:
                w.block(2)
            elif kind == _LINE:
                w.block(1)
            elif kind == _CELL:
                if el.getprevious() is not None:
                    w.space = _CELL_SEPARATOR
            elif kind == _LIST:
                w.block(1 if lists else 2)
                start = el.get("start", "1")
                lists.append([tag == "ol", int(start) if start.isdigit() else 1])
            elif kind == _ITEM:
                w.block(1)
                outer = w.indent
                saved_indent.append(outer)
                if lists and lists[-1][0]:
                    bullet = f"{lists[-1][1]}. "
                    lists[-1][1] += 1
                else:
                    bullet = "* "
                w.marker = outer + bullet
                w.indent = outer + " " * len(bullet)
            elif kind == _QUOTE:
                w.block(2)
                saved_indent.append(w.indent)
                w.indent += "> "
            elif kind == _PRE:
                w.block(2)
                pre += 1
            elif kind == _BREAK:
                w.line_break()
            elif kind == _LINK:
                href = (el.get("href") or "").strip()
                links.append((len(w.out), href if href.lower().startswith(_LINK_SCHEMES)
                              else ""))
            elif kind == _IMAGE:
                alt = el.get("alt")
                if alt and links:  # an image link's words are its alt text
                    w.text(alt)
            elif kind == _OTHER:  # a comment: its text is not content
                continue
            if el.text:
                if pre:
                    w.verbatim(el.text)
                else:
                    w.text(el.text)
            continue
        if skipped:
            skipped = False
        else:
            kind = kinds.get(tag, _INLINE)
            if kind in (_PARAGRAPH, _QUOTE, _PRE):
                w.block(2)
                if kind == _QUOTE:
                    w.indent = saved_indent.pop()
                elif kind == _PRE:
                    pre -= 1
            elif kind == _LINE:
                w.block(1)
            elif kind == _ITEM:
                w.block(1)
                w.indent = saved_indent.pop()
                w.marker = ""
            elif kind == _LIST:
                lists.pop()
                w.block(1 if lists else 2)
            elif kind == _LINK:
                at, url = links.pop()
                if url:
                    _show_url(w, at, url)
        tail = el.tail
        if tail:
            if pre:
                w.verbatim(tail)
            else:
                w.text(tail)
    return w.result()


def _hidden(el: etree._Element) -> bool:
    style = el.get("style")
    return (el.get("hidden") is not None
            or (style is not None and "none" in style and _HIDDEN_STYLE.search(style) is not None))


def _show_url(w: _Writer, at: int, url: str) -> None:
    """After a link's words, its URL in parentheses (unless the words are the URL)."""
    shown = "".join(w.out[at:]).strip()
    bare = url[7:] if url.lower().startswith("mailto:") else url
    if shown in (url, bare):
        return
    if shown:
        w.space = " "
        w.text(f"({url})")
    else:
        w.text(url)
