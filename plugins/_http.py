"""What an httpx failure says about a request: certainly not sent, or maybe sent.

A provider's API call either never left (no connection could be made: retry it) or may
have reached the provider (it timed out or lost the connection afterwards, or a gateway
lost the provider's answer): then the message may have gone out and must not be re-sent.
"""

from __future__ import annotations

import httpx

# Failures before any byte of the request left: the provider certainly has nothing.
NOT_SENT: tuple[type[httpx.HTTPError], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
# A gateway in front of the provider answered for it: its upstream had the request.
GATEWAY_ERRORS = frozenset({502, 504})
