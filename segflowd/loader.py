"""Load the user's app from ``[daemon] app``: ``path/to/file.py[:attr]`` or ``pkg.module:attr``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path

from .app import Segflow
from .errors import AppError

__all__ = ["load_app"]

DEFAULT_ATTR = "app"


def _split(spec: str) -> tuple[str, str]:
    target, sep, attr = spec.rpartition(":")
    if not sep or "/" in attr or "\\" in attr:
        return spec, DEFAULT_ATTR
    return target, attr or DEFAULT_ATTR


def _describe(exc: BaseException, origin: str) -> str:
    """One line: the exception and the deepest frame inside the user's code."""
    if isinstance(exc, SyntaxError):
        return f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}"
    if isinstance(exc, AppError):
        return str(exc)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else origin
    return f"{where}: {type(exc).__name__}: {exc}"


def load_app(spec: str, base_dir: Path | None = None, *, validate: bool = True) -> Segflow:
    """Import the app, check it is a :class:`Segflow`, and validate it; AppError otherwise.

    With ``validate=False`` the cross-reference checks are left to the caller
    (``segflowd check`` lists them all instead of stopping at the first).
    """
    target, attr = _split(spec.strip())
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if is_file:
        path = Path(target)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise AppError(f"app file {path} not found (from [daemon] app = {spec!r})")
        module_name = f"segflow_app_{abs(hash(str(path.resolve())))}"
        loc = importlib.util.spec_from_file_location(module_name, path)
        if loc is None or loc.loader is None:  # pragma: no cover - .py files always load
            raise AppError(f"cannot import {path}")
        module = importlib.util.module_from_spec(loc)
        # The app's folder goes on sys.path so it can import its own helper modules.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        sys.modules[module_name] = module
        try:
            loc.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(module_name, None)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise AppError(f"loading the app failed: {_describe(exc, str(path))}") from None
        origin = str(path)
    else:
        if base_dir is not None and str(base_dir) not in sys.path:
            sys.path.insert(0, str(base_dir))
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise AppError(f"app module {target!r} not found (from [daemon] app = "
                               f"{spec!r})") from None
            raise AppError(f"loading the app failed: {_describe(exc, target)}") from None
        except Exception as exc:
            raise AppError(f"loading the app failed: {_describe(exc, target)}") from None
        origin = target
    app = getattr(module, attr, None)
    if app is None:
        raise AppError(f"{origin} has no attribute {attr!r} (from [daemon] app = {spec!r})")
    if not isinstance(app, Segflow):
        raise AppError(f"{origin}:{attr} is a {type(app).__name__}, not a segflowd.Segflow")
    if validate:
        app.validate()
    return app
