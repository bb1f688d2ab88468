"""Twilio's request signature (``X-Twilio-Signature``): the daemon checks it on the
status callbacks and replies Twilio posts (:mod:`segflowd.delivery.smshooks`); the
``twilio`` plugin's tests sign with it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Mapping

__all__ = ["MESSAGE_SID", "signature_valid", "twilio_signature"]

MESSAGE_SID = re.compile(r"[SM]M[0-9a-fA-F]{32}")  # a message sid: SM... (SMS) or MM... (MMS)


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """Twilio's ``X-Twilio-Signature`` for a request to ``url`` with these POST params:
    base64 of HMAC-SHA1 (keyed by the auth token) over the full URL followed by each
    param's name and value, sorted by name."""
    data = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_valid(auth_token: str, url: str, params: Mapping[str, str],
                    header: str) -> bool:
    """Whether ``header`` (an ``X-Twilio-Signature``) signs this request, compared in
    constant time. As Twilio's own helpers do, an https URL is also tried with and
    without its default port (Twilio signs the URL as configured, and a proxy in front
    of the daemon may add or drop ``:443``)."""
    if not header:
        return False
    expected = header.encode()
    return any(hmac.compare_digest(twilio_signature(auth_token, u, params).encode(), expected)
               for u in _url_variants(url))


def _url_variants(url: str) -> list[str]:
    parts = urllib.parse.urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    variants = [url]
    if default is None or parts.hostname is None:
        return variants
    host = parts.netloc.rpartition("@")[2]
    userinfo = parts.netloc[: len(parts.netloc) - len(host)]
    try:
        port = parts.port
    except ValueError:
        return variants
    if port is None:
        other = f"{userinfo}{host}:{default}"
    elif port == default:
        other = userinfo + host.rsplit(":", 1)[0]
    else:
        return variants
    variants.append(urllib.parse.urlunsplit(parts._replace(netloc=other)))
    return variants
