"""A client for segflowd's native API (and its Segment-compatible batch route).

    async with SegflowClient("http://127.0.0.1:8787", api_key="...") as sf:
        await sf.create_user("u1", {"email": "ann@example.com", "name": "Ann"})
        await sf.emit("u1", "purchase", {"amount": 42}, id="order-17")
        await sf.send("receipt", user_id="u1", data={"amount": 42})

``SyncSegflowClient`` offers the same methods for code without an event loop. A call
returns only once segflowd has committed the data; an error answer raises
:class:`SegflowAPIError` with the server's code and message.

A timestamp is a :class:`datetime.datetime` (a naive one is UTC) or an ISO-8601 string
(``"2026-03-01T09:00:00Z"``, ``"2026-03-01T10:00:00+01:00"``; without an offset, UTC);
anything else raises :class:`TypeError`, a string that is no ISO-8601 time
:class:`ValueError`, before any request is made.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from .errors import SegflowError

__all__ = ["BatchItem", "SegflowAPIError", "SegflowClient", "SyncSegflowClient", "Timestamp"]

Timestamp = dt.datetime | str  # a datetime (naive: UTC) or an ISO-8601 string

DEFAULT_TIMEOUT = 10.0  # seconds per request


class SegflowAPIError(SegflowError):
    """segflowd answered an error: ``status``, ``code`` and ``message`` from its body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"segflowd answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One entry of :meth:`SegflowClient.batch`: an event (``name`` set) or user update."""

    user_id: str
    name: str | None = None  # None: merge ``attributes`` into the user
    attributes: Mapping[str, object] = dataclasses.field(default_factory=dict)
    timestamp: Timestamp | None = None
    id: str | None = None  # dedupes the event

    def __post_init__(self) -> None:
        if self.timestamp is not None:
            _iso(self.timestamp)  # a bad timestamp fails here, not in batch()

    def as_segment(self) -> dict[str, object]:
        msg: dict[str, object] = {"userId": self.user_id,
                                  "messageId": self.id or str(uuid.uuid4())}
        if self.timestamp is not None:
            msg["timestamp"] = _iso(self.timestamp)
        if self.name is None:
            msg.update(type="identify", traits=dict(self.attributes))
        else:
            msg.update(type="track", event=self.name, properties=dict(self.attributes))
        return msg


class _Requests:
    """What both clients send: method, path, headers and JSON body per call."""

    def __init__(self, api_key: str) -> None:
        self.bearer = {"Authorization": f"Bearer {api_key}"}
        basic = base64.b64encode(f"{api_key}:".encode()).decode()
        self.basic = {"Authorization": f"Basic {basic}"}

    def user(self, user_id: str) -> str:
        return f"/v1/users/{quote(user_id, safe='')}"

    def send(self, template: str, user_id: str | None, to: str | None,
             data: Mapping[str, object] | None, idempotency_key: str | None
             ) -> tuple[str, dict[str, str], dict[str, object]]:
        """Path, headers and body of ``POST /v1/send/{template}``."""
        if user_id is None and to is None:
            raise ValueError("send() needs user_id or to")
        body: dict[str, object] = {"data": dict(data or {})}
        if user_id is not None:
            body["user_id"] = user_id
        if to is not None:
            body["to"] = to
        headers = dict(self.bearer)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return f"/v1/send/{quote(template, safe='')}", headers, body

    def event(self, name: str, attributes: Mapping[str, object] | None,
              timestamp: Timestamp | None, id: str | None) -> dict[str, object]:
        body: dict[str, object] = {"name": name, "attributes": dict(attributes or {})}
        if timestamp is not None:
            body["timestamp"] = _iso(timestamp)
        if id is not None:
            body["id"] = id
        return body


def _iso(value: object) -> str:
    """``value`` (a :data:`Timestamp`) as the ISO-8601 text the API takes."""
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"timestamp {value!r} is not an ISO-8601 date and time "
                             "(like 2026-03-01T09:00:00Z)") from None
        return _iso(parsed)
    if not isinstance(value, dt.datetime):
        raise TypeError(f"timestamp must be a datetime or an ISO-8601 string, "
                        f"not {type(value).__name__}")
    if value.tzinfo is None:
        return value.isoformat() + "Z"
    return value.isoformat()


def _check(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json() if response.content else None
    code, message = "http_error", response.text[:300]
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        pass
    raise SegflowAPIError(response.status_code, code, message)


class SegflowClient:
    """Async client over httpx. Use as ``async with``, or call :meth:`aclose`."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._r = _Requests(api_key)
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout,
                                       transport=transport)

    async def __aenter__(self) -> SegflowClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create_user(self, user_id: str, attributes: Mapping[str, object] | None = None
                          ) -> None:
        """Create the user (or merge into an existing one)."""
        await self.update_user(user_id, attributes or {})

    async def update_user(self, user_id: str, attributes: Mapping[str, object]) -> None:
        """Merge ``attributes`` into the user's; a ``None`` value removes the key."""
        _check(await self._http.put(self._r.user(user_id), headers=self._r.bearer,
                                    json={"attributes": dict(attributes)}))

    async def get_user(self, user_id: str) -> dict[str, Any]:
        """The user with their segments and campaigns; SegflowAPIError 404 if unknown."""
        out: dict[str, Any] = _check(await self._http.get(self._r.user(user_id),
                                                          headers=self._r.bearer))
        return out

    async def delete_user(self, user_id: str) -> bool:
        """Forget the user and their data; True if they existed."""
        out = _check(await self._http.delete(self._r.user(user_id), headers=self._r.bearer))
        return bool(out["deleted"])

    async def emit(self, user_id: str, name: str, attributes: Mapping[str, object] | None = None,
                   *, timestamp: Timestamp | None = None, id: str | None = None) -> int | None:
        """Store an event; returns its id (the first one's, for a repeated ``id``)."""
        out = _check(await self._http.post(
            self._r.user(user_id) + "/events", headers=self._r.bearer,
            json=self._r.event(name, attributes, timestamp, id)))
        return None if out["id"] is None else int(out["id"])

    async def batch(self, items: Sequence[BatchItem]) -> None:
        """Many user updates and events in one request, committed together."""
        _check(await self._http.post("/v1/batch", headers=self._r.basic,
                                     json={"batch": [i.as_segment() for i in items]}))

    async def send(self, template: str, *, user_id: str | None = None, to: str | None = None,
                   data: Mapping[str, object] | None = None,
                   idempotency_key: str | None = None) -> int:
        """Queue a transactional email of ``template`` (or of a transaction) to the user
        and/or the address ``to``, with ``data`` as its template context; returns the
        message id. The key needs scope ``app`` or ``all``. A repeated ``idempotency_key``
        queues nothing and returns the first message's id."""
        path, headers, body = self._r.send(template, user_id, to, data, idempotency_key)
        return int(_check(await self._http.post(path, headers=headers, json=body))["message"])


class SyncSegflowClient:
    """The same calls without an event loop (httpx's blocking client)."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._r = _Requests(api_key)
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> SyncSegflowClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def create_user(self, user_id: str, attributes: Mapping[str, object] | None = None) -> None:
        self.update_user(user_id, attributes or {})

    def update_user(self, user_id: str, attributes: Mapping[str, object]) -> None:
        _check(self._http.put(self._r.user(user_id), headers=self._r.bearer,
                              json={"attributes": dict(attributes)}))

    def get_user(self, user_id: str) -> dict[str, Any]:
        out: dict[str, Any] = _check(self._http.get(self._r.user(user_id),
                                                    headers=self._r.bearer))
        return out

    def delete_user(self, user_id: str) -> bool:
        return bool(_check(self._http.delete(self._r.user(user_id),
                                             headers=self._r.bearer))["deleted"])

    def emit(self, user_id: str, name: str, attributes: Mapping[str, object] | None = None,
             *, timestamp: Timestamp | None = None, id: str | None = None) -> int | None:
        out = _check(self._http.post(self._r.user(user_id) + "/events", headers=self._r.bearer,
                                     json=self._r.event(name, attributes, timestamp, id)))
        return None if out["id"] is None else int(out["id"])

    def batch(self, items: Sequence[BatchItem]) -> None:
        _check(self._http.post("/v1/batch", headers=self._r.basic,
                               json={"batch": [i.as_segment() for i in items]}))

    def send(self, template: str, *, user_id: str | None = None, to: str | None = None,
             data: Mapping[str, object] | None = None,
             idempotency_key: str | None = None) -> int:
        path, headers, body = self._r.send(template, user_id, to, data, idempotency_key)
        return int(_check(self._http.post(path, headers=headers, json=body))["message"])
