"""Inflating a many-member gzip request body: the daemon's way against the old one.

    .venv/bin/python bench/inflate.py            # full: up to 25,000 members, 7 runs each
    .venv/bin/python bench/inflate.py --quick    # up to 5,000 members, 3 runs each

A client (or an attacker) may send a gzip body as many tiny members: the body stays
within the request limit (500 KiB by default) while every member costs a decompressor.
Per member count, ``inflate_ms_<n>_members`` is the median time of
:func:`segflowd.http.inflate` on such a body; the baseline, measured in the same run on
the same body, is the way it was done before (a new ``out += ...`` and the whole rest of
the body handed to zlib, and copied by it, at every member: quadratic). ``ratio`` below 1
is the speed-up. Bodies are 64-byte members, so the decompressed size is 64 bytes per
member and the limit is set just above it. No store is touched.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
import zlib
from collections.abc import Awaitable, Callable

import anyio

from segflowd.http import inflate

TARGET_MS = 50.0  # a request's inflation should never stall the event loop noticeably


def old_inflate(raw: bytes, limit: int) -> bytes:
    """Segflow's inflation before #25 item 11, kept here as the baseline."""
    out = b""
    data = raw
    while True:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        out += d.decompress(data, limit + 1 - len(out))
        if len(out) > limit or d.unconsumed_tail:
            raise ValueError("too large")
        if not d.eof:
            raise ValueError("truncated")
        data = d.unused_data
        if not data.strip(b"\0"):
            return out


def body_of(members: int) -> bytes:
    return b"".join(gzip.compress(f"{i:015d}|".encode() + b"a" * 48, mtime=0)
                    for i in range(members))


async def median_ms(fn: Callable[[], Awaitable[object]], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def emit(figure: str, value: float, baseline: float, members: int, body: int) -> None:
    print(json.dumps({"bench": "inflate", "figure": figure, "store": "none",
                      "value": round(value, 3), "unit": "ms", "baseline": round(baseline, 3),
                      "ratio": round(value / baseline, 4) if baseline else None,
                      "target": TARGET_MS, "members": members, "body_bytes": body}),
          flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small scale, a few seconds")
    args = parser.parse_args()
    counts = (500, 2000, 5000) if args.quick else (1000, 5000, 10_000, 25_000)
    runs = 3 if args.quick else 7
    for n in counts:
        raw = body_of(n)
        limit = 64 * n

        async def new(raw: bytes = raw, limit: int = limit) -> bytes:
            return await inflate(raw, limit, gzip=True)

        async def old(raw: bytes = raw, limit: int = limit) -> bytes:
            return old_inflate(raw, limit)

        assert await new() == await old()
        value = await median_ms(new, runs)
        baseline = await median_ms(old, runs)
        emit(f"inflate_ms_{n}_members", value, baseline, n, len(raw))


if __name__ == "__main__":
    anyio.run(main)
