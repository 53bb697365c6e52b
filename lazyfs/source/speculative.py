"""A source that starts downloading a layer's prefetch region before anyone asks for it.

A cold mount needs the layer's TOC before it knows which chunks the prefetch wants, and the
TOC sits at the end of the blob: fetching them one after the other costs the TOC's transfer and
round trips before the first prefetched byte. The prioritized files are at the start of the
blob, though, and the converter records where they end in a layer annotation
(`lazyfs.format.oci.ANNOTATION_PREFETCH_END`). With it, the mount starts this download of
[0, end) at once, side by side with the TOC fetch, and the prefetch later consumes it as if
its own request were streaming in.

Nothing here is trusted more than any other source: the bytes are raw blob bytes, cut into
members, inflated and checked against the TOC's chunk digests by the fetcher like all others.
A wrong or hostile annotation only wastes at most MAX_SPECULATIVE_BYTES of download: a request
that is not inside the speculated window goes to the underlying source.

The TOC goes first, though: the mount can serve nothing before it has parsed the TOC, while
the prefetch region is needed only as the program reads it. Started together, the two
transfers would share the link, and the TOC would arrive about twice as late. So the download
waits for the first read outside the window (the TOC's, through this same source) and carries
it: one request asks for that read's ranges first and the window after them (HTTP: one
multi-range request on the connection the documents kept alive). The TOC's bytes come first
and are handed to its reader once they are all in, the window's follow without a gap on the
link, and no new connection or round trip is spent on the window. A server that cannot answer
several ranges at once gets them one after the other (lazyfs/source/http.py), the TOC's still
first. With no read outside the window within START_WAIT_S, the download starts alone.

Several windows: when the converter knew what a start-up reads of the prioritized files, the
layer says which blob ranges hold those chunks (`ANNOTATION_PREFETCH_RANGES`), and the
download asks for those ranges, one multi-range request still, instead of all of [0, end).
The bytes of the windows are kept one after the other in one buffer.

The windows serve the prefetch: every request that lies inside them (the prefetch may need
several, of at most FetchOptions.max_ranges_per_request ranges each) is answered from the
download, as it comes in. They are dropped when the prefetch ends (`discard`), so their memory
is held only during the mount's first seconds; a request that still waits on them then fails
as retriable, and its retry reads from the server.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator, Sequence

from lazyfs.errors import FetchError
from lazyfs.format.workload import merge_extents, range_holding
from lazyfs.source import iter_ranges

log = logging.getLogger(__name__)

# A speculative download is held in memory until the prefetch consumes it: this bounds it (and
# what a lying annotation can make a mount download for nothing).
MAX_SPECULATIVE_BYTES = 64 << 20
# The download starts at the latest this long after the source is made, TOC read or not.
START_WAIT_S = 1.0
# At most this many windows in the download's request, with the TOC's range: more are joined
# across their smallest gaps. The fetcher's own cap on ranges per request is 32, and a Range
# header of thousands of ranges is refused by servers (nginx: 400 past ~8 KiB of headers).
MAX_WINDOWS = 31


class _Rider:
    """The first read outside the window, carried by the window's request: its pieces, handed
    over from the download thread to its reader once they are all in (the reader wants them
    all, and waking it for each piece would cost it the interpreter lock each time)."""

    def __init__(self, ranges: Sequence[tuple[int, int]]):
        self.ranges = list(ranges)
        self._pieces: list[tuple[int, bytes]] = []
        # Its reader is done once these are in, without waiting for what follows them.
        self._missing_bytes = sum(length for _, length in self.ranges)
        self._error: BaseException | None = None
        self._ended = threading.Event()

    def put(self, index: int, piece: bytes) -> None:
        self._pieces.append((index, piece))
        self._missing_bytes -= len(piece)
        if self._missing_bytes <= 0:
            self.end()

    def end(self, error: BaseException | None = None) -> None:
        """No more pieces: all were delivered (None), or the request failed."""
        if not self._ended.is_set():
            self._error = error
            self._ended.set()

    def pieces(self) -> Iterator[tuple[int, bytes]]:
        self._ended.wait()
        if self._error is not None:
            raise self._error
        yield from self._pieces


class SpeculativeSource:
    """Wraps a BlobSource; downloads the `windows` ((start, end) blob ranges in blob order) in
    a thread, in one request with the first read outside them (see the module doc)."""

    def __init__(self, inner, windows: Sequence[tuple[int, int]]):
        self.inner = inner
        self.windows = _bounded(list(windows))
        # Where each window's bytes start in the buffer, which holds them one after the other.
        self._buffer_starts = list(itertools.accumulate(
            (end - start for start, end in self.windows[:-1]), initial=0))
        self._buffer = bytearray()
        self._error: BaseException | None = None
        self._done = False
        self._released = False  # the windows' memory is freed: the download stops keeping bytes
        self._rider: _Rider | None = None
        self._started = False  # the download has taken its rider (if any): no more boarding
        self._changed = threading.Condition()
        self._go = threading.Event()  # set when the download should start
        # Set as the request goes out (or once it never will): what the mount waits for before
        # it spends the interpreter on imports (lazyfs.mount). This thread keeps the
        # interpreter until the request's bytes are handed to the kernel, so they go first.
        self.asking = threading.Event()
        self._thread = threading.Thread(target=self._download, name="lazyfs-speculative",
                                        daemon=True)
        self._thread.start()

    # -- BlobSource -------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        return self.inner.requests

    def size(self) -> int:
        return self.inner.size()

    def describe(self) -> str:
        return self.inner.describe()

    def set_pool_size(self, max_connections: int) -> None:
        set_pool_size = getattr(self.inner, "set_pool_size", None)
        if set_pool_size is not None:
            set_pool_size(max_connections)

    def read(self, blob_offset: int, length: int) -> bytes:
        return b"".join(piece for _, piece in self.read_ranges([(blob_offset, length)]))

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        if self._covers(ranges):
            self._go.set()  # the window's consumer is here: no reason to wait any longer
            yield from self._serve(ranges)
            return
        rider = self._board(ranges)
        if rider is None:
            yield from iter_ranges(self.inner, ranges)
        else:
            yield from rider.pieces()

    def close(self) -> None:
        self._give_up()
        self.inner.close()

    # -- the window -------------------------------------------------------------------------------

    def discard(self) -> None:
        """The prefetch is over: whatever it did not consume is not needed any more."""
        self._give_up()

    def _covers(self, ranges: Sequence[tuple[int, int]]) -> bool:
        """Whether these ranges are for the windows (each inside one, and they are still
        held). Others (the TOC, on-demand reads) go to the underlying source."""
        with self._changed:
            return not self._released and all(
                range_holding(self.windows, offset, offset + length) is not None
                for offset, length in ranges)

    def _board(self, ranges: Sequence[tuple[int, int]]) -> _Rider | None:
        """A rider for these ranges on the windows' request, if that has not started and the
        ranges miss every window (the TOC does: it ends the blob); else None (read alone)."""
        with self._changed:
            if (self._started or self._released or self._rider is not None
                    or any(self._overlaps(offset, length) for offset, length in ranges)):
                self._go.set()  # whatever the window waited for, it will not come through here
                return None
            self._rider = _Rider(ranges)
        self._go.set()
        return self._rider

    def _overlaps(self, blob_offset: int, length: int) -> bool:
        end = blob_offset + length
        return any(start < end and blob_offset < stop for start, stop in self.windows)

    def _serve(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """The pieces of each range, as the download brings them in."""
        for index, (blob_offset, length) in enumerate(ranges):
            window = range_holding(self.windows, blob_offset, blob_offset + length)
            base = self._buffer_starts[window] - self.windows[window][0]
            position, end = base + blob_offset, base + blob_offset + length
            while position < end:
                piece = self._next_piece(position, end)
                yield index, piece
                position += len(piece)

    def _next_piece(self, buffer_offset: int, buffer_end: int) -> bytes:
        """The buffer's bytes from buffer_offset (up to buffer_end), once the download has
        brought some; raises if it failed or the windows were dropped."""
        with self._changed:
            while len(self._buffer) <= buffer_offset:
                if self._error is not None or self._done or self._released:
                    # The windows serve nobody after this: retries go to the server.
                    self._release_locked()
                    why = (f"failed: {self._error}" if self._error is not None
                           else f"ended at {len(self._buffer)} bytes")
                    raise FetchError(f"{self.describe()}: speculative prefetch download {why}",
                                     retriable=True) from None
                self._changed.wait()
            return bytes(self._buffer[buffer_offset:buffer_end])

    def _download(self) -> None:
        self._go.wait(START_WAIT_S)
        with self._changed:
            self._started = True
            rider, released = self._rider, self._released
        try:
            if released:  # given up before it started: ask for nothing but the rider's
                if rider is not None:
                    for piece in iter_ranges(self.inner, rider.ranges):
                        rider.put(*piece)
                return
            ranges = ((rider.ranges if rider is not None else [])
                      + [(start, end - start) for start, end in self.windows])
            first_window = len(ranges) - len(self.windows)
            self.asking.set()
            for index, piece in iter_ranges(self.inner, ranges):
                if index < first_window:
                    rider.put(index, piece)
                    continue
                if rider is not None:
                    rider.end()  # the window's first bytes: the rider's are all in
                    rider = None
                with self._changed:
                    if self._released:
                        return
                    self._buffer += piece
                    self._changed.notify_all()
        except Exception as exc:  # noqa: BLE001 - handed to the consumers, which retry
            log.debug("speculative download of %s failed: %s", self.describe(), exc)
            if rider is not None:
                rider.end(exc)
                rider = None
            with self._changed:
                self._error = exc
        finally:
            self.asking.set()
            if rider is not None:
                rider.end()
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def _give_up(self) -> None:
        """The windows will serve nobody (the prefetch is over, or the mount is closing)."""
        self._go.set()  # a download still waiting to start finds the windows released
        with self._changed:
            self._release_locked()

    def _release_locked(self) -> None:
        self._released = True
        self._buffer = bytearray()
        self._changed.notify_all()


def _bounded(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """At most MAX_WINDOWS windows (joined across their smallest gaps) of at most
    MAX_SPECULATIVE_BYTES in all (the last ones cut)."""
    windows = [(max(0, start), end) for start, end in windows if end > max(0, start)]
    if len(windows) > MAX_WINDOWS:
        gaps = sorted(start - windows[index][1] for index, (start, _) in enumerate(windows[1:]))
        windows = merge_extents(windows, gaps[len(windows) - MAX_WINDOWS - 1])
    bounded, budget = [], MAX_SPECULATIVE_BYTES
    for start, end in windows:
        if budget <= 0:
            break
        bounded.append((start, min(end, start + budget)))
        budget -= bounded[-1][1] - start
    return bounded
