"""The scheduler between file reads and sources: verified chunks, fetched once, cached.

A read asks for the chunks that cover its range. Each chunk is looked up in three places, in
order: a small in-memory LRU, the shared on-disk cache, and finally the layer's source. Fetched
bytes are inflated and checked against the chunk digest from the TOC in a worker thread before
they are cached or returned: nothing unverified reaches a reader or the cache.

One fetch per chunk at a time (single flight): the first reader to miss a chunk *claims* it (a
_Flight in `_flights`), later readers of that chunk wait for the claim's result, whoever made it:
another read, the prefetch, or the background fetch. Claiming is synchronous (no await between
the lookup and the claim), so two readers can never both claim, and a claim is always resolved:
with the bytes, with the error (not sticky: the next read claims again), or, when its owner was
cancelled, as abandoned, after which its waiters claim again themselves.

What one claim set (a job) costs the source: the chunks not in the disk cache become spans
(rangeplan), merged when close and grouped into multi-range requests, each request run under a
per-source PriorityLimiter (priority.py) and retried with backoff (retry.py). A request streams:
in its worker thread each member is cut out of the answer, inflated and verified as soon as its
last byte is in, and its waiters are woken then (the disk cache write comes after, off their
path), so a reader of the first prioritized file does not wait for the whole prefetch. A retry
asks only for the members not yet delivered.

Readahead: a read that starts a file or continues the previous read of it also claims the next
chunks (up to FetchOptions.readahead_bytes past its end) into the same request. The kernel
splits a big read(2) into 128 KiB FUSE reads that arrive together; the first one (in order:
pyfuse3 handles them in arrival order up to our synchronous claim) claims the lot and the
others find their chunks in flight, so a 1 MiB read over 256 KiB chunks is one request. In a
mount, jobs run in the fetcher's own nursery (`running()`), so a read returns as soon as its
own chunks are in while the readahead part of its request is still arriving.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import logging
import random
import threading
from dataclasses import dataclass, field, replace

import trio

from lazyfs.errors import CacheError, FetchError, FormatError, LazyfsError, VerificationError
from lazyfs.fetchoptions import FetchOptions
from lazyfs.format.toc import Chunk
from lazyfs.priority import DemandGauge, Priority, PriorityLimiter
from lazyfs.rangeplan import Range, group_spans, merge_ranges, plan_requests
from lazyfs.retry import retrying
from lazyfs.source import iter_ranges

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BYTES = FetchOptions.memory_bytes
DEFAULT_PARALLEL_FETCHES = FetchOptions.max_connections
# Disk cache reads up to this size run on the event loop instead of a worker thread: a thread
# round trip (~50 us, several times that on a busy machine) costs more than a pread and the
# BLAKE3 of a few 16 KiB blocks from a local disk (~10-60 us), and random and small-file reads
# are dominated by it. Bigger reads go to a thread so that the loop keeps serving others.
INLINE_CACHE_READ_BYTES = 64 << 10
# Files whose last read end is remembered for readahead (an LRU: a few bytes each).
_READ_ENDS_KEPT = 4096
# trio >= 0.23 renamed to_thread.run_sync's `cancellable` to `abandon_on_cancel`.
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel"
            in inspect.signature(trio.to_thread.run_sync).parameters else "cancellable")


@dataclass
class LayerStats:
    label: str
    bytes_total: int  # the blob's size
    bytes_fetched: int = 0  # compressed bytes read from the source (merged gaps included)
    bytes_served: int = 0  # file bytes returned to readers
    chunks_fetched: int = 0
    cache_hits: int = 0  # memory or disk
    cache_misses: int = 0
    errors: int = 0
    last_error: str = ""
    retries: int = 0  # requests sent again after a retriable failure
    chunks_prefetched: int = 0  # fetched by the mount-time prefetch (prioritized files)
    prefetch_done: bool = False
    background_bytes: int = 0  # compressed bytes the background fetch read from the source
    background_chunks_left: int = -1  # chunks not yet local; -1: background fetch not started
    background_done: bool = False  # every chunk of the layer is in the disk cache

    def as_json(self, requests: int, multi_range: bool | None) -> dict:
        return {**self.__dict__, "requests": requests, "multi_range": multi_range}


@dataclass(eq=False)
class _Flight:
    key: object
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None  # with data None and no error: abandoned


class _MemoryLRU:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[object, bytes] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key, data: bytes) -> None:
        if key in self._items or len(data) > self.max_bytes:
            return
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)


Claim = tuple[Chunk, _Flight]


class ChunkFetcher:
    def __init__(self, layers, cache, *, options: FetchOptions | None = None,
                 memory_bytes: int | None = None, parallel_fetches: int | None = None):
        options = options or FetchOptions()
        if memory_bytes is not None:
            options = replace(options, memory_bytes=memory_bytes)
        if parallel_fetches is not None:
            options = replace(options, max_connections=parallel_fetches)
        self.options = options
        self.layers = layers
        self.cache = cache
        self.stats = [LayerStats(layer.spec.label, layer.blob_size) for layer in layers]
        self.demand = DemandGauge()
        self.cache_errors = 0
        self._memory = _MemoryLRU(options.memory_bytes)
        self._flights: dict[object, _Flight] = {}
        self._read_ends: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._rng = random.Random()
        # One limiter per source object (layers normally each have their own).
        self._limiters: dict[int, PriorityLimiter] = {}
        for layer in layers:
            if id(layer.source) not in self._limiters:
                self._limiters[id(layer.source)] = PriorityLimiter(options.max_connections)
                set_pool_size = getattr(layer.source, "set_pool_size", None)
                if set_pool_size is not None:
                    set_pool_size(options.max_connections)
        # Worker threads: one per request the limiters allow, and a few for disk cache lookups.
        self._threads = trio.CapacityLimiter(options.max_connections * len(self._limiters) + 4)
        self._jobs: trio.Nursery | None = None  # see running()

    @contextlib.asynccontextmanager
    async def running(self):
        """While inside, jobs run in a nursery of the fetcher's own (the mount's lifetime), so
        a read returns as soon as its own chunks are in while the rest of its job (readahead)
        goes on. Outside, a read waits for its whole job."""
        async with trio.open_nursery() as nursery:
            self._jobs = nursery
            try:
                yield
            finally:
                self._jobs = None

    def threads_busy(self) -> bool:
        """Whether worker threads are fetching, inflating or reading the disk cache now."""
        return self._threads.borrowed_tokens > 0

    # -- reading ----------------------------------------------------------------------------

    async def read(self, layer, chunks: list[Chunk], file_offset: int, size: int) -> bytes:
        """`size` bytes of a file from `file_offset` (fewer at the end of the file)."""
        self.demand.saw_read()
        end = file_offset + size
        wanted = _covering(chunks, file_offset, end)
        if len(wanted) == 1:
            piece = await self._from_cached_range(layer, wanted[0], file_offset, end)
            if piece is not None:
                return piece
        readahead = self._readahead(layer, chunks, file_offset, end)
        datas = await self.get_chunks(layer, wanted, Priority.DEMAND, readahead=readahead)
        parts = []
        for chunk, data in zip(wanted, datas):
            start = max(file_offset, chunk.file_offset) - chunk.file_offset
            stop = min(end, chunk.file_offset + chunk.size) - chunk.file_offset
            parts.append(data[start:stop])
        out = b"".join(parts)
        self.stats[layer.index].bytes_served += len(out)
        return out

    async def _from_cached_range(self, layer, chunk: Chunk, file_offset: int, end: int) -> bytes | None:
        """A read inside one chunk that memory does not hold, served from the disk cache by
        reading and checking only the blocks it covers (a 4 KiB read must not re-hash a 4 MiB
        chunk). None when the cache cannot: the chunk was never fully verified in this
        process, or a block failed its check (the file is gone then, and gets refetched)."""
        if self.cache is None or not chunk.digest:
            return None
        key = self._key(layer, chunk)
        if key in self._flights or self._memory.get(key) is not None:
            return None
        start = max(file_offset, chunk.file_offset) - chunk.file_offset
        stop = min(end, chunk.file_offset + chunk.size) - chunk.file_offset
        try:
            if stop - start <= INLINE_CACHE_READ_BYTES:
                # A worker-thread round trip costs more than this read and check (the cache
                # is local disk): small reads are done right here, on the event loop.
                piece = self.cache.read_range(chunk.digest, start, stop - start)
            else:
                piece = await trio.to_thread.run_sync(self.cache.read_range, chunk.digest,
                                                      start, stop - start,
                                                      limiter=self._threads)
        except CacheError as exc:
            self.cache_errors += 1
            log.warning("chunk cache: %s", exc)
            return None
        if piece is None or len(piece) != stop - start:
            return None
        stats = self.stats[layer.index]
        stats.cache_hits += 1
        stats.bytes_served += len(piece)
        return piece

    async def chunk(self, layer, chunk: Chunk) -> bytes:
        return (await self.get_chunks(layer, [chunk], Priority.DEMAND))[0]

    async def get_chunks(self, layer, chunks: list[Chunk], priority: Priority, *,
                         readahead: list[Chunk] = ()) -> list[bytes]:
        """The verified bytes of each chunk. Chunks in flight are waited for; the others are
        claimed, with the `readahead` chunks nobody has, and fetched as one job."""
        stats = self.stats[layer.index]
        results: list[bytes | None] = [None] * len(chunks)
        while True:
            waits: list[tuple[int, _Flight]] = []
            claimed: list[Claim] = []
            for i, chunk in enumerate(chunks):
                if results[i] is not None:
                    continue
                key = self._key(layer, chunk)
                data = self._memory.get(key)
                if data is not None:
                    results[i] = data
                    stats.cache_hits += 1
                    continue
                flight = self._flights.get(key)
                if flight is None:
                    flight = self._claim(key)
                    claimed.append((chunk, flight))
                waits.append((i, flight))
            if not waits:
                return results
            # Readahead rides only on a request this read makes anyway.
            if claimed:
                claimed += self.claim(layer, readahead)
            readahead = ()
            busy = self.demand.busy() if priority == Priority.DEMAND else contextlib.nullcontext()
            with busy:
                async with trio.open_nursery() as nursery:
                    if claimed:
                        (self._jobs or nursery).start_soon(self.run_job, layer, claimed, priority)
                    for _, flight in waits:
                        await flight.done.wait()
            abandoned = False
            for i, flight in waits:
                if flight.data is not None:
                    results[i] = flight.data
                elif flight.error is not None:
                    raise flight.error
                else:
                    abandoned = True
            if not abandoned:
                return results

    def claim(self, layer, chunks) -> list[Claim]:
        """Claim the chunks that are neither in memory nor in flight (synchronous: after it
        returns, readers of these chunks wait for whoever runs the job)."""
        claimed = []
        for chunk in chunks:
            key = self._key(layer, chunk)
            if key not in self._flights and self._memory.get(key) is None:
                claimed.append((chunk, self._claim(key)))
        return claimed

    async def run_job(self, layer, claimed: list[Claim], priority: Priority, *,
                      max_range_bytes: int | None | bool = True) -> None:
        """Resolve every claimed flight: from the disk cache, else from the source. Never
        raises a LazyfsError (it goes to the flights' waiters and the stats). A cancelled job
        leaves its unresolved flights abandoned. `max_range_bytes`: True for the options' cap,
        None for no cap (the prefetch: one range whatever its size)."""
        try:
            pending = await self._from_disk_cache(layer, claimed, priority)
            if pending:
                await self._from_source(layer, pending, priority, max_range_bytes)
        except LazyfsError as exc:  # the disk cache, typically
            self._fail(layer, claimed, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not leave readers waiting forever
            log.exception("fetch job failed")
            self._fail(layer, claimed, exc)
        finally:
            for _, flight in claimed:
                if not flight.done.is_set():
                    self._finish(flight)

    # -- claims and results -------------------------------------------------------------------

    @staticmethod
    def _key(layer, chunk: Chunk):
        return chunk.digest or (layer.index, chunk.blob_offset, chunk.inner_offset, chunk.size)

    def _claim(self, key) -> _Flight:
        flight = self._flights[key] = _Flight(key)
        return flight

    def _finish(self, flight: _Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        flight.done.set()

    def _fail(self, layer, claimed: list[Claim], exc: BaseException) -> None:
        open_flights = [flight for _, flight in claimed if not flight.done.is_set()]
        if not open_flights:
            return
        stats = self.stats[layer.index]
        stats.errors += 1
        stats.last_error = f"{type(exc).__name__}: {exc}"
        for flight in open_flights:
            flight.error = exc
            self._finish(flight)

    def _deliver(self, layer, outcomes: list[tuple[Chunk, _Flight, object]], fetched_bytes: int,
                 priority: Priority) -> None:
        """On the trio side: results of one member from a worker thread."""
        stats = self.stats[layer.index]
        stats.bytes_fetched += fetched_bytes
        if priority == Priority.BACKGROUND:
            stats.background_bytes += fetched_bytes
        for chunk, flight, outcome in outcomes:
            if isinstance(outcome, BaseException):
                if not flight.done.is_set():
                    stats.errors += 1
                    stats.last_error = f"{type(outcome).__name__}: {outcome}"
                    flight.error = outcome
                    self._finish(flight)
                continue
            stats.cache_misses += 1
            stats.chunks_fetched += 1
            if priority == Priority.PREFETCH:
                stats.chunks_prefetched += 1
            # Background chunks go to the disk cache only: they must not push the chunks
            # programs are reading out of memory.
            if priority != Priority.BACKGROUND:
                self._memory.put(flight.key, outcome)
            if not flight.done.is_set():
                flight.data = outcome
                self._finish(flight)

    # -- the disk cache ---------------------------------------------------------------------

    async def _from_disk_cache(self, layer, claimed: list[Claim],
                               priority: Priority) -> list[Claim]:
        """Resolve the claims the disk cache holds; return the others."""
        if self.cache is None or not any(chunk.digest for chunk, _ in claimed):
            return claimed
        found = await trio.to_thread.run_sync(self._cache_lookup_blocking, claimed,
                                              limiter=self._threads)
        stats = self.stats[layer.index]
        pending = []
        for (chunk, flight), data in zip(claimed, found):
            if data is None:
                pending.append((chunk, flight))
                continue
            stats.cache_hits += 1
            if priority != Priority.BACKGROUND:
                self._memory.put(flight.key, data)
            flight.data = data
            self._finish(flight)
        return pending

    def _cache_lookup_blocking(self, claimed: list[Claim]) -> list[bytes | None]:
        found = []
        for chunk, _ in claimed:
            data = None
            if chunk.digest:
                try:
                    data = self.cache.get(chunk.digest)
                except CacheError as exc:  # an unreadable cache costs a fetch, not the read
                    self.cache_errors += 1
                    log.warning("chunk cache: %s", exc)
            found.append(data)
        return found

    def _store(self, digest: str, data: bytes) -> None:
        """Cache a verified chunk. A cache that cannot store (full disk) costs a refetch later,
        not this read: the bytes in hand are verified, so they are still served."""
        if self.cache is None:
            return
        try:
            # Just verified against the TOC (in _decode): the cache need not hash it again.
            self.cache.put(digest, data, verified=True)
        except CacheError as exc:
            self.cache_errors += 1
            log.warning("could not cache chunk %s: %s", digest, exc)

    # -- the source ---------------------------------------------------------------------------

    async def _from_source(self, layer, claimed: list[Claim], priority: Priority,
                           max_range_bytes) -> None:
        spans = group_spans((chunk.blob_offset, chunk.blob_end, (chunk, flight))
                            for chunk, flight in claimed)
        if max_range_bytes is True:
            max_range_bytes = self.options.max_range_bytes
        requests = plan_requests(spans, merge_gap_bytes=self.options.merge_gap_bytes,
                                 max_ranges=self.options.max_ranges_per_request,
                                 max_range_bytes=max_range_bytes)
        if len(requests) == 1:
            await self._request(layer, requests[0].ranges, priority)
            return
        async with trio.open_nursery() as nursery:
            for request in requests:
                nursery.start_soon(self._request, layer, request.ranges, priority)

    async def _request(self, layer, ranges: list[Range], priority: Priority) -> None:
        """One request (multi-range when several ranges), retried for what is still missing."""
        spans = [span for rng in ranges for span in rng.spans]
        stats = self.stats[layer.index]
        limiter = self._limiters[id(layer.source)]

        async def attempt() -> None:
            todo = [span for span in spans
                    if any(not flight.done.is_set() for _, flight in span.items)]
            if not todo:
                return
            # The same merging as the plan, over what is left: never more than the plan.
            todo_ranges = merge_ranges(todo, merge_gap_bytes=self.options.merge_gap_bytes)
            async with limiter.slot(priority):
                await self._stream(layer, todo_ranges, priority)
            if any(not flight.done.is_set() for span in todo for _, flight in span.items):
                # Sources deliver every byte or raise; this would be a source's bug, and a
                # reader must get an error rather than claim the same chunks forever.
                raise FetchError(f"{layer.source.describe()}: the answer ended before every "
                                 "asked-for range was complete")

        def on_retry(exc, retry: int, delay_s: float) -> None:
            stats.retries += 1
            log.info("%s: retry %d in %.2f s: %s", layer.spec.label, retry + 1, delay_s, exc)

        try:
            await retrying(attempt, self.options.retry, on_retry=on_retry, rng=self._rng)
        except LazyfsError as exc:
            self._fail(layer, [item for span in spans for item in span.items], exc)

    async def _stream(self, layer, ranges: list[Range], priority: Priority) -> None:
        stop = threading.Event()
        try:
            # Prefetch and background requests are abandoned on cancellation (an unmount must
            # not wait for a big transfer); the thread notices `stop` and closes the answer.
            # An on-demand read waits for its request: it is small, and its reader is there.
            await trio.to_thread.run_sync(self._stream_blocking, layer, ranges, priority, stop,
                                          limiter=self._threads,
                                          **{_ABANDON: priority != Priority.DEMAND})
        finally:
            stop.set()

    def _stream_blocking(self, layer, ranges: list[Range], priority: Priority,
                         stop: threading.Event) -> None:
        """In a worker thread: fetch the ranges, and as soon as a member's bytes are all in,
        inflate and verify its chunks and hand them to the trio side."""
        current = -1
        buffer = bytearray()
        buffer_start = 0  # blob offset of buffer[0]
        received_end = 0  # blob offset just past the last byte received
        next_span = 0
        unreported_bytes = 0
        pieces = iter_ranges(layer.source, [(r.blob_start, r.length) for r in ranges])
        try:
            for index, piece in pieces:
                if stop.is_set():
                    return
                if index != current:
                    current, next_span = index, 0
                    buffer = bytearray()
                    buffer_start = received_end = ranges[index].blob_start
                # After a span, buffer_start moves on to the next span's start, which may lie
                # past what has been received (a gap inside a merged range, as between
                # zstd:chunked members): the gap's bytes are dropped as they arrive.
                piece_start, received_end = received_end, received_end + len(piece)
                buffer += memoryview(piece)[max(0, buffer_start - piece_start):]
                unreported_bytes += len(piece)
                spans = ranges[index].spans
                while next_span < len(spans) and spans[next_span].blob_end <= received_end:
                    span = spans[next_span]
                    member = bytes(buffer[span.blob_start - buffer_start:
                                          span.blob_end - buffer_start])
                    outcomes = [(chunk, flight, self._decode(layer, chunk, member))
                                for chunk, flight in span.items]
                    next_span += 1
                    # Drop what no later span needs (spans are sorted by start).
                    keep_from = (spans[next_span].blob_start if next_span < len(spans)
                                 else span.blob_end)
                    del buffer[:max(0, keep_from - buffer_start)]
                    buffer_start = max(buffer_start, keep_from)
                    if stop.is_set():
                        return
                    trio.from_thread.run_sync(self._deliver, layer, outcomes, unreported_bytes,
                                              priority)
                    unreported_bytes = 0
                    # Readers have their bytes: the disk cache write is off their path.
                    for chunk, _, outcome in outcomes:
                        if chunk.digest and not isinstance(outcome, BaseException):
                            self._store(chunk.digest, outcome)
        finally:
            pieces.close()

    def _decode(self, layer, chunk: Chunk, member: bytes):
        """The chunk's verified bytes, or the LazyfsError that makes them unusable. The caller
        caches them (after handing them to their readers)."""
        try:
            data = layer.codec.decompress_prefix(member, chunk.inner_offset + chunk.size)
            data = data[chunk.inner_offset:]
            if chunk.digest:
                actual = "sha256:" + hashlib.sha256(data).hexdigest()
                if actual != chunk.digest:
                    raise VerificationError(
                        f"{layer.spec.label}: chunk at blob offset {chunk.blob_offset} has "
                        f"digest {actual}, the TOC says {chunk.digest}")
            elif layer.verified:
                # A verified layer without a chunk digest cannot be served: that is the rule.
                raise VerificationError(f"{layer.spec.label}: chunk at blob offset "
                                        f"{chunk.blob_offset} has no digest in the TOC")
            return data
        except VerificationError as exc:
            return exc
        except FormatError as exc:
            # The codec's message ("corrupt gzip member") does not say where: add it, so that
            # stats' last error points at the chunk.
            return FormatError(f"{layer.spec.label}: chunk at blob offset {chunk.blob_offset}: "
                               f"{exc}")
        except LazyfsError as exc:
            return exc

    # -- readahead ----------------------------------------------------------------------------

    def _readahead(self, layer, chunks: list[Chunk], start: int, end: int) -> list[Chunk]:
        if self.options.readahead_bytes <= 0 or not chunks:
            return []
        key = (layer.index, chunks[0].blob_offset, chunks[0].inner_offset)
        sequential = start == 0 or self._read_ends.get(key) == start
        self._read_ends[key] = end
        self._read_ends.move_to_end(key)
        if len(self._read_ends) > _READ_ENDS_KEPT:
            self._read_ends.popitem(last=False)
        if not sequential:
            return []
        return [chunk for chunk in _covering(chunks, end, end + self.options.readahead_bytes)
                if chunk.file_offset >= end]

    # -- stats --------------------------------------------------------------------------------

    def stats_json(self) -> list[dict]:
        return [s.as_json(getattr(layer.source, "requests", 0),
                          getattr(layer.source, "multi_range", None))
                for s, layer in zip(self.stats, self.layers)]


def _covering(chunks: list[Chunk], start: int, end: int) -> list[Chunk]:
    """The chunks overlapping [start, end), found by bisection (files may have many chunks)."""
    lo, hi = 0, len(chunks)
    while lo < hi:
        mid = (lo + hi) // 2
        if chunks[mid].file_offset + chunks[mid].size <= start:
            lo = mid + 1
        else:
            hi = mid
    out = []
    for chunk in chunks[lo:]:
        if chunk.file_offset >= end:
            break
        out.append(chunk)
    return out
