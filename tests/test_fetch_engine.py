"""The fetch engine: range planning, priorities, retries (on trio's MockClock), single flight
across merged requests, prefetch and background fetch in-process, and the HTTP source's
multi-range requests, fallbacks and redirects against real and misbehaving servers."""

from __future__ import annotations

import functools
import random
import threading
import time

import pytest
import trio
import trio.testing

from converter.layer import LayerOptions, convert_layer
from lazyfs.cache import ChunkCache
from lazyfs.errors import FetchError, LazyfsError, NotFound, RangeNotSupported
from lazyfs.fetch import ChunkFetcher
from lazyfs.fetchoptions import FetchOptions, RetryPolicy
from lazyfs.format.estargz import PREFETCH_LANDMARK
from lazyfs.layer import LayerSpec, open_layer
from lazyfs import prefetch
from lazyfs.prefetch import background_fetch, prefetch_and_background, prioritized_chunks
from lazyfs.priority import DemandGauge, Priority, PriorityLimiter
from lazyfs.rangeplan import Span, group_requests, group_spans, merge_ranges, plan_requests
from lazyfs.retry import retrying
from lazyfs.source.http import HttpSource
from tests.servers import PyHttpServer, PyRequest
from tests.tarbuild import file_, tar_of

KiB = 1024
CHUNK = 64 * KiB


# --- range planning ------------------------------------------------------------------------

def spans(*pairs):
    return [Span(start, end, [f"{start}-{end}"]) for start, end in pairs]


def shape(ranges):
    return [(r.blob_start, r.blob_end, [(s.blob_start, s.blob_end) for s in r.spans])
            for r in ranges]


def test_adjacent_spans_merge_into_one_range():
    ranges = merge_ranges(spans((0, 100), (100, 250), (250, 300)), merge_gap_bytes=0)
    assert shape(ranges) == [(0, 300, [(0, 100), (100, 250), (250, 300)])]


def test_gap_threshold_is_inclusive():
    at_threshold = merge_ranges(spans((0, 100), (164, 200)), merge_gap_bytes=64)
    assert shape(at_threshold) == [(0, 200, [(0, 100), (164, 200)])]
    past_threshold = merge_ranges(spans((0, 100), (165, 200)), merge_gap_bytes=64)
    assert shape(past_threshold) == [(0, 100, [(0, 100)]), (165, 200, [(165, 200)])]


def test_merged_ranges_respect_the_size_limit():
    ranges = merge_ranges(spans((0, 40), (40, 80), (80, 120), (120, 160)), merge_gap_bytes=0,
                          max_range_bytes=100)
    assert [(r.blob_start, r.blob_end) for r in ranges] == [(0, 80), (80, 160)]
    # A single span larger than the limit is still fetched, alone.
    ranges = merge_ranges(spans((0, 10), (10, 500), (500, 510)), merge_gap_bytes=0,
                          max_range_bytes=100)
    assert [(r.blob_start, r.blob_end) for r in ranges] == [(0, 10), (10, 500), (500, 510)]


def test_overlapping_spans_always_merge():
    # Ranges of one multi-range request must not overlap, whatever the limits say.
    ranges = merge_ranges(spans((0, 100), (50, 150)), merge_gap_bytes=0, max_range_bytes=10)
    assert [(r.blob_start, r.blob_end) for r in ranges] == [(0, 150)]


def test_chunks_sharing_a_member_share_a_span():
    grouped = group_spans([(100, 200, "b"), (0, 100, "a"), (100, 200, "c")])
    assert [(s.blob_start, s.blob_end, s.items) for s in grouped] == \
        [(0, 100, ["a"]), (100, 200, ["b", "c"])]
    with pytest.raises(ValueError):
        group_spans([(5, 5, "empty")])


def test_ranges_group_into_requests_by_count_and_bytes():
    ranges = merge_ranges(spans(*[(i * 1000, i * 1000 + 100) for i in range(7)]),
                          merge_gap_bytes=64)
    assert len(ranges) == 7
    assert [len(r.ranges) for r in group_requests(ranges, max_ranges=3)] == [3, 3, 1]
    assert [len(r.ranges) for r in group_requests(ranges, max_ranges=32,
                                                  max_request_bytes=250)] == [2, 2, 2, 1]
    [one] = plan_requests(spans((0, 100), (100, 200), (5000, 5100)), merge_gap_bytes=64,
                          max_ranges=32)
    assert [(r.blob_start, r.blob_end) for r in one.ranges] == [(0, 200), (5000, 5100)]
    assert one.length == 300


# --- priorities ------------------------------------------------------------------------------

def test_limiter_serves_demand_then_prefetch_then_background():
    order = []

    async def main():
        limiter = PriorityLimiter(2)
        await limiter.acquire(Priority.DEMAND)
        await limiter.acquire(Priority.DEMAND)

        async def waiter(priority, name):
            async with limiter.slot(priority):
                order.append(name)
                await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            for priority, name in [(Priority.BACKGROUND, "bg1"), (Priority.PREFETCH, "pre"),
                                   (Priority.BACKGROUND, "bg2"), (Priority.DEMAND, "demand")]:
                nursery.start_soon(waiter, priority, name)
                await trio.sleep(0.01)
            assert limiter.waiting() == 4 and limiter.waiting(Priority.BACKGROUND) == 2
            limiter.release(Priority.DEMAND)
            await trio.sleep(0.01)
            limiter.release(Priority.DEMAND)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # Background holds at most slots - 1 = 1 slot: bg2 waits for bg1 although a slot is free.
    assert order == ["demand", "pre", "bg1", "bg2"]


def test_background_always_leaves_a_slot_for_demand():
    async def main():
        limiter = PriorityLimiter(3)
        await limiter.acquire(Priority.BACKGROUND)
        await limiter.acquire(Priority.BACKGROUND)
        with trio.move_on_after(1) as scope:
            await limiter.acquire(Priority.BACKGROUND)
        assert scope.cancelled_caught and limiter.waiting() == 0
        with trio.fail_after(1):
            await limiter.acquire(Priority.DEMAND)  # immediately
        assert limiter.in_use == 3

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_demand_gauge_holds_background_until_idle():
    events = []

    async def main():
        gauge = DemandGauge()

        async def background():
            await gauge.wait_idle()
            events.append(("background", trio.current_time()))

        async with trio.open_nursery() as nursery:
            with gauge.busy():
                nursery.start_soon(background)
                await trio.sleep(5)
                events.append(("demand done", trio.current_time()))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert events == [("demand done", 5.0), ("background", 5.0)]


def test_wait_quiet_waits_for_a_pause_in_reads_counted_from_the_call():
    async def main():
        gauge = DemandGauge()
        started = trio.current_time()

        async def reads_every(interval_s, until_s):
            while trio.current_time() - started < until_s:
                gauge.saw_read()
                await trio.sleep(interval_s)

        # Nothing read yet: the quiet period still counts from the call (a program about to
        # start must not find the background fetch running).
        await gauge.wait_quiet(1.0, 30.0)
        assert trio.current_time() - started == 1.0
        # Reads every 0.3 s for 2 s: the quiet second starts at the last one.
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reads_every, 0.3, 2.0)
            await gauge.wait_quiet(1.0, 30.0)
            waited_s = trio.current_time() - started
        assert waited_s == pytest.approx(1.8 + 1.0)
        # A program that never pauses: max_wait_s bounds the wait.
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reads_every, 0.3, 100.0)
            await gauge.wait_quiet(1.0, 30.0)
            assert trio.current_time() - started == pytest.approx(30.0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_background_fetch_starts_once_reads_pause(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(background_quiet_s=0.5))
    read_times = []

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(prefetch_and_background, fetcher, stay=False))
            for _ in range(8):  # a program reading its prefetched files for ~0.8 s
                assert await fetcher.read(layer, files["p1"].chunks, 0, 100) == \
                    content["p1"][:100]
                read_times.append(time.monotonic())
                await trio.sleep(0.1)

    trio.run(main)
    # The prefetch was the only request while the program read; the background requests
    # came half a second after its last read, and made the layer local.
    stats = fetcher.stats[0]
    assert stats.background_done and len(source.calls) > 1
    assert source.call_times[0] < read_times[0]
    assert source.call_times[1] - read_times[-1] >= 0.5 - 0.02


# --- retries on the mock clock -------------------------------------------------------------

def run_retrying(policy, errors, seed=0):
    """Run retrying() over an attempt that raises `errors` in turn, then succeeds. Returns
    (result or the exception raised, the attempt times)."""
    times = []
    errors = list(errors)

    async def attempt():
        times.append(trio.current_time())
        if errors:
            raise errors.pop(0)
        return "ok"

    async def main():
        try:
            return await retrying(attempt, policy, rng=random.Random(seed))
        except LazyfsError as exc:
            return exc

    result = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return result, [b - a for a, b in zip(times, times[1:])]


def retriable():
    return FetchError("connection reset", retriable=True)


def test_backoff_sequence_is_exponential_with_bounded_jitter():
    policy = RetryPolicy(retries=4, first_delay_s=0.2, max_delay_s=10)
    result, waits = run_retrying(policy, [retriable() for _ in range(4)])
    assert result == "ok"
    assert len(waits) == 4
    for retry, wait in enumerate(waits):
        ceiling = 0.2 * 2 ** retry
        assert ceiling / 2 <= wait <= ceiling, (retry, wait)
        assert policy.delay_bounds_s(retry) == pytest.approx((ceiling / 2, ceiling))
    # Exactly the policy's draws from the same random sequence (nothing else sleeps).
    rng = random.Random(0)
    assert waits == pytest.approx([policy.delay_s(n, rng) for n in range(4)])


def test_backoff_is_capped():
    policy = RetryPolicy(retries=6, first_delay_s=1, max_delay_s=3)
    _, waits = run_retrying(policy, [retriable() for _ in range(6)])
    assert [policy.delay_bounds_s(n)[1] for n in range(6)] == [1, 2, 3, 3, 3, 3]
    assert all(1.5 <= wait <= 3 for wait in waits[2:])


def test_gives_up_after_the_retries():
    policy = RetryPolicy(retries=3, first_delay_s=0.1)
    result, waits = run_retrying(policy, [retriable() for _ in range(10)])
    assert isinstance(result, FetchError) and result.retriable
    assert "gave up after 4 attempts" in str(result)
    assert "connection reset" in str(result)
    assert len(waits) == 3
    assert sum(waits) <= 0.1 + 0.2 + 0.4


def test_no_retry_on_non_retriable_errors():
    for error in (FetchError("HTTP 403", retriable=False), NotFound("gone"),
                  RangeNotSupported("ignored Range")):
        result, waits = run_retrying(RetryPolicy(retries=5), [error])
        assert result is error and waits == []


def test_zero_retries_raises_the_first_error_unchanged():
    error = retriable()
    result, waits = run_retrying(RetryPolicy(retries=0), [error])
    assert result is error and waits == []


def test_retry_after_is_respected_within_the_cap():
    error = retriable()
    error.retry_after_s = 2.0
    _, waits = run_retrying(RetryPolicy(retries=1, first_delay_s=0.1, max_delay_s=5), [error])
    assert waits == [pytest.approx(2.0)]
    error = retriable()
    error.retry_after_s = 3600.0
    _, waits = run_retrying(RetryPolicy(retries=1, first_delay_s=0.1, max_delay_s=5), [error])
    assert waits == [pytest.approx(5.0)]


# --- the fetcher over an in-memory source ----------------------------------------------------

class MemorySource:
    """A blob in memory with multi-range reads: logs each call's ranges, can be held (gate),
    and can fail calls (`failures`: exceptions raised by the next calls, before any byte, or
    after `cut_after` ranges were delivered)."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.calls: list[list[tuple[int, int]]] = []
        self.call_times: list[float] = []  # time.monotonic() of each call
        self.requests = 0
        self.failures: list[Exception] = []
        self.cut_after: int | None = None
        self.hold_after_bytes: int | None = None  # stop there until `resume` is set
        self.resume = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def size(self) -> int:
        return len(self.data)

    def read(self, blob_offset: int, length: int) -> bytes:
        return b"".join(piece for _, piece in self.read_ranges([(blob_offset, length)]))

    def read_ranges(self, ranges):
        with self._lock:
            self.calls.append(list(ranges))
            self.call_times.append(time.monotonic())
            self.requests += 1
            failure = self.failures.pop(0) if self.failures else None
        self.entered.set()
        assert self.gate.wait(10)
        cut_after, self.cut_after = self.cut_after, None
        if failure is not None and cut_after is None:
            raise failure
        sent = 0
        for index, (blob_offset, length) in enumerate(ranges):
            if failure is not None and index >= cut_after:
                raise failure
            for start in range(blob_offset, blob_offset + length, 16 * KiB):
                if self.hold_after_bytes is not None and sent >= self.hold_after_bytes:
                    assert self.resume.wait(10)
                piece = bytes(self.data[start:min(start + 16 * KiB, blob_offset + length)])
                sent += len(piece)
                yield index, piece

    def describe(self) -> str:
        return "memory"


@pytest.fixture
def setup(tmp_path):
    """(source, cache, layer, {path: entry}, {path: content}); four 3-chunk files and two
    prioritized small files, chunks of 64 KiB of random bytes (members barely compress)."""
    rng = random.Random(3)
    content = {f"f{i}": rng.randbytes(3 * CHUNK) for i in range(4)}
    content.update({"p1": b"first\n" * 100, "p2": rng.randbytes(CHUNK + 5)})
    src = tar_of(tmp_path, *(file_(name, data) for name, data in content.items()))
    out = tmp_path / "layer.esgz"
    result = convert_layer(str(src), str(out), LayerOptions(
        chunk_size=CHUNK, compression_level=1, prioritized_files=("p1", "p2")))
    source = MemorySource(out.read_bytes())
    cache = ChunkCache(str(tmp_path / "cache"))
    layer = open_layer(0, LayerSpec(source, result.toc_digest, "test"), cache)
    source.calls.clear()
    source.call_times.clear()
    return source, cache, layer, {item.path: item for item in layer.entries}, content


def fast(**changes) -> FetchOptions:
    """Options whose retries wait little (real clock tests)."""
    return FetchOptions(retry=RetryPolicy(retries=3, first_delay_s=0.001), **changes)


def member_range(chunks):
    return (chunks[0].blob_offset, chunks[-1].blob_end - chunks[0].blob_offset)


def test_a_read_over_several_chunks_is_one_request(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(readahead_bytes=0))
    f1 = files["f1"]
    data = trio.run(fetcher.read, layer, f1.chunks, 10, 3 * CHUNK)
    assert data == content["f1"][10:]
    assert source.calls == [[member_range(f1.chunks)]]


def test_readahead_joins_the_request_of_a_sequential_read(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(readahead_bytes=2 * CHUNK))
    f2 = files["f2"]

    async def main():
        # As the kernel reads: 16 KiB pieces from the start, in order.
        out = b""
        for offset in range(0, 3 * CHUNK, 16 * KiB):
            out += await fetcher.read(layer, f2.chunks, offset, 16 * KiB)
        return out

    assert trio.run(main) == content["f2"]
    assert source.calls == [[member_range(f2.chunks)]]
    # A read elsewhere (not sequential) fetches only its own chunk.
    source.calls.clear()
    f3 = files["f3"]
    data = trio.run(fetcher.read, layer, f3.chunks, CHUNK + 5, 10)
    assert data == content["f3"][CHUNK + 5:CHUNK + 15]
    assert source.calls == [[member_range(f3.chunks[1:2])]]


def test_a_read_returns_before_its_readahead_is_in(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(readahead_bytes=2 * CHUNK))
    f2 = files["f2"]
    # The answer stalls after the first chunk's member: the read needs only that one.
    source.hold_after_bytes = f2.chunks[0].blob_end - f2.chunks[0].blob_offset

    async def main():
        async with fetcher.running():
            with trio.fail_after(5):
                data = await fetcher.read(layer, f2.chunks, 0, 100)
            assert not source.resume.is_set()
            source.resume.set()
            # The readahead went on without the reader: the next read is from memory.
            data += await fetcher.read(layer, f2.chunks, 100, 3 * CHUNK)
            return data

    assert trio.run(main) == content["f2"]
    assert source.calls == [[member_range(f2.chunks)]]


def test_distant_chunks_share_one_multi_range_request(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(readahead_bytes=0, merge_gap_bytes=0))
    f0 = files["f0"]
    # The middle chunk first; then a read of the whole file needs chunks 0 and 2, with the
    # middle chunk's member (more than the allowed gap of 0 bytes) between them.
    trio.run(fetcher.read, layer, f0.chunks, CHUNK, 1)
    source.calls.clear()
    assert trio.run(fetcher.read, layer, f0.chunks, 0, 3 * CHUNK) == content["f0"]
    assert source.calls == [[member_range(f0.chunks[:1]), member_range(f0.chunks[2:])]]


def test_single_flight_across_merged_requests(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(readahead_bytes=0))
    f1, f2 = files["f1"], files["f2"]
    results = {}

    async def read(name, item, offset, size):
        results[name] = await fetcher.read(layer, item.chunks, offset, size)

    async def main():
        source.gate.clear()
        async with trio.open_nursery() as nursery:
            # One merged request for all of f1 and f2 (adjacent in the blob)...
            nursery.start_soon(fetcher.get_chunks, layer, f1.chunks + f2.chunks, Priority.DEMAND)
            await trio.to_thread.run_sync(source.entered.wait)
            # ...then readers of single chunks inside it, while it is on the wire.
            nursery.start_soon(read, "f1 middle", f1, CHUNK + 7, 100)
            nursery.start_soon(read, "f2 end", f2, 3 * CHUNK - 50, 50)
            nursery.start_soon(read, "f2 all", f2, 0, 3 * CHUNK)
            await trio.sleep(0.1)
            assert len(source.calls) == 1
            source.gate.set()

    trio.run(main)
    assert source.calls == [[member_range(f1.chunks + f2.chunks)]]
    assert results == {"f1 middle": content["f1"][CHUNK + 7:CHUNK + 107],
                       "f2 end": content["f2"][-50:], "f2 all": content["f2"]}


def test_retriable_failures_are_retried_with_backoff(setup):
    source, cache, layer, files, content = setup
    policy = RetryPolicy(retries=3, first_delay_s=1.0)
    fetcher = ChunkFetcher([layer], cache, options=FetchOptions(retry=policy, readahead_bytes=0))
    source.failures = [FetchError("reset", retriable=True), FetchError("503", retriable=True)]

    async def main():
        start = trio.current_time()
        data = await fetcher.read(layer, files["f0"].chunks, 0, CHUNK)
        return data, trio.current_time() - start

    data, elapsed_s = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert data == content["f0"][:CHUNK]
    assert len(source.calls) == 3 and fetcher.stats[0].retries == 2
    assert 0.5 + 1.0 <= elapsed_s <= 1.0 + 2.0  # two waits, each within its jitter bounds


def test_retries_give_up_and_the_error_is_not_sticky(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=FetchOptions(
        retry=RetryPolicy(retries=2, first_delay_s=1.0), readahead_bytes=0))
    source.failures = [FetchError("reset", retriable=True)] * 3
    clock = trio.testing.MockClock(autojump_threshold=0)
    with pytest.raises(FetchError, match="gave up after 3 attempts"):
        trio.run(fetcher.read, layer, files["f0"].chunks, 0, 10, clock=clock)
    assert len(source.calls) == 3
    assert "gave up" in fetcher.stats[0].last_error
    assert trio.run(fetcher.read, layer, files["f0"].chunks, 0, 10) == content["f0"][:10]


def test_non_retriable_failure_is_not_retried(setup):
    source, cache, layer, files, _ = setup
    fetcher = ChunkFetcher([layer], cache, options=fast())
    source.failures = [RangeNotSupported("server ignored the Range header")]
    with pytest.raises(RangeNotSupported):
        trio.run(fetcher.read, layer, files["f0"].chunks, 0, 10)
    assert len(source.calls) == 1


def test_a_retry_asks_only_for_what_is_missing(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(readahead_bytes=0, merge_gap_bytes=0))
    f0 = files["f0"]
    trio.run(fetcher.read, layer, f0.chunks, CHUNK, 1)  # chunk 1 in memory: two ranges needed
    source.calls.clear()
    source.failures = [FetchError("cut", retriable=True)]
    source.cut_after = 1  # the first range arrives, then the connection is cut
    assert trio.run(fetcher.read, layer, f0.chunks, 0, 3 * CHUNK) == content["f0"]
    first, second = member_range(f0.chunks[:1]), member_range(f0.chunks[2:])
    assert source.calls == [[first, second], [second]]


# --- prefetch and background fetch -------------------------------------------------------------

def test_prioritized_chunks_are_everything_before_the_landmark(setup):
    _, _, layer, files, _ = setup
    paths = [item.path for item in layer.entries]
    assert paths.index("p1") < paths.index("p2") < paths.index(PREFETCH_LANDMARK)
    chunks = prioritized_chunks(layer.entries)
    assert chunks == files["p1"].chunks + files["p2"].chunks
    plain = [item for item in layer.entries if item.path != PREFETCH_LANDMARK]
    assert prioritized_chunks(plain) == []


def test_prefetch_is_one_request_and_readers_wait_for_it(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(background_fetch=False))
    got = {}

    async def reader(name):
        got[name] = await fetcher.read(layer, files[name].chunks, 0, 1 << 20)

    async def main():
        source.gate.clear()
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(prefetch_and_background, fetcher, stay=False))
            # The prefetch has claimed its chunks: these readers must not fetch themselves.
            nursery.start_soon(reader, "p2")
            nursery.start_soon(reader, "p1")
            await trio.sleep(0.05)
            source.gate.set()

    trio.run(main)
    assert got == {"p1": content["p1"], "p2": content["p2"]}
    assert source.calls == [[member_range(files["p1"].chunks + files["p2"].chunks)]]
    stats = fetcher.stats[0]
    assert stats.prefetch_done and stats.chunks_prefetched == 3
    assert all(cache.contains(c.digest) for c in files["p1"].chunks + files["p2"].chunks)


def test_no_prefetch_option(setup):
    source, cache, layer, files, _ = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(prefetch=False, background_fetch=False))
    trio.run(functools.partial(prefetch_and_background, fetcher, stay=False))
    assert source.calls == []


def test_background_fetch_makes_the_layer_local(setup):
    source, cache, layer, files, content = setup
    fetcher = ChunkFetcher([layer], cache, options=fast(background_request_bytes=4 * CHUNK))
    trio.run(functools.partial(prefetch_and_background, fetcher, stay=False))
    all_chunks = [c for item in layer.entries for c in item.chunks]
    assert all(cache.contains(c.digest) for c in all_chunks)
    stats = fetcher.stats[0]
    assert stats.background_done and stats.background_chunks_left == 0
    assert stats.background_bytes > 0 and stats.errors == 0
    # Requests of at most 4 chunks' worth (one member may straddle the bound), none repeated.
    assert all(sum(length for _, length in call) <= 5 * CHUNK for call in source.calls[1:])
    fetched = sorted(r for call in source.calls for r in call)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(fetched, fetched[1:]))
    # Everything is local now: a new fetcher (a remount) reads without a request.
    source.calls.clear()
    remount = ChunkFetcher([layer], cache, options=fast())
    assert trio.run(remount.read, layer, files["f3"].chunks, 0, 3 * CHUNK) == content["f3"]
    assert source.calls == []


def test_background_fetch_waits_while_reads_are_fetching(setup):
    source, cache, layer, files, _ = setup
    fetcher = ChunkFetcher([layer], cache, options=fast())

    async def main():
        async with trio.open_nursery() as nursery:
            with fetcher.demand.busy():
                nursery.start_soon(background_fetch, fetcher)
                for _ in range(50):
                    await trio.sleep(0.001)
                assert source.calls == []  # paused: a program is waiting for data
            # Idle again: the background fetch proceeds.

    trio.run(main)
    assert fetcher.stats[0].background_done


def test_background_bandwidth_cap(setup):
    source, cache, layer, _, _ = setup
    rate = 100 * KiB  # bytes per second
    fetcher = ChunkFetcher([layer], cache, options=fast(
        prefetch=False, background_bytes_per_s=rate))

    async def main():
        start = trio.current_time()
        await background_fetch(fetcher)
        return trio.current_time() - start

    elapsed_s = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    total = sum(length for call in source.calls for _, length in call)
    last = sum(length for _, length in source.calls[-1])
    # Paced: every request but the last has waited out its bytes at the capped rate.
    assert (total - last) / rate <= elapsed_s <= total / rate + 1
    # Requests are kept to about a second of the budget (a member may straddle the bound).
    assert all(sum(length for _, length in call) <= rate + CHUNK + 1024
               for call in source.calls)


def test_background_errors_are_recorded_not_raised(setup, monkeypatch):
    source, cache, layer, files, _ = setup
    monkeypatch.setattr(prefetch, "FIRST_PASS_PAUSE_S", 0.01)
    fetcher = ChunkFetcher([layer], cache, options=fast(prefetch=False))
    source.failures = [FetchError("HTTP 403 Forbidden", retriable=False)]
    passes = []

    async def main():
        with trio.fail_after(10):
            await background_fetch(fetcher)

    original = prefetch._background_layer

    async def counted(*args):
        passes.append(fetcher.stats[0].last_error)
        return await original(*args)

    monkeypatch.setattr(prefetch, "_background_layer", counted)
    trio.run(main)
    stats = fetcher.stats[0]
    # The first pass met the error and recorded it; the next pass, after the pause, fetched
    # what was missing: the failure was not sticky, and nothing was raised.
    assert passes == ["", "FetchError: HTTP 403 Forbidden"]
    assert "403" in stats.last_error and stats.errors == 1
    assert stats.background_done and stats.background_chunks_left == 0


# --- the HTTP source: multi-range, fallbacks, redirects -----------------------------------------

BLOB = random.Random(0).randbytes(256 * KiB + 17)
RANGES = [(0, 100), (5000, 1000), (70_000, 65_536), (256 * KiB, 17)]


def collect(source, ranges):
    parts = [b""] * len(ranges)
    for index, piece in source.read_ranges(ranges):
        parts[index] += piece
    return parts


def expected(ranges):
    return [BLOB[offset:offset + length] for offset, length in ranges]


def test_multi_range_request_against_nginx(nginx):
    (nginx.root / "blob").write_bytes(BLOB)
    with HttpSource(nginx.url + "/blob") as source:
        nginx.clear_log()
        assert collect(source, RANGES) == expected(RANGES)
        assert source.multi_range is True
        # Keep-alive survives a multipart answer.
        assert source.read(10, 10) == BLOB[10:20]
    first, second = nginx.requests()
    assert first.status == 206
    assert first.range == "bytes=" + ",".join(f"{o}-{o + n - 1}" for o, n in RANGES)
    assert first.connection == second.connection


def test_a_server_without_multi_range_gets_single_ranges(tmp_path):
    (tmp_path / "blob").write_bytes(BLOB)
    # PyHttpServer understands only "bytes=a-b": a list of ranges gets 200 and the whole body.
    with PyHttpServer(tmp_path) as server, HttpSource(server.url + "/blob") as source:
        assert collect(source, RANGES) == expected(RANGES)
        assert source.multi_range is False
        assert collect(source, RANGES[:2]) == expected(RANGES[:2])  # remembered: no new try
        ranges = [request.headers.get("Range") for request in server.received]
    assert ranges == ["bytes=0-99,5000-5999,70000-135535,262144-262160", "bytes=0-99",
                      "bytes=5000-5999", "bytes=70000-135535", "bytes=262144-262160",
                      "bytes=0-99", "bytes=5000-5999"]


class _MultipartServer(PyHttpServer):
    """Answers lists of ranges with multipart/byteranges; `mangle(parts)` may break it."""

    def _handle(self, handler, head):
        header = handler.headers.get("Range", "")
        if "," not in header:
            return super()._handle(handler, head)
        self.received.append(_request(handler))
        data = BLOB
        body = b""
        for part in header.removeprefix("bytes=").split(","):
            first, last = map(int, part.split("-"))
            body += (b"\r\n--XYZ\r\nContent-Type: application/octet-stream\r\n"
                     + f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n".encode()
                     + data[first:last + 1])
        body += b"\r\n--XYZ--\r\n"
        self.send(handler, 206, {"Content-Type": self.content_type}, self.mangle(body))

    content_type = "multipart/byteranges; boundary=XYZ"

    def mangle(self, body: bytes) -> bytes:
        return body


def _request(handler):
    return PyRequest(handler.command, handler.path, dict(handler.headers))


class _BadSecondBoundary(_MultipartServer):
    def mangle(self, body):
        second = body.find(b"--XYZ", body.find(b"--XYZ") + 1)
        return body[:second] + b"--ABC" + body[second + 5:]


class _WrongPartRange(_MultipartServer):
    def mangle(self, body):
        return body.replace(b"Content-Range: bytes 5000-5999", b"Content-Range: bytes 5001-6000")


def test_our_multipart_parser_on_a_quoted_boundary_and_preamble(tmp_path):
    (tmp_path / "blob").write_bytes(BLOB)

    class Quoted(_MultipartServer):
        content_type = 'multipart/byteranges; boundary="XYZ"; charset=ignored'

        def mangle(self, body):
            return b"this is a preamble\r\n" + body

    with Quoted(tmp_path) as server, HttpSource(server.url + "/blob") as source:
        assert collect(source, RANGES) == expected(RANGES)
        assert source.multi_range is True


@pytest.mark.parametrize("server_class", [_BadSecondBoundary, _WrongPartRange])
def test_a_malformed_multipart_answer_falls_back_without_refetching(tmp_path, server_class):
    (tmp_path / "blob").write_bytes(BLOB)
    with server_class(tmp_path) as server, HttpSource(server.url + "/blob") as source:
        assert collect(source, RANGES) == expected(RANGES)
        assert source.multi_range is False
        ranges = [request.headers.get("Range") for request in server.received]
    # The first part was delivered from the multipart answer; only the rest is asked again.
    assert ranges[0].count(",") == 3
    assert ranges[1:] == ["bytes=5000-5999", "bytes=70000-135535", "bytes=262144-262160"]


class _RedirectServer(PyHttpServer):
    """/blob redirects to /signed/N/blob (N counts the redirects); a signed location works
    for `uses` requests, then answers 403 as an expired presigned URL does."""

    uses = 2

    def __init__(self, root):
        super().__init__(root)
        self.redirects = 0
        self.left: dict[str, int] = {}

    def _handle(self, handler, head):
        if handler.path == "/blob":
            self.received.append(_request(handler))
            self.redirects += 1
            location = f"/signed/{self.redirects}/blob"
            self.left[location] = self.uses
            self.send(handler, 307, {"Location": location}, b"", head)
            return
        if handler.path.startswith("/signed/"):
            if self.left.get(handler.path, 0) <= 0:
                self.received.append(_request(handler))
                self.send(handler, 403, {}, b"expired\n", head)
                return
            self.left[handler.path] -= 1
            self.received.append(_request(handler))
            handler.path = "/blob-data"
            recorded = len(self.received)
            super()._handle(handler, head)
            del self.received[recorded]  # the base class's record of the rewritten path
            return
        super()._handle(handler, head)


def test_redirects_are_cached_and_re_resolved_when_expired(tmp_path):
    (tmp_path / "blob-data").write_bytes(BLOB)
    with _RedirectServer(tmp_path) as server, HttpSource(server.url + "/blob") as source:
        for offset in range(0, 5000, 1000):
            assert source.read(offset, 100) == BLOB[offset:offset + 100]
        paths = [request.path for request in server.received]
        assert "hunter" not in source.describe()
    # First read: redirect then the signed location; the second goes straight there; the
    # third finds it expired (403), goes back to /blob once and gets a fresh location.
    assert paths == ["/blob", "/signed/1/blob", "/signed/1/blob", "/signed/1/blob", "/blob",
                     "/signed/2/blob", "/signed/2/blob", "/signed/2/blob", "/blob",
                     "/signed/3/blob"]


# --- keeping the loop awake between requests (lazyfs/awake.py) ---------------------------------

def test_the_loop_polls_for_a_window_after_a_request_then_sleeps():
    from lazyfs.awake import Activity

    busy = [False]
    activity = Activity(0.002, threads_busy=lambda: busy[0])

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(activity.keep_loop_awake)
            await trio.testing.wait_all_tasks_blocked()  # no request yet: asleep
            assert activity.polls == 0
            activity.touch()
            for _ in range(10):
                await trio.sleep(0)
            assert activity.polls >= 5  # awake, polling
            clock.jump(0.003)  # the window has passed
            await trio.testing.wait_all_tasks_blocked()
            polls = activity.polls
            await trio.sleep(0)
            assert activity.polls == polls  # asleep again
            busy[0] = True  # worker threads at work: no spinning (they need the GIL)
            activity.touch()
            for _ in range(10):
                await trio.sleep(0)
            assert activity.polls == polls
            nursery.cancel_scope.cancel()

    clock = trio.testing.MockClock()
    trio.run(main, clock=clock)
