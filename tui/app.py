"""segflow-tui: watch a running segflowd and act on it, over its control socket only.

``segflow-tui [--socket PATH | --config PATH] [--wait]``. A missing socket or a permission
error at start is one sentence on stderr (exit 1). Once connected, losing the daemon is
shown in the status line and the TUI reconnects by itself when the daemon is back.
The live feed is rendered on an interval, never per event, so a busy daemon (thousands
of events a second) cannot make the TUI unresponsive.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import anyio
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import (
    DataTable,
    Footer,
    Header,
    Input,
    RichLog,
    Static,
    TabbedContent,
    TabPane,
)

from segflowd.errors import ControlReplyError, ControlUnavailable

from .backend import Backend
from .dashboard import PanelView, error_details
from .pick import PickSendScreen
from .render import (
    FeedFilter,
    feed_line,
    message_details,
    segment_details,
    timeline,
    value,
)
from .reports import ReportsScreen
from .rows import INSTANCE_COLUMNS, campaign_row, keyed, message_row, rows, segment_row
from .screens import ActionScreen, ConfirmScreen, DetailScreen, FunnelScreen, HelpScreen
from .widgets import Dashboard

__all__ = ["SegflowTUI", "main"]

POLL_INTERVAL = 1.0  # seconds between snapshot refreshes
FEED_INTERVAL = 0.25  # seconds between feed renders: the throttle
RETRY_INTERVAL = 1.0  # seconds between reconnection attempts
FEED_LINES = 1000  # lines the activity feed keeps
FEED_PER_RENDER = 200  # lines written per render at most; older ones are summarized
PENDING_MAX = 20_000  # events waiting for the next render before the TUI skips some
MESSAGES_SHOWN = 200

TABS = ("dashboard", "campaigns", "activity", "segments", "user", "messages")
DETAIL_TABS = ("dashboard", "segments", "messages")  # where `e` opens a full text

class SegflowTUI(App[None]):
    """The Textual app. ``backend`` is its only source of data (the control socket)."""

    TITLE = "segflow-tui"
    CSS = """
    #conn { height: 1; padding: 0 1; background: $boost; }
    #tabs { height: 1fr; }
    #tabs ContentSwitcher, #tabs TabPane { height: 1fr; }
    #feed, #campaigns-table, #segments-table, #messages-table { height: 1fr; }
    #conn.error { background: $error 40%; }
    #feed-info, #messages-info { height: 1; padding: 0 1; color: $text-muted; }
    #timeline { padding: 0 1; }
    HelpScreen, ConfirmScreen, FunnelScreen, DetailScreen { align: center middle; }
    #detail-box { width: 90%; height: 80%; border: round $accent; padding: 0 1;
                  background: $surface; }
    #help { width: 80; height: auto; border: round $accent; padding: 1 2;
            background: $surface; }
    #confirm { width: 64; height: auto; border: thick $warning; padding: 1 2;
               background: $surface; }
    #buttons { height: auto; align: center middle; margin-top: 1; }
    #buttons Button { margin: 0 2; }
    #funnel-box { width: 100; height: 80%; border: round $accent; background: $surface; }
    #funnel-title { padding: 0 1 1 1; }
    ActionScreen { align: center middle; }
    #action-box { width: 72; height: auto; border: round $accent; padding: 1 2;
                  background: $surface; }
    .hint { color: $text-muted; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("ctrl+r", "refresh", "refresh"),
        Binding("a", "any_action", "action"),
        Binding("b", "pick_send", "pick & send", show=False),
        Binding("e", "details", "full text"),
        Binding("escape", "leave_field", "leave field", show=False),
        *[Binding(str(i + 1), f"show_tab('{t}')", t, show=False) for i, t in enumerate(TABS)],
        Binding("p", "pause", "pause"),
        Binding("u", "resume", "resume"),
        Binding("f", "refresh_segment", "refresh segment"),
        Binding("x", "toggle_failures", "failures/all"),
        Binding("t", "retry_message", "retry"),
        Binding("slash", "focus_filter", "filter"),
        Binding("r", "push_screen('reports')", "reports", show=False),
    ]
    SCREENS: ClassVar = {"reports": ReportsScreen}  # r pushes it (tui/reports.py)
    _TAB_ACTIONS: ClassVar[dict[str, str]] = {"pause": "campaigns", "resume": "campaigns",
                    "refresh_segment": "segments", "toggle_failures": "messages",
                    "retry_message": "messages", "focus_filter": "activity"}

    def __init__(self, backend: Backend, *, poll_interval: float = POLL_INTERVAL,
                 feed_interval: float = FEED_INTERVAL,
                 retry_interval: float = RETRY_INTERVAL) -> None:
        super().__init__()
        self.backend = backend
        self.poll_interval = poll_interval
        self.feed_interval = feed_interval
        self.retry_interval = retry_interval
        self.connected = False
        self.ever_connected = False
        self.reconnects = 0
        self.refreshes = 0
        self.status: Mapping[str, object] = {}
        self.panels: list[PanelView] = []
        self._by_id: dict[str, dict[str, Mapping[str, object]]] = {}
        self.failures_only = False
        self.feed_filter = FeedFilter()
        self.events_seen = 0
        self.missed_total = 0
        self.skipped = 0
        self.last_action: tuple[str, str] | None = None
        self._pending: collections.deque[Mapping[str, object]] = collections.deque()
        self._recent: collections.deque[Mapping[str, object]] = collections.deque(
            maxlen=FEED_LINES)

    # -- layout ----------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static("connecting…", id="conn")
        with TabbedContent(initial="dashboard", id="tabs"):
            with TabPane("1 Dashboard", id="dashboard"), VerticalScroll():
                yield Dashboard(id="dash")
            with TabPane("2 Campaigns", id="campaigns"):
                yield DataTable(id="campaigns-table", cursor_type="row", zebra_stripes=True)
            with TabPane("3 Activity", id="activity"):
                yield Input(placeholder="filter: campaign:NAME user:ID kind:flow  (or words)",
                            id="feed-filter")
                yield Static("", id="feed-info")
                yield RichLog(id="feed", max_lines=FEED_LINES, wrap=True)
            with TabPane("4 Segments", id="segments"):
                yield DataTable(id="segments-table", cursor_type="row", zebra_stripes=True)
            with TabPane("5 User", id="user"):
                yield Input(placeholder="user id, then enter", id="user-id")
                with VerticalScroll():
                    yield Static("type a user id to see their journey", id="timeline")
            with TabPane("6 Messages", id="messages"):
                yield Static("", id="messages-info")
                yield DataTable(id="messages-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#campaigns-table", DataTable).add_columns(
            "campaign", "state", "version", "live", *INSTANCE_COLUMNS, "total")
        self.query_one("#segments-table", DataTable).add_columns(
            "segment", "size", "refresh", "last refresh", "next refresh", "last error")
        self.query_one("#messages-table", DataTable).add_columns(
            "id", "created", "user", "kind", "campaign/transaction", "template", "to",
            "status", "attempts", "last error")
        self.set_interval(self.feed_interval, self._flush_feed)
        self._connection()

    # -- connection ------------------------------------------------------------------

    def _set_conn(self, text: str, *, error: bool = False) -> None:
        conn = self.query_one("#conn", Static)
        conn.update(text)
        conn.set_class(error, "error")

    @work(exclusive=True, group="connection")
    async def _connection(self) -> None:
        try:
            await self._connect_forever()
        finally:  # the app is closing: leave no socket open
            with anyio.CancelScope(shield=True):
                await self.backend.close()

    async def _connect_forever(self) -> None:
        while True:
            try:
                version = await self.backend.connect()
            except ControlUnavailable as exc:
                self.connected = False
                if self.ever_connected:
                    self._set_conn(f"lost the daemon (stopped or restarting) — reconnecting… "
                                   f"({exc})", error=True)
                else:
                    self._set_conn(f"{exc} — retrying", error=True)
                await anyio.sleep(self.retry_interval)
                continue
            where = self.backend.description
            if self.ever_connected:
                self.reconnects += 1
                self._set_conn(f"reconnected to segflowd {version} at {where} "
                               "(the daemon restarted)")
                self.notify("the daemon restarted; reconnected")
            else:
                self._set_conn(f"connected to segflowd {version} at {where}")
            self.connected = self.ever_connected = True
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read_stream)
                    while True:
                        await self.refresh_data()
                        await anyio.sleep(self.poll_interval)
            except* ControlUnavailable:
                pass
            self.connected = False
            self._set_conn("lost the daemon (stopped or restarting) — reconnecting…",
                           error=True)
            await self.backend.close()

    async def _read_stream(self) -> None:
        async for batch in self.backend.stream():
            self.missed_total += batch.missed
            for event in batch.events:
                if len(self._pending) >= PENDING_MAX:
                    self.skipped += 1
                else:
                    self._pending.append(event)
        raise ControlUnavailable("the live stream ended")

    # -- snapshots -------------------------------------------------------------------

    async def refresh_data(self) -> None:
        """Fetch every snapshot once and redraw the screens from it."""
        status = await self.backend.request("status")
        campaigns = await self.backend.request("campaigns")
        segments = await self.backend.request("segments")
        messages = await self.backend.request("messages", limit=MESSAGES_SHOWN,
                                              failures=self.failures_only)
        self._by_id = {"segments": keyed(segments), "messages": keyed(messages)}
        if isinstance(status, Mapping):
            self.status = status
            self.panels = self.query_one(Dashboard).show(status, rows(campaigns))
        self._fill(self.query_one("#campaigns-table", DataTable), rows(campaigns),
                   campaign_row)
        self._fill(self.query_one("#segments-table", DataTable), rows(segments),
                   segment_row)
        self._fill(self.query_one("#messages-table", DataTable), rows(messages),
                   message_row)
        self.query_one("#messages-info", Static).update(
            ("failures only" if self.failures_only else "recent messages")
            + f" (newest first; x toggles)  ·  {len(rows(messages))} shown")
        self.refreshes += 1

    def _fill(self, table: DataTable[str], rows: Sequence[Mapping[str, object]],
              cells: Callable[[Mapping[str, object]], list[str]]) -> None:
        cursor = table.cursor_row
        table.clear()
        for row in rows:
            values = cells(row)
            table.add_row(*values, key=str(values[0]))
        if rows:
            table.move_cursor(row=min(cursor, len(rows) - 1))

    # -- the live feed ---------------------------------------------------------------

    def _flush_feed(self) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        self._pending.clear()
        self.events_seen += len(batch)
        self._recent.extend(batch)
        if isinstance(self.screen, PickSendScreen):  # a broadcast's progress
            self.screen.feed(batch)
        self._write_feed(batch)

    def _write_feed(self, events: Sequence[Mapping[str, object]]) -> None:
        log = self.query_one("#feed", RichLog)
        shown = [e for e in events if self.feed_filter.matches(e)]
        if len(shown) > FEED_PER_RENDER:
            log.write(Text(f"… {len(shown) - FEED_PER_RENDER} more events (showing the latest)",
                           style="dim"))
            shown = shown[-FEED_PER_RENDER:]
        for event in shown:
            log.write(feed_line(event))
        missed = self.missed_total + self.skipped
        self.query_one("#feed-info", Static).update(
            f"{self.events_seen} events"
            + (f", {missed} missed (a slow client: the daemon dropped them)" if missed else ""))

    @on(Input.Changed, "#feed-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.feed_filter = FeedFilter.parse(event.value)
        self.query_one("#feed", RichLog).clear()
        self._write_feed(list(self._recent))

    # -- campaigns, users ------------------------------------------------------------

    @on(DataTable.RowSelected, "#segments-table")
    @on(DataTable.RowSelected, "#messages-table")
    def _detail_selected(self) -> None:
        self.action_details()

    def action_details(self) -> None:
        """The full text of what the screen lists cut: errors, a message, a segment."""
        tab = self.query_one("#tabs", TabbedContent).active
        if tab == "dashboard":
            self.push_screen(DetailScreen("failures in the last hour",
                                          error_details(self.status)))
            return
        found = None
        if tab in ("messages", "segments"):
            key = self._selected(f"#{tab}-table")
            found = self._by_id.get(tab, {}).get(key or "")
        if found is None:
            self.notify("nothing selected")
        elif tab == "messages":
            self.push_screen(DetailScreen(f"message {found.get('id')}",
                                          message_details(found)))
        else:
            self.push_screen(DetailScreen(f"segment {found.get('name')}",
                                          segment_details(found)))

    @on(DataTable.RowSelected, "#campaigns-table")
    def _campaign_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self._open_campaign(event.row_key.value)

    @work(group="requests")
    async def _open_campaign(self, name: str) -> None:
        try:
            detail = await self.backend.request("campaign", name=name)
        except (ControlReplyError, ControlUnavailable) as exc:
            self.notify(str(exc), severity="error")
            return
        if isinstance(detail, Mapping):
            await self.push_screen(FunnelScreen(detail))

    @on(Input.Submitted, "#user-id")
    def _user_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self._load_user(event.value.strip())
        self.set_focus(None)  # digits switch screens again; "5" comes back here

    @on(Input.Submitted, "#feed-filter")
    def _filter_submitted(self) -> None:
        self.set_focus(None)

    def action_leave_field(self) -> None:
        self.set_focus(None)

    @work(exclusive=True, group="user")
    async def _load_user(self, uid: str) -> None:
        view = self.query_one("#timeline", Static)
        try:
            user = await self.backend.request("user", id=uid)
        except ControlReplyError as exc:
            view.update(Text(str(exc), style="yellow"))
            return
        except ControlUnavailable as exc:
            view.update(Text(str(exc), style="red"))
            return
        if isinstance(user, Mapping):
            view.update(timeline(user))

    # -- actions ---------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "details":  # the screens that list errors
            return self.query_one("#tabs", TabbedContent).active in DETAIL_TABS
        tab = self._TAB_ACTIONS.get(action)
        if tab is None:
            return True
        return self.query_one("#tabs", TabbedContent).active == tab

    @on(TabbedContent.TabActivated)
    def _tab_changed(self, event: TabbedContent.TabActivated) -> None:
        # The pane's table takes the keys at once (enter opens, arrows move).
        focus = {"campaigns": "#campaigns-table", "segments": "#segments-table",
                 "messages": "#messages-table", "user": "#user-id"}.get(str(event.pane.id))
        if focus:
            self.query_one(focus).focus()
        else:
            self.set_focus(None)
        self.refresh_bindings()

    def action_show_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_pick_send(self) -> None:
        self.push_screen(PickSendScreen(self.backend))

    def action_refresh(self) -> None:
        self._refresh_now()

    @work(group="requests")
    async def _refresh_now(self) -> None:
        try:
            await self.refresh_data()
        except (ControlUnavailable, ControlReplyError) as exc:
            self.notify(str(exc), severity="error")

    def action_focus_filter(self) -> None:
        self.query_one("#feed-filter", Input).focus()

    def action_toggle_failures(self) -> None:
        self.failures_only = not self.failures_only
        self._refresh_now()

    def _selected(self, table_id: str) -> str | None:
        table = self.query_one(table_id, DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return key

    def action_pause(self) -> None:
        name = self._selected("#campaigns-table")
        if name:
            self._confirm(f"Pause campaign [b]{name}[/b]?\nNo new entries and no steps until "
                          "resumed; waiting timers are kept.",
                          "campaign.pause", {"campaign": name})

    def action_resume(self) -> None:
        name = self._selected("#campaigns-table")
        if name:
            self._confirm(f"Resume campaign [b]{name}[/b]?", "campaign.resume",
                          {"campaign": name})

    def action_refresh_segment(self) -> None:
        name = self._selected("#segments-table")
        if name:
            self._confirm(f"Refresh segment [b]{name}[/b] now?", "segment.refresh",
                          {"segment": name})

    def action_retry_message(self) -> None:
        mid = self._selected("#messages-table")
        if mid:
            self._confirm(f"Retry message [b]{mid}[/b]?", "message.retry",
                          {"message": int(mid)})

    def action_any_action(self) -> None:
        offered = self.status.get("actions")
        names = [str(a) for a in offered] if isinstance(offered, list) else []

        def chosen(choice: tuple[str, dict[str, object]] | None) -> None:
            if choice is not None:
                name, args = choice
                shown = " ".join(f"{k}={v}" for k, v in args.items()) or "no arguments"
                self._confirm(f"Run [b]{name}[/b] with {shown}?", name, args)

        self.push_screen(ActionScreen(names), chosen)

    def _confirm(self, question: str, action: str, args: Mapping[str, object]) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._run_action(action, dict(args))
            else:
                self.last_action = (action, "cancelled")

        self.push_screen(ConfirmScreen(question), answered)

    @work(group="requests")
    async def _run_action(self, action: str, args: dict[str, object]) -> None:
        try:
            result = await self.backend.action(action, args)
        except (ControlReplyError, ControlUnavailable) as exc:
            self.last_action = (action, str(exc))
            self.notify(str(exc), severity="error", timeout=8)
            return
        self.last_action = (action, "ok")
        self.notify(f"{action}: done" + (f" — {value(result)}" if result is not None else ""),
                    timeout=10)
        with contextlib.suppress(ControlUnavailable, ControlReplyError):
            await self.refresh_data()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``segflow-tui`` command (see :mod:`segflow_tui.cli`)."""
    from .cli import run

    return run(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
