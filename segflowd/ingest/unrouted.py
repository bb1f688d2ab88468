"""Requests no route answers (404, 405), counted by the API they were aimed at.

A client configured with the wrong host path, or an SDK calling a route this daemon
lacks, shows up in ``/metrics`` as ``segflow_http_unrouted_total{api, status}``, the API
told by the path's prefix (:func:`api_of`): ``native`` (``/v1/users``), ``app``
(``/v1/send``), ``segment`` (any other ``/v1/...``), ``customerio`` (``/api/...``), and
``other``.
"""

from __future__ import annotations

from collections.abc import Callable

from ..metrics import Metrics

__all__ = ["METRIC", "api_of", "counter"]

METRIC = "segflow_http_unrouted_total"


def api_of(path: str) -> str:
    """The API a request path was aimed at (one of five labels, never the path itself)."""
    if path == "/v1/users" or path.startswith("/v1/users/"):
        return "native"
    if path == "/v1/send" or path.startswith("/v1/send/"):
        return "app"
    if path.startswith("/v1/"):
        return "segment"
    if path.startswith("/api/"):
        return "customerio"
    return "other"


def counter(metrics: Metrics) -> Callable[[str, int], None]:
    """The :attr:`~segflowd.http.Router.on_unrouted` hook counting into ``metrics``."""
    metrics.describe(METRIC, "counter",
                     "requests no route answers (404/405), by the API aimed at and status")

    def count(path: str, status: int) -> None:
        metrics.inc(METRIC, api=api_of(path), status=str(status))

    return count
