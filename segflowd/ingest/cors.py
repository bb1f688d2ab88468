"""CORS for the tracking routes, so a browser (analytics.js) can send events.

Only routes that write tracking data get it: the Segment routes and the Customer.io
Track routes that add people and events. A route that reads or deletes data never does,
so a page elsewhere can never read a user nor forget one through a visitor's browser.

On a tracking route every answer, errors included, carries ``Vary: Origin`` and, when the
request's ``Origin`` is allowed by ``[http] cors_origins``, ``Access-Control-Allow-Origin``
(the origin itself; ``*`` for a request without one when every origin is allowed). An
``OPTIONS`` preflight is answered 204 with the route's tracking methods, the headers of
:data:`ALLOW_HEADERS` and :data:`MAX_AGE`; from an origin not allowed, or for a method the
route does not allow from a browser, it is a 403 without ``Access-Control-Allow-Origin``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..http import Handler, HTTPError, Request, Response, Router, answer_error

__all__ = ["ALLOW_HEADERS", "MAX_AGE", "CorsPolicy"]

# Request headers a tracking client may send: what analytics.js, Segment's and
# Customer.io's SDKs use. Anything else in a preflight is not echoed back.
ALLOW_HEADERS = ("authorization", "content-type", "content-encoding", "x-retry-count",
                 "x-requested-with")
MAX_AGE = 86400  # seconds a browser may cache a preflight (browsers cap it lower)
ANY = "*"


class CorsPolicy:
    """The allowed origins, and the tracking routes registered through :meth:`add`."""

    def __init__(self, origins: Sequence[str]) -> None:
        self.any_origin = ANY in origins
        self.origins = frozenset(origins)
        self._methods: dict[str, list[str]] = {}  # template -> methods open to browsers
        self._allow_headers = ", ".join(ALLOW_HEADERS)

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def headers(self, request: Request) -> dict[str, str]:
        """The CORS headers of an answer to ``request`` on a tracking route."""
        origin = request.headers.get("origin")
        if origin is None:
            return {"Vary": "Origin", "Access-Control-Allow-Origin": ANY} if self.any_origin \
                else {"Vary": "Origin"}
        if self.allows(origin):
            return {"Vary": "Origin", "Access-Control-Allow-Origin": origin}
        return {"Vary": "Origin"}

    def add(self, router: Router, method: str, template: str, handler: Handler) -> None:
        """Register ``handler`` as a tracking route: its answers carry the CORS headers."""
        self._methods.setdefault(template, []).append(method)

        async def with_cors(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception as exc:  # answered as the router would, with the headers
                response = answer_error(exc, request.method, request.path)
            response.headers.update(self.headers(request))
            return response

        router.add(method, template, with_cors)

    def add_preflights(self, router: Router) -> None:
        """Register ``OPTIONS`` on every tracking route added so far."""
        for template, methods in self._methods.items():
            router.add("OPTIONS", template, self._preflight(sorted({*methods, "OPTIONS"})))
        self._methods.clear()

    def _preflight(self, methods: list[str]) -> Handler:
        allow = ", ".join(methods)

        async def preflight(request: Request) -> Response:
            headers = self.headers(request)
            origin = request.headers.get("origin")
            if origin is not None and not self.allows(origin):
                raise _refused(f"origin {origin[:200]!r} is not in [http] cors_origins",
                               headers)
            wanted = request.headers.get("access-control-request-method", "").strip()
            if wanted and wanted.upper() not in methods:
                raise _refused(f"{wanted[:20]} is not allowed from a browser here "
                               f"(allowed: {allow})", headers)
            return Response(204, content_type="text/plain", headers={
                **headers, "Allow": allow,
                "Access-Control-Allow-Methods": allow,
                "Access-Control-Allow-Headers": self._allow_headers,
                "Access-Control-Max-Age": str(MAX_AGE)})

        return preflight


def _refused(message: str, headers: dict[str, str]) -> HTTPError:
    return HTTPError(403, "cors_refused", message, headers)
