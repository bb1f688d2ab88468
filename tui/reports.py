"""The Reports screen: each campaign's steps and variants as plain-text bars.

Asks the daemon for the ``report`` action's answer (segflowd.reports) and shows, per
campaign, one bar per step (its sent messages; the open, click and conversion rates
beside it) and one per variant (its conversion rate, the p-value against the control,
``winner`` when it wins). ``r`` refreshes, escape goes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from segflowd.errors import ControlReplyError, ControlUnavailable

__all__ = ["BAR_WIDTH", "ReportsScreen", "render_report"]

BAR_WIDTH = 30  # characters of the longest bar


def _num(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _pct(value: object) -> str:
    return f"{float(value) * 100:5.1f}%" if isinstance(value, int | float) else "    -"


def _bar(n: float, top: float) -> str:
    return ("█" * max(1, round(BAR_WIDTH * n / top)) if n > 0 and top > 0 else "").ljust(
        BAR_WIDTH)


def render_report(report: Mapping[str, object]) -> Text:
    """The report answer as text: per campaign, bars per step and per variant."""
    found, vfound = report.get("rows"), report.get("variants")
    rows = [r for r in found if isinstance(r, Mapping)] if isinstance(found, list) else []
    variants = [v for v in vfound if isinstance(v, Mapping)] \
        if isinstance(vfound, list) else []
    out = Text()
    if not rows:
        out.append("no campaign messages yet", style="dim")
        return out
    for campaign in sorted({str(r.get("campaign")) for r in rows}):
        out.append(f"{campaign}\n", style="bold")
        steps: dict[str, dict[str, int]] = {}
        for r in rows:
            if str(r.get("campaign")) != campaign:
                continue
            step = "-" if r.get("step") is None else str(r.get("step"))
            acc = steps.setdefault(f"{step} {r.get('template')}", {})
            for k in ("sent", "opened_unique", "clicked_unique", "converted"):
                acc[k] = acc.get(k, 0) + _num(r.get(k))
        top = max((s["sent"] for s in steps.values()), default=0)
        out.append("  steps (sent; opened, clicked, converted of sent)\n", style="dim")
        for label, s in steps.items():
            sent = s["sent"]
            rates = [s[k] / sent if sent else None
                     for k in ("opened_unique", "clicked_unique", "converted")]
            out.append(f"  {label[:24]:<24} ")
            out.append(_bar(sent, top), style="green")
            out.append(f" {sent:>8}  " + "  ".join(_pct(x) for x in rates) + "\n")
        mine: Sequence[Mapping[str, object]] = [
            v for v in variants if str(v.get("campaign")) == campaign]
        best = max((float(str(v.get("conversion_rate") or 0)) for v in mine), default=0.0)
        out.append("  variants (conversion rate; p-value against the control)\n", style="dim")
        for v in mine:
            rate = float(str(v.get("conversion_rate") or 0))
            name = "-" if v.get("variant") is None else str(v.get("variant"))
            p = v.get("p_value")
            note = "control" if v.get("control") else (
                f"p={float(str(p)):.4f}" if p is not None else "p=-")
            out.append(f"  {name[:24]:<24} ")
            out.append(_bar(rate, best), style="cyan")
            out.append(f" {_pct(v.get('conversion_rate'))}  {_num(v.get('converted'))}/"
                       f"{_num(v.get('sent'))}  {note}")
            if v.get("winner"):
                out.append("  winner", style="bold green")
            out.append("\n")
        out.append("\n")
    return out


class ReportsScreen(Screen[None]):
    """Campaign reports from the daemon's ``report`` action."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "app.pop_screen", "back"), Binding("r", "reload", "refresh")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="reports-box") as box:
            box.border_title = "Reports"
            yield Static("loading…", id="reports")
        yield Footer()

    def on_screen_resume(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        self._load()

    @work(exclusive=True, group="reports")
    async def _load(self) -> None:
        view = self.query_one("#reports", Static)
        backend = getattr(self.app, "backend", None)
        if backend is None:
            view.update("no daemon to ask")
            return
        try:
            answer = await backend.action("report", {})
        except (ControlReplyError, ControlUnavailable) as exc:
            view.update(Text(f"report failed: {exc}", style="red"))
            return
        view.update(render_report(answer) if isinstance(answer, Mapping)
                    else Text("the daemon's answer is not a report", style="red"))
