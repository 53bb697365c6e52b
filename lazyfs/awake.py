"""Keep the daemon's event loop polling for a moment after each FUSE request.

Every FUSE request is a round trip between the reading program and this daemon. On an idle
machine, and above all in a virtual machine, a CPU with nothing to run goes to sleep (a halted
vCPU is descheduled by the host), and waking it for the next request costs more than our whole
handling of a small read: bench/read.py measured small-file and 4 KiB random reads about 2x
faster when the CPUs are kept awake. A program reading files issues its requests back to back,
so after a request the loop keeps running (trio's scheduler polls the FUSE descriptor without
blocking) for `window_s`, then sleeps in epoll as usual. The cost is at most `window_s` of one
core after the last request of a burst.

Never while worker threads work (`threads_busy()`): the spinning loop holds the GIL, and
inflating, hashing and disk reads in those threads matter more than the loop's wake-up time.
"""

from __future__ import annotations

import trio

from lazyfs.fetchoptions import BUSY_POLL_S


class Activity:
    def __init__(self, window_s: float = BUSY_POLL_S, threads_busy=lambda: False):
        self.window_s = window_s
        self.threads_busy = threads_busy
        self.last_s = float("-inf")  # trio clock time of the last request
        self.polls = 0  # loop passes made awake (for tests and curiosity)
        self._woken: trio.Event | None = None

    def touch(self) -> None:
        """A request arrived (called on the loop by every handler)."""
        self.last_s = trio.current_time()
        if self._woken is not None and not self._woken.is_set():
            self._woken.set()

    async def keep_loop_awake(self) -> None:
        """Run for the mount's life (cancelled at unmount)."""
        if self.window_s <= 0:
            return
        while True:
            self._woken = trio.Event()
            if trio.current_time() - self.last_s >= self.window_s:
                await self._woken.wait()
            while trio.current_time() - self.last_s < self.window_s:
                if self.threads_busy():
                    await trio.sleep(self.window_s / 4)
                else:
                    self.polls += 1
                    await trio.sleep(0)
