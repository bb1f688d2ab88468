"""Modal screens: help, confirmation of an admin action, a campaign's funnel, full texts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Input, Label, Select, Static

from .render import value

__all__ = ["ActionScreen", "ConfirmScreen", "DetailScreen", "FunnelScreen", "HelpScreen",
           "parse_args"]

# What each admin action takes, as typed in the action dialog (KEY=VALUE words).
ACTION_ARGS = {
    "campaign.pause": "campaign=NAME",
    "campaign.resume": "campaign=NAME",
    "segment.refresh": "segment=NAME",
    "email.test": "template=NAME to=ADDRESS [user=ID]",
    "message.retry": "message=ID",
    "instance.terminate": "instance=ID",
    "instance.restart": "instance=ID",
    "audiences.list": "[source=NAME]",
    "broadcast.launch": "segment=NAME template=NAME (or campaign=NAME) [rate=N] "
                        "[broadcast=LABEL]",
}
_INT_ARGS = ("message", "instance")


def parse_args(text: str) -> dict[str, object]:
    """``a=1 b=x`` → ``{"a": 1, "b": "x"}`` (ids become integers); ValueError if malformed."""
    out: dict[str, object] = {}
    for word in text.split():
        key, sep, val = word.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {word!r}")
        out[key] = int(val) if key in _INT_ARGS and val.isdigit() else val
    return out

HELP = """\
[b]segflow-tui[/b] — watch and steer a running segflowd over its control socket

[b]Screens[/b]
  1 dashboard  2 campaigns  3 activity  4 segments  5 user  6 messages
[b]Everywhere[/b]
  ?  this help    ctrl+r  refresh now    a  any admin action    q  quit
  b  pick & send: a data source's row → its audience → a template → send
  r  reports: each campaign's steps and variants as bars (r refreshes, escape back)
[b]Dashboard[/b]
  a red panel that says WARNING: a threshold (\\[dashboard]) is crossed
  e  the last hour's top errors in full
[b]Campaigns[/b]
  enter  open the funnel      p  pause      u  resume
[b]Activity[/b]
  /  filter: campaign:NAME user:ID kind:flow (words match anything)
[b]Segments[/b]
  f  refresh the selected segment now    enter/e  its last error in full
[b]User[/b]
  type an id and press enter: the journey as a timeline
  (segment entries and exits, flow steps, messages, opens and clicks)
[b]Messages[/b]
  x  failures only / all      t  retry the selected message
  enter/e  the selected message with its last error in full

escape leaves a text field, so the keys above work again.
Admin actions always ask for confirmation first (y / n).
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static(HELP)
            yield Label("press escape to close", classes="hint")


class DetailScreen(ModalScreen[None]):
    """A long text in full, wrapped and scrollable: an error the lists cut at the edge."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,e", "dismiss", "close")]

    def __init__(self, title: str, body: Text) -> None:
        super().__init__()
        self.title_text = title
        self.body = body

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail-box") as box:
            box.border_title = self.title_text
            box.border_subtitle = "escape: close"
            yield Static(self.body, id="detail")


class ConfirmScreen(ModalScreen[bool]):
    """Ask before an admin action; dismissed with True only on an explicit yes."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Static(self.question, id="question")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class FunnelScreen(ModalScreen[None]):
    """One campaign: counts by status and the per-step funnel."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "back")]

    def __init__(self, campaign: Mapping[str, object]) -> None:
        super().__init__()
        self.campaign = campaign

    def compose(self) -> ComposeResult:
        c = self.campaign
        statuses = c.get("instances")
        counts = ", ".join(f"{k} {v}" for k, v in statuses.items() if v) \
            if isinstance(statuses, Mapping) else "-"
        with Vertical(id="funnel-box"):
            yield Static(f"[b]{c.get('name')}[/b]  version {value(c.get('version'))}   "
                         f"instances: {counts or 'none'}", id="funnel-title")
            yield DataTable(id="funnel", cursor_type="row")
            yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#funnel", DataTable)
        table.add_columns("step", "kind", "name", "reached", "here now", "")
        funnel = self.campaign.get("funnel")
        rows = [f for f in funnel if isinstance(f, Mapping)] if isinstance(funnel, list) else []
        top = max((int(str(f.get("reached", 0))) for f in rows), default=0) or 1
        for f in rows:
            reached = int(str(f.get("reached", 0)))
            bar = "█" * max(1, round(24 * reached / top)) if reached else ""
            table.add_row(value(f.get("seq")), value(f.get("kind")), value(f.get("name")),
                          value(reached), value(f.get("here")), bar)


class ActionScreen(ModalScreen[tuple[str, dict[str, object]] | None]):
    """Pick any admin action the daemon offers and type its arguments."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "cancel")]

    def __init__(self, available: list[str]) -> None:
        super().__init__()
        self.available = available or list(ACTION_ARGS)

    def compose(self) -> ComposeResult:
        with Vertical(id="action-box"):
            yield Label("[b]Admin action[/b]")
            yield Select([(name, name) for name in self.available], id="action-name",
                         allow_blank=False, value=self.available[0])
            yield Input(placeholder=ACTION_ARGS.get(self.available[0], "KEY=VALUE ..."),
                        id="action-args")
            yield Static("", id="action-error")
            yield Label("enter: continue (you confirm next)   escape: cancel", classes="hint")

    def on_select_changed(self, event: Select.Changed) -> None:
        self.query_one("#action-args", Input).placeholder = ACTION_ARGS.get(
            str(event.value), "KEY=VALUE ...")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        name = str(self.query_one("#action-name", Select).value)
        try:
            args = parse_args(event.value)
        except ValueError as exc:
            self.query_one("#action-error", Static).update(f"[red]{exc}[/red]")
            return
        self.dismiss((name, args))
