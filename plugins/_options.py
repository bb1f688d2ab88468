"""Reading a ``[providers.NAME]`` table: typed options with clear errors."""

from __future__ import annotations

from collections.abc import Iterable

from segflowd.errors import ProviderError
from segflowd.providers import ProviderContext


class Options:
    """Typed access to a provider's options; unknown keys are an error."""

    def __init__(self, ctx: ProviderContext, plugin: str, known: Iterable[str]) -> None:
        self.ctx = ctx
        allowed = {"plugin", *known}
        unknown = set(ctx.options) - allowed
        if unknown:
            raise ProviderError(f"[providers.{ctx.name}]: unknown option(s) "
                                f"{', '.join(sorted(unknown))} ({plugin} takes: "
                                f"{', '.join(sorted(allowed - {'plugin'}))})")

    def text(self, key: str, default: str = "", *, required: bool = False) -> str:
        value = self.ctx.options.get(key, default)
        if not isinstance(value, str) or (required and not value):
            # The config file resolved key_env and key_file into key before us (segflowd
            # .configenv), so a missing secret is named with all three ways to give it.
            raise ProviderError(f"[providers.{self.ctx.name}].{key}: " + (
                f"required (give {key}, {key}_env or {key}_file)" if required and not value
                else "must be a string"))
        return value

    def integer(self, key: str, default: int) -> int:
        value = self.ctx.options.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            raise ProviderError(f"[providers.{self.ctx.name}].{key}: must be an integer") from None

    def boolean(self, key: str, default: bool) -> bool:
        """A TOML boolean only: a string such as ``"on"`` or ``"True "`` is an error, not a
        guess (a guess that reads a typo as false would turn a safety check off)."""
        value = self.ctx.options.get(key, default)
        if not isinstance(value, bool):
            raise ProviderError(f"[providers.{self.ctx.name}].{key}: must be true or false "
                                f"(a TOML boolean, unquoted), not {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.ctx.options.get(key, default)
        try:
            return float(str(value))
        except ValueError:
            raise ProviderError(f"[providers.{self.ctx.name}].{key}: must be a number") from None
