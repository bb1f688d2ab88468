"""The ``segflowd`` command: ``run`` (the default), ``check``, ``migrate``, ``version``.

Exit status: 0 success; 1 a runtime failure or problems found by ``check``; 2 a bad
configuration or app, or another segflowd already running on the store (a person has to
act; systemd should not restart-loop).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

import anyio
import structlog

from .. import __version__
from ..app import Segflow
from ..config import Config, load_config
from ..errors import AppError, ConfigError, SegflowError, StoreError, StoreLocked
from ..loader import load_app
from ..logs import configure_logging
from .check import run_check

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# More subcommands, each in its own module exposing ``add_parser(sub, common)`` (which
# adds one or more subparsers and sets ``handler=run`` on them) and ``run(args) -> int``.
COMMAND_MODULES: tuple[str, ...] = (
    "segflowd.cli.control",  # status and the admin actions over the control socket
    "segflowd.cli.preview",  # render a template for a user into .html and .eml files
    "segflowd.cli.sources",  # discover: run a data source's queries on its database
    "segflowd.cli.simulate",  # a scripted scenario under a virtual clock, as a table
    "segflowd.cli.suppressions",  # list, remove or export the suppression list (the store)
    "segflowd.cli.requeue",  # queue failed or unknown messages again, in bulk (the store)
    "segflowd.cli.users",  # users show: one user's journey (over the control socket)
    "segflowd.cli.report",  # campaign counts and rates (the store)
)


class _CommandModule(Protocol):
    def add_parser(self, sub: argparse._SubParsersAction[argparse.ArgumentParser],
                   common: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segflowd", description="Segflow daemon")
    p.add_argument("--version", action="version", version=f"segflowd {__version__}")
    config_help = "segflow.toml (default: $SEGFLOW_CONFIG or ./segflow.toml)"
    # Accepted before the command too (``segflowd --config X`` runs the daemon). SUPPRESS
    # keeps a subcommand that was not given --config from resetting the top-level value.
    p.add_argument("--config", "-c", metavar="PATH", default=argparse.SUPPRESS,
                   help=config_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="PATH", default=argparse.SUPPRESS,
                        help=config_help)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon (the default)")
    check = sub.add_parser(
        "check", parents=[common],
        help="validate config and app against the store; exit non-zero on problems")
    check.add_argument("--strict", action="store_true",
                       help="an unreachable data source is a problem, not a warning")
    check.add_argument("--fail-on-divergence", action="store_true",
                       help="exit 1 when an in-flight instance would diverge under this code")
    sub.add_parser("migrate", parents=[common], help="migrate the store's schema and exit")
    sub.add_parser("version", help="print the version")
    for name in COMMAND_MODULES:
        cast(_CommandModule, importlib.import_module(name)).add_parser(sub, common)
    p.set_defaults(command="run", config=None, handler=None)
    return p


def _fail(message: str, code: int) -> int:
    print(f"segflowd: {message}", file=sys.stderr)
    return code


def _run_async(fn: object) -> None:
    try:
        import uvloop  # noqa: F401  (only to know it is there)

        options = {"use_uvloop": True}
    except ImportError:  # pragma: no cover - uvloop is a dependency on CPython/POSIX
        options = {}
    try:
        anyio.run(fn, backend="asyncio", backend_options=options)  # type: ignore[arg-type]  # fn is an async callable
    except BaseExceptionGroup as group:
        # A SegflowError raised inside a task group arrives wrapped; it is still a clear
        # message for the user, not a traceback. Anything else stays a crash.
        first = _first_segflow_error(group)
        if first is None:
            raise
        raise first from None


def _first_segflow_error(group: BaseExceptionGroup[BaseException]) -> SegflowError | None:
    for exc in group.exceptions:
        if isinstance(exc, SegflowError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_segflow_error(exc)
            if found is not None:
                return found
    return None


def _load(config_path: str | None) -> tuple[Config, Segflow]:
    config = load_config(config_path)
    configure_logging(config.daemon.log_format, config.daemon.log_level)
    app = load_app(config.daemon.app, config.base_dir)
    return config, app


def cmd_run(config_path: str | None) -> int:
    from ..daemon import Daemon

    try:
        config, app = _load(config_path)
    except (ConfigError, AppError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    daemon = Daemon(config, app)

    async def main() -> None:
        await daemon.run()

    try:
        _run_async(main)
    except SegflowError as exc:
        structlog.get_logger("segflowd").error("daemon.failed", error=str(exc))
        return _fail(str(exc), EXIT_USAGE if isinstance(exc, StoreLocked) else EXIT_FAILURE)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled by the daemon
        return EXIT_OK
    return EXIT_OK


def cmd_migrate(config_path: str | None) -> int:
    from ..store import Store

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    configure_logging(config.daemon.log_format, config.daemon.log_level)

    async def main() -> None:
        store = Store.open(config.store.url, connect_timeout=config.store.connect_timeout,
                           group_readable=config.store.group_readable)
        try:
            before = await store.migrate()
            print(f"store {store.safe_url}: schema version {before} -> {store.schema_version}")
        except SegflowError:
            raise
        except Exception as exc:  # the driver's own error: unreachable, access denied, ...
            reason = str(getattr(exc, "orig", None) or exc).split("\n", 1)[0]
            raise StoreError(f"store {store.safe_url}: {reason}") from None
        finally:
            await store.close()

    try:
        _run_async(main)
    except SegflowError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    return EXIT_OK


def cmd_check(config_path: str | None, *, strict: bool = False,
              fail_on_divergence: bool = False) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    # Only errors: what check finds (a data source query that failed, say) it prints as a
    # problem or warning line of its own, without the log line beside it.
    configure_logging(config.daemon.log_format, "error")
    try:
        app = load_app(config.daemon.app, config.base_dir, validate=False)
    except AppError as exc:
        print(f"problem: {exc}")
        print("check: 1 problem")
        return EXIT_FAILURE
    report: list[str] = []

    async def main() -> None:
        report.extend(await run_check(config, app, out=print, strict=strict,
                                      fail_on_divergence=fail_on_divergence))

    _run_async(main)
    for problem in report:
        print(f"problem: {problem}")
    if report:
        print(f"check: {len(report)} problem{'s' if len(report) != 1 else ''}")
        return EXIT_FAILURE
    print("check: ok")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.handler is not None:
        return int(args.handler(args))
    if args.command == "version":
        print(f"segflowd {__version__}")
        return EXIT_OK
    if args.command == "check":
        return cmd_check(args.config, strict=args.strict,
                         fail_on_divergence=args.fail_on_divergence)
    if args.command == "migrate":
        return cmd_migrate(args.config)
    return cmd_run(args.config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
