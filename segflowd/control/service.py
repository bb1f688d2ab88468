"""The control socket: snapshots, the live event stream and admin actions over JSON lines.

A unix socket at ``[daemon] control_socket``, born with mode ``control_socket_mode``
(0600 by default; ``control_socket_group`` hands it to a group). A socket left by a dead
daemon is replaced; one a live daemon answers on is never taken over (ControlSocketError).
The wire format is in :mod:`segflowd.control.protocol` and docs/reference/control-protocol.md.

Every request gets a reply: a bad or empty line, an unknown op, a refused ``subscribe``, an
action no service registered, a failing query are error replies, and the connection stays
open (only a line over MAX_LINE closes it: the next line cannot be found). A subscriber
reads the bus through its own bounded buffer, so a slow or stuck client only misses events
(and is told how many); it never slows the daemon (the stream is
:mod:`segflowd.control.stream`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import grp
import os
import socket
import stat
from pathlib import Path

import anyio
import structlog
from anyio.abc import SocketListener, SocketStream, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from .. import __version__
from ..errors import ControlSocketError, SegflowError, StoreUnavailable
from ..http import Router
from ..kernel import Kernel
from ..reports import action as report_action
from . import queries
from .protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    BadRequest,
    Request,
    decode_request,
    dumps,
    error_reply,
    ok_reply,
    request_id,
    to_jsonable,
    unix_address,
)
from .stream import STREAM_BUFFER, Streams

__all__ = ["ControlService", "ControlStatistics", "open_control_socket"]

log = structlog.get_logger("segflowd.control")

BACKLOG = 64  # pending connections on the socket
SAMPLE_INTERVAL = 1.0  # seconds between rate samples
HISTORY = 120  # samples kept for the TUI's sparklines (two minutes at 1 s)
PING_TIMEOUT = 1.0  # seconds the store may take to answer the status health check
# Seconds the dashboard's health figures (queries.health: scans of the last hour) are
# reused: a TUI asks for status every second, and several may be attached.
HEALTH_TTL = 15.0
PROBE_TIMEOUT = 1.0  # seconds to wait when checking whether an existing socket is live
COUNTED_KINDS = ("event.ingested", "message.sent", "message.failed")
COUNTER_BUFFER = 200_000  # counted events held between two samples (rates above that clip)
INGEST_COUNTER = "segflow_ingest_events_total"


@dataclasses.dataclass(frozen=True)
class ControlStatistics:
    path: str
    connections: int
    connections_total: int
    requests: int
    errors: int
    subscribers: int
    events_streamed: int
    events_missed: int


def open_control_socket(path: Path, mode: int = 0o600, group: str = "") -> socket.socket:
    """Bind a listening unix socket at ``path`` safely; ControlSocketError says why not.

    The socket is created under a umask that leaves it ``0600`` from its first instant,
    then given ``mode`` (and ``group``): there is no window in which others may connect.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlSocketError(
            f"cannot create the folder for the control socket {path}: {exc.strerror}") from None
    _remove_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with unix_address(path) as address:
            sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ControlSocketError(f"cannot create the control socket {path}: {reason}") from None
    finally:
        os.umask(old)
    try:
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ControlSocketError(
                    f"[daemon] control_socket_group: no group named {group!r}") from None
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        path.unlink(missing_ok=True)
        raise ControlSocketError(
            f"cannot set the control socket's owner or mode: {exc.strerror}") from None
    except ControlSocketError:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def _remove_if_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(
            f"{path} exists and is not a socket; refusing to replace it "
            "(remove it or set [daemon] control_socket)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        with unix_address(path) as address:
            probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: a dead daemon's leftover
        log.info("control.stale_socket_replaced", path=str(path))
        return
    except OSError as exc:
        raise ControlSocketError(
            f"cannot check the existing control socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ControlSocketError(
        f"another segflowd is already listening on the control socket {path}; stop it first "
        "or give this one another [daemon] control_socket")


class _Sampler:
    """Rates for the dashboard: counts per interval, kept as a short history."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.history: collections.deque[dict[str, object]] = collections.deque(maxlen=HISTORY)
        self.rates: dict[str, float] = {"ingest_per_s": 0.0, "sent_per_s": 0.0,
                                        "failed_per_s": 0.0}
        self.outbox: dict[str, int] | None = None

    async def run(self) -> None:
        bus, clock = self.kernel.bus, self.kernel.clock
        sub = bus.subscribe(kinds=frozenset(COUNTED_KINDS), buffer=COUNTER_BUFFER)
        last_counter = self.kernel.metrics.value(INGEST_COUNTER)
        last = clock.monotonic()
        try:
            while True:
                await clock.sleep(SAMPLE_INTERVAL)
                now = clock.monotonic()
                span = max(now - last, 1e-6)
                last = now
                counts = dict.fromkeys(COUNTED_KINDS, 0)
                drained, _ = sub.drain(limit=COUNTER_BUFFER)
                for event in drained:
                    counts[event.kind] += 1
                counter = self.kernel.metrics.value(INGEST_COUNTER)
                ingested = max(counter - last_counter, float(counts["event.ingested"]))
                last_counter = counter
                self.rates = {
                    "ingest_per_s": round(ingested / span, 2),
                    "sent_per_s": round(counts["message.sent"] / span, 2),
                    "failed_per_s": round(counts["message.failed"] / span, 2),
                }
                with contextlib.suppress(SegflowError, OSError):
                    self.outbox = await queries.outbox_depth(self.kernel.store)
                wheel = _wheel(self.kernel)
                self.history.append({
                    **self.rates,
                    "outbox": sum(self.outbox.values()) if self.outbox else 0,
                    "lateness_s": wheel.get("lateness_s") or 0.0,
                })
        finally:
            sub.close()


def _stats(kernel: Kernel) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, fn in sorted(kernel.stats.items()):
        try:
            out[name] = to_jsonable(fn())
        except Exception as exc:  # one broken statistics() must not break status
            out[name] = {"error": str(exc)}
    return out


def _wheel(kernel: Kernel, stats: dict[str, object] | None = None) -> dict[str, object]:
    """Timer-wheel size and lateness from the flows area's statistics, whatever it calls them."""
    src = (stats if stats is not None else _stats(kernel)).get("wheel")
    out: dict[str, object] = {"size": None, "lateness_s": None}
    if not isinstance(src, dict):
        return out
    for key, value in src.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if "lateness" in key or "late" in key.split("_"):
            out["lateness_s"] = value if out["lateness_s"] is None else out["lateness_s"]
        elif key in ("size", "timers", "scheduled", "pending") and out["size"] is None:
            out["size"] = value
    return out


class ControlService:
    """The daemon side of the control socket (a daemon Service)."""

    name = "control"

    def __init__(self, kernel: Kernel, *, path: Path | None = None, mode: int | None = None,
                 group: str | None = None, stream_buffer: int = STREAM_BUFFER) -> None:
        self.kernel = kernel
        d = kernel.config.daemon
        self.path = path if path is not None else d.control_socket
        self.mode = mode if mode is not None else d.control_socket_mode
        self.group = group if group is not None else d.control_socket_group
        self.stream_buffer = stream_buffer
        self.sampler = _Sampler(kernel)
        self._started = kernel.clock.monotonic()
        self._health: tuple[float, object] | None = None  # (when, queries.health's answer)
        self._listener: SocketListener | None = None
        self._inode: int | None = None
        self._streams = Streams(kernel, stream_buffer)
        self._tg: TaskGroup | None = None
        self._connections = self._connections_total = 0
        self._requests = self._errors = 0
        kernel.stats[self.name] = self.statistics
        report_action.register(kernel)  # "report": segflowd.reports

    def statistics(self) -> ControlStatistics:
        streams = self._streams
        return ControlStatistics(str(self.path), self._connections, self._connections_total,
                                 self._requests, self._errors + streams.errors,
                                 len(streams.subs), streams.streamed, streams.missed)

    # -- Service ---------------------------------------------------------------------

    def register_routes(self, router: Router) -> None:
        """The control socket has no HTTP routes."""

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        sock = open_control_socket(self.path, self.mode, self.group)
        self._inode = os.stat(self.path).st_ino
        listener = self._listener = await SocketListener.from_socket(sock)
        log.info("control.listening", path=str(self.path), mode=oct(self.mode))
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self.sampler.run)
                task_status.started()
                await listener.serve(self._handle, task_group=tg)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            self._unlink()

    async def drain(self) -> None:
        """Stop accepting and end every connection: clients see EOF and reconnect later."""
        self._unlink()
        self._streams.close_all()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _unlink(self) -> None:
        # Only our own socket: a successor may already have replaced it.
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    # -- connections -----------------------------------------------------------------

    async def _handle(self, stream: SocketStream) -> None:
        self._connections += 1
        self._connections_total += 1
        reader = BufferedByteReceiveStream(stream)
        try:
            await stream.send(dumps({"hello": "segflowd", "protocol": PROTOCOL_VERSION,
                                     "version": __version__}))
            while True:
                try:
                    line = await reader.receive_until(b"\n", MAX_LINE)
                except anyio.DelimiterNotFound:
                    self._errors += 1
                    await stream.send(error_reply(
                        None, "bad_request",
                        f"request line longer than {MAX_LINE} bytes; closing the connection"))
                    return
                self._requests += 1
                if not line.strip():
                    self._errors += 1
                    await stream.send(error_reply(None, "bad_request", "empty request line"))
                    continue
                try:
                    req = decode_request(line)
                except BadRequest as exc:
                    self._errors += 1
                    await stream.send(error_reply(request_id(line), exc.code, str(exc)))
                    continue
                if req.op != "subscribe":
                    await stream.send(await self._serve(req))
                elif await self._streams.serve(req, stream, reader):
                    return  # the stream ended, and the connection with it
                # else: a refused subscribe got its error reply; the connection goes on
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                anyio.ClosedResourceError, ConnectionError):
            pass  # the client went away
        except Exception:
            log.exception("control.connection_failed")
        finally:
            self._connections -= 1
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve(self, req: Request) -> bytes:
        try:
            result = await self._dispatch(req)
        except BadRequest as exc:
            self._errors += 1
            return error_reply(req.id, exc.code, str(exc))
        except StoreUnavailable as exc:
            self._errors += 1
            return error_reply(req.id, "store_unavailable", str(exc))
        except Exception as exc:
            self._errors += 1
            log.exception("control.request_failed", op=req.op)
            return error_reply(req.id, "internal", f"{req.op} failed: {exc}")
        return ok_reply(req.id, result)

    async def _dispatch(self, req: Request) -> object:
        k = self.kernel
        if req.op == "hello":
            return {"protocol": PROTOCOL_VERSION, "version": __version__}
        if req.op == "status":
            return await self.status()
        if req.op == "campaigns":
            return await queries.campaigns(k.store, k.app)
        if req.op == "campaign":
            name = req.str_arg("name")
            found = await queries.campaign_detail(k.store, k.app, name)
            if found is None:
                raise BadRequest(f"no campaign named {name!r}", "not_found")
            return found
        if req.op == "segments":
            return await queries.segments(k.store, k.app)
        if req.op == "user":
            uid = req.str_arg("id")
            user = await queries.user_detail(k.store, uid)
            if user is None:
                raise BadRequest(f"no user with id {uid!r}", "not_found")
            return user
        if req.op == "messages":
            failures = req.args.get("failures", False)
            campaign = req.args.get("campaign")
            if not isinstance(failures, bool):
                raise BadRequest("messages: argument 'failures' must be true or false")
            if campaign is not None and not isinstance(campaign, str):
                raise BadRequest("messages: argument 'campaign' must be a string")
            return await queries.messages_page(k.store, limit=req.int_arg("limit", 100),
                                               failures=failures, campaign=campaign)
        if req.op == "actions":
            return sorted(k.actions)
        if req.op == "action":
            return await self._action(req)
        raise BadRequest(f"{req.op} cannot be used here", "bad_request")  # pragma: no cover

    async def _action(self, req: Request) -> object:
        name = req.str_arg("name")
        args = req.args.get("args", {})
        if not isinstance(args, dict):
            raise BadRequest("action: 'args' must be a JSON object")
        action = self.kernel.actions.get(name)
        if action is None:
            raise BadRequest(f"{name} is not available in this daemon", "not_available")
        log.info("control.action", action=name)
        try:
            result = await action(args)
        except StoreUnavailable:
            raise
        except (SegflowError, ValueError, KeyError, LookupError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise BadRequest(f"{name}: {msg}", "action_failed") from None
        self.kernel.bus.publish("control.action", action=name)
        return to_jsonable(result)

    async def _health_now(self) -> object:
        """The dashboard's health figures, computed at most every :data:`HEALTH_TTL`."""
        k, at = self.kernel, self.kernel.clock.monotonic()
        if self._health is None or at - self._health[0] >= HEALTH_TTL:
            self._health = (at, await queries.health(k.store, k.clock.now()))
        return self._health[1]

    async def status(self) -> dict[str, object]:
        """Uptime, version, store health, rates, outbox, wheel and every area's statistics."""
        k = self.kernel
        healthy = await k.store.ping(PING_TIMEOUT)
        stats = _stats(k)
        app = k.app
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "uptime_s": round(k.clock.monotonic() - self._started, 3),
            "now": k.clock.now(),
            "store": {**dataclasses.asdict(k.store.statistics()), "healthy": healthy,
                      "url": k.store.safe_url},
            "bus": dataclasses.asdict(k.bus.statistics()),
            "rates": dict(self.sampler.rates),
            "outbox": self.sampler.outbox,
            "wheel": _wheel(k, stats),
            "history": list(self.sampler.history),
            "health": await self._health_now() if healthy else None,
            "dashboard": dataclasses.asdict(k.config.dashboard),
            "app": {"segments": len(app.segments), "campaigns": len(app.campaigns),
                    "templates": len(app.templates), "transactions": len(app.transactions)},
            "actions": sorted(k.actions),
            "stats": stats,
        }
