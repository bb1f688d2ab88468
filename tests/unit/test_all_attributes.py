"""The public API: ``segflowd.__all__`` is complete, and every module's ``__all__`` imports."""

from __future__ import annotations
import __future__

import importlib
import pkgutil
import types

import pytest

import segflowd


def test_every_name_in_all_is_importable() -> None:
    for name in segflowd.__all__:
        assert hasattr(segflowd, name), name
    namespace: dict[str, object] = {}
    exec("from segflowd import *", namespace)
    assert set(segflowd.__all__) <= set(namespace)


def test_all_lists_every_public_attribute_of_the_package() -> None:
    public = {
        name for name, value in vars(segflowd).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
        and not isinstance(value, __future__._Feature)  # from __future__ import annotations
    }
    assert public <= set(segflowd.__all__), public - set(segflowd.__all__)


def test_the_dsl_names_of_the_design_are_exported() -> None:
    assert {"Segflow", "ago", "SegflowError", "ConfigError", "AppError"} <= set(
        segflowd.__all__)


@pytest.mark.parametrize("module", sorted(
    m.name for m in pkgutil.walk_packages(segflowd.__path__, "segflowd.")
    if not m.name.endswith(".__main__")  # running one is running the command
))
def test_each_modules_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", ()):
        assert hasattr(mod, name), f"{module}.__all__ names missing {name!r}"
