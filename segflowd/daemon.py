"""The daemon's lifecycle: ``startup → run → shutdown`` in one anyio task group.

Startup takes the store's daemon lock (:mod:`segflowd.lock`: one daemon per store),
connects to (and migrates) the store, retrying while it is unreachable, then binds the
HTTP listener and starts each service; READY=1 goes to systemd once all of that holds.
SIGTERM or SIGINT stops accepting, drains within ``[daemon] drain_timeout`` seconds,
releases the lock and returns normally (exit 0). A second signal skips the drain. A lock
lost to another daemon while running drains the same way, then raises StoreLocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import socket
import time
from collections.abc import Iterator
from typing import Protocol

import anyio
import structlog
import uvicorn
from anyio.abc import TaskStatus

from . import __version__
from .app import Segflow
from .bus import Bus
from .clock import Clock, SystemClock
from .config import Config
from .control.service import ControlService
from .delivery.outcallservice import OutcallService
from .delivery.service import DeliveryService
from .errors import ListenError, SegflowError
from .flows.goals import GoalService
from .flows.service import FlowService
from .hooks import ContextProvider, IngestSink, MembershipSink, OutboxWaker
from .http import Request, Response, Router, error_response, json_response
from .httpguard import HttpLimits, connection_cap, guarded_protocol
from .ingest.service import IngestService
from .kernel import Kernel
from .lock import DaemonLock
from .metrics import Metrics, Sample
from .retention.service import RetentionService
from .sdnotify import Notifier
from .segments.engine import SegmentService
from .segments.transactions import TransactionService
from .sources.audiences import AudienceService
from .sources.broadcasts import BroadcastService
from .sources.datasources import DataSources, PreloadContext
from .sources.pools import SourceService
from .store import Store
from .storebounds import REQUEST_BOUND

__all__ = ["Daemon", "DaemonStatistics", "Service", "build_services"]

log = structlog.get_logger("segflowd.daemon")

HEALTH_TIMEOUT = 2.0  # seconds the store may take to answer a health check
STORE_WAIT_SLACK = 10.0  # seconds added to each start-timeout extension while retrying


class Service(Protocol):
    """A part of the daemon that owns tasks: started in order, drained in reverse."""

    name: str

    def register_routes(self, router: Router) -> None:
        """Add this service's HTTP routes (called before the listener opens)."""
        ...

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Run until cancelled; call ``task_status.started()`` once ready."""
        ...

    async def drain(self) -> None:
        """Finish in-flight work; the daemon bounds how long this may take."""
        ...


def build_services(k: Kernel) -> list[Service]:
    """The daemon's services in start order (drained in reverse order).

    The sink lists are shared by reference: a service built early is told about sinks
    appended later, because nothing is delivered to them before the daemon runs.
    """
    services: list[Service] = []
    ingest_sinks: list[IngestSink] = []  # told after each ingest group commit
    membership_sinks: list[MembershipSink] = []  # told of segment entries and exits
    wakers: list[OutboxWaker] = []  # told that messages were queued
    # -- delivery (outbox workers, providers, tracking, unsubscribe, webhooks) --
    # context_providers is shared by reference: the sources block appends its preload.
    context_providers: list[ContextProvider] = []
    delivery = DeliveryService(k, context_providers=context_providers)
    services.append(delivery)
    wakers.append(delivery)
    ingest_sinks.append(delivery)  # a forget's messages: the provider's copies go
    # -- flows (campaign engine and timer wheel) --
    flows = FlowService(k, wakers=wakers, conditions=None)  # the sources block sets conditions
    services.append(flows)
    membership_sinks.append(flows)
    ingest_sinks.append(flows)
    # -- outbound webhooks (rt.webhook's calls; idle without any) --
    outcalls = OutcallService(k, on_final=flows.schedule)  # a final call wakes its flow
    services.append(outcalls)
    wakers.append(outcalls)
    # -- segments and transactions --
    segment_service = SegmentService(k, membership_sinks=membership_sinks)
    transaction_service = TransactionService(k, wakers=wakers)
    services += [segment_service, transaction_service]
    ingest_sinks += [segment_service, transaction_service]
    # Conversions of campaigns' goal events. Run without a goal too: it then only keeps
    # its cursor current, so a goal added later does not convert the time it had none.
    goals = GoalService(k, flows=flows)
    services.append(goals)
    ingest_sinks.append(goals)
    # -- ingest (HTTP APIs) --
    services.append(IngestService(k, sinks=ingest_sinks, wakers=wakers))
    # -- data sources, audiences and broadcasts --
    source_service = SourceService(k)
    data_sources = DataSources(source_service, k.app.data_sources, k.app.audiences)
    if k.config.sources:
        flows.conditions = source_service  # rt.condition(...) runs on the sources
    context_providers.append(PreloadContext(data_sources, k.store))  # template `profile`
    services += [source_service, AudienceService(k, data_sources, ingest_sinks=ingest_sinks),
                 BroadcastService(k, wakers=wakers, flows=flows)]
    # -- retention (prunes finished data in small batches; after the services whose
    # cursors and live rows its rules read) --
    services.append(RetentionService(k))
    # -- control socket --
    services.append(ControlService(k))
    return services


@dataclasses.dataclass(frozen=True)
class DaemonStatistics:
    version: str
    uptime_seconds: float
    ready: bool
    stopping: bool
    services: tuple[str, ...]


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Daemon:
    """One segflowd process: the store, the HTTP listener and the services."""

    def __init__(self, config: Config, app: Segflow, *, clock: Clock | None = None,
                 notifier: Notifier | None = None, services: list[Service] | None = None) -> None:
        self.config = config
        self.app = app
        self.clock: Clock = clock or SystemClock()
        self.notifier = notifier or Notifier()
        self.store = Store.open(config.store.url, pool_size=config.store.pool_size,
                                connect_timeout=config.store.connect_timeout,
                                timeout=config.store.timeout,
                                group_readable=config.store.group_readable)
        self.lock = DaemonLock.for_store(self.store,
                                         connect_timeout=config.store.connect_timeout)
        self.metrics = Metrics()
        self.bus = Bus()
        self.kernel = Kernel(config=config, app=app, store=self.store, clock=self.clock,
                             bus=self.bus, metrics=self.metrics)
        self.kernel.stats["daemon"] = self.statistics
        self.kernel.stats["store"] = self.store.statistics
        self.kernel.stats["lock"] = self.lock.statistics
        self.router = Router()
        self.services: list[Service] = (
            list(services) if services is not None else build_services(self.kernel))
        self._started = time.monotonic()
        self._ready = False
        self._stopping = False
        self._stop = anyio.Event()
        self._server: _EmbeddedServer | None = None
        self._http_done = anyio.Event()
        self._lock_lost: SegflowError | None = None
        self._register_core()

    # -- public ----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin a graceful shutdown (as SIGTERM does)."""
        self._stop.set()

    def statistics(self) -> DaemonStatistics:
        return DaemonStatistics(
            version=__version__, uptime_seconds=time.monotonic() - self._started,
            ready=self._ready, stopping=self._stopping,
            services=tuple(s.name for s in self.services),
        )

    async def run(self) -> None:
        """Start, serve until asked to stop, drain, return.

        A failure the user can act on (store schema too new, port busy, store refusing
        the credentials, another daemon holding the store's lock) is raised as that
        :class:`SegflowError` itself, not wrapped in an exception group; anything else
        propagates as the task group raised it.
        """
        force = anyio.Event()
        try:
            await self._run(force)
        except BaseExceptionGroup as group:
            matched, rest = group.split(SegflowError)
            if matched is None or rest is not None:
                raise
            first: BaseException = matched
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        finally:
            with anyio.CancelScope(shield=True):
                await self.lock.release()
                await self.store.close()
        log.info("daemon.stopped")
        if self._lock_lost is not None:
            raise self._lock_lost

    async def _run(self, force: anyio.Event) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals, force)
            tg.start_soon(self.notifier.watchdog_loop)
            startup = anyio.Event()
            tg.start_soon(self._startup_and_serve, startup)
            await self._stop.wait()
            self._stopping = True
            self.notifier.stopping()
            log.info("daemon.stopping", drain_timeout=self.config.daemon.drain_timeout)
            if startup.is_set():
                await self._drain(force)
            tg.cancel_scope.cancel()

    # -- lifecycle -------------------------------------------------------------------

    async def _startup_and_serve(self, started: anyio.Event) -> None:
        t0 = time.monotonic()
        self.notifier.status("connecting to the store")

        def on_retry(attempt: int, delay: float, reason: str) -> None:
            log.warning("store.unreachable", attempt=attempt, retry_in_s=round(delay, 1),
                        store=self.store.safe_url, error=reason)
            self.notifier.status(f"store unreachable, retrying in {delay:.0f}s: {reason}")
            # Waiting for the store is progress, not a hang: keep TimeoutStartSec from
            # failing the unit while the database comes up.
            self.notifier.extend_timeout(delay + self.config.store.connect_timeout
                                         + STORE_WAIT_SLACK)

        # The lock comes first: a second daemon must not migrate the schema under the
        # one that holds the store.
        await self.lock.acquire(retry_max=self.config.store.start_retry_max,
                                on_retry=on_retry)
        await self.store.wait_ready(retry_max=self.config.store.start_retry_max,
                                    on_retry=on_retry)
        for service in self.services:
            service.register_routes(self.router)
        sock = _bind(self.config.http.host, self.config.http.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_lock)
            for service in self.services:
                await tg.start(_run_service, service)
            await tg.start(self._serve_http, sock)
            self._ready = True
            started.set()
            listen = f"{self.config.http.host}:{sock.getsockname()[1]}"
            self.notifier.ready(f"ready on {listen}")
            self.bus.publish("daemon.ready", version=__version__, listen=listen)
            log.info("daemon.ready", version=__version__, listen=listen,
                     store=self.store.safe_url, startup_s=round(time.monotonic() - t0, 3),
                     segments=len(self.app.segments), campaigns=len(self.app.campaigns),
                     templates=len(self.app.templates),
                     transactions=len(self.app.transactions))

    async def _keep_lock(self) -> None:
        """Hold the store's lock; if it is lost for good, drain and stop (run() raises)."""
        try:
            await self.lock.watch()
        except SegflowError as exc:  # StoreLocked, or the lock cannot be taken again
            self._lock_lost = exc
            log.error("daemon.lock_lost_for_good", error=str(exc))
            self.request_stop()

    async def _serve_http(self, sock: socket.socket, *,
                          task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        h = self.config.http
        cap = connection_cap(h.max_connections)
        if cap < h.max_connections:
            log.warning("http.max_connections_lowered", configured=h.max_connections,
                        max_connections=cap, reason="under the open-files limit (ulimit -n)")
        limits = HttpLimits(header_timeout=h.header_timeout, body_timeout=h.body_timeout,
                            keepalive_timeout=h.keepalive_timeout, max_connections=cap,
                            max_header_bytes=h.max_header_bytes, max_headers=h.max_headers)
        config = uvicorn.Config(
            self.router, log_config=None, lifespan="off", access_log=False,
            http=guarded_protocol(limits), ws="none", server_header=False, date_header=True,
            timeout_graceful_shutdown=int(max(1, self.config.daemon.drain_timeout)),
        )
        server = _EmbeddedServer(config)
        self._server = server
        # Every request handler inherits this context: its reads of the store wait
        # [store] timeout at most (background services' reads are not bounded so).
        REQUEST_BOUND.set(self.config.store.timeout)
        done = self._http_done = anyio.Event()

        async def serve() -> None:
            try:
                await server.serve([sock])
            finally:
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            while not server.started:
                if server.should_exit:  # startup failed; uvicorn logged why
                    raise RuntimeError("the HTTP server failed to start")
                await anyio.sleep(0.005)
            task_status.started()

    async def _drain(self, force: anyio.Event) -> None:
        with anyio.move_on_after(self.config.daemon.drain_timeout) as scope:
            async with anyio.create_task_group() as tg:
                async def forced() -> None:
                    await force.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(forced)
                if self._server is not None:
                    self._server.should_exit = True  # stop accepting; finish requests
                    await self._http_done.wait()
                for service in reversed(self.services):
                    await service.drain()
                tg.cancel_scope.cancel()
        if scope.cancelled_caught or force.is_set():
            log.warning("daemon.drain_cut_short", drain_timeout=self.config.daemon.drain_timeout)

    async def _signals(self, force: anyio.Event) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._stop.is_set():
                    log.warning("daemon.signal_again", signal=name)
                    force.set()
                    if self._server is not None:
                        self._server.force_exit = True
                else:
                    log.info("daemon.signal", signal=name)
                    self._stop.set()

    # -- core routes -----------------------------------------------------------------

    def _register_core(self) -> None:
        self.router.add("GET", "/healthz", self._healthz)
        self.router.add("GET", "/metrics", self._metrics)
        m = self.metrics
        m.describe("segflow_up", "gauge", "1 while the daemon is ready")
        m.describe("segflow_uptime_seconds", "gauge", "seconds since the process started")
        m.describe("segflow_store_up", "gauge", "1 when the last store health check passed")
        m.describe("segflow_store_pool_checked_out", "gauge", "store connections in use")
        m.describe("segflow_app_definitions", "gauge", "definitions in the loaded app")
        m.describe("segflow_build_info", "gauge", "always 1; labels carry the version")
        m.collect(self._collect)

    def _collect(self) -> list[Sample]:
        st = self.store.statistics()
        app = self.app
        return [
            ("segflow_up", {}, 1.0 if self._ready and not self._stopping else 0.0),
            ("segflow_uptime_seconds", {}, time.monotonic() - self._started),
            ("segflow_store_up", {"dialect": st.dialect}, 1.0 if st.healthy else 0.0),
            ("segflow_store_pool_checked_out", {}, float(st.checked_out)),
            ("segflow_build_info", {"version": __version__}, 1.0),
            *[("segflow_app_definitions", {"kind": kind}, float(n)) for kind, n in (
                ("segment", len(app.segments)), ("campaign", len(app.campaigns)),
                ("template", len(app.templates)), ("transaction", len(app.transactions)))],
        ]

    async def _healthz(self, request: Request) -> Response:
        ok = await self.store.ping(HEALTH_TIMEOUT)
        body = {
            "status": "ok" if ok and not self._stopping else "unavailable",
            "store": "ok" if ok else "unreachable",
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "stopping": self._stopping,
        }
        healthy = ok and not self._stopping
        return json_response(body, 200 if healthy else 503,
                             None if healthy else {"Retry-After": "5"})

    async def _metrics(self, request: Request) -> Response:
        key = self.config.http.metrics_key
        if key:
            import hmac

            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), key.encode()):
                return error_response(401, "unauthorized", "metrics need the metrics key",
                                      {"WWW-Authenticate": "Bearer"})
        return Response(200, self.metrics.render().encode(),
                        "text/plain; version=0.0.4; charset=utf-8")


async def _run_service(service: Service, *, task_status: TaskStatus[None]) -> None:
    with structlog.contextvars.bound_contextvars(service=service.name):
        await service.run(task_status=task_status)


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listener ourselves so a busy port is one clear error, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
