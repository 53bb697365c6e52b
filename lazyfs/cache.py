"""The host-wide on-disk cache: verified, decompressed chunks by digest, and TOC records.

One directory serves every mount and every image on the host, and several processes may use it
at once. There is no shared index file, no database and no lock file: the filesystem is the
index, and every operation is safe against any other process doing anything at the same time.

On-disk layout (``<root>`` is ``default_cache_dir()`` unless the caller chose another)::

    <root>/VERSION                          "1\\n": the layout version, checked at open
    <root>/chunks/sha256/<hex[:2]>/<hex>    a chunk's uncompressed bytes; hex = its sha256
    <root>/tocs/sha256/<hex>                32 bytes sha256(record), then the caller's record;
                                            hex = the TOC digest the record is filed under
    <root>/tmp/<kind>.<pid>.<random>.tmp    files being written; renamed into place when complete

Why it is correct:

* Nothing unverified is ever served. ``get`` re-hashes every chunk it reads, ``read_range``
  re-hashes every block it reads (below), and ``get_toc`` checks the record against the digest
  stored in front of it. A corrupt, truncated or empty file (bit rot, a power loss before the
  kernel flushed a renamed file, since we do not fsync, a meddling user) is deleted and reported
  as a miss: the caller refetches. It is not an error.
* Nothing partial is ever visible. ``put`` writes a temp file in ``<root>/tmp`` (same
  filesystem), then renames it into place with ``os.rename``, which is atomic: a reader
  opens either the old complete file, the new complete file, or nothing. Temp files of
  crashed processes are removed by the next open once older than ``STALE_TEMP_SECONDS``.
* Paths come only from digests that match ``sha256:`` + 64 lowercase hex (``ValueError``
  otherwise), so a hostile TOC cannot name a file outside the cache directory.

LRU across processes, and why the file's mtime is the last-use time: every process can read
and set it (``os.utime`` on each hit, and a new file's mtime is its creation time) with no
coordination, and it survives restarts. atime was rejected because most filesystems are mounted
``relatime`` or ``noatime``; a shared index file or SQLite database was rejected because it
needs locking and its own crash recovery, for a cache whose loss costs only refetches. The cost
is one metadata write per hit, small next to reading and hashing the chunk.

Each instance keeps an in-memory index ``{(kind, hex): (size, last_use)}``, built by one
``os.scandir`` walk at open and updated by its own gets and puts; files that other processes add
join it lazily (a ``get`` or ``contains`` that finds one adds it). The index is therefore only
this process's *view*. When a put pushes the view over ``max_bytes``, the instance rescans the
directory (so the eviction sees every process's files and their true mtimes, and the view
converges) and deletes least-recently-used entries until usage is under
``EVICT_TO_FRACTION * max_bytes``. Chunks go first; TOC records, small and costly to miss (a
mount needs every TOC before it can serve anything), count against the bound but go only when
no chunk is left. A rescan costs about as much as the open scan; it happens once per
``(1 - EVICT_TO_FRACTION) * max_bytes`` written, so it is amortised over gigabytes of fetches.

What concurrency can do, and why none of it serves a wrong byte:

* Two processes evict at once: both may delete files, each ignores ``FileNotFoundError``; the
  cache may end smaller than needed. At worst a chunk is refetched.
* A chunk larger than ``EVICT_TO_FRACTION * max_bytes`` is stored and then evicted at once.
* A process evicts a file that another just used or just rewrote: a hot chunk is refetched.
* A reader has the file open while it is evicted or replaced: the open descriptor still reads
  the complete old file, which is then verified as usual.
* Several writers: usage can exceed ``max_bytes`` by what the other processes wrote since this
  one last scanned, until any of them evicts (each eviction sees the whole directory).

Range reads. A 4 KiB read must not cost reading and hashing a whole 4 MiB chunk, and must not
serve a byte that was not verified either. So when a chunk is verified in this process (``put``,
or the first ``get`` that finds it), the instance records the BLAKE3 digest of each
``block_size`` block of it (16 KiB: 256 digests, 8 KiB of memory per 4 MiB chunk);
``read_range`` then reads only the blocks covering the range and checks each against its
recorded digest. The digests are derived from bytes whose whole-chunk sha256 matched the
chunk's name, so a block that matches its digest holds exactly the verified bytes (BLAKE3 is a
cryptographic hash like sha256: a file altered on disk, by accident or on purpose, cannot be
made to match). BLAKE3 rather than sha256 because every byte of every warm read is hashed
again: on 16 KiB blocks it runs at ~3 GB/s here against sha256's ~1 GB/s (with SHA-NI), and
sha256 was two thirds of a warm sequential read's cost. They are kept in memory only, never on
disk (a file next to the chunk could be altered together with it), in an LRU bounded by
``block_digest_bytes``; a chunk without them (another process stored it, or they were dropped)
is read with ``get`` once, which records them again. ``read_range`` touches the file's mtime (the
LRU clock) at most once per ``TOUCH_INTERVAL_SECONDS`` as this process sees it, not on every
read: a minute is fine resolution for an LRU of gigabytes.

Threads: every method may be called from any thread at any time. Locks guard only the in-memory
index, counters and block digests, never I/O or hashing (hashlib and file I/O release the GIL),
so ``put`` can run in a background thread, off a reader's critical path, while other threads
``get`` and ``read_range``. Until such a ``put`` returns, the chunk is simply not in the cache
(``get`` and ``read_range`` return None): the caller serves the bytes it holds.

Errors: an unusable directory (cannot be created, a file in the way, not writable, another
layout version) is a ``CacheError`` at open. An I/O failure in ``put`` (disk full, directory
removed underneath us) is a ``CacheError`` too; the caller holds verified bytes and may serve
them anyway. Directories are created with mode 0o700 and files 0o600: the chunks of private
images must not become readable by other users. An existing directory keeps its mode.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

from blake3 import blake3

from lazyfs.errors import CacheError

# Default cache size bound: 10 GiB, about 2500 chunks of 4 MiB.
DEFAULT_MAX_BYTES = 10 << 30

# Eviction stops once usage is at most this fraction of max_bytes, so that a full cache does not
# evict (and rescan) again on every put.
EVICT_TO_FRACTION = 0.9

# A temp file older than this belongs to a crashed process: a live one renames its temp file
# within the time it takes to write one chunk.
STALE_TEMP_SECONDS = 3600

# The on-disk layout version (the VERSION file). Bump it when the layout or a record format
# changes; an instance refuses a directory written with another version.
LAYOUT_VERSION = 1

# Range reads (see the module doc): chunks are verified in blocks of this size, and the block
# digests of all chunks together take at most this much memory (LRU beyond).
DEFAULT_BLOCK_SIZE = 16 << 10
DEFAULT_BLOCK_DIGEST_BYTES = 32 << 20
# Accounted per chunk on top of its digests: the dict entry, the key, the tuple, bytes header.
_BLOCK_RECORD_OVERHEAD = 240
_BLOCK_DIGEST_SIZE = 32  # BLAKE3's default output

# read_range sets a chunk file's mtime (its last use, for every process's LRU) at most this
# often, as this process's index sees it; get and put always do.
TOUCH_INTERVAL_SECONDS = 60

# The root directory of the system-wide cache (when running as root).
SYSTEM_CACHE_DIR = "/var/cache/lazyfs"

_DIR_MODE = 0o700

# The only accepted digest spelling. fullmatch, so no trailing newline or other junk slips by.
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_HEX2_RE = re.compile(r"[0-9a-f]{2}")

# Size of the sha256 stored in front of each TOC record.
_TOC_CHECK_SIZE = 32

_CHUNK = "chunk"
_TOC = "toc"


def default_cache_dir() -> str:
    """/var/cache/lazyfs for root; $XDG_CACHE_HOME/lazyfs or ~/.cache/lazyfs for others."""
    if os.geteuid() == 0:
        return SYSTEM_CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says relative paths are invalid: ignore them
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lazyfs")


@dataclass
class CacheStats:
    """Counters of one ChunkCache instance (chunks and TOC records together)."""

    hits: int = 0
    misses: int = 0  # includes the corrupt entries
    corrupt: int = 0  # entries that failed verification and were deleted
    evictions: int = 0  # files this instance deleted to respect max_bytes
    bytes_stored: int = 0  # bytes this instance wrote with put and put_toc
    range_hits: int = 0  # read_range calls served (also counted in hits)
    range_unknown: int = 0  # read_range calls that found no block digests: returned None


class _Entry(NamedTuple):
    size: int
    last_use: float  # time.time() seconds, the file's mtime


def _hex_of(digest: str) -> str:
    """The 64 hex digits of a valid digest; ValueError for anything else, before any path exists."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r} (want 'sha256:' + 64 lowercase hex)")
    return digest[len("sha256:"):]


class ChunkCache:
    """Content-addressed chunks and TOC records on disk; synchronous and thread-safe."""

    def __init__(self, root: str, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 block_digest_bytes: int = DEFAULT_BLOCK_DIGEST_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, not {block_size}")
        if block_digest_bytes < 0:
            raise ValueError(f"block_digest_bytes must not be negative, not {block_digest_bytes}")
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        self.block_size = block_size
        self.block_digest_bytes = block_digest_bytes
        # Chunk hex → (chunk size, concatenated BLAKE3 digests of its blocks), least recently
        # used first; _block_bytes is their accounted total. Guarded by _lock.
        self._blocks: collections.OrderedDict[str, tuple[int, bytes]] = collections.OrderedDict()
        self._block_bytes = 0
        self._chunks_dir = os.path.join(self.root, "chunks", "sha256")
        self._tocs_dir = os.path.join(self.root, "tocs", "sha256")
        self._tmp_dir = os.path.join(self.root, "tmp")
        self._lock = threading.Lock()  # guards _index, _total, _stats and _blocks
        self._evict_lock = threading.Lock()  # one eviction at a time in this process
        self._stats = CacheStats()
        try:
            # One level at a time: makedirs applies its mode to the last level only.
            for path in (self.root, os.path.dirname(self._chunks_dir), self._chunks_dir,
                         os.path.dirname(self._tocs_dir), self._tocs_dir, self._tmp_dir):
                os.makedirs(path, mode=_DIR_MODE, exist_ok=True)
            self._check_version()
            self._remove_stale_temps()
            self._probe_writable()
            self._index = self._scan()
        except OSError as exc:
            raise CacheError(f"cache directory {self.root} is unusable: {exc}") from exc
        self._total = sum(e.size for e in self._index.values())

    # -- public API ------------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return replace(self._stats)

    def usage_bytes(self) -> int:
        """Bytes used by chunks and TOC records, as this instance sees them (see module doc)."""
        with self._lock:
            return self._total

    def get(self, digest: str) -> bytes | None:
        """The chunk's bytes, verified against digest, or None (a miss, or a corrupt entry).

        The first get of a chunk in this process also records its block digests (in the same
        pass over the bytes), so that later reads of it can use read_range.
        """
        hex_ = _hex_of(digest)
        with self._lock:
            known = hex_ in self._blocks
        blocks = None

        def check(raw: bytes) -> bytes | None:
            nonlocal blocks
            if known:
                return raw if _sha256_hex(raw) == hex_ else None
            whole = hashlib.sha256()
            block_digests = _block_digests(raw, self.block_size, whole)
            if whole.hexdigest() != hex_:
                return None
            blocks = block_digests
            return raw

        data = self._read(_CHUNK, hex_, check)
        if blocks is not None:
            self._remember_blocks(hex_, len(data), blocks)
        return data

    def put(self, digest: str, data: bytes, *, verified: bool = False) -> None:
        """Store a chunk and record its block digests (for read_range).

        verified=False (the default): the bytes are hashed and a mismatch is a ValueError.
        verified=True: the caller guarantees that sha256(data) is digest (it has just checked,
        as the fetcher does before it serves anything), and the whole-chunk hash is skipped;
        the blocks are hashed once, for their digests. Wrong bytes put this way would be served
        by read_range (get would still catch them): only pass verified=True for bytes checked
        against this very digest.

        Thread-safe, and holds no lock while it hashes or writes: call it from a background
        thread to keep it off a read's critical path (see the module doc).
        """
        hex_ = _hex_of(digest)
        if verified:
            blocks = _block_digests(data, self.block_size)
        else:
            whole = hashlib.sha256()
            blocks = _block_digests(data, self.block_size, whole)
            actual = whole.hexdigest()
            if actual != hex_:
                # A caller bug, not bad input: we would cache bytes that do not match their name.
                raise ValueError(f"refusing to cache bytes with digest sha256:{actual} "
                                 f"under {digest}")
        self._write(_CHUNK, hex_, [data])
        self._remember_blocks(hex_, len(data), blocks)

    def read_range(self, digest: str, chunk_offset: int, length: int) -> bytes | None:
        """Bytes [chunk_offset, chunk_offset + length) of a chunk (fewer at its end), each block
        they touch read from disk and checked against the block digests recorded for the chunk.

        None when no block digests are recorded in this process (call get, which verifies the
        whole chunk and records them), when the file is gone (a miss), or when a block does not
        match (the file is deleted and counted corrupt, its block digests forgotten: refetch).
        A range at or past the chunk's end is b"". ValueError for a bad digest or a negative
        offset or length; CacheError for an I/O error other than a missing file.
        """
        hex_ = _hex_of(digest)
        if chunk_offset < 0 or length < 0:
            raise ValueError(f"negative range: offset {chunk_offset}, length {length}")
        with self._lock:
            record = self._blocks.get(hex_)
            if record is None:
                self._stats.range_unknown += 1
                return None
            self._blocks.move_to_end(hex_)
        size, block_digests = record
        end = min(chunk_offset + length, size)
        if chunk_offset >= end:
            return b""
        block_size = self.block_size
        first = chunk_offset // block_size
        start = first * block_size
        stop = min(-(-end // block_size) * block_size, size)
        key = (_CHUNK, hex_)
        path = self._path(_CHUNK, hex_)
        fd = self._open_entry(key, path)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            intact = st.st_size == size  # truncated or grown: corrupt, whatever the range
            if intact:
                raw = os.pread(fd, stop - start, start)
                intact = (len(raw) == stop - start
                          and _blocks_match(raw, block_size, block_digests, first))
            if not intact:
                self._remove_corrupt(path, st)
                with self._lock:
                    self._stats.corrupt += 1
                self._forget(key, miss=True)
                return None
            now = time.time()
            with self._lock:
                entry = self._index.get(key)
                touch = entry is None or now - entry.last_use >= TOUCH_INTERVAL_SECONDS
                if touch:
                    self._set(key, _Entry(size, now))
                self._stats.hits += 1
                self._stats.range_hits += 1
            if touch:
                os.utime(fd)  # through the descriptor, as in _read
        except OSError as exc:
            raise CacheError(f"cannot read {path}: {exc}") from exc
        finally:
            os.close(fd)
        return raw[chunk_offset - start:end - start]

    def contains(self, digest: str) -> bool:
        """Whether a chunk file exists (not verified: a later get may still find it corrupt)."""
        hex_ = _hex_of(digest)
        path = self._path(_CHUNK, hex_)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            self._forget((_CHUNK, hex_))
            return False
        except OSError as exc:
            raise CacheError(f"cannot stat {path}: {exc}") from exc
        with self._lock:
            if (_CHUNK, hex_) not in self._index:
                self._set((_CHUNK, hex_), _Entry(st.st_size, st.st_mtime))
        return True

    def has_toc(self, toc_digest: str) -> bool:
        """Whether a TOC record exists (not verified: get_toc may still find it corrupt)."""
        return os.path.exists(self._path(_TOC, _hex_of(toc_digest)))

    def put_toc(self, toc_digest: str, record: bytes) -> None:
        """Store an opaque TOC record under the TOC's digest (the caller vouches for the record)."""
        hex_ = _hex_of(toc_digest)
        self._write(_TOC, hex_, [hashlib.sha256(record).digest(), record])

    def get_toc(self, toc_digest: str) -> bytes | None:
        """The record stored under toc_digest, intact, or None (a miss, or a corrupt file)."""
        hex_ = _hex_of(toc_digest)

        def check(raw: bytes) -> bytes | None:
            check_sum, record = raw[:_TOC_CHECK_SIZE], raw[_TOC_CHECK_SIZE:]
            if len(check_sum) != _TOC_CHECK_SIZE or hashlib.sha256(record).digest() != check_sum:
                return None
            return record

        return self._read(_TOC, hex_, check)

    # -- reading and writing -----------------------------------------------------------------------

    def _path(self, kind: str, hex_: str) -> str:
        # hex_ has been validated by _hex_of: 64 lowercase hex digits, so no separator, no "..".
        if kind == _CHUNK:
            return os.path.join(self._chunks_dir, hex_[:2], hex_)
        return os.path.join(self._tocs_dir, hex_)

    def _open_entry(self, key, path: str) -> int | None:
        """A read-only fd on an entry's file, or None (a miss) if it is gone."""
        try:
            # O_NOFOLLOW: only regular files we renamed into place, never a planted symlink.
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(key, miss=True)
            return None
        except OSError as exc:
            raise CacheError(f"cannot open {path}: {exc}") from exc

    def _read(self, kind: str, hex_: str,
              check: Callable[[bytes], bytes | None]) -> bytes | None:
        """Read a file and run check(raw) → payload or None (corrupt: delete, count a miss)."""
        key = (kind, hex_)
        path = self._path(kind, hex_)
        fd = self._open_entry(key, path)
        if fd is None:
            return None
        try:
            with open(fd, "rb") as f:
                raw = f.read()
                payload = check(raw)
                if payload is None:
                    self._remove_corrupt(path, os.fstat(fd))
                    with self._lock:
                        self._stats.corrupt += 1
                    self._forget(key, miss=True)
                    return None
                # The file's mtime is its last use, for every process (see module doc). Through
                # the descriptor: if the file was just evicted, this touches only the orphan.
                os.utime(fd)
        except OSError as exc:
            raise CacheError(f"cannot read {path}: {exc}") from exc
        with self._lock:
            self._stats.hits += 1
            self._set(key, _Entry(len(raw), time.time()))
        return payload

    def _remove_corrupt(self, path: str, st_read: os.stat_result) -> None:
        # Delete only the file we read: another process may have renamed a good copy over it
        # since (then that copy stays). The check-then-unlink still has a window; losing it
        # deletes a good copy, which costs a refetch and nothing else.
        try:
            st_now = os.stat(path, follow_symlinks=False)
            if (st_now.st_dev, st_now.st_ino) == (st_read.st_dev, st_read.st_ino):
                os.unlink(path)
        except FileNotFoundError:
            pass

    def _write(self, kind: str, hex_: str, parts: list[bytes]) -> None:
        """Write parts to a temp file and rename it to the entry's path; then evict if over."""
        path = self._path(kind, hex_)
        size = sum(len(p) for p in parts)
        tmp_path = None
        try:
            fd, tmp_path = tempfile.mkstemp(prefix=f"{kind}.{os.getpid()}.", suffix=".tmp",
                                            dir=self._tmp_dir)  # mode 0o600
            with open(fd, "wb") as f:
                for part in parts:
                    f.write(part)
            # The shard directory may not exist yet; nothing ever removes one, so no race.
            os.makedirs(os.path.dirname(path), mode=_DIR_MODE, exist_ok=True)
            # Always write, even over an existing file: content-addressed, so a good old copy
            # equals the new one, and a corrupt old copy is healed.
            os.rename(tmp_path, path)
            tmp_path = None
        except OSError as exc:
            raise CacheError(f"cannot store {path}: {exc}") from exc
        finally:
            if tmp_path is not None:
                try:
                    os.unlink(tmp_path)
                except OSError:
                    pass
        with self._lock:
            self._stats.bytes_stored += size
            self._set((kind, hex_), _Entry(size, time.time()))
            over = self._total > self.max_bytes
        if over:
            self._evict()

    # -- the index ---------------------------------------------------------------------------------

    def _set(self, key: tuple[str, str], entry: _Entry) -> None:
        """Record an entry (caller holds _lock)."""
        old = self._index.get(key)
        if old is not None:
            self._total -= old.size
        self._index[key] = entry
        self._total += entry.size

    def _forget(self, key: tuple[str, str], *, miss: bool = False) -> None:
        """The file is gone (or corrupt and deleted): out of the index, its block digests too."""
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._total -= old.size
            if key[0] == _CHUNK:
                self._drop_blocks(key[1])
            if miss:
                self._stats.misses += 1

    # -- block digests -------------------------------------------------------------------------------

    def _remember_blocks(self, hex_: str, size: int, block_digests: bytes) -> None:
        cost = len(block_digests) + _BLOCK_RECORD_OVERHEAD
        if cost > self.block_digest_bytes:
            return
        with self._lock:
            self._drop_blocks(hex_)
            self._blocks[hex_] = (size, block_digests)
            self._block_bytes += cost
            while self._block_bytes > self.block_digest_bytes:
                _, (_, evicted) = self._blocks.popitem(last=False)
                self._block_bytes -= len(evicted) + _BLOCK_RECORD_OVERHEAD

    def _drop_blocks(self, hex_: str) -> None:
        """Forget a chunk's block digests (caller holds _lock)."""
        record = self._blocks.pop(hex_, None)
        if record is not None:
            self._block_bytes -= len(record[1]) + _BLOCK_RECORD_OVERHEAD

    def _scan(self) -> dict[tuple[str, str], _Entry]:
        """Every entry on disk with size and mtime: one scandir per directory, one stat per file.

        Names that are not entries (foreign files, wrong shard) are ignored, never deleted:
        a file we do not know is not ours to remove.
        """
        index: dict[tuple[str, str], _Entry] = {}

        def add_files(kind: str, directory: str, shard: str | None) -> None:
            try:
                with os.scandir(directory) as it:
                    for e in it:
                        if not _HEX64_RE.fullmatch(e.name) or (shard and e.name[:2] != shard):
                            continue
                        try:
                            if not e.is_file(follow_symlinks=False):
                                continue
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:  # evicted by another process meanwhile
                            continue
                        index[(kind, e.name)] = _Entry(st.st_size, st.st_mtime)
            except FileNotFoundError:
                pass

        try:
            with os.scandir(self._chunks_dir) as shards:
                shard_names = [s.name for s in shards
                               if _HEX2_RE.fullmatch(s.name) and s.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            shard_names = []
        for name in shard_names:
            add_files(_CHUNK, os.path.join(self._chunks_dir, name), name)
        add_files(_TOC, self._tocs_dir, None)
        return index

    def _rescan(self) -> None:
        """Replace the index by what is on disk now, keeping what changed here during the scan."""
        scan_started = time.time()
        scanned = self._scan()
        with self._lock:
            for key, mine in self._index.items():
                theirs = scanned.get(key)
                if theirs is not None:
                    if mine.last_use > theirs.last_use:  # e.g. a hit whose utime the scan missed
                        scanned[key] = mine
                elif mine.last_use >= scan_started:  # put here while the scan ran: maybe missed
                    scanned[key] = mine
            self._index = scanned
            self._total = sum(e.size for e in scanned.values())

    # -- eviction ----------------------------------------------------------------------------------

    def _evict(self) -> None:
        """Delete least-recently-used entries, chunks before TOCs, until under the low mark."""
        with self._evict_lock:
            with self._lock:
                if self._total <= self.max_bytes:
                    return  # another thread evicted while this one waited for the lock
            try:
                self._rescan()  # see every process's files and their last use
            except OSError as exc:
                raise CacheError(f"cannot scan the cache directory {self.root}: {exc}") from exc
            with self._lock:
                if self._total <= self.max_bytes:
                    return  # another process or thread has evicted already
                target = int(self.max_bytes * EVICT_TO_FRACTION)
                plan = sorted(self._index.items(),
                              key=lambda item: (item[0][0] == _TOC, item[1].last_use))
            for key, planned in plan:
                with self._lock:
                    if self._total <= target:
                        return
                    if self._index.get(key) != planned:
                        continue  # used or rewritten here since the plan: it is recent now
                try:
                    os.unlink(self._path(*key))
                    deleted = True
                except FileNotFoundError:  # another process evicted it first
                    deleted = False
                except OSError as exc:
                    raise CacheError(f"cannot evict {self._path(*key)}: {exc}") from exc
                with self._lock:
                    if self._index.get(key) == planned:
                        del self._index[key]
                        self._total -= planned.size
                    if key[0] == _CHUNK:
                        self._drop_blocks(key[1])
                    if deleted:
                        self._stats.evictions += 1

    # -- opening -----------------------------------------------------------------------------------

    def _check_version(self) -> None:
        path = os.path.join(self.root, "VERSION")
        want = f"{LAYOUT_VERSION}\n".encode()
        try:
            with open(path, "rb") as f:
                have = f.read(64)
        except FileNotFoundError:
            have = b""
        if not have:  # a new directory, or an empty file left by a power loss (no fsync)
            fd, tmp_path = tempfile.mkstemp(prefix="VERSION.", dir=self._tmp_dir)
            with open(fd, "wb") as f:
                f.write(want)
            os.rename(tmp_path, path)  # concurrent openers all write the same bytes
            return
        if have != want:
            found = have.strip().decode(errors="replace")
            raise CacheError(f"cache directory {self.root} has layout version {found!r}, "
                             f"this lazyfs uses {LAYOUT_VERSION}: choose another cache "
                             f"directory or remove this one")

    def _remove_stale_temps(self) -> None:
        """Delete temp files left by crashed processes (old enough that no writer is alive)."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        with os.scandir(self._tmp_dir) as it:
            for e in it:
                try:
                    if e.is_file(follow_symlinks=False) and \
                            e.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(e.path)
                except FileNotFoundError:  # another process cleaned it first
                    pass

    def _probe_writable(self) -> None:
        """Fail at open, not at the first put, on a read-only or unwritable directory."""
        fd, path = tempfile.mkstemp(prefix="probe.", dir=self._tmp_dir)
        os.close(fd)
        os.unlink(path)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _block_digests(data: bytes, block_size: int, whole=None) -> bytes:
    """The BLAKE3 digest of each block_size block of data, concatenated; with `whole` (a sha256
    object), data is also fed to it in the same pass, while each block is in the CPU cache."""
    view = memoryview(data)
    out = []
    for start in range(0, len(view), block_size):
        block = view[start:start + block_size]
        if whole is not None:
            whole.update(block)
        out.append(blake3(block).digest())
    return b"".join(out)


def _blocks_match(raw: bytes, block_size: int, block_digests: bytes, first_block: int) -> bool:
    """Whether raw, the blocks from number first_block on, matches their recorded digests."""
    view = memoryview(raw)
    at = first_block * _BLOCK_DIGEST_SIZE
    for start in range(0, len(view), block_size):
        if blake3(view[start:start + block_size]).digest() != \
                block_digests[at:at + _BLOCK_DIGEST_SIZE]:
            return False
        at += _BLOCK_DIGEST_SIZE
    return True
