"""Segflow: self-hosted, code-first marketing automation.

The public API a team writes its app with::

    from segflowd import Segflow, ago
    from segflowd.schema import users, events
"""

from __future__ import annotations

from .app import Segflow, ago
from .errors import (
    AppError,
    ConfigError,
    FlowError,
    ProviderError,
    SchemaTooNew,
    SegflowError,
    StoreError,
    StoreUnavailable,
    TemplateError,
    WebhookFailed,
)

__version__ = "0.1.0"

__all__ = [
    "AppError",
    "ConfigError",
    "FlowError",
    "ProviderError",
    "SchemaTooNew",
    "Segflow",
    "SegflowError",
    "StoreError",
    "StoreUnavailable",
    "TemplateError",
    "WebhookFailed",
    "__version__",
    "ago",
]
