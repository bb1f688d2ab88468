"""``segflowd status`` and the admin subcommands, over the control socket (for scripts).

Each subcommand connects to ``--socket PATH`` (default: ``[daemon] control_socket`` of
the config), sends one request and prints the reply. Exit status: 0 done; 1 the daemon
is unreachable or refused (the reason is one line on stderr); 2 a bad config. ``test-email``
waits for its message: 0 sent; 1 failed or suppressed (the reason on stderr); 3 ``unknown``
or not settled in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping

import anyio

from ..control.client import ControlClient, resolve_socket
from ..dashboard import DashboardConfig
from ..errors import ConfigError, ControlError
from . import pickbroadcast

__all__ = ["add_parser", "format_duration", "format_status", "run"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNSETTLED = 3  # test-email: the message is `unknown`, or still on its way

Args = Callable[[argparse.Namespace], dict[str, object]]

# subcommand -> (action name, help, positional arguments, how to build the action's args)
_ACTIONS: dict[str, tuple[str, str, tuple[tuple[str, type, str], ...], Args]] = {
    "pause": ("campaign.pause", "pause a campaign: no new entries, no steps, timers kept",
              (("campaign", str, "campaign name"),), lambda a: {"campaign": a.campaign}),
    "resume": ("campaign.resume", "resume a paused campaign",
               (("campaign", str, "campaign name"),), lambda a: {"campaign": a.campaign}),
    "refresh": ("segment.refresh", "recompute a segment now",
                (("segment", str, "segment name"),), lambda a: {"segment": a.segment}),
    "test-email": ("email.test", "send a test email of a template to an address",
                   (("template", str, "template name"), ("to", str, "email address")),
                   lambda a: _test_email_args(a)),
    "retry": ("message.retry", "retry a failed message",
              (("message_id", int, "message id"),), lambda a: {"message": a.message_id}),
    "terminate": ("instance.terminate", "terminate a diverged or failed flow instance",
                  (("instance_id", int, "instance id"),),
                  lambda a: {"instance": a.instance_id}),
    "restart": ("instance.restart", "restart a diverged or failed flow instance",
                (("instance_id", int, "instance id"),),
                lambda a: {"instance": a.instance_id}),
    "wake": ("instance.wake", "fire a waiting flow instance's wait now, as its timer would",
             (("instance_id", int, "instance id"),), lambda a: {"instance": a.instance_id}),
    "audiences": ("audiences.list", "list the data sources' audiences", (),
                  lambda a: {"source": a.source} if a.source else {}),
    "broadcast": ("broadcast.launch",
                  "launch a broadcast to a segment or a data source's audience",
                  (), lambda a: _broadcast_args(a)),  # its target: cli.pickbroadcast
}


def _test_email_args(a: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {"template": a.template, "to": a.to}
    if a.user:
        out["user"] = a.user
    if a.data is not None:
        try:
            data = json.loads(a.data)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--data is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise argparse.ArgumentTypeError("--data must be a JSON object")
        out["data"] = data
    return out


def _broadcast_args(a: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = pickbroadcast.target_args(a)
    for key in ("template", "campaign", "rate", "data", "topic"):
        if getattr(a, key) is not None:
            out[key] = getattr(a, key)
    if a.name:
        out["broadcast"] = a.name
    return {**out, **_kv(a.arg)}


def _kv(pairs: list[str] | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--arg wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    control = argparse.ArgumentParser(add_help=False)
    control.add_argument("--socket", metavar="PATH",
                         help="the control socket (default: [daemon] control_socket)")
    p = sub.add_parser("status", parents=[common, control],
                       help="show the running daemon's status")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")
    p.set_defaults(handler=run, op="status")
    for cmd, (action, help_text, positionals, _build) in _ACTIONS.items():
        p = sub.add_parser(cmd, parents=[common, control], help=help_text)
        for name, typ, meta in positionals:
            p.add_argument(name, type=typ, help=meta)
        if cmd == "test-email":
            p.add_argument("--user", metavar="ID", help="render for this user's attributes")
            p.add_argument("--data", metavar="JSON",
                           help="the template's context (a JSON object)")
        if cmd == "audiences":
            p.add_argument("source", nargs="?", help="only this data source")
        if cmd == "broadcast":
            pickbroadcast.add_arguments(p)  # a segment, or --data-source ... --values
            what = p.add_mutually_exclusive_group(required=True)
            what.add_argument("--template", metavar="NAME", help="send this template")
            what.add_argument("--campaign", metavar="NAME", help="run this campaign's flow")
            p.add_argument("--rate", type=float, metavar="N", help="users per second")
            p.add_argument("--name", metavar="LABEL", help="a label for the broadcast")
            p.add_argument("--topic", metavar="NAME",
                           help="the app topic its users can opt out of (app.topic)")
            p.add_argument("--data", metavar="JSON", help="extra template data (a JSON object)")
            p.add_argument("--arg", action="append", metavar="KEY=VALUE",
                           help="any further argument of the action (repeatable)")
        p.add_argument("--json", action="store_true", help="print the reply as JSON")
        p.set_defaults(handler=run, op="action", action=action, command_name=cmd)


def run(args: argparse.Namespace) -> int:
    try:
        path = resolve_socket(args.socket, args.config)
    except ConfigError as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.op == "action":
        try:
            action_args = _ACTIONS[args.command_name][3](args)
        except argparse.ArgumentTypeError as exc:
            print(f"segflowd: {exc}", file=sys.stderr)
            return EXIT_USAGE
    result: list[object] = []

    async def main() -> None:
        async with await ControlClient.connect(path) as client:
            if args.op == "status":
                result.append(await client.request("status"))
            else:
                result.append(await client.action(args.action, action_args))

    try:
        anyio.run(main)
    except ControlError as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    (value,) = result
    if args.op == "action" and args.command_name == "test-email":
        return report_test_email(value, as_json=args.json)
    if args.json:
        print(json.dumps(value, indent=2, sort_keys=True))
    elif args.op == "status" and isinstance(value, dict):
        print(format_status(value))
    elif (dry_run := pickbroadcast.format_reply(value)) is not None:
        print(dry_run)
    elif isinstance(value, str):
        print(value)
    else:
        print(f"{args.action}: ok" + ("" if value is None else f" {json.dumps(value)}"))
    return EXIT_OK


def report_test_email(value: object, *, as_json: bool) -> int:
    """Print an ``email.test`` reply; its exit status: 0 sent, 1 failed or suppressed (the
    reason on stderr), 3 not known to have gone (``unknown``, or not settled in time)."""
    reply = value if isinstance(value, Mapping) else {}
    status, error = reply.get("status"), reply.get("error")
    print(json.dumps(value, indent=2, sort_keys=True) if as_json
          else f"email.test: message {reply.get('message')} {status}")
    if status == "sent":
        return EXIT_OK
    why = f": {error}" if error else ""
    if status in ("failed", "suppressed"):
        print(f"segflowd: the test message was {status}{why}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"segflowd: the test message is {status} (not known to be sent){why}",
          file=sys.stderr)
    return EXIT_UNSETTLED


def format_duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}h"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {s:02d}s"


def _num(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def _health(st: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """The dashboard's health figures as lines, and what it warns about: the same
    thresholds (the daemon's ``[dashboard]``, sent as ``dashboard``) as segflow-tui."""
    if "health" not in st:
        return [], []
    h = st.get("health")
    if not isinstance(h, Mapping):
        return ["health: unknown (the store did not answer)"], []
    sent = st.get("dashboard")
    t = {**dataclasses.asdict(DashboardConfig()), **(sent if isinstance(sent, Mapping) else {})}
    raw = h.get("instances")
    inst: Mapping[str, object] = raw if isinstance(raw, Mapping) else {}
    fails, oldest = h.get("failures_1h"), h.get("oldest_queued_s")
    bad = sum(int(v) for v in inst.values() if isinstance(v, int))
    age = format_duration(oldest) if isinstance(oldest, int | float) else "-"
    lines = [f"health: {_num(fails)} failures in the last hour, oldest queued message {age}, "
             f"instances {_num(inst.get('failed'))} failed, {_num(inst.get('diverged'))} "
             "diverged"]
    warn = []
    if isinstance(fails, int) and fails >= t["failures_per_hour"]:
        warn.append(f"{fails} failures in the last hour (warns at {t['failures_per_hour']})")
    if bad >= t["failed_instances"]:
        warn.append(f"{bad} instances failed or diverged: restart or terminate them")
    if isinstance(oldest, int | float) and oldest >= t["oldest_queued_s"]:
        warn.append(f"the oldest queued message has waited {age}")
    per = h.get("campaigns")
    for name, c in sorted(per.items()) if isinstance(per, Mapping) else ():
        n = c.get("failures_1h") if isinstance(c, Mapping) else None
        if isinstance(n, int) and n >= t["campaign_failures_per_hour"]:
            warn.append(f"campaign {name}: {n} failures in the last hour")
    top = h.get("top_errors")
    for e in top if isinstance(top, list) else []:
        if isinstance(e, Mapping):
            text = " ".join(str(e.get("error")).split())
            lines.append(f"  {_num(e.get('count'))}x ({e.get('where')}) "
                         f"{text if len(text) <= 100 else text[:99] + '…'}")
    return lines, warn


def format_status(st: Mapping[str, object]) -> str:
    """The human form of a ``status`` reply (tolerates any field being absent)."""

    def get(name: str) -> Mapping[str, object]:
        value = st.get(name)
        return value if isinstance(value, Mapping) else {}

    store, rates, wheel, bus = get("store"), get("rates"), get("wheel"), get("bus")
    outbox = get("outbox")
    uptime = st.get("uptime_s")
    lines = [
        f"segflowd {st.get('version', '?')} (control protocol {st.get('protocol', '?')}), "
        f"up {format_duration(float(uptime)) if isinstance(uptime, int | float) else '?'}",
        f"store:  {store.get('dialect', '?')}, "
        f"{'healthy' if store.get('healthy') else 'UNREACHABLE'}, "
        f"schema {_num(store.get('schema_version'))}, "
        f"{_num(store.get('checked_out'))}/{_num(store.get('pool_size'))} connections in use",
        f"rates:  ingest {_num(rates.get('ingest_per_s'))}/s, "
        f"sent {_num(rates.get('sent_per_s'))}/s, failed {_num(rates.get('failed_per_s'))}/s",
        "outbox: " + (", ".join(f"{k} {_num(v)}" for k, v in outbox.items()) or "-"),
        f"wheel:  {_num(wheel.get('size'))} timers, lateness {_num(wheel.get('lateness_s'))} s",
        f"bus:    {_num(bus.get('published'))} published, "
        f"{_num(bus.get('subscribers'))} subscribers, {_num(bus.get('dropped'))} dropped",
    ]
    delivery = get("stats").get("delivery")
    providers = delivery.get("providers") if isinstance(delivery, Mapping) else None
    for p in providers if isinstance(providers, list) else []:
        if isinstance(p, Mapping) and p.get("outage_since"):
            lines.insert(1, f"ALARM:  provider {p.get('name')} ({p.get('plugin')}) is down "
                            f"since {p.get('outage_since')}: {p.get('outage_error')} "
                            "(its messages stay queued; it is probed until it answers)")
    health, warnings = _health(st)
    lines[1:1] = [f"WARNING: {w}" for w in warnings]
    lines += health
    for area, values in get("stats").items():
        if isinstance(values, Mapping):
            flat = ", ".join(f"{k}={_num(v)}" for k, v in values.items()
                             if not isinstance(v, Mapping | list))
            lines.append(f"{area + ':':<7} {flat}")
    flows = get("stats").get("flows")
    held = flows.get("waiting_entries") if isinstance(flows, Mapping) else None
    for name, n in sorted(held.items()) if isinstance(held, Mapping) else ():
        lines.append(f"paused: campaign {name}: {_num(n)} entries waiting (they enter on "
                     "resume)")
    actions = st.get("actions")
    if isinstance(actions, list):
        lines.append("actions: " + (", ".join(str(a) for a in actions) or "none"))
    return "\n".join(lines)
