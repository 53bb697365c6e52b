"""Prefetch at mount, then background fetch: what a mount fetches before anyone asks.

Prefetch: a converted layer starts with its prioritized files (the ones a workload reads first,
recorded with `lazyfs record`), then the `.prefetch.landmark` entry; a layer converted without a
list starts with `.no.prefetch.landmark` instead and prefetches nothing. The chunks of every
file before the landmark are contiguous members at the start of the blob, so they are fetched
as one ranged read (no size cap: the answer is streamed and each member is inflated, verified
and handed out as soon as it is in). When the list the layer was converted with said what a
start-up read of those files, the layer's prefetch ranges (`dev.lazyfs.prefetch.ranges`) name
the blob ranges of the chunks it read, and only the chunks inside them are prefetched: the
rest of those files is fetched when something reads it, or by the background fetch.

Ordering against reads: the prefetch *claims* its chunks (fetch.ChunkFetcher.claim) before the
mount serves its first request (`nursery.start` returns only after the claims), so a read of a
prioritized file always finds its chunks in flight and waits for the prefetch instead of racing
it with a second request for the same bytes.

Background fetch: after the prefetch, once the mount has been quiet for a moment (no file read
for FetchOptions.background_quiet_s: a program starting up must not share the CPU and the link
with it), the rest of each remote layer, at the lowest priority:
  * it waits until no on-demand read is fetching before each request (DemandGauge), and its
    requests are bounded (FetchOptions.background_request_bytes), so it pauses within one
    request of a program needing data;
  * it holds at most all-but-one connection of a source (PriorityLimiter);
  * an optional average bandwidth cap paces its requests;
  * it claims chunks only just before fetching them, so a reader never waits for a background
    claim that is still queued;
  * its chunks go to the disk cache, not the memory LRU (they must not evict what programs read).
Layers in local files are skipped: their bytes are already local. A pass that leaves chunks
missing (errors, recorded in the layer's stats) is followed by another after a growing pause,
so an outage delays the image becoming local but does not stop it for good.

Everything here runs in the mount's nursery, so unmounting cancels it. No error escapes: one
would end the mount. Errors are recorded in the per-layer stats (last_error) and logged.
"""

from __future__ import annotations

import logging

import trio

from lazyfs.format.estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK
from lazyfs.format.workload import range_holding
from lazyfs.priority import Priority
from lazyfs.rangeplan import group_spans, plan_requests

log = logging.getLogger(__name__)

# Pause between background passes that left chunks missing: doubling from 30 s to 10 min, so a
# long outage costs a few cheap attempts an hour, and a short one delays completion little.
FIRST_PASS_PAUSE_S = 30.0
MAX_PASS_PAUSE_S = 600.0
# With a bandwidth cap, one background request is at most about this much of the budget, so a
# capped transfer comes in short bursts rather than one long one at full speed.
_PACED_BURST_S = 1.0
_MIN_REQUEST_BYTES = 64 << 10


async def prefetch_and_background(fetcher, *, task_status=trio.TASK_STATUS_IGNORED,
                                  stay: bool = True, prefetched=None, settled=None) -> None:
    """The mount's fetching work: start with `await nursery.start(prefetch_and_background,
    fetcher)`, which returns once the prefetch has claimed its chunks. Then it prefetches
    (and calls `prefetched()`, if given, once that is over), waits for the mount to be quiet
    (and calls `settled()`, if given: the start-up is over), fetches in the background, and
    (`stay`) keeps the fetcher's job nursery open until it is cancelled at unmount (see
    ChunkFetcher.running)."""
    options = fetcher.options
    async with fetcher.running():
        claims = []
        for layer in fetcher.layers:
            chunks = (prioritized_chunks(layer.entries, layer.spec.prefetch_ranges)
                      if options.prefetch else [])
            claims.append((layer, fetcher.claim(layer, chunks)))
        task_status.started()
        async with trio.open_nursery() as nursery:
            for layer, claimed in claims:
                nursery.start_soon(_prefetch_layer, fetcher, layer, claimed)
        if prefetched is not None:
            prefetched()
        if options.background_fetch or settled is not None:
            await fetcher.demand.wait_quiet(options.background_quiet_s,
                                            options.background_max_wait_s)
        if settled is not None:
            settled()
        if options.background_fetch:
            await background_fetch(fetcher)
        if stay:
            await trio.sleep_forever()


def prioritized_chunks(entries, read_ranges=None) -> list:
    """The chunks of every file before `.prefetch.landmark`, in blob order; none for a layer
    with `.no.prefetch.landmark` or without a landmark. With `read_ranges` (the layer's
    prefetch ranges: the blob ranges of what a recorded start-up read of those files), only
    the chunks inside them."""
    chunks = []
    for item in entries:
        if item.path == PREFETCH_LANDMARK:
            if read_ranges is not None:
                chunks = [chunk for chunk in chunks if range_holding(
                    read_ranges, chunk.blob_offset, chunk.blob_end) is not None]
            return sorted(chunks, key=lambda chunk: chunk.blob_offset)
        if item.path == NO_PREFETCH_LANDMARK:
            return []
        chunks.extend(item.chunks)
    return []


async def _prefetch_layer(fetcher, layer, claimed) -> None:
    stats = fetcher.stats[layer.index]
    try:
        if claimed:
            await fetcher.run_job(layer, claimed, Priority.PREFETCH, max_range_bytes=None)
    except Exception as exc:  # noqa: BLE001 - never end the mount
        _record(stats, "prefetch", exc)
    discard = getattr(layer.source, "discard", None)  # a SpeculativeSource's unused window
    if discard is not None:
        discard()
    stats.prefetch_done = True


async def background_fetch(fetcher) -> None:
    """Fetch every chunk of every remote layer that is not in the disk cache, in passes."""
    pacer = _Pacer(fetcher.options.background_bytes_per_s)
    pause_s = FIRST_PASS_PAUSE_S
    while True:
        complete = True
        for layer in fetcher.layers:
            try:
                complete &= await _background_layer(fetcher, layer, pacer)
            except Exception as exc:  # noqa: BLE001 - never end the mount
                _record(fetcher.stats[layer.index], "background fetch", exc)
                complete = False
        if complete:
            return
        await trio.sleep(pause_s)
        pause_s = min(MAX_PASS_PAUSE_S, pause_s * 2)


async def _background_layer(fetcher, layer, pacer: "_Pacer") -> bool:
    """One pass over a layer; True when every chunk is now local."""
    stats = fetcher.stats[layer.index]
    if stats.background_done:
        return True
    if _is_local(layer.source):
        stats.background_chunks_left = 0
        stats.background_done = True
        return True
    chunks = {}
    for item in layer.entries:
        for chunk in item.chunks:
            chunks.setdefault(fetcher._key(layer, chunk), chunk)
    missing = await trio.to_thread.run_sync(_not_cached, fetcher.cache, list(chunks.values()))
    stats.background_chunks_left = len(missing)
    options = fetcher.options
    request_bytes = options.background_request_bytes
    if options.background_bytes_per_s:
        burst_bytes = int(options.background_bytes_per_s * _PACED_BURST_S)
        request_bytes = max(_MIN_REQUEST_BYTES, min(request_bytes, burst_bytes))
    spans = group_spans((chunk.blob_offset, chunk.blob_end, chunk) for chunk in missing)
    requests = plan_requests(spans, merge_gap_bytes=options.merge_gap_bytes,
                             max_ranges=options.max_ranges_per_request,
                             max_range_bytes=request_bytes, max_request_bytes=request_bytes)
    failed = 0
    for request in requests:
        await fetcher.demand.wait_idle()
        await pacer.wait(request.length)
        wanted = [chunk for rng in request.ranges for span in rng.spans for chunk in span.items]
        claimed = fetcher.claim(layer, wanted)
        if claimed:
            await fetcher.run_job(layer, claimed, Priority.BACKGROUND)
        request_failed = sum(1 for _, flight in claimed if flight.data is None)
        failed += request_failed
        stats.background_chunks_left -= len(wanted) - request_failed
    stats.background_done = failed == 0
    return stats.background_done


def _not_cached(cache, chunks) -> list:
    """The chunks the disk cache does not hold (by a stat: reading and hashing every cached
    chunk just to skip it would cost more than the background fetch itself)."""
    if cache is None:
        return sorted(chunks, key=lambda chunk: chunk.blob_offset)
    missing = [chunk for chunk in chunks if not (chunk.digest and cache.contains(chunk.digest))]
    return sorted(missing, key=lambda chunk: chunk.blob_offset)


def _is_local(source) -> bool:
    from lazyfs.source.file import FileSource

    return isinstance(source, FileSource)


def _record(stats, what: str, exc: BaseException) -> None:
    stats.errors += 1
    stats.last_error = f"{what}: {type(exc).__name__}: {exc}"
    log.warning("%s: %s", stats.label, stats.last_error, exc_info=exc)


class _Pacer:
    """An average bandwidth cap over requests: a request of N bytes may start no sooner than
    N / rate seconds after the previous one started. Within a request the link runs at full
    speed, which is why background requests are kept to about a second of the budget."""

    def __init__(self, bytes_per_s: int | None):
        self.bytes_per_s = bytes_per_s
        self._next_start_s: float | None = None

    async def wait(self, request_bytes: int) -> None:
        if not self.bytes_per_s:
            return
        now_s = trio.current_time()
        start_s = max(now_s, self._next_start_s if self._next_start_s is not None else now_s)
        await trio.sleep_until(start_s)
        self._next_start_s = start_s + request_bytes / self.bytes_per_s
