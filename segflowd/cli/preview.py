"""``segflowd preview TEMPLATE --user ID [--event JSON] [--data JSON] [--out DIR]``.

Renders a template for a user in the store exactly as delivery would (component
library, CSS inlining, text part, MIME headers) and writes ``TEMPLATE.html`` and
``TEMPLATE.eml`` for a person to open. An SMS template is printed instead, with its
length, encoding (GSM-7 or UCS-2) and segment count. Nothing is queued or sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa

from ..clock import utcnow
from ..config import load_config
from ..delivery.mime import (
    InvalidMessage,
    MessageParts,
    build_message,
    domain_of,
    make_message_id,
)
from ..delivery.templates import Renderer
from ..delivery.tokens import Signer, ephemeral_key
from ..errors import AppError, ConfigError, SegflowError
from ..loader import load_app
from ..schema import users
from ..store import Store
from .smscheck import sms_preview

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("preview", parents=[common],
                       help="render a template for a user into .html and .eml files")
    p.add_argument("template", help="the template's name (app.template(NAME, ...))")
    p.add_argument("--user", required=True, metavar="ID", help="a user id in the store")
    p.add_argument("--event", metavar="JSON", default=None,
                   help="the triggering event as a JSON object (the template's `event`)")
    p.add_argument("--data", metavar="JSON", default=None,
                   help="more template variables as a JSON object (send_email(**data))")
    p.add_argument("--kind", default="campaign",
                   choices=["campaign", "transaction", "broadcast", "test"],
                   help="message kind: campaign and broadcast carry List-Unsubscribe")
    p.add_argument("--out", metavar="DIR", default=".", help="where to write the files")
    p.set_defaults(handler=run, command="preview")


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        app = load_app(config.daemon.app, config.base_dir)
    except (ConfigError, AppError) as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        data = _json_object(args.data, "--data")
        if args.event is not None:
            data["event"] = _json_object(args.event, "--event")
    except ValueError as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.template not in app.templates and args.template not in app.sms_templates:
        known = ", ".join(sorted([*app.templates, *app.sms_templates])) or "none"
        print(f"segflowd: unknown template {args.template!r} (templates: {known})",
              file=sys.stderr)
        return EXIT_USAGE

    async def load_user() -> dict[str, Any] | None:
        store = Store.open(config.store.url)
        try:
            async with store.connect() as conn:
                row = (await conn.execute(sa.select(users).where(
                    users.c.id == args.user))).mappings().first()
        finally:
            await store.close()
        if row is None:
            return None
        return {**(row["attributes"] or {}), "id": row["id"], "email": row["email"]}

    try:
        user = anyio.run(load_user)
    except SegflowError as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except sa.exc.SQLAlchemyError as exc:
        print(f"segflowd: cannot read user {args.user!r} from the store: "
              f"{type(exc).__name__} (has it been migrated?)", file=sys.stderr)
        return EXIT_FAILURE
    if user is None:
        print(f"segflowd: no user {args.user!r} in the store", file=sys.stderr)
        return EXIT_FAILURE
    if args.template in app.sms_templates:
        try:
            lines = sms_preview(app, args.template, user, data, args.kind)
        except SegflowError as exc:
            print(f"segflowd: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print("\n".join(lines))
        return EXIT_OK
    signer = Signer(config.email.secret or ephemeral_key())
    public = (config.http.public_url or f"http://{config.http.listen}").rstrip("/")
    marketing = args.kind in ("campaign", "broadcast")
    unsub = f"{public}/u/{signer.sign('u', {'u': str(user['id']), 'm': 0})}" if marketing else ""
    context = {**data, "data": data, "user": user, "unsubscribe_url": unsub,
               "message": {"id": 0, "kind": args.kind, "campaign": None,
                           "template": args.template}}
    try:
        rendered = Renderer(app).render(args.template, context)
        msg = build_message(MessageParts(
            row_id=0, kind=args.kind, sender=config.email.from_,
            to=str(user.get("email") or "preview@example.invalid"), subject=rendered.subject,
            html=rendered.html, text=rendered.text,
            message_id=make_message_id(0, domain_of(config.email.from_)), date=utcnow(),
            reply_to=config.email.reply_to, unsubscribe_url=unsub,
            unsubscribe_mailto=config.email.unsubscribe_mailto))
    except (SegflowError, InvalidMessage) as exc:
        print(f"segflowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    html_path, eml_path = out / f"{args.template}.html", out / f"{args.template}.eml"
    html_path.write_text(rendered.html, encoding="utf-8")
    eml_path.write_bytes(msg.mime)
    print(f"subject: {rendered.subject}")
    print(f"wrote {html_path}")
    print(f"wrote {eml_path}")
    return EXIT_OK
