"""The dashboard widget: a grid of bordered panels, each warning in colour and in words.

Each panel's border title names it and its subtitle says ``ok`` or ``WARNING``; a
warning panel also gets the ``warn`` class (a heavy red border) and a first body line,
in bold red, that says why. Rates and depths have a sparkline of the status
``history`` under their numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.widgets import Sparkline, Static

from .dashboard import PANELS, PanelView, panels

__all__ = ["Dashboard"]

# panel -> the status history field its sparkline draws
SPARK_FIELDS = {"ingest": "ingest_per_s", "sending": "sent_per_s", "outbox": "outbox",
                "timers": "lateness_s"}


class Dashboard(Grid):
    DEFAULT_CSS = """
    Dashboard { grid-size: 3; grid-rows: auto; grid-gutter: 0 1; height: auto;
                padding: 0 1; }
    Dashboard .panel { height: auto; border: round $success; padding: 0 1;
                       border-subtitle-color: $success; }
    Dashboard .panel.warn { border: heavy $error; border-subtitle-color: $error;
                            border-subtitle-style: bold; }
    Dashboard #panel-failures, Dashboard #panel-campaigns { column-span: 3; }
    Dashboard Sparkline { height: 2; }
    """

    def compose(self) -> ComposeResult:
        for key, title in PANELS.items():
            with Vertical(id=f"panel-{key}", classes="panel") as panel:
                panel.border_title = title
                panel.border_subtitle = "…"
                yield Static("", id=f"body-{key}")
                if key in SPARK_FIELDS:
                    yield Sparkline([0.0], id=f"spark-{key}", summary_function=max)

    def show(self, status: Mapping[str, object],
             campaigns: Sequence[Mapping[str, object]]) -> list[PanelView]:
        """Redraw every panel from one status reply and the campaigns list."""
        views = panels(status, campaigns)
        for view in views:
            panel = self.query_one(f"#panel-{view.key}", Vertical)
            panel.border_subtitle = view.subtitle
            panel.set_class(bool(view.warnings), "warn")
            body = view.body
            if view.warnings:
                body = Text("⚠ " + "; ".join(view.warnings) + "\n", style="bold red") + body
            self.query_one(f"#body-{view.key}", Static).update(body)
        history = status.get("history")
        rows = [h for h in history if isinstance(h, Mapping)] if isinstance(history, list) else []
        for key, field in SPARK_FIELDS.items():
            data = [_float(h.get(field)) for h in rows] or [0.0]
            self.query_one(f"#spark-{key}", Sparkline).data = data
        return views


def _float(v: object) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0
