"""Retrying an async fetch attempt under a RetryPolicy (see lazyfs.fetchoptions for the why of
the backoff), or a blocking one (opening an image at mount). Iterative with a bounded count:
never unbounded recursion, never forever.

Only FetchError with `.retriable` is retried: connection errors, timeouts, cut bodies, 5xx,
408 and 429. Everything else (404, 403, a server ignoring Range, a digest mismatch) fails the
same way every time, so it is raised at once. Waiting uses trio's clock, so tests run the
whole schedule in no real time with trio.testing.MockClock(autojump_threshold=0).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from lazyfs.errors import FetchError
from lazyfs.fetchoptions import RetryPolicy

T = TypeVar("T")


async def retrying(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, *,
                   on_retry: Callable[[FetchError, int, float], None] | None = None,
                   rng: random.Random | None = None) -> T:
    """`await attempt()`, again after a backoff on each retriable FetchError, at most
    `policy.retries` more times. The last error is raised with the number of attempts."""
    import trio  # here, not at the top: opening an image (retrying_blocking) must not pay for it

    rng = rng or random.Random()
    retry = 0
    while True:
        try:
            return await attempt()
        except FetchError as exc:
            delay_s = _delay_or_raise(exc, retry, policy, rng)
            if on_retry is not None:
                on_retry(exc, retry, delay_s)
            await trio.sleep(delay_s)
            retry += 1


def retrying_blocking(attempt: Callable[[], T], policy: RetryPolicy, *,
                      on_retry: Callable[[FetchError, int, float], None] | None = None,
                      rng: random.Random | None = None,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """The same for blocking code outside trio (opening an image before the mount serves):
    `attempt()`, retried the same way, waiting with `sleep`."""
    rng = rng or random.Random()
    retry = 0
    while True:
        try:
            return attempt()
        except FetchError as exc:
            delay_s = _delay_or_raise(exc, retry, policy, rng)
            if on_retry is not None:
                on_retry(exc, retry, delay_s)
            sleep(delay_s)
            retry += 1


def _delay_or_raise(exc: FetchError, retry: int, policy: RetryPolicy,
                    rng: random.Random) -> float:
    """The wait before retry number `retry` after `exc`; raises when `exc` is not retriable or
    the retries are used up (then with the number of attempts in the message)."""
    if not exc.retriable:
        raise exc
    if retry >= policy.retries:
        if retry == 0:
            raise exc
        raise FetchError(f"{exc} (gave up after {retry + 1} attempts)", retriable=True) from exc
    delay_s = policy.delay_s(retry, rng)
    # A server that says when to come back (Retry-After) is believed, within reason.
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        delay_s = max(delay_s, min(retry_after_s, policy.max_delay_s))
    return delay_s
