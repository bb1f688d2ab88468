"""Where a config value comes from besides segflow.toml's own text.

Three ways, all applied by :func:`segflowd.config.load_config`:

* ``SEGFLOW_<SECTION>_<KEY>`` (``SEGFLOW_PROVIDERS_<NAME>_<KEY>``, ...) overrides a key;
  ``..._<KEY>_ENV`` and ``..._<KEY>_FILE`` override it with an indirection. An override
  replaces every spelling of the key in the file.
* ``k_env = "VAR"``: the value of ``k`` is the environment variable ``VAR``.
* ``k_file = "PATH"``: the value of ``k`` is the file's text less one trailing newline
  (what ``echo`` and most editors add). A relative ``PATH`` is relative to the config
  file. This is the form for systemd credentials (``LoadCredential=``, read from
  ``/run/credentials/<unit>/<NAME>``), Docker and Kubernetes secrets, Vault Agent files.

At most one of ``k``, ``k_env`` and ``k_file`` may be given. Errors name the key and the
variable or path, never a value read from it.

A key that takes a list of strings (``[email] secret_previous``) takes a TOML array in the
file; from the environment or a file its value is one string per line, blank lines left
out (:func:`string_list`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path

from .errors import ConfigError

__all__ = ["ENV_PREFIX", "MAX_SECRET_FILE", "named_overrides", "read_secret_file",
           "resolve_indirections", "section_overrides", "string_list"]

ENV_PREFIX = "SEGFLOW_"
MAX_SECRET_FILE = 64 * 1024  # bytes: a secret file longer than this is a wrong path
SUFFIXES = ("_env", "_file")

ErrorFactory = Callable[[str, str], ConfigError]
Origins = MutableMapping[str, str]  # dotted key -> the environment variable that set it


def _spellings(key: str) -> tuple[str, ...]:
    return (key, *(key + s for s in SUFFIXES))


def _base(key: str) -> str:
    for suffix in SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key


def section_overrides(env: Mapping[str, str], section: str, cls: type,
                      table: dict[str, object], origins: Origins) -> dict[str, object]:
    """Apply ``SEGFLOW_<SECTION>_<KEY>[_ENV|_FILE]`` to ``table`` (a ``[section]``)."""
    for f in dataclasses.fields(cls):
        key = f.name.rstrip("_")
        for candidate in _spellings(key):
            var = f"{ENV_PREFIX}{section}_{candidate}".upper()
            if var in env:
                for spelling in _spellings(key):
                    table.pop(spelling, None)
                table[candidate] = env[var]
                origins[f"{section}.{key}"] = origins[f"{section}.{candidate}"] = var
    return table


def named_overrides(env: Mapping[str, str], group: str, name: str, table: dict[str, object],
                    origins: Origins) -> dict[str, object]:
    """Apply ``SEGFLOW_<GROUP>_<NAME>_<KEY>`` to a ``[group.name]`` table."""
    prefix = f"{ENV_PREFIX}{group}_{name}_".upper().replace("-", "_")
    for var, value in env.items():
        if var.startswith(prefix) and len(var) > len(prefix):
            key = var[len(prefix):].lower()
            base = _base(key)
            for spelling in _spellings(base):
                table.pop(spelling, None)
            table[key] = value
            origins[f"{group}.{name}.{base}"] = origins[f"{group}.{name}.{key}"] = var
    return table


def resolve_indirections(table: Mapping[str, object], where: str, env: Mapping[str, str],
                         base_dir: Path, error: ErrorFactory) -> dict[str, object]:
    """Replace every ``k_env = "VAR"`` by ``k = $VAR`` and ``k_file = "P"`` by its text."""
    out: dict[str, object] = {}
    for key, value in table.items():
        base = _base(key)
        if base == key:
            out[key] = value
            continue
        given = [k for k in _spellings(base) if k in table]
        if len(given) > 1:
            listed = (f"either {given[0]} or {given[1]}, not both" if len(given) == 2
                      else f"only one of {', '.join(given)}")
            raise error(f"{where}.{given[1]}", f"give {listed}")
        if key.endswith("_env"):
            if not isinstance(value, str) or not value:
                raise error(f"{where}.{key}", "must name an environment variable")
            if value not in env:
                raise error(f"{where}.{key}", f"environment variable {value} is not set")
            out[base] = env[value]
        else:
            out[base] = read_secret_file(value, f"{where}.{key}", base_dir, error)
    return out


def read_secret_file(value: object, key: str, base_dir: Path, error: ErrorFactory) -> str:
    """The text of the file ``value`` names, less one trailing newline."""
    if not isinstance(value, str) or not value:
        raise error(key, "must name a file (an absolute path, or one relative to the "
                         "config file)")
    path = Path(value) if Path(value).is_absolute() else base_dir / value
    try:
        with path.open("rb") as fh:  # not read_bytes(): a FIFO or device must not hang us
            data = fh.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise error(key, f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_SECRET_FILE:
        raise error(key, f"{path} is longer than {MAX_SECRET_FILE} bytes: not a secret file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(key, f"{path} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def string_list(value: object, key: str, error: ErrorFactory) -> tuple[str, ...]:
    """A TOML array of non-empty strings; or a string (what ``SEGFLOW_*``, ``k_env`` and
    ``k_file`` give) holding one per line, blank lines left out."""
    if isinstance(value, str):
        return tuple(line for line in value.splitlines() if line)
    if not isinstance(value, list):
        raise error(key, "must be an array of strings (from the environment or a file: "
                         "one per line)")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise error(f"{key}[{i}]", "must be a non-empty string")
    return tuple(value)
