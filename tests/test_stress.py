"""Stress: 64 concurrent readers at random offsets over a few hundred files, for a bounded time,
over HTTP through nginx with a connection reset sprinkled over the blob requests. Every read is
checked against the file's content; the daemon's memory must stay within a stated bound.

The memory bound, and why. The daemon runs with a small memory LRU (--memory-cache 4M, the
image is ~14 MiB) so that the LRU fills and evicts all the time. What it may hold at once:
  - the memory LRU of verified chunks: at most MEMORY_CACHE_BYTES;
  - the cache's 16 KiB block digests: 32 bytes per 16 KiB plus ~240 bytes per chunk, under
    0.5 MiB for this image;
  - answers in flight: at most --max-connections (8) requests at once, each for the chunks
    of one FUSE read (at most 1 MiB, the kernel readahead window the mount sets) plus
    readahead (1 MiB) and merge gaps (64 KiB), each byte held at most twice (the source's
    piece and the member buffer);
  - replies being assembled: one per reader, at most the largest read (200 KB) each;
So the peak RSS (VmHWM) may exceed the RSS at mount by at most
    LRU + answers in flight + replies + MARGIN  (~4 + 35 + 12 + 48 MiB)
where MARGIN covers what the allocator keeps: glibc serves big buffers from per-thread arenas
once its dynamic mmap threshold has risen, and keeps freed memory there. Measured here over
30 s of this load: the RSS rises ~20-30 MiB above the mount's and levels off (with
MALLOC_MMAP_THRESHOLD_=131072 it stays flat ~15 MiB above), while Python's own traced heap
stays flat. Also the plateau itself is checked: from the middle of the run to its end the RSS
may rise by at most LATE_GROWTH_BOUND, which a leak of anything per read (tens of thousands
of reads, hundreds of MiB served, every chunk re-read from the disk cache as the 4 MiB LRU
churns) would exceed.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from lazyfs.fetchoptions import FetchOptions
from tests.faultproxy import FaultProxy
from tests.imagebuild import converted_one_layer
from tests.mounting import (assert_cache_holds_only_verified, daemon_log, daemon_rss_bytes,
                            direct_read, lazyfs_stats, mounted, require_fuse)
from tests.tarbuild import dir_, file_

KiB, MiB = 1024, 1024 * 1024
CHUNK = 64 * KiB
TAG = "stress"
READERS = 64
STRESS_SECONDS = 8.0
RESET_EVERY = 10  # every 10th new blob request is reset: retried, never seen by a reader
# (a retry is never reset: spare_retries, see tests/faultproxy.py)
READ_SIZES = (1, 100, 4096, 65536, 200_000)
MEMORY_CACHE_BYTES = 4 * MiB  # --memory-cache 4M
_OPTIONS = FetchOptions()
# The kernel's largest FUSE read: its readahead window, which the mount sets to 1 MiB.
FUSE_READ_BYTES = 1 * MiB
IN_FLIGHT_BYTES = 2 * _OPTIONS.max_connections * (
    FUSE_READ_BYTES + 2 * CHUNK + _OPTIONS.readahead_bytes + _OPTIONS.merge_gap_bytes)
REPLY_BYTES = READERS * max(READ_SIZES)
MARGIN_BYTES = 48 * MiB
RSS_GROWTH_BOUND = MEMORY_CACHE_BYTES + IN_FLIGHT_BYTES + REPLY_BYTES + MARGIN_BYTES
LATE_GROWTH_BOUND = 16 * MiB


def _files() -> dict[str, bytes]:
    """300 files in 16 directories: every 10th spans 2 to 8 chunks, the others are small."""
    rng = random.Random(64)
    files = {}
    for number in range(300):
        size = rng.randint(2 * CHUNK, 8 * CHUNK) if number % 10 == 0 else rng.randint(0, 40 * KiB)
        files[f"d{number % 16:02d}/f{number:03d}.bin"] = rng.randbytes(size)
    return files


FILES = _files()


@pytest.fixture(scope="module")
def stress_layout(tmp_path_factory):
    """(converted layout dir, every chunk digest)"""
    require_fuse()
    root = tmp_path_factory.mktemp("stress-image")
    members = [dir_(f"d{number:02d}/") for number in range(16)]
    members += [file_(path, data) for path, data in FILES.items()]
    return converted_one_layer(root, members, TAG, CHUNK)


def test_64_readers_at_random_offsets_get_right_bytes_in_bounded_memory(stress_layout, nginx,
                                                                        tmp_path):
    layout, digests = stress_layout
    shutil.copytree(layout, Path(nginx.root) / "layout")
    cache_dir = tmp_path / "cache"
    mount_dir = tmp_path / "mnt"
    assert sum(map(len, FILES.values())) > 3 * MEMORY_CACHE_BYTES  # the LRU must evict
    with FaultProxy(nginx.url) as proxy, \
            mounted(f"{proxy.url}/layout:{TAG}", mount_dir, "--no-prefetch",
                    "--no-background-fetch", "--memory-cache", "4M",
                    cache_dir=cache_dir) as daemon:
        rss_at_mount = daemon_rss_bytes(daemon.pid)
        proxy.inject("reset", every=RESET_EVERY, spare_retries=True,
                     match=lambda method, path, headers: "/blobs/" in path and "Range" in headers)
        halfway: list[int] = []
        sampler = threading.Timer(STRESS_SECONDS / 2,
                                  lambda: halfway.append(daemon_rss_bytes(daemon.pid)))
        sampler.start()
        results = _read_at_random(mount_dir, STRESS_SECONDS)
        sampler.join()
        peak = _vm_hwm_bytes(daemon.pid)
        rss_at_end = daemon_rss_bytes(daemon.pid)
        assert daemon.poll() is None

        failures = [failure for result in results for failure in result["failures"]]
        report = lazyfs_stats(mount_dir)
        [layer] = report["layers"]
        assert failures == [], (failures[:5], report["last_error"], layer["last_error"],
                                daemon_log(mount_dir)[-3000:])
        reads = sum(result["reads"] for result in results)
        assert reads >= READERS * 10, f"only {reads} reads in {STRESS_SECONDS} s"
        assert proxy.faults_applied >= 1 and layer["retries"] >= proxy.faults_applied
        assert layer["errors"] == 0, layer["last_error"]
        assert peak - rss_at_mount <= RSS_GROWTH_BOUND, (
            f"daemon RSS grew from {rss_at_mount / MiB:.0f} MiB to a peak of "
            f"{peak / MiB:.0f} MiB: more than the {RSS_GROWTH_BOUND / MiB:.0f} MiB bound "
            f"({reads} reads, {layer['bytes_served'] / MiB:.0f} MiB served)")
        assert rss_at_end - halfway[0] <= LATE_GROWTH_BOUND, (
            f"daemon RSS still growing: {halfway[0] / MiB:.0f} MiB half-way, "
            f"{rss_at_end / MiB:.0f} MiB at the end")
        assert_cache_holds_only_verified(cache_dir, digests)


def _read_at_random(mount_dir: Path, seconds: float) -> list[dict]:
    """READERS threads reading at random until the time is up; each result has its number of
    reads and its failures (wrong bytes or an error), as text."""
    paths = sorted(FILES)
    deadline = time.monotonic() + seconds
    results = [{"reads": 0, "failures": []} for _ in range(READERS)]

    def reader(number: int) -> None:
        rng = random.Random(number)
        result = results[number]
        while time.monotonic() < deadline and len(result["failures"]) < 3:
            path = rng.choice(paths)
            data = FILES[path]
            offset = rng.randrange(len(data) + 1)
            size = rng.choice(READ_SIZES)
            try:
                # Mostly O_DIRECT (every read reaches the daemon), some through the page cache.
                if rng.random() < 0.75:
                    got = direct_read(mount_dir / path, offset, size)
                else:
                    with open(mount_dir / path, "rb") as f:
                        f.seek(offset)
                        got = f.read(size)
            except OSError as exc:
                result["failures"].append(f"{path} at {offset}: {exc}")
                continue
            if got != data[offset:offset + size]:
                result["failures"].append(f"{path} at {offset}: wrong bytes")
            result["reads"] += 1

    threads = [threading.Thread(target=reader, args=(number,)) for number in range(READERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
        assert not thread.is_alive(), "a reader hung"
    return results


def _vm_hwm_bytes(pid: int) -> int:
    """The peak resident set size of a process (VmHWM in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")
