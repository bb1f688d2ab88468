"""Pick and send (issue #21): a data source's discovered row as a broadcast's audience.

``b`` opens :class:`PickSendScreen`, which walks the operator through what ``segflowd
broadcast --data-source NAME --values KEY=VALUE ...`` does, one step at a time, over the
control socket only:

1. the data sources (``audiences.list``);
2. one source's discovery rows (``audiences.list`` with ``source``);
3. a row: its placeholder values (guessed from the row's columns, editable), the
   audience's size and a sample (``audiences.pick`` with ``dry_run``: nothing written),
   and the template or campaign to send, with an optional rate;
4. a confirmation that says what goes to how many;
5. the broadcast (``broadcast.launch``) and its progress: users handled from the live
   stream (``broadcast.progress``, ``broadcast.completed``, the feed's source, handed in
   by the app through :meth:`PickSendScreen.feed`), and the messages' outcomes from the
   ``messages`` snapshot, refreshed until the broadcast is done and nothing is queued.

A daemon's refusal is shown in the screen as its one-line message, never a traceback.
Escape goes back a step, or closes the screen (a launched broadcast goes on).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Select, Static

from segflowd.errors import ControlReplyError, ControlUnavailable
from segflowd.sources.picked import PickError

from .backend import Backend
from .pickvalues import cell, format_values, guess_values, message_counts, parse_values, table_rows
from .render import value

__all__ = ["STEPS", "PickSendScreen"]

STEPS = ("sources", "rows", "audience", "confirm", "progress")
PROGRESS_INTERVAL = 0.5  # seconds between counts of the broadcast's messages
MESSAGES_LIMIT = 1000  # the messages op's most: a larger broadcast's counts are its latest
BROADCAST_EVENTS = ("broadcast.progress", "broadcast.completed", "broadcast.failed",
                    "broadcast.held", "broadcast.released")
HINTS = {
    "sources": "enter: this data source's rows   escape: close",
    "rows": "enter: pick this row (its audience is counted, nothing is written)   "
            "escape: back",
    "audience": "type a template (or choose a campaign), then enter   "
                "values: edit and enter to count again   escape: back",
    "confirm": "y: send   n / escape: back",
    "progress": "escape: close (the broadcast goes on in the daemon)",
}


class PickSendScreen(ModalScreen[None]):
    """Choose a data source, a discovered row, a template or campaign; confirm; watch."""

    DEFAULT_CSS = """
    PickSendScreen { align: center middle; }
    #pick-box { width: 96%; height: 92%; border: round $accent; padding: 0 1;
                background: $surface; }
    #pick-box DataTable { height: 1fr; }
    #pick-sample { height: auto; max-height: 9; }
    #pick-audience { height: 1fr; }
    #pick-audience Input, #pick-audience Select { margin: 0; }
    #pick-error { color: $error; }
    #pick-title { text-style: bold; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "back"),
        Binding("y", "launch", "send", show=False),
        Binding("n", "no", "no", show=False),
    ]

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.step = "sources"
        self.sources: dict[str, Mapping[str, object]] = {}
        self.source: str | None = None
        self.discovered: list[Mapping[str, object]] = []
        self.values: dict[str, object] = {}
        self.preview: Mapping[str, object] = {}
        self.target: dict[str, object] = {}
        self.launched: Mapping[str, object] = {}
        self.broadcasts: dict[int, dict[str, object]] = {}  # from the live stream, by id
        self.counts: dict[str, int] = {}
        self.done = False
        self.error = ""

    def compose(self) -> ComposeResult:
        with Vertical(id="pick-box") as box:
            box.border_title = "pick & send"
            yield Static("", id="pick-title")
            yield DataTable(id="pick-sources", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="pick-rows", cursor_type="row", zebra_stripes=True)
            with Vertical(id="pick-audience"):
                yield Input(placeholder="KEY=VALUE ... (the audience query's placeholders)",
                            id="pick-values")
                yield Static("", id="pick-count")
                yield DataTable(id="pick-sample", cursor_type="none", show_cursor=False)
                yield Input(placeholder="template to send (or leave empty and choose a "
                                        "campaign below)", id="pick-template")
                yield Select[str]([], prompt="or start a campaign's flow", id="pick-campaign")
                yield Input(placeholder="rate in users per second (empty: the daemon's "
                                        "default)", id="pick-rate")
            yield Static("", id="pick-confirm")
            yield Static("", id="pick-progress")
            yield Static("", id="pick-error")
            yield Static("", id="pick-hint", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#pick-sources", DataTable).add_columns(
            "data source", "source", "placeholders", "discovery")
        self._show("sources")
        self._load_sources()
        self._load_campaigns()

    # -- steps -----------------------------------------------------------------------

    def _show(self, step: str) -> None:
        self.step = step
        visible = {"sources": "#pick-sources", "rows": "#pick-rows",
                   "audience": "#pick-audience", "confirm": "#pick-confirm",
                   "progress": "#pick-progress"}
        for s, selector in visible.items():
            self.query_one(selector).display = s == step
        titles = {"sources": "1/5 choose a data source",
                  "rows": f"2/5 {self.source}: choose a discovered row",
                  "audience": f"3/5 {self.source}: the audience, and what to send",
                  "confirm": "4/5 confirm", "progress": "5/5 sending"}
        self.query_one("#pick-title", Static).update(titles[step])
        self.query_one("#pick-hint", Static).update(HINTS[step])
        focus = {"sources": "#pick-sources", "rows": "#pick-rows",
                 "audience": "#pick-template"}.get(step)
        if focus:
            self.query_one(focus).focus()
        else:
            self.set_focus(None)
        self.refresh_bindings()

    def _fail(self, message: str) -> None:
        self.error = message
        self.query_one("#pick-error", Static).update(Text(message))

    async def _call(self, op: str, **args: object) -> object | None:
        """One request, or None with the daemon's message shown (never raised)."""
        try:
            if op == "action":
                name = str(args.pop("name"))
                return await self.backend.action(name, args)
            return await self.backend.request(op, **args)
        except (ControlReplyError, ControlUnavailable) as exc:
            self._fail(str(exc))
            return None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("launch", "no"):  # y and n answer the confirmation only
            return self.step == "confirm"
        return True

    def action_no(self) -> None:
        self.action_back()

    def action_back(self) -> None:
        self._fail("")
        previous = {"rows": "sources", "audience": "rows", "confirm": "audience"}
        if self.step in previous:
            self._show(previous[self.step])
        else:
            self.dismiss(None)

    # -- 1. data sources -------------------------------------------------------------

    @work(exclusive=True, group="pick-load")
    async def _load_sources(self) -> None:
        reply = await self._call("action", name="audiences.list")
        if not isinstance(reply, Mapping):
            return
        table = self.query_one("#pick-sources", DataTable)
        table.clear()
        self.sources = {}
        for d in table_rows(reply.get("data_sources")):
            name = str(d.get("name"))
            self.sources[name] = d
            names = d.get("placeholders")
            shown = ", ".join(str(n) for n in names) if isinstance(names, list) else "?"
            table.add_row(name, value(d.get("source")), shown,
                          "yes" if d.get("discovery") else "no", key=name)
        if not self.sources:
            self._fail("this daemon's app declares no data sources (app.data_source)")

    @work(group="pick-load")
    async def _load_campaigns(self) -> None:
        try:
            reply = await self.backend.request("campaigns")
        except (ControlReplyError, ControlUnavailable):
            return  # the template field still works; launching reports any real trouble
        names = [str(c.get("name")) for c in table_rows(reply) if c.get("defined")]
        self.query_one("#pick-campaign", Select).set_options((n, n) for n in names)

    @on(DataTable.RowSelected, "#pick-sources")
    def _source_selected(self, event: DataTable.RowSelected) -> None:
        name = event.row_key.value
        if name is None:
            return
        if not self.sources.get(name, {}).get("discovery"):
            return self._fail(f"data source {name!r} has no discovery query: give its "
                              "values with segflowd broadcast --data-source NAME --values")
        self._fail("")
        self.source = name
        self._load_rows(name)

    # -- 2. discovery rows -----------------------------------------------------------

    @work(exclusive=True, group="pick-load")
    async def _load_rows(self, name: str) -> None:
        reply = await self._call("action", name="audiences.list", source=name)
        if not isinstance(reply, Mapping):
            return
        self.discovered = table_rows(reply.get("rows"))
        table = self.query_one("#pick-rows", DataTable)
        table.clear(columns=True)
        if self.discovered:
            table.add_columns(*(str(c) for c in self.discovered[0]))
        for i, row in enumerate(self.discovered):
            table.add_row(*(cell(v) for v in row.values()), key=str(i))
        if not self.discovered:
            self._fail(f"the discovery query of {name!r} returned no rows")
        self._show("rows")

    @on(DataTable.RowSelected, "#pick-rows")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is None or self.source is None:
            return
        names = self.sources.get(self.source, {}).get("placeholders")
        placeholders = [str(n) for n in names] if isinstance(names, list) else []
        self.values = guess_values(self.discovered[int(key)], placeholders)
        self.query_one("#pick-values", Input).value = format_values(self.values)
        self._fail("")
        self._show("audience")
        self._count()

    # -- 3. the audience and the target ----------------------------------------------

    @on(Input.Submitted, "#pick-values")
    def _values_submitted(self, event: Input.Submitted) -> None:
        try:
            self.values = parse_values(event.value)
        except PickError as exc:
            return self._fail(str(exc))
        self._fail("")
        self._count()

    @work(exclusive=True, group="pick-count")
    async def _count(self) -> None:
        self.preview = {}
        count = self.query_one("#pick-count", Static)
        count.update(f"counting the audience of {self.source} {json.dumps(self.values)}…")
        sample = self.query_one("#pick-sample", DataTable)
        sample.clear(columns=True)
        reply = await self._call("action", name="audiences.pick", data_source=self.source,
                                 values=self.values, dry_run=True)
        if not isinstance(reply, Mapping):
            count.update("no audience: fix the values above (enter counts again)")
            return
        self.preview = reply
        rows = table_rows(reply.get("sample"))
        count.update(Text.assemble(
            ("audience: ", "bold"), (f"{value(reply.get('count'))} profiles", "bold"),
            f"  (segment {value(reply.get('segment'))}; nothing written yet)  "
            f"sample of {len(rows)}:"))
        if rows:
            sample.add_columns(*(str(c) for c in rows[0]))
        for r in rows:
            sample.add_row(*(cell(v) for v in r.values()))

    @on(Input.Submitted, "#pick-template")
    @on(Input.Submitted, "#pick-rate")
    def _target_submitted(self) -> None:
        if not self.preview:
            return self._fail("no audience counted yet: check the values (enter counts again)")
        template = self.query_one("#pick-template", Input).value.strip()
        campaign = self.query_one("#pick-campaign", Select).value
        rate_text = self.query_one("#pick-rate", Input).value.strip()
        target: dict[str, object] = {}
        if template:
            target["template"] = template
        elif isinstance(campaign, str):
            target["campaign"] = campaign
        else:
            return self._fail("type a template to send, or choose a campaign")
        if rate_text:
            try:
                rate = float(rate_text)
            except ValueError:
                return self._fail(f"rate must be a number of users per second, not "
                                  f"{rate_text!r}")
            if not rate > 0:
                return self._fail("rate must be more than 0 users per second")
            target["rate"] = rate
        self.target = target
        self._fail("")
        self.query_one("#pick-confirm", Static).update(self._question())
        self._show("confirm")

    def _question(self) -> Text:
        p, t = self.preview, self.target
        what = (f"template {t['template']}" if "template" in t
                else f"campaign {t['campaign']} (its flow starts for each of them)")
        rate = f"{value(t['rate'])} users/s" if "rate" in t else "the daemon's default rate"
        return Text.assemble(
            "Send ", (what, "bold"), " to ", (f"{value(p.get('count'))} profiles", "bold"),
            f" of data source {self.source} {json.dumps(self.values)}?\n",
            f"segment {value(p.get('segment'))}, at {rate}. The audience is synced now; "
            "each person gets it once.\n\n", ("y", "bold"), ": send    ", ("n", "bold"),
            " / escape: back")

    # -- 4. launch, 5. progress ------------------------------------------------------

    def action_launch(self) -> None:
        if self.step == "confirm":
            self._launch()

    @work(exclusive=True, group="pick-launch")
    async def _launch(self) -> None:
        self.query_one("#pick-confirm", Static).update("launching…")
        reply = await self._call("action", name="broadcast.launch", data_source=self.source,
                                 values=self.values, **self.target)
        if not isinstance(reply, Mapping):
            self._show("audience")  # the daemon's message stays shown: fix and go again
            return
        self.launched = reply
        self._show("progress")
        self._render_progress()
        self._count_messages()
        self.set_interval(PROGRESS_INTERVAL, self._poll, name="pick-progress")

    def feed(self, events: Sequence[Mapping[str, object]]) -> None:
        """Live events from the app's stream: the broadcasts' progress and ends."""
        for e in events:
            bid = e.get("broadcast")
            if e.get("kind") not in BROADCAST_EVENTS or not isinstance(bid, int):
                continue
            state = self.broadcasts.setdefault(bid, {})
            kind = str(e.get("kind")).removeprefix("broadcast.")
            if kind == "progress":
                state.update(done=e.get("done"), total=e.get("total"))
            elif kind in ("completed", "failed"):
                state.update(status=kind, error=e.get("error"))
            else:
                state["held"] = kind == "held"
        if self.launched:
            self._render_progress()

    def _poll(self) -> None:
        if not self.done:
            self._count_messages()
    @work(exclusive=True, group="pick-progress")
    async def _count_messages(self) -> None:
        args: dict[str, object] = {"limit": MESSAGES_LIMIT}
        if self.launched.get("campaign") is not None:
            args["campaign"] = self.launched.get("campaign")
        reply = await self._call("messages", **args)
        if reply is None:
            return
        self.counts = message_counts(reply, self.launched)
        self._render_progress()

    def _render_progress(self) -> None:
        b = self.launched
        bid = b.get("id")
        live = self.broadcasts.get(bid, {}) if isinstance(bid, int) else {}
        status = str(live.get("status", b.get("status")))
        total = live.get("total", b.get("total"))
        c = self.counts
        settled = status in ("completed", "failed") and c.get("queued", 0) == 0
        self.done = settled
        what = f"template {b['template']}" if b.get("template") is not None \
            else f"campaign {b.get('campaign')}"
        out = Text.assemble(
            (f"broadcast {value(bid)}", "bold"), f": {what} to {value(b.get('segment'))}\n",
            f"users handled: {value(live.get('done', b.get('done')))} of {value(total)}  "
            f"({status}{', held: its campaign is paused' if live.get('held') else ''})\n",
            ("messages: ", "bold"),
            f"{c.get('sent', 0)} sent · {c.get('queued', 0)} queued · "
            f"{c.get('failed', 0)} failed · {c.get('suppressed', 0)} suppressed\n")
        if live.get("error"):
            out.append(f"error: {live.get('error')}\n", style="red")
        out.append("done." if settled else "sending… (refreshing)",
                   style="bold green" if settled and status == "completed" else "")
        self.query_one("#pick-progress", Static).update(out)
