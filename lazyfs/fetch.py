"""The scheduler between file reads and sources: verified chunks, fetched once, cached.

A read asks for the chunks that cover its range. Each chunk is looked up in three places, in
order: a small in-memory LRU (a 128 KiB read pattern over a 4 MiB chunk must not re-read and
re-hash the chunk 32 times), the shared on-disk cache, and finally the layer's source. Fetched
bytes are inflated and checked against the chunk digest from the TOC in a worker thread before
they are cached or returned: nothing unverified reaches a reader or the cache.

One fetch per chunk at a time: a second reader of a chunk that is being fetched waits for the
first one's result (single flight) rather than fetching it again.

Coalescing neighbouring chunks, priorities and retries come with the fetch-engine issue; this
module is where they go.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from dataclasses import dataclass, field

import trio

from lazyfs.errors import CacheError, LazyfsError, VerificationError
from lazyfs.format.toc import Chunk

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BYTES = 64 << 20
DEFAULT_PARALLEL_FETCHES = 8


@dataclass
class LayerStats:
    label: str
    bytes_total: int  # the blob's size
    bytes_fetched: int = 0  # compressed bytes read from the source
    bytes_served: int = 0  # file bytes returned to readers
    chunks_fetched: int = 0
    cache_hits: int = 0  # memory or disk
    cache_misses: int = 0
    errors: int = 0
    last_error: str = ""

    def as_json(self, requests: int) -> dict:
        return {**self.__dict__, "requests": requests}


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


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


class ChunkFetcher:
    def __init__(self, layers, cache, *, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 parallel_fetches: int = DEFAULT_PARALLEL_FETCHES):
        self.layers = layers
        self.cache = cache
        self.stats = [LayerStats(layer.spec.label, layer.blob_size) for layer in layers]
        self._memory = _MemoryLRU(memory_bytes)
        self._flights: dict[object, _Flight] = {}
        self._limiter = trio.CapacityLimiter(parallel_fetches)
        self.cache_errors = 0

    async def read(self, layer, chunks: list[Chunk], file_offset: int, size: int) -> bytes:
        """`size` bytes of a file from `file_offset` (fewer at the end of the file)."""
        parts = []
        end = file_offset + size
        for chunk in _covering(chunks, file_offset, end):
            data = await self.chunk(layer, chunk)
            start = max(file_offset, chunk.file_offset) - chunk.file_offset
            stop = min(end, chunk.file_offset + chunk.size) - chunk.file_offset
            parts.append(data[start:stop])
        out = b"".join(parts)
        self.stats[layer.index].bytes_served += len(out)
        return out

    async def chunk(self, layer, chunk: Chunk) -> bytes:
        key = chunk.digest or (layer.index, chunk.blob_offset, chunk.inner_offset, chunk.size)
        data = self._memory.get(key)
        if data is not None:
            self.stats[layer.index].cache_hits += 1
            return data
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.data
        flight = self._flights[key] = _Flight()
        try:
            data = await self._load(layer, chunk)
            self._memory.put(key, data)
            flight.data = data
            return data
        except LazyfsError as exc:
            flight.error = exc
            stats = self.stats[layer.index]
            stats.errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            raise
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def _load(self, layer, chunk: Chunk) -> bytes:
        stats = self.stats[layer.index]
        data, fetched_bytes = await trio.to_thread.run_sync(
            self._load_blocking, layer, chunk, limiter=self._limiter)
        if fetched_bytes:
            stats.cache_misses += 1
            stats.chunks_fetched += 1
            stats.bytes_fetched += fetched_bytes
        else:
            stats.cache_hits += 1
        return data

    def _load_blocking(self, layer, chunk: Chunk) -> tuple[bytes, int]:
        """(verified chunk bytes, compressed bytes fetched: 0 for a disk cache hit)."""
        if chunk.digest and self.cache is not None:
            cached = self.cache.get(chunk.digest)
            if cached is not None:
                return cached, 0
        length = chunk.blob_end - chunk.blob_offset
        member = layer.source.read(chunk.blob_offset, length)
        data = layer.codec.decompress_prefix(member, chunk.inner_offset + chunk.size)
        data = data[chunk.inner_offset:]
        if chunk.digest:
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != chunk.digest:
                raise VerificationError(
                    f"{layer.spec.label}: chunk at blob offset {chunk.blob_offset} has digest "
                    f"{actual}, the TOC says {chunk.digest}")
            self._store(chunk.digest, data)
        elif layer.verified:
            # A verified layer without a chunk digest cannot be served: that is the rule.
            raise VerificationError(f"{layer.spec.label}: chunk at blob offset "
                                    f"{chunk.blob_offset} has no digest in the TOC")
        return data, length

    def _store(self, digest: str, data: bytes) -> None:
        """Cache a verified chunk. A cache that cannot store (full disk) costs a refetch later,
        not this read: the bytes in hand are verified, so they are still served."""
        if self.cache is None:
            return
        try:
            self.cache.put(digest, data)
        except CacheError as exc:
            self.cache_errors += 1
            log.warning("could not cache chunk %s: %s", digest, exc)

    def stats_json(self) -> list[dict]:
        return [s.as_json(getattr(layer.source, "requests", 0))
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
