"""Retrying an async fetch attempt under a RetryPolicy (see lazyfs.fetchoptions for the why of
the backoff). Iterative with a bounded count: never unbounded recursion, never forever.

Only FetchError with `.retriable` is retried: connection errors, timeouts, cut bodies, 5xx,
408 and 429. Everything else (404, 403, a server ignoring Range, a digest mismatch) fails the
same way every time, so it is raised at once. Waiting uses trio's clock, so tests run the
whole schedule in no real time with trio.testing.MockClock(autojump_threshold=0).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from lazyfs.errors import FetchError
from lazyfs.fetchoptions import RetryPolicy

T = TypeVar("T")


async def retrying(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, *,
                   on_retry: Callable[[FetchError, int, float], None] | None = None,
                   rng: random.Random | None = None) -> T:
    """`await attempt()`, again after a backoff on each retriable FetchError, at most
    `policy.retries` more times. The last error is raised with the number of attempts."""
    rng = rng or random.Random()
    retry = 0
    while True:
        try:
            return await attempt()
        except FetchError as exc:
            if not exc.retriable:
                raise
            if retry >= policy.retries:
                if retry == 0:
                    raise
                raise FetchError(f"{exc} (gave up after {retry + 1} attempts)",
                                 retriable=True) from exc
            delay_s = policy.delay_s(retry, rng)
            # A server that says when to come back (Retry-After) is believed, within reason.
            retry_after_s = getattr(exc, "retry_after_s", None)
            if retry_after_s is not None:
                delay_s = max(delay_s, min(retry_after_s, policy.max_delay_s))
            if on_retry is not None:
                on_retry(exc, retry, delay_s)
            await trio.sleep(delay_s)
            retry += 1
