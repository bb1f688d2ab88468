"""``GET`` and ``PUT /v1/users/{id}/subscriptions``: a user's topics, over the native API.

The reply is ``{"user_id", "all", "topics"}``: ``all`` false when the user unsubscribed
from all marketing mail, ``topics`` every app topic with true when subscribed (the
states the preference page shows, :mod:`segflowd.delivery.preferences`). A ``PUT`` takes
``{"all": bool, "topics": {name: bool}}`` (either may be left out) and answers the new
state; an unknown topic or a value that is not a boolean is a 400 with nothing written,
an unknown user a 404.
"""

from __future__ import annotations

from ..appcraft import MARKETING_TOPIC
from ..delivery.preferences import publish_changes, read_preferences, set_preferences
from ..http import HTTPError, Request, Response, json_response
from ..kernel import Kernel
from ..userlocks import existing_users
from .auth import Authenticator
from .payloads import field_error, only_fields, require_id, require_object

__all__ = ["SubscriptionsAPI"]

_FIELDS = frozenset({"all", "topics"})
MAX_BODY = 65_536  # bytes of a PUT's body, at most


class SubscriptionsAPI:
    """The two routes' handlers; ingest registers them with its auth and counting."""

    def __init__(self, k: Kernel, auth: Authenticator) -> None:
        self.k = k
        self.auth = auth

    async def get(self, request: Request) -> Response:
        self.auth.native(request)
        uid = require_id(request.params["id"], "id")
        async with self.k.store.connect() as conn:
            if not await existing_users(conn, [uid], lock=False):
                raise HTTPError(404, "not_found", f"no user {uid!r}")
            prefs = await read_preferences(conn, uid, self.k.app.topics)
        return json_response(prefs.as_json(uid))

    async def put(self, request: Request) -> Response:
        self.auth.native(request)
        uid = require_id(request.params["id"], "id")
        body = require_object(await request.json(MAX_BODY), "body")
        only_fields(body, _FIELDS, '; a topic\'s state goes in "topics": {"name": true}')
        changes = self._changes(body)
        async with self.k.store.begin() as conn:
            changed = await set_preferences(conn, self.k.store, uid, changes,
                                            self.k.clock.now())
            if changed is None:
                raise HTTPError(404, "not_found", f"no user {uid!r}")
            prefs = await read_preferences(conn, uid, self.k.app.topics)
        publish_changes(self.k, uid, changed)
        return json_response(prefs.as_json(uid))

    def _changes(self, body: dict[str, object]) -> dict[str, bool]:
        """What ``body`` asks for, every part checked before anything is written."""
        changes: dict[str, bool] = {}
        if "all" in body:
            if not isinstance(body["all"], bool):
                raise field_error("all", "must be true (subscribed) or false "
                                         "(unsubscribed from all marketing mail)")
            changes[MARKETING_TOPIC] = body["all"]
        if "topics" in body:
            topics = require_object(body["topics"], "topics")
            known = self.k.app.topics
            for name, on in topics.items():
                if name not in known:
                    raise field_error(f"topics.{name[:100]}", "unknown topic (topics: "
                                      f"{', '.join(sorted(known)) or 'none'})")
                if not isinstance(on, bool):
                    raise field_error(f"topics.{name}", "must be true or false")
                changes[name] = on
        return changes
