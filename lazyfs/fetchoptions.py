"""What the fetch engine may do: connections, merging, retries, timeouts, prefetch.

Plain data with no I/O imports, so the CLI and the mount options can carry it. Each default says
why it is what it is; every one of them is a mount option.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


# After each FUSE request the daemon's loop keeps polling for the next one this long before it
# sleeps (lazyfs/awake.py): programs issue their requests back to back, and a CPU that went to
# sleep in between wakes slower than a small read is served. Short: at most this much of one
# core is spent after the last request of a burst.
BUSY_POLL_S = 0.002
# FetchOptions.merge_gap_bytes' default (explained there); the converter joins the prefetch
# ranges it writes by it (converter/layer.py).
DEFAULT_MERGE_GAP_BYTES = 64 << 10


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and "equal jitter".

    Retry number n (0-based) waits a random time in [c/2, c] where
    c = min(max_delay_s, first_delay_s * 2**n). The doubling backs off from a server in trouble;
    the jitter spreads the retries of many readers (and many hosts that lost the same server at
    the same moment) so that they do not come back in lockstep. Equal jitter rather than "full"
    jitter (uniform in [0, c]) because full jitter may retry at once, which against a server
    that just reset the connection is a wasted attempt.

    With the defaults a read gives up after 5 attempts and at most 0.2+0.4+0.8+1.6 = 3.0 s of
    waiting: a FUSE read blocks a program, and past a few seconds an EIO it can handle is kinder
    than a hang (the failure is not sticky: the next read tries again).
    """

    retries: int = 4  # attempts after the first
    first_delay_s: float = 0.2
    max_delay_s: float = 10.0

    def delay_bounds_s(self, retry: int) -> tuple[float, float]:
        """(shortest, longest) wait before retry number `retry` (0-based)."""
        ceiling = min(self.max_delay_s, self.first_delay_s * 2 ** retry)
        return ceiling / 2, ceiling

    def delay_s(self, retry: int, rng: random.Random) -> float:
        low, high = self.delay_bounds_s(retry)
        return rng.uniform(low, high)


@dataclass(frozen=True)
class FetchOptions:
    # Parallel requests (and kept-alive connections) per source. 8 keeps a 100 Mbit/s link
    # busy with 4 MiB chunks at tens of ms round trip, and is well under what servers and CDNs
    # allow one client.
    max_connections: int = 8

    # Two compressed ranges closer than this are fetched as one, gap included. Fetching the gap
    # costs gap / bandwidth; a separate request costs a round trip. The break-even gap is
    # RTT x bandwidth: 20 ms x 100 Mbit/s = 250 KB, 1 ms x 1 Gbit/s = 125 KB. 64 KiB stays
    # under the break-even of common links, so merging never costs more than it saves, and
    # ranges farther apart still share a request as parts of one multi-range request.
    merge_gap_bytes: int = DEFAULT_MERGE_GAP_BYTES
    # One merged range of on-demand reads at most this big (a single chunk may be bigger), so a
    # read never waits for much more than it asked for.
    max_range_bytes: int = 16 << 20
    # Ranges per multi-range request: each costs ~26 bytes of the Range header, and 32 keep it
    # under 1 KiB (nginx's default client_header_buffer_size; many servers refuse > 8 KiB).
    max_ranges_per_request: int = 32
    # A read that starts a file or continues the previous read of it also fetches the next
    # chunks up to this many bytes past its end, in the same request: sequential readers (the
    # kernel sends 128 KiB reads) then cost one request per ~1 MiB, not one per chunk.
    readahead_bytes: int = 1 << 20

    # Connect: a server that does not accept within this is down or unreachable. Read: the
    # longest wait for the next bytes of an answer (not for the whole answer, so big ranges on
    # slow but steady links are fine); a stalled connection is cut and the request retried.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    # At mount: the prioritized files of each layer (before .prefetch.landmark) in one request.
    prefetch: bool = True
    # After the prefetch: the rest of each remote layer at the lowest priority, so that sooner
    # or later the whole image is local. Bytes per second on average; None: no cap.
    background_fetch: bool = True
    background_bytes_per_s: int | None = None
    # One background request fetches at most this much: it bounds how long an on-demand read
    # shares the link with a background transfer it arrived during (4 MiB at 100 Mbit/s is
    # 0.34 s) while keeping the round trip per request under ~6% of the transfer time.
    background_request_bytes: int = 4 << 20
    # The background fetch starts once no file has been read for this long after the prefetch
    # (at most background_max_wait_s after it): a program starting up is reading, and the
    # background transfer's inflating, hashing and cache writes would take CPU from it, and
    # its 4 MiB requests would hold the link while the program's next on-demand read waits.
    background_quiet_s: float = 1.0
    background_max_wait_s: float = 30.0

    # Verified chunks kept in memory: a 128 KiB read pattern over a 4 MiB chunk must not re-read
    # and re-hash the chunk from the disk cache 32 times.
    memory_bytes: int = 64 << 20

    def timeouts_s(self) -> tuple[float, float]:
        """(connect, read) as requests takes them."""
        return self.connect_timeout_s, self.read_timeout_s
