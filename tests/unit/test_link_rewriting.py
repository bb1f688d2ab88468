"""Click tracking rewrites the links of the parsed HTML, never text that looks like one
(#25 item 7), and only ever signs absolute http(s) URLs.

:func:`add_tracking` is checked on its own, then through delivery's real path
(:class:`~segflowd.testing.Simulation`), where user data in an attribute comes out of
the CSS inliner with its quotes raw: ``title="x href='https://evil.example'"``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from segflowd.app import Segflow
from segflowd.delivery.templates import add_tracking
from segflowd.delivery.tokens import Signer
from segflowd.simulation import LINK_SECRET
from segflowd.testing import Simulation

signed: list[str] = []


def click(url: str) -> str:
    signed.append(url)
    return f"https://t.example/t/c/{len(signed)}"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    signed.clear()


def hrefs(html: str) -> list[str]:
    root = etree.HTML(html)
    assert root is not None
    return [a.get("href") or "" for a in root.iter("a")]


def test_an_href_inside_another_attribute_is_neither_touched_nor_signed() -> None:
    html = ('<html><body><a title="x href=\'https://evil.example\'" '
            'href="https://example.com/real">go</a>'
            '<p title="see href=&quot;https://evil.example/2&quot;">t</p></body></html>')
    out = add_tracking(html, click, None)
    assert signed == ["https://example.com/real"]
    assert hrefs(out) == ["https://t.example/t/c/1"]
    assert "title=\"x href='https://evil.example'\"" in out
    assert "title='see href=\"https://evil.example/2\"'" in out  # lxml's choice of quotes


@pytest.mark.parametrize("href", [
    "javascript:alert(1)", " JavaScript:alert(1)", "data:text/html,<b>x</b>",
    "mailto:ann@example.com?subject=Hi", "tel:+15550100", "/relative/path", "page.html",
    "#top", "//evil.example/protocol-relative", "https:evil.example", "https:///x",
    "ftp://example.com/f", "https://exa\tmple.com/tab", "https://example.com/\x1bx",
    "https://example.com/\x7f", "java\nscript:alert(1)",
])
def test_links_that_are_not_absolute_http_urls_are_never_signed(href: str) -> None:
    """Left as they are (lxml percent-encodes a space or control character in an href,
    which turns ``java\\nscript:`` into no script at all)."""
    html = f'<html><body><a href="{href.replace("<", "&lt;")}">x</a></body></html>'
    out = add_tracking(html, click, None)
    assert signed == []
    [after] = hrefs(out)
    assert not after.startswith("https://t.example/")
    assert after.replace("%09", "\t").replace("%0A", "\n").replace("%1B", "\x1b").replace(
        "%7F", "\x7f") == href.strip()


def test_mailto_and_tel_links_stay_exactly_as_written() -> None:
    html = ('<html><body><a href="mailto:ann@example.com?subject=Hello">m</a>'
            '<a href="tel:+15550100">t</a></body></html>')
    out = add_tracking(html, click, "https://t.example/t/o/1")
    assert '<a href="mailto:ann@example.com?subject=Hello">m</a>' in out
    assert '<a href="tel:+15550100">t</a>' in out


def test_links_in_comments_scripts_and_styles_are_not_links() -> None:
    html = ('<html><head><style>/* <a href="https://evil.example/css"> */</style></head>'
            '<body><!-- <a href="https://evil.example/comment">c</a> -->'
            '<script>var s = \'<a href="https://evil.example/js">\';</script>'
            '<a href="https://example.com/real">r</a></body></html>')
    out = add_tracking(html, click, None)
    assert signed == ["https://example.com/real"]
    assert '<!-- <a href="https://evil.example/comment">c</a> -->' in out
    assert '<a href="https://evil.example/js">' in out  # the script, as it was


def test_every_real_link_is_signed_with_its_decoded_url_whatever_its_spelling() -> None:
    html = ('<HTML><BODY><A HREF="https://a.example/x?y=1&amp;z=2">a</A>'
            "<a href='HTTPS://B.example/'>b</a><a href=http://c.example/u>c</a>"
            '<a href="  https://d.example/  ">d</a></BODY></HTML>')
    out = add_tracking(html, click, None)
    assert signed == ["https://a.example/x?y=1&z=2", "HTTPS://B.example/",
                      "http://c.example/u", "https://d.example/"]
    assert hrefs(out) == [f"https://t.example/t/c/{i}" for i in range(1, 5)]


def test_the_notrack_attribute_counts_only_as_an_attribute() -> None:
    html = ('<html><body><a data-segflow-notrack href="https://h.example/u/tok">u</a>'
            '<a title="data-segflow-notrack" href="https://example.com/real">r</a>'
            "</body></html>")
    out = add_tracking(html, click, None)
    assert signed == ["https://example.com/real"]
    assert hrefs(out) == ["https://h.example/u/tok", "https://t.example/t/c/1"]


def test_the_pixel_ends_the_body_and_the_rest_of_the_document_is_kept() -> None:
    html = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>T</title>'
            '</head><body class="b"><p style="color: red;">caf\u00e9 &amp; co &lt;3</p>'
            "<br><img src=\"https://example.com/i.png\" alt=\"\"></body></html>")
    out = add_tracking(html, click, "https://t.example/t/o/1")
    assert out == (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>T</title>'
        '</head><body class="b"><p style="color: red;">caf\u00e9 &amp; co &lt;3</p>'
        '<br><img src="https://example.com/i.png" alt="">'
        '<img src="https://t.example/t/o/1" width="1" height="1" alt="" '
        'style="display:block;border:0;width:1px;height:1px"></body></html>')


def test_an_empty_document_gets_only_the_pixel() -> None:
    out = add_tracking("", click, "https://t.example/t/o/1")
    assert out.startswith('<img src="https://t.example/t/o/1"')


TEMPLATE = """<!DOCTYPE html><html><body>
<p><a title="{{ user.bio }}" href="https://example.com/real">Real</a></p>
<p title="{{ user.bio }}">{{ user.name }}</p>
<p><a href="mailto:help@example.com">Help</a></p>
</body></html>
"""


def test_user_data_in_an_attribute_never_gets_a_signed_link_through_delivery(
        tmp_path: Path) -> None:
    (tmp_path / "news.html").write_text(TEMPLATE)
    app = Segflow(templates=tmp_path)
    app.template("news", subject="News", html="news.html", track=True)
    app.transaction("news", event="go", template="news")
    with Simulation(app, start="2026-03-01T09:00:00Z") as sim:
        sim.user("eve", email="eve@example.com", name="Eve",
                 bio="x href='https://evil.example/' y")
        sim.event("eve", "go")
        [message] = sim.sent("eve")
    def verify(token: str) -> object:
        return Signer(LINK_SECRET).verify("c", token)["l"]

    links = hrefs(message.html)
    assert len(links) == 2, links
    assert verify(links[0].rsplit("/t/c/", 1)[1]) == "https://example.com/real"
    assert links[1] == "mailto:help@example.com"
    # Every signed token in the message is the real link's, none the attacker's.
    tokens = [t.split('"', 1)[0] for t in message.html.split("/t/c/")[1:]]
    assert [verify(t) for t in tokens] == ["https://example.com/real"]
    assert "href='https://evil.example/'" in message.html  # still there, as title text
