"""The on-disk chunk and TOC cache: real files in tmp_path, several instances standing in for
several processes."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs import cache as cache_mod
from lazyfs.cache import STALE_TEMP_SECONDS, CacheStats, ChunkCache, default_cache_dir
from lazyfs.errors import CacheError


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunk(i: int, size: int = 100) -> tuple[str, bytes]:
    """A distinct chunk of exactly size bytes and its digest."""
    data = (f"chunk {i} ".encode() * size)[:size]
    return digest_of(data), data


def chunk_path(root, digest: str) -> str:
    hex_ = digest.split(":")[1]
    return os.path.join(root, "chunks", "sha256", hex_[:2], hex_)


def toc_path(root, digest: str) -> str:
    return os.path.join(root, "tocs", "sha256", digest.split(":")[1])


def tree(root) -> dict[str, bytes]:
    """Every regular file under root with its content: the whole observable state."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def entries_on_disk(root) -> dict[str, int]:
    """Chunk and TOC files (not tmp/, not VERSION) with their sizes."""
    return {rel: len(data) for rel, data in tree(root).items()
            if rel.startswith(("chunks", "tocs"))}


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_chunk_and_toc(tmp_path):
    c = ChunkCache(str(tmp_path))
    d, data = chunk(1)
    assert c.get(d) is None
    assert not c.contains(d)
    c.put(d, data)
    assert c.contains(d)
    assert c.get(d) == data
    assert os.path.isfile(chunk_path(tmp_path, d))

    toc_d = digest_of(b"the toc json")
    assert c.get_toc(toc_d) is None
    c.put_toc(toc_d, b"opaque record\n\x00\xff")
    assert c.get_toc(toc_d) == b"opaque record\n\x00\xff"
    assert os.path.isfile(toc_path(tmp_path, toc_d))

    assert c.stats == CacheStats(hits=2, misses=2, corrupt=0, evictions=0,
                                 bytes_stored=100 + 32 + 16)
    assert c.usage_bytes() == sum(entries_on_disk(tmp_path).values())
    assert os.listdir(tmp_path / "tmp") == []


def test_empty_chunk_is_a_valid_entry(tmp_path):
    c = ChunkCache(str(tmp_path))
    c.put(digest_of(b""), b"")
    assert c.get(digest_of(b"")) == b""


def test_layout_and_modes(tmp_path):
    root = tmp_path / "a" / "cache"
    c = ChunkCache(str(root))
    d, data = chunk(1)
    c.put(d, data)
    assert (root / "VERSION").read_bytes() == b"1\n"
    for sub in ("", "chunks", "chunks/sha256", "tocs", "tocs/sha256", "tmp",
                "chunks/sha256/" + d[7:9]):
        assert os.stat(root / sub).st_mode & 0o777 == 0o700, sub
    assert os.stat(chunk_path(root, d)).st_mode & 0o777 == 0o600


def test_put_refuses_bytes_that_do_not_match_the_digest(tmp_path):
    c = ChunkCache(str(tmp_path))
    d, _ = chunk(1)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="refusing"):
        c.put(d, b"something else")
    assert tree(tmp_path) == before
    assert c.get(d) is None


def test_a_new_instance_indexes_what_is_on_disk(tmp_path):
    a = ChunkCache(str(tmp_path))
    for i in range(20):
        a.put(*chunk(i))
    a.put_toc(digest_of(b"toc"), b"record")
    # Foreign names are ignored, not counted and not deleted.
    foreign = [tmp_path / "chunks" / "sha256" / "README",
               tmp_path / "chunks" / "sha256" / chunk(0)[0][7:9] / "notes.txt",
               tmp_path / "chunks" / "sha256" / "00" / ("ff" * 32)]  # wrong shard
    for path in foreign:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
    b = ChunkCache(str(tmp_path))
    assert b.usage_bytes() == a.usage_bytes() == 20 * 100 + 32 + 6
    assert all(path.exists() for path in foreign)


# -- corruption ------------------------------------------------------------------------------------


def flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def empty(path):
    os.truncate(path, 0)


def grow(path):
    with open(path, "ab") as f:
        f.write(b"trailing junk")


@pytest.mark.parametrize("damage", [flip_a_byte, truncate, empty, grow])
def test_a_corrupt_chunk_is_removed_and_reported_as_a_miss(tmp_path, damage):
    c = ChunkCache(str(tmp_path))
    d, data = chunk(1)
    c.put(d, data)
    damage(chunk_path(tmp_path, d))

    assert c.get(d) is None
    assert not os.path.exists(chunk_path(tmp_path, d))
    assert c.stats.corrupt == 1 and c.stats.misses == 1 and c.stats.hits == 0
    assert c.usage_bytes() == 0
    assert c.get(d) is None  # now a plain miss
    assert c.stats.corrupt == 1 and c.stats.misses == 2

    c.put(d, data)
    assert c.get(d) == data


@pytest.mark.parametrize("damage", [flip_a_byte, truncate, empty, grow])
def test_a_corrupt_toc_record_is_removed_and_reported_as_a_miss(tmp_path, damage):
    c = ChunkCache(str(tmp_path))
    toc_d = digest_of(b"toc")
    c.put_toc(toc_d, b"a record of some length")
    damage(toc_path(tmp_path, toc_d))
    assert c.get_toc(toc_d) is None
    assert not os.path.exists(toc_path(tmp_path, toc_d))
    assert c.stats.corrupt == 1
    c.put_toc(toc_d, b"a record of some length")
    assert c.get_toc(toc_d) == b"a record of some length"


def test_put_over_a_corrupt_file_heals_it(tmp_path):
    c = ChunkCache(str(tmp_path))
    d, data = chunk(1)
    c.put(d, data)
    flip_a_byte(chunk_path(tmp_path, d))
    c.put(d, data)  # no get in between
    assert c.get(d) == data
    assert c.stats.corrupt == 0


def test_a_symlink_in_the_cache_is_not_followed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"not in the cache")
    root = tmp_path / "cache"
    c = ChunkCache(str(root))
    d = digest_of(b"not in the cache")
    path = chunk_path(root, d)
    os.makedirs(os.path.dirname(path))
    os.symlink(secret, path)
    with pytest.raises(CacheError):
        c.get(d)
    assert secret.read_bytes() == b"not in the cache"


# -- temp files ------------------------------------------------------------------------------------


def test_a_partial_temp_file_is_never_an_entry_and_is_cleaned_when_old(tmp_path):
    ChunkCache(str(tmp_path))
    d, data = chunk(1)
    # What a process killed in the middle of put leaves behind, named like ours.
    old = tmp_path / "tmp" / f"chunk.99999.dead{d[7:15]}.tmp"
    old.write_bytes(data[:40])
    hour_ago = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(old, (hour_ago, hour_ago))
    fresh = tmp_path / "tmp" / "chunk.99998.live.tmp"  # a live writer in another process
    fresh.write_bytes(data[:40])

    c = ChunkCache(str(tmp_path))
    assert not old.exists()
    assert fresh.exists()
    assert c.get(d) is None and not c.contains(d)
    assert c.usage_bytes() == 0


# -- eviction --------------------------------------------------------------------------------------


def test_lru_eviction_keeps_the_recently_used(tmp_path):
    c = ChunkCache(str(tmp_path), max_bytes=1000)
    chunks = [chunk(i) for i in range(11)]
    for d, data in chunks[:10]:
        c.put(d, data)
    assert c.usage_bytes() == 1000  # at the bound, not over it: nothing evicted
    assert c.get(chunks[0][0]) == chunks[0][1]  # chunk 0 is now the most recently used

    c.put(*chunks[10])  # 1100 > 1000: evict the LRU until <= 900

    assert c.stats.evictions == 2
    assert c.usage_bytes() == 900 == sum(entries_on_disk(tmp_path).values())
    assert [c.contains(d) for d, _ in chunks] == [True, False, False] + [True] * 8


def test_the_bound_holds_over_many_puts(tmp_path):
    rng = random.Random(7)
    c = ChunkCache(str(tmp_path), max_bytes=5000)
    for i in range(300):
        c.put(*chunk(i, size=rng.randrange(1, 700)))
        if rng.random() < 0.5:
            c.get(chunk(rng.randrange(i + 1))[0])
        on_disk = sum(entries_on_disk(tmp_path).values())
        assert on_disk == c.usage_bytes() <= 5000
    assert c.stats.evictions > 0


def test_tocs_are_evicted_last(tmp_path):
    c = ChunkCache(str(tmp_path), max_bytes=1000)
    toc_d = digest_of(b"toc")
    c.put_toc(toc_d, b"r" * 68)  # 100 bytes on disk, the oldest entry
    for i in range(10):
        c.put(*chunk(i))
    assert c.get_toc(toc_d) == b"r" * 68
    assert c.stats.evictions > 0
    # Every chunk goes before any TOC, even the one just put.
    c.put(*chunk(99, size=850))
    assert c.get_toc(toc_d) == b"r" * 68
    assert c.usage_bytes() == 100 == sum(entries_on_disk(tmp_path).values())
    # TOCs count against the bound: when only TOCs are left, the oldest ones go.
    tocs = [digest_of(b"toc %d" % i) for i in range(10)]
    for d in tocs:
        c.put_toc(d, b"r" * 68)
    assert c.get_toc(toc_d) is None and c.get_toc(tocs[0]) is None
    assert all(c.get_toc(d) is not None for d in tocs[1:])
    assert c.usage_bytes() == 900


def test_eviction_sees_the_other_processes_uses(tmp_path):
    a = ChunkCache(str(tmp_path), max_bytes=1000)
    b = ChunkCache(str(tmp_path), max_bytes=1000)
    chunks = [chunk(i) for i in range(11)]
    for d, data in chunks[:10]:
        a.put(d, data)
    assert b.get(chunks[0][0]) == chunks[0][1]  # used by "another process": its mtime moves
    a.put(*chunks[10])
    assert [a.contains(d) for d, _ in chunks] == [True, False, False] + [True] * 8


def test_eviction_tolerates_files_already_evicted_elsewhere(tmp_path):
    a = ChunkCache(str(tmp_path), max_bytes=1000)
    chunks = [chunk(i) for i in range(12)]
    for d, data in chunks[:10]:
        a.put(d, data)
    for d, _ in chunks[:5]:  # another process evicted these behind a's back
        os.unlink(chunk_path(tmp_path, d))
    a.put(*chunks[10])  # a's view is 1100: it rescans, finds 600 and evicts nothing
    assert a.stats.evictions == 0
    assert a.usage_bytes() == 600 == sum(entries_on_disk(tmp_path).values())


# -- range reads -----------------------------------------------------------------------------------

BLOCK = 1024  # small blocks in these tests, so that a chunk of a few KiB has several


def big_chunk(i: int, size: int = 10 * BLOCK + 123) -> tuple[str, bytes]:
    """Random bytes (a flipped byte anywhere changes its block's digest), not a block multiple."""
    data = random.Random(i).randbytes(size)
    return digest_of(data), data


def ranges(size: int, count: int = 200, seed: int = 0) -> list[tuple[int, int]]:
    """(offset, length) pairs: random ones and every edge (block boundaries, the chunk's end)."""
    rng = random.Random(seed)
    out = [(0, size), (0, 1), (size - 1, 1), (size - 1, 100), (BLOCK - 1, 2), (BLOCK, BLOCK),
           (BLOCK - 1, BLOCK + 2), (0, 0), (size, 10), (size + 5, 1), (3 * BLOCK, 0)]
    for _ in range(count):
        offset = rng.randrange(size)
        out.append((offset, rng.choice([1, 4096, rng.randrange(1, size + 1)])))
    return out


@pytest.mark.parametrize("how", ["put", "put-verified", "get-in-a-new-instance"])
def test_read_range_returns_the_chunk_bytes_at_any_offset(tmp_path, how):
    c = ChunkCache(str(tmp_path), block_size=BLOCK)
    d, data = big_chunk(1)
    c.put(d, data, verified=(how == "put-verified"))
    if how == "get-in-a-new-instance":  # another process stored it: get records the blocks
        c = ChunkCache(str(tmp_path), block_size=BLOCK)
        assert c.read_range(d, 0, 10) is None
        assert c.get(d) == data
    for offset, length in ranges(len(data)):
        assert c.read_range(d, offset, length) == data[offset:offset + length], (offset, length)
    assert c.stats.corrupt == 0 and c.stats.misses == 0
    assert c.stats.range_hits > 0


def test_read_range_reads_only_the_covering_blocks(tmp_path, monkeypatch):
    c = ChunkCache(str(tmp_path), block_size=BLOCK)
    d, data = big_chunk(1)
    c.put(d, data)
    reads = []
    real_pread = os.pread

    def pread(fd, n, offset):
        reads.append((n, offset))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(cache_mod.os, "pread", pread)
    assert c.read_range(d, 3 * BLOCK + 10, 100) == data[3 * BLOCK + 10:3 * BLOCK + 110]
    assert c.read_range(d, 2 * BLOCK - 1, 2) == data[2 * BLOCK - 1:2 * BLOCK + 1]
    assert c.read_range(d, len(data) - 5, 100) == data[-5:]
    assert reads == [(BLOCK, 3 * BLOCK), (2 * BLOCK, BLOCK), (len(data) % BLOCK, 10 * BLOCK)]


def test_read_range_without_block_digests_is_none_until_a_get(tmp_path):
    ChunkCache(str(tmp_path), block_size=BLOCK).put(*big_chunk(1))
    c = ChunkCache(str(tmp_path), block_size=BLOCK)  # a new process: no block digests
    d, data = big_chunk(1)
    assert c.read_range(d, 0, 10) is None
    assert c.read_range(digest_of(b"never stored"), 0, 10) is None
    assert c.stats == CacheStats(range_unknown=2)
    assert os.path.exists(chunk_path(tmp_path, d))  # not a miss, not corrupt: left alone
    assert c.get(d) == data
    assert c.read_range(d, 5, 10) == data[5:15]
    assert c.stats.range_hits == 1


@pytest.mark.parametrize("block_index", [0, 4, 10])  # the first, a middle, the short last one
def test_a_corrupt_block_is_detected_and_the_file_removed(tmp_path, block_index):
    c = ChunkCache(str(tmp_path), block_size=BLOCK)
    d, data = big_chunk(1)
    c.put(d, data)
    path = chunk_path(tmp_path, d)
    at = block_index * BLOCK + 7
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([data[at] ^ 0x01]))
    # Blocks other than the damaged one are still served: each was checked.
    other = (block_index + 1) % 11
    assert c.read_range(d, other * BLOCK, 10) == data[other * BLOCK:other * BLOCK + 10]
    # A read that touches the damaged block is not.
    assert c.read_range(d, at - 3, 5) is None
    assert not os.path.exists(path)
    assert c.stats.corrupt == 1 and c.stats.misses == 1
    assert c.usage_bytes() == 0
    # Its block digests are gone with it; a refetch and put bring everything back.
    assert c.read_range(d, 0, 10) is None and c.stats.range_unknown == 1
    c.put(d, data, verified=True)
    assert c.read_range(d, at - 3, 5) == data[at - 3:at + 2]


@pytest.mark.parametrize("damage", [truncate, empty, grow])
def test_a_file_of_the_wrong_size_is_corrupt_whatever_the_range(tmp_path, damage):
    c = ChunkCache(str(tmp_path), block_size=BLOCK)
    d, data = big_chunk(1)
    c.put(d, data)
    damage(chunk_path(tmp_path, d))
    assert c.read_range(d, 0, 10) is None  # the first block is intact in every case
    assert not os.path.exists(chunk_path(tmp_path, d))
    assert c.stats.corrupt == 1


def test_a_missing_file_is_a_miss(tmp_path):
    c = ChunkCache(str(tmp_path), block_size=BLOCK)
    d, data = big_chunk(1)
    c.put(d, data)
    os.unlink(chunk_path(tmp_path, d))  # evicted by another process
    assert c.read_range(d, 0, 10) is None
    assert c.stats.misses == 1 and c.stats.corrupt == 0 and c.usage_bytes() == 0


def test_verified_put_skips_the_whole_chunk_hash(tmp_path, monkeypatch):
    c = ChunkCache(str(tmp_path), block_size=BLOCK)
    d, data = big_chunk(1)
    sha256_calls, block_hashed = [], []
    real_sha256, real_blake3 = hashlib.sha256, cache_mod.blake3

    def sha256(data=b""):
        sha256_calls.append(len(data))
        return real_sha256(data)

    def blake3(data=b""):
        block_hashed.append(len(data))
        return real_blake3(data)

    monkeypatch.setattr(cache_mod.hashlib, "sha256", sha256)
    monkeypatch.setattr(cache_mod, "blake3", blake3)
    c.put(d, data, verified=True)
    blocks = [BLOCK] * 10 + [len(data) % BLOCK]
    assert sha256_calls == [] and block_hashed == blocks  # each block once, nothing else
    block_hashed.clear()
    c.put(d, data)  # unverified: the whole chunk too (fed block by block, in the same pass)
    assert sha256_calls == [0] and block_hashed == blocks
    monkeypatch.undo()
    assert c.read_range(d, 0, len(data)) == data


def test_verified_put_trusts_the_caller_and_get_still_checks(tmp_path):
    # The contract: verified=True is the caller's word. Bytes that do not match are stored
    # (and read_range would serve them); a full get still finds them out and removes them.
    c = ChunkCache(str(tmp_path), block_size=BLOCK)
    d, _ = big_chunk(1)
    _, other = big_chunk(2)
    c.put(d, other, verified=True)
    with pytest.raises(ValueError, match="refusing to cache"):
        c.put(d, other)
    assert ChunkCache(str(tmp_path), block_size=BLOCK).get(d) is None
    assert not os.path.exists(chunk_path(tmp_path, d))


def test_read_range_arguments(tmp_path):
    c = ChunkCache(str(tmp_path), block_size=BLOCK)
    d, data = big_chunk(1)
    c.put(d, data)
    for offset, length in [(-1, 1), (0, -1)]:
        with pytest.raises(ValueError, match="negative range"):
            c.read_range(d, offset, length)
    assert c.read_range(d, len(data), 1) == b""
    empty_d = digest_of(b"")
    c.put(empty_d, b"", verified=True)
    assert c.read_range(empty_d, 0, 10) == b""
    for bad in [dict(block_size=0), dict(block_digest_bytes=-1)]:
        with pytest.raises(ValueError):
            ChunkCache(str(tmp_path), **bad)


def test_block_digests_are_bounded_least_recently_used_first(tmp_path):
    # 11 digests of 32 bytes plus the per-chunk overhead: room for two chunks' records.
    record = 11 * 32 + cache_mod._BLOCK_RECORD_OVERHEAD
    c = ChunkCache(str(tmp_path), block_size=BLOCK, block_digest_bytes=2 * record + 10)
    (d1, x1), (d2, x2), (d3, x3) = big_chunk(1), big_chunk(2), big_chunk(3)
    c.put(d1, x1)
    c.put(d2, x2)
    assert c.read_range(d1, 0, 5) == x1[:5]  # d1 is now the most recently used
    c.put(d3, x3)  # evicts d2's record, not d1's
    assert c.read_range(d2, 0, 5) is None
    assert c.read_range(d1, 0, 5) == x1[:5] and c.read_range(d3, 0, 5) == x3[:5]
    assert c.get(d2) == x2  # records it again, evicting the least recently used (d1)
    assert c.read_range(d2, 0, 5) == x2[:5] and c.read_range(d1, 0, 5) is None
    # A bound too small for any record: range reads just always return None.
    tiny = ChunkCache(str(tmp_path), block_size=BLOCK, block_digest_bytes=0)
    tiny.put(d1, x1)
    assert tiny.read_range(d1, 0, 5) is None and tiny.get(d1) == x1


def test_evicted_chunks_lose_their_block_digests(tmp_path):
    c = ChunkCache(str(tmp_path), max_bytes=25 * BLOCK, block_size=BLOCK)
    chunks = [big_chunk(i) for i in range(4)]  # 10 KiB each: the third put evicts
    for d, data in chunks:
        c.put(d, data)
    assert c.stats.evictions > 0
    for d, data in chunks:
        on_disk = os.path.exists(chunk_path(tmp_path, d))
        assert c.read_range(d, 0, 5) == (data[:5] if on_disk else None)
    assert len(c._blocks) == sum(os.path.exists(chunk_path(tmp_path, d)) for d, _ in chunks)


def test_read_range_touches_the_file_at_most_once_per_interval(tmp_path):
    c = ChunkCache(str(tmp_path), block_size=BLOCK)
    d, data = big_chunk(1)
    c.put(d, data)
    path = chunk_path(tmp_path, d)
    old = time.time() - 2 * cache_mod.TOUCH_INTERVAL_SECONDS
    os.utime(path, (old, old))
    c2 = ChunkCache(str(tmp_path), block_size=BLOCK)  # indexes the old mtime
    assert c2.get(d) == data  # get always touches
    assert os.path.getmtime(path) > old + 1
    os.utime(path, (old, old))
    assert c2.read_range(d, 0, 5) == data[:5]  # used just now, as c2 sees it: no touch
    assert os.path.getmtime(path) == pytest.approx(old)
    c3 = ChunkCache(str(tmp_path), block_size=BLOCK)
    assert c3.get(d) == data
    os.utime(path, (old, old))
    c3._index[("chunk", d.split(":")[1])] = cache_mod._Entry(len(data), old)
    assert c3.read_range(d, 0, 5) == data[:5]  # last used long ago: touched
    assert os.path.getmtime(path) > old + 1


def test_background_puts_and_range_reads_from_many_threads(tmp_path):
    """put from writer threads (off the readers' path) while readers use read_range and get:
    a reader gets the right bytes or None, never anything else, whatever the interleaving."""
    c = ChunkCache(str(tmp_path), max_bytes=60 * BLOCK, block_size=BLOCK)
    chunks = [big_chunk(i, size=BLOCK * (1 + i % 5) + i) for i in range(30)]
    errors: list[BaseException] = []
    wrong: list[str] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                d, data = rng.choice(chunks)
                c.put(d, data, verified=rng.random() < 0.5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(600):
                d, data = rng.choice(chunks)
                offset = rng.randrange(len(data))
                length = rng.randrange(1, 3 * BLOCK)
                got = c.read_range(d, offset, length)
                if got is None:
                    whole = c.get(d)
                    if whole is not None and whole != data:
                        wrong.append(d)
                elif got != data[offset:offset + length]:
                    wrong.append(d)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=reader, args=(100 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []
    assert c.stats.corrupt == 0 and c.stats.range_hits > 0 and c.stats.evictions > 0
    assert os.listdir(tmp_path / "tmp") == []


# -- several processes -----------------------------------------------------------------------------


def test_two_instances_see_each_others_entries(tmp_path):
    a = ChunkCache(str(tmp_path))
    b = ChunkCache(str(tmp_path))
    d, data = chunk(1)
    a.put(d, data)
    assert b.usage_bytes() == 0  # b learns of it lazily
    assert b.contains(d)
    assert b.get(d) == data
    assert b.usage_bytes() == 100
    b.put_toc(digest_of(b"toc"), b"rec")
    assert a.get_toc(digest_of(b"toc")) == b"rec"


def test_two_instances_put_get_and_evict_concurrently(tmp_path):
    max_bytes = 20_000
    instances = [ChunkCache(str(tmp_path), max_bytes=max_bytes) for _ in range(2)]
    chunks = [chunk(i, size=500 + 37 * i) for i in range(120)]
    errors: list[BaseException] = []
    wrong: list[str] = []

    def worker(c: ChunkCache, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(400):
                d, data = rng.choice(chunks)
                if rng.random() < 0.5:
                    c.put(d, data)
                else:
                    got = c.get(d)
                    if got is not None and got != data:
                        wrong.append(d)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(instances[i % 2], i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == [] and wrong == []
    assert sum(c.stats.evictions for c in instances) > 0
    # Each instance bounds its own view; the views together cover the directory.
    assert sum(entries_on_disk(tmp_path).values()) <= 2 * max_bytes
    assert os.listdir(tmp_path / "tmp") == []
    # A fresh instance sees exactly what is on disk, all of it intact.
    fresh = ChunkCache(str(tmp_path), max_bytes=max_bytes)
    assert fresh.usage_bytes() == sum(entries_on_disk(tmp_path).values())
    for d, data in chunks:
        assert fresh.get(d) in (None, data)
    assert fresh.stats.corrupt == 0


# -- hostile input ---------------------------------------------------------------------------------

HOSTILE_DIGESTS = [
    "sha256:../../etc",
    "sha256:../../../../../../etc/passwd",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha256:" + "a" * 64 + "\n",
    "sha256:" + "a" * 62 + "/x",
    "sha256:" + "g" * 64,
    "sha512:" + "a" * 128,
    "SHA256:" + "a" * 64,
    "a" * 64,
    "/etc/passwd",
    "",
    None,
    b"sha256:" + b"a" * 64,
]


@pytest.mark.parametrize("digest", HOSTILE_DIGESTS)
@pytest.mark.parametrize("call", [
    lambda c, d: c.get(d),
    lambda c, d: c.put(d, b"data"),
    lambda c, d: c.put(d, b"data", verified=True),
    lambda c, d: c.read_range(d, 0, 1),
    lambda c, d: c.contains(d),
    lambda c, d: c.get_toc(d),
    lambda c, d: c.put_toc(d, b"record"),
], ids=["get", "put", "put-verified", "read_range", "contains", "get_toc", "put_toc"])
def test_hostile_digests_raise_and_touch_nothing(tmp_path, digest, call):
    (tmp_path / "outside").write_bytes(b"keep")
    c = ChunkCache(str(tmp_path / "cache"))
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        call(c, digest)
    assert tree(tmp_path) == before
    assert c.stats == CacheStats()


# -- unusable cache directories --------------------------------------------------------------------


def test_a_file_in_place_of_the_cache_dir(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(CacheError, match="unusable"):
        ChunkCache(str(tmp_path / "file"))


def test_a_cache_dir_under_a_regular_file(tmp_path):
    # Fails even for root, unlike permission bits.
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(CacheError, match="unusable"):
        ChunkCache(str(tmp_path / "file" / "cache"))


def test_a_file_in_the_way_of_a_subdirectory(tmp_path):
    (tmp_path / "chunks").write_bytes(b"x")
    with pytest.raises(CacheError, match="unusable"):
        ChunkCache(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a mode 0500 directory")
def test_an_unwritable_cache_dir(tmp_path):
    ChunkCache(str(tmp_path / "cache"))
    os.chmod(tmp_path / "cache" / "tmp", 0o500)
    try:
        with pytest.raises(CacheError, match="unusable"):
            ChunkCache(str(tmp_path / "cache"))
    finally:
        os.chmod(tmp_path / "cache" / "tmp", 0o700)


def test_another_layout_version_is_refused(tmp_path):
    ChunkCache(str(tmp_path))
    (tmp_path / "VERSION").write_bytes(b"2\n")
    with pytest.raises(CacheError, match="layout version '2'"):
        ChunkCache(str(tmp_path))


def test_an_empty_version_file_is_rewritten(tmp_path):
    ChunkCache(str(tmp_path))
    (tmp_path / "VERSION").write_bytes(b"")  # a power loss after the rename, before a flush
    ChunkCache(str(tmp_path))
    assert (tmp_path / "VERSION").read_bytes() == b"1\n"


def test_put_failure_is_a_cache_error_and_leaves_no_temp_file(tmp_path):
    c = ChunkCache(str(tmp_path))
    d, data = chunk(1)
    # A file where the shard directory should be: the rename target cannot be created.
    os.makedirs(tmp_path / "chunks" / "sha256", exist_ok=True)
    (tmp_path / "chunks" / "sha256" / d[7:9]).write_bytes(b"x")
    with pytest.raises(CacheError, match="cannot store"):
        c.put(d, data)
    assert os.listdir(tmp_path / "tmp") == []
    assert c.usage_bytes() == 0


def test_max_bytes_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        ChunkCache(str(tmp_path), max_bytes=0)


# -- default directory -----------------------------------------------------------------------------


@pytest.mark.parametrize("euid, xdg, expected", [
    (0, "/xdg", "/var/cache/lazyfs"),
    (1000, "/xdg", "/xdg/lazyfs"),
    (1000, None, "/home/u/.cache/lazyfs"),
    (1000, "", "/home/u/.cache/lazyfs"),
    (1000, "relative/dir", "/home/u/.cache/lazyfs"),  # invalid per the XDG spec: ignored
])
def test_default_cache_dir(monkeypatch, euid, xdg, expected):
    monkeypatch.setattr(cache_mod.os, "geteuid", lambda: euid)
    monkeypatch.setenv("HOME", "/home/u")
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert default_cache_dir() == expected


# -- property --------------------------------------------------------------------------------------

# Few keys, so that sequences often put, damage and get the same one; sizes such that the
# 600-byte bound holds two or three of them and evicts often.
_KEYS = [chunk(i, size=10 + 100 * i) for i in range(4)]
_DAMAGES = [flip_a_byte, truncate, empty, grow]

_OPS = st.lists(st.tuples(st.sampled_from(["put", "put-verified", "get", "range", "damage",
                                           "reopen"]),
                          st.integers(0, 1),  # which of two instances ("processes")
                          st.integers(0, len(_KEYS) - 1)),  # which key, or which damage
                max_size=60)


@settings(max_examples=100, deadline=None)
@given(_OPS)
def test_property_get_and_read_range_never_return_bytes_that_do_not_match_the_key(ops):
    max_bytes = 600
    with tempfile.TemporaryDirectory() as root:
        instances = [ChunkCache(root, max_bytes=max_bytes, block_size=32),
                     ChunkCache(root, max_bytes=max_bytes, block_size=32)]
        for op, which, k in ops:
            c = instances[which]
            d, data = _KEYS[k]
            if op in ("put", "put-verified"):
                c.put(d, data, verified=(op == "put-verified"))
                assert c.usage_bytes() <= max_bytes
            elif op == "get":
                got = c.get(d)
                assert got is None or digest_of(got) == d
            elif op == "range":  # a range picked from the key and the instance: deterministic
                offset, length = (k * 37) % len(data), 25 + 50 * which
                got = c.read_range(d, offset, length)
                assert got is None or got == data[offset:offset + length]
            elif op == "damage":  # every chunk on disk, in one of the ways bits go bad
                for rel, content in tree(root).items():
                    if rel.startswith("chunks") and content:
                        _DAMAGES[k](os.path.join(root, rel))
            else:
                instances[which] = ChunkCache(root, max_bytes=max_bytes, block_size=32)
