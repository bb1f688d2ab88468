"""API keys from ``[[http.keys]]``, the three ways clients present them, and key scopes.

* native: ``Authorization: Bearer <secret>``
* Segment: Basic with the secret as user name and an empty password, or ``writeKey``
  in the body
* Customer.io: Basic with the key's name as site id and its secret as API key

Every comparison is constant-time and every configured key is compared (no early
exit), so timing tells nothing about which keys exist. Secrets never reach a log.

**Scopes.** Each key has a ``scope`` (``[[http.keys]] scope = ...``, default ``"all"``)
and each route states the kind of access it needs with ``need=``:

* ``need="track"``: a tracking write (Segment routes, Customer.io Track API writes);
  keys of scope ``track`` or ``all`` pass. A browser's write key is public: give it
  scope ``track``.
* ``need="app"``: the App API's send routes (``/v1/send/...``); scope ``app`` or ``all``.
* ``need="all"``: everything else, i.e. reads, deletes, forgets and the native
  ``/v1/users/...`` routes; scope ``all`` only.

So a key passes when its scope is ``all`` or equals ``need``. A valid key whose scope does
not fit is a 403 with a JSON error naming the key and the scope needed; no key or a
wrong one stays a 401. A route calls the method of its protocol with its need::

    self.auth.native(request)                          # need="all" (default)
    self.auth.native(request, need="app")              # POST /v1/send/{template}
    self.auth.segment(request, write_key)              # need="track" (default)
    self.auth.customerio(request)                      # need="track" (default)
    self.auth.customerio(request, need="all")          # DELETE /api/v1/customers/{id}

Each returns the key's name.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from typing import Literal

from ..config import HttpKey
from ..http import HTTPError, Request

__all__ = ["Authenticator", "Need"]

Need = Literal["all", "track", "app"]  # what a route needs of a key's scope


def _unauthorized(message: str, scheme: str) -> HTTPError:
    return HTTPError(401, "unauthorized", message, {"WWW-Authenticate": scheme})


def _forbidden(name: str, scope: str, need: Need) -> HTTPError:
    allowed = "'all'" if need == "all" else f"'{need}' or 'all'"
    return HTTPError(403, "forbidden", (
        f"the key {name!r} has scope {scope!r}: this route needs a key of scope {allowed}"))


class Authenticator:
    """Checks a request's credentials and the key's scope; each method returns the
    matching key's name (401 without a valid key, 403 when its scope does not fit)."""

    def __init__(self, keys: Sequence[HttpKey]) -> None:
        self._keys = tuple((k.name.encode(), k.secret.encode()) for k in keys)
        self._scopes = {k.name: k.scope for k in keys}

    def _allowed(self, name: str, need: Need) -> str:
        scope = self._scopes.get(name, "all")
        if scope != "all" and scope != need:
            raise _forbidden(name, scope, need)
        return name

    def _by_secret(self, secret: str) -> str | None:
        given = secret.encode()
        found: str | None = None
        for name, key in self._keys:
            if hmac.compare_digest(given, key) and found is None:
                found = name.decode()
        return found

    def native(self, request: Request, need: Need = "all") -> str:
        """The key behind ``Authorization: Bearer <secret>``; 401 otherwise."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("send the API key as 'Authorization: Bearer <secret>'",
                                'Bearer realm="segflow"')
        name = self._by_secret(value.strip())
        if name is None:
            raise _unauthorized("the API key is not valid", 'Bearer realm="segflow"')
        return self._allowed(name, need)

    def segment(self, request: Request, write_key: object, need: Need = "track") -> str:
        """Segment: Basic ``secret:`` (any password ignored), else the body's ``writeKey``."""
        basic = _basic(request)
        secret: str | None = None
        if basic is not None:
            secret = basic[0]
        elif isinstance(write_key, str) and write_key:
            secret = write_key
        if secret is None:
            raise _unauthorized("send the write key by Basic auth (key as user name) or as "
                                "'writeKey' in the body", 'Basic realm="segflow"')
        name = self._by_secret(secret)
        if name is None:
            raise _unauthorized("the write key is not valid", 'Basic realm="segflow"')
        return self._allowed(name, need)

    def customerio(self, request: Request, need: Need = "track") -> str:
        """Customer.io: Basic with site id = key name and API key = secret."""
        basic = _basic(request)
        if basic is None:
            raise _unauthorized("send Basic auth: site id (key name) and API key (secret)",
                                'Basic realm="segflow"')
        site, secret = (s.encode() for s in basic)
        found: str | None = None
        for name, key in self._keys:
            ok = hmac.compare_digest(site, name) & hmac.compare_digest(secret, key)
            if ok and found is None:
                found = name.decode()
        if found is None:
            raise _unauthorized("the site id and API key do not match a configured key",
                                'Basic realm="segflow"')
        return self._allowed(found, need)


def _basic(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthorized("the Basic credentials are not valid base64",
                            'Basic realm="segflow"') from None
    user, _, password = decoded.partition(":")
    return user, password
