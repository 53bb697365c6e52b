"""Who gets a connection first: on-demand reads, then prefetch, then background fetch.

A program blocked in read(2) is waiting now; prefetched files will be read soon; the background
fetch only makes the image local sooner or later. Two mechanisms keep them in that order:

* PriorityLimiter, one per source: at most `slots` requests at once. A freed slot goes to the
  waiter with the best priority (FIFO within a priority), and background requests may hold at
  most `slots - 1` slots, so an on-demand read always finds a connection free of background
  work. trio.CapacityLimiter was rejected: it is FIFO only.
* DemandGauge, one per fetcher: counts on-demand reads that are fetching. The background fetch
  waits for it to be idle before each of its (bounded) requests, so it pauses while programs
  wait for data, whatever source they read from: requests on other connections still share
  the link's bandwidth.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
from dataclasses import dataclass, field

import trio


class Priority(enum.IntEnum):
    DEMAND = 0
    PREFETCH = 1
    BACKGROUND = 2


@dataclass(eq=False)
class _Waiter:
    priority: Priority
    event: trio.Event = field(default_factory=trio.Event)
    granted: bool = False
    cancelled: bool = False


class PriorityLimiter:
    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"need at least one slot, not {slots}")
        self.slots = slots
        self.background_slots = max(1, slots - 1)
        self.in_use = 0
        self._background_in_use = 0
        self._queue: list[tuple[int, int, _Waiter]] = []  # heap: (priority, arrival, waiter)
        self._arrivals = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: Priority):
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release(priority)

    def waiting(self, priority: Priority | None = None) -> int:
        return sum(1 for p, _, w in self._queue
                   if not w.cancelled and (priority is None or p == priority))

    async def acquire(self, priority: Priority) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._drop_cancelled()
        ahead = self._queue and self._queue[0][0] <= priority
        if not ahead and self._grantable(priority):
            self._take(priority)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(priority)
        heapq.heappush(self._queue, (priority, next(self._arrivals), waiter))
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # granted and cancelled at once: give the slot on
                self.release(priority)
            else:
                waiter.cancelled = True
                self._grant_waiters()
            raise

    def release(self, priority: Priority) -> None:
        self.in_use -= 1
        if priority == Priority.BACKGROUND:
            self._background_in_use -= 1
        self._grant_waiters()

    def _grantable(self, priority: Priority) -> bool:
        if self.in_use >= self.slots:
            return False
        return priority != Priority.BACKGROUND or self._background_in_use < self.background_slots

    def _take(self, priority: Priority) -> None:
        self.in_use += 1
        if priority == Priority.BACKGROUND:
            self._background_in_use += 1

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0][2].cancelled:
            heapq.heappop(self._queue)

    def _grant_waiters(self) -> None:
        # The heap's head has the best priority; if even it cannot be granted (no slot, or a
        # background waiter at the background cap: then everyone queued is background), stop.
        while True:
            self._drop_cancelled()
            if not self._queue or not self._grantable(self._queue[0][0]):
                return
            priority, _, waiter = heapq.heappop(self._queue)
            self._take(priority)
            waiter.granted = True
            waiter.event.set()


class DemandGauge:
    """How many on-demand fetches are running, and when a file was last read; lets background
    work wait for none, or for a quiet mount."""

    def __init__(self):
        self.active = 0
        self._idle: trio.Event | None = None
        self.last_read_s = float("-inf")  # trio.current_time() of the latest read

    def saw_read(self) -> None:
        self.last_read_s = trio.current_time()

    async def wait_quiet(self, quiet_s: float, max_wait_s: float) -> None:
        """Until no file has been read for quiet_s seconds, counted from now at the earliest
        (a program that has not started reading yet is about to), or max_wait_s have passed
        (a program that never stops reading must not keep the image from becoming local)."""
        now_s = trio.current_time()
        deadline_s = now_s + max_wait_s
        self.last_read_s = max(self.last_read_s, now_s)
        while True:
            quiet_at_s = self.last_read_s + quiet_s
            if trio.current_time() >= min(quiet_at_s, deadline_s):
                return
            await trio.sleep_until(min(quiet_at_s, deadline_s))

    @contextlib.contextmanager
    def busy(self):
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait_idle(self) -> None:
        while self.active:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
        await trio.lowlevel.checkpoint()
