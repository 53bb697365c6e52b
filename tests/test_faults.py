"""The fetch engine through a real mount against a real nginx, with and without faults.

nginx's access log proves what went over the wire: a multi-chunk read is one request (merged,
or multi-range), the prefetch of the prioritized files is one request at mount, and reads of
those files wait for it. Faults come from tests/faultproxy.py between the mount and nginx:
connection resets, delays, stalls, 5xx and 5xx bursts, a server ignoring Range or answering
other ranges, truncated bodies and multipart answers, flipped bytes, servers without (or with
broken) multi-range support. Under each, one test checks the four promises (see
test_every_fault_keeps_the_four_promises); the same faults are also thrown at the prefetch,
the background fetch and the opening of the image. docs/security.md tables the outcomes.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from converter.image import convert_image
from converter.layer import LayerOptions
from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.format.seekable import FORMATS
from lazyfs.oci_layout import open_image
from lazyfs.prefetch import prioritized_chunks
from tests.faultproxy import FaultProxy
from tests.imagebuild import write_layout
from tests.mounting import (assert_cache_holds_only_verified, direct_read, forget_pages,
                            lazyfs_cmd, lazyfs_stats, mounted, read_in_a_loop, require_fuse)
from tests.tarbuild import dir_, file_

KiB = 1024
CHUNK = 256 * KiB
TAG = "faults"
_rng = random.Random(11)
# Random bytes: members barely compress, so compressed ranges are about chunk-sized.
FILES = {
    "app/start.py": b"print('hello')\n" * 200,
    "app/lib.bin": _rng.randbytes(600 * KiB),
    "data/a.bin": _rng.randbytes(6 * CHUNK + 1000),
    "data/b.bin": _rng.randbytes(3 * CHUNK),
    "data/small.txt": b"small\n",
}
PRIORITIZED = ("app/start.py", "app/lib.bin")
# Tight failure options so that the fault tests are quick: 3 attempts, ~0.6 s of backoff at most.
FAST_FAILURE = ("--retries", "2", "--timeout", "1", "--connect-timeout", "1")
# The kernel's readahead window sizes the reads that reach the mount (and what it reads ahead
# after a pread); tests that reason about the exact requests a pread causes keep the kernel's
# own default, 128 KiB, rather than the 1 MiB a mount sets.
EXACT_READS = ("--kernel-readahead", "128K")


def _build_layout(root: Path, layer_format: str):
    """(converted layout dir, blob file name, {path: entry}, prioritized chunks)"""
    require_fuse()
    members = [dir_("app/"), dir_("data/")] + [file_(path, data) for path, data in FILES.items()]
    source = write_layout(root / "source", [members], TAG)
    converted = root / "converted"
    convert_image(f"{source}:{TAG}", str(converted), archive=False,
                  options=LayerOptions(format=layer_format, chunk_size=CHUNK,
                                       prioritized_files=PRIORITIZED))
    with open_image(f"{converted}:{TAG}") as image:
        [desc] = image.layers
        with LocalBlob(image.blobs.unverified_path(desc)) as blob:
            entries = {item.path: item for item in SeekableLayer.open(blob).entries}
    prioritized = prioritized_chunks(list(entries.values()))
    return converted, desc.digest.split(":")[1], entries, prioritized


@pytest.fixture(scope="module", params=FORMATS)
def any_format_layout(request, tmp_path_factory):
    """The image in each seekable format: what goes over the wire is the same for both."""
    return _build_layout(tmp_path_factory.mktemp("faults-image"), request.param)


@pytest.fixture(scope="module")
def estargz_layout(tmp_path_factory):
    """The image as eStargz only: faults are about HTTP, not the format."""
    return _build_layout(tmp_path_factory.mktemp("faults-image"), "estargz")


@pytest.fixture(scope="module")
def zstd_layout(tmp_path_factory):
    """The image as zstd:chunked, for the faults whose outcome depends on the codec."""
    return _build_layout(tmp_path_factory.mktemp("faults-image"), "zstd:chunked")


def _publish(layout, nginx):
    converted, blob_hex, entries, prioritized = layout
    shutil.copytree(converted, Path(nginx.root) / "layout")
    return f"/layout/blobs/sha256/{blob_hex}", entries, prioritized


@pytest.fixture
def published(any_format_layout, nginx):
    """(blob URI path, {path: entry}, prioritized chunks), served by nginx."""
    return _publish(any_format_layout, nginx)


@pytest.fixture
def published_estargz(estargz_layout, nginx):
    return _publish(estargz_layout, nginx)


def chunk_digests(entries: dict) -> set[str]:
    return {chunk.digest for item in entries.values() for chunk in item.chunks}


def blob_requests(nginx, blob_uri):
    return [record for record in nginx.requests() if record.uri == blob_uri]


def finished_blob_requests(nginx, blob_uri, timeout_s: float = 10):
    """The blob requests once at least one has finished: a read may return while the rest of
    its request (readahead) is still on the wire, and nginx logs a request when it ends."""
    deadline = time.monotonic() + timeout_s
    while not (records := blob_requests(nginx, blob_uri)):
        assert time.monotonic() < deadline, "no blob request was logged"
        time.sleep(0.02)
    return records


def ranges_of(record) -> list[tuple[int, int]]:
    return [tuple(map(int, part.split("-")))
            for part in record.range.removeprefix("bytes=").split(",")]


def stats(mount_dir: Path) -> dict:
    return json.loads(os.getxattr(mount_dir, "user.lazyfs.stats"))["layers"][0]


def wait_for(mount_dir: Path, key: str, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while not stats(mount_dir)[key]:
        assert time.monotonic() < deadline, stats(mount_dir)
        time.sleep(0.02)
    return stats(mount_dir)


def pread(mount_dir: Path, path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` (fewer at the end of the file), or the OSError of a read.

    In a loop, as programs read: when a later part of a big read fails, the kernel returns
    the part before it (a short read), and the next read reports the error."""
    return read_in_a_loop(mount_dir / path, offset, size)


def read_all(mount_dir: Path, path: str) -> bytes:
    return pread(mount_dir, path, 0, len(FILES[path]) + 1)


def assert_eio(mount_dir: Path, path: str) -> None:
    with pytest.raises(OSError) as info:
        read_all(mount_dir, path)
    assert info.value.errno == errno.EIO


def drop_kernel_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --- what goes over the wire (nginx's access log) ----------------------------------------------

def test_prefetch_is_one_request_at_mount_and_covers_the_prioritized_files(published, nginx,
                                                                           tmp_path):
    blob_uri, entries, prioritized = published
    mount_dir = tmp_path / "mnt"
    with mounted(f"{nginx.url}/layout:{TAG}", mount_dir, "--no-background-fetch",
                 cache_dir=tmp_path / "cache"):
        layer = wait_for(mount_dir, "prefetch_done")
        landmark_offset = entries[".prefetch.landmark"].chunks[0].blob_offset
        # The manifest's prefetch-end annotation lets the mount ask for everything before the
        # landmark at once, in the TOC's request, after the TOC; the prefetch consumes it.
        expected = (0, landmark_offset - 1)
        assert prioritized[-1].blob_end <= landmark_offset  # everything before the landmark
        [request] = blob_requests(nginx, blob_uri)
        toc_range, prefetch_range = ranges_of(request)
        assert prefetch_range == expected
        blob_size = (Path(nginx.root) / blob_uri.lstrip("/")).stat().st_size
        assert landmark_offset < toc_range[0] <= toc_range[1] < blob_size  # the TOC: at the end
        assert request.status == 206
        assert layer["chunks_prefetched"] == len(prioritized) == 4
        nginx.clear_log()
        for path in PRIORITIZED:
            assert read_all(mount_dir, path) == FILES[path]
        assert blob_requests(nginx, blob_uri) == []  # served from what the prefetch fetched


def test_reads_during_the_prefetch_wait_for_it(published, nginx, tmp_path):
    blob_uri, entries, prioritized = published
    prefetch_start = 0  # the prefetch asks for everything before the landmark (see above)
    landmark_offset = entries[".prefetch.landmark"].chunks[0].blob_offset
    prefetch_range = f"{prefetch_start}-{landmark_offset - 1}"
    with FaultProxy(nginx.url) as proxy:
        # The prefetch's part of the answer (after the TOC's) takes a second: the reads below
        # arrive while it is on its way.
        proxy.inject("pause", seconds=1.0, match=lambda method, path, headers: headers.get(
            "Range", "").endswith(f",{prefetch_range}"))
        mount_dir = tmp_path / "mnt"
        with mounted(f"{proxy.url}/layout:{TAG}", mount_dir, "--no-background-fetch",
                     cache_dir=tmp_path / "cache"):
            started = time.monotonic()
            assert read_all(mount_dir, "app/lib.bin") == FILES["app/lib.bin"]
            assert read_all(mount_dir, "app/start.py") == FILES["app/start.py"]
            waited_s = time.monotonic() - started
            assert proxy.faults_applied == 1
    chunk_reads = [r for r in blob_requests(nginx, blob_uri)
                   if any(start < prioritized[-1].blob_end for start, _ in ranges_of(r))]
    assert [ranges_of(r)[1:] for r in chunk_reads] == [[(prefetch_start, landmark_offset - 1)]]
    assert 0.5 < waited_s < 5  # the reads waited for the paused part (1 s from its start)


def test_a_multi_chunk_read_is_one_request(published, nginx, tmp_path):
    blob_uri, entries, _ = published
    chunks = entries["data/a.bin"].chunks
    mount_dir = tmp_path / "mnt"
    with mounted(f"{nginx.url}/layout:{TAG}", mount_dir, "--no-background-fetch",
                 "--no-prefetch", cache_dir=tmp_path / "cache"):
        nginx.clear_log()
        assert pread(mount_dir, "data/a.bin", 0, 1 << 20) == FILES["data/a.bin"][:1 << 20]
        [request] = finished_blob_requests(nginx, blob_uri)
        # One merged range from the file's first chunk through at least the 4th (1 MiB over
        # 256 KiB chunks), and readahead's chunks after it, in the same request.
        [(first, last)] = ranges_of(request)
        assert first == chunks[0].blob_offset
        assert last + 1 in {chunk.blob_end for chunk in chunks[3:]}
        assert request.status == 206


def test_distant_chunks_are_one_multi_range_request(published, nginx, tmp_path):
    blob_uri, entries, _ = published
    chunks = entries["data/a.bin"].chunks
    mount_dir = tmp_path / "mnt"
    with mounted(f"{nginx.url}/layout:{TAG}", mount_dir, "--no-background-fetch",
                 "--no-prefetch", *EXACT_READS, cache_dir=tmp_path / "cache"):
        # The second chunk alone first (a read in its middle, not sequential: no readahead)...
        assert pread(mount_dir, "data/a.bin", CHUNK + 1000, 10) == \
            FILES["data/a.bin"][CHUNK + 1000:CHUNK + 1010]
        assert [ranges_of(r) for r in finished_blob_requests(nginx, blob_uri)][-1] == \
            [(chunks[1].blob_offset, chunks[1].blob_end - 1)]
        nginx.clear_log()
        # ...then the first 768 KiB: chunks 0 and 2 (and readahead) are missing, with chunk 1's
        # 256 KiB between them: two ranges in one multipart request.
        assert pread(mount_dir, "data/a.bin", 0, 3 * CHUNK) == FILES["data/a.bin"][:3 * CHUNK]
        [request] = finished_blob_requests(nginx, blob_uri)
        spans = ranges_of(request)
        assert spans[0] == (chunks[0].blob_offset, chunks[0].blob_end - 1)
        assert len(spans) == 2 and spans[1][0] == chunks[2].blob_offset
        assert request.status == 206
        # (Set when the whole answer is in: the read itself may return before its readahead.)
        assert wait_for(mount_dir, "multi_range")["multi_range"] is True


def test_background_fetch_makes_the_image_local(published, nginx, tmp_path):
    blob_uri, entries, _ = published
    mount_dir = tmp_path / "mnt"
    cache_dir = tmp_path / "cache"
    with mounted(f"{nginx.url}/layout:{TAG}", mount_dir, cache_dir=cache_dir):
        layer = wait_for(mount_dir, "background_done")
        assert layer["background_chunks_left"] == 0 and layer["errors"] == 0
        assert layer["background_bytes"] > 0
        digests = {digest.split(":")[1] for digest in chunk_digests(entries)}
        cached = {path.name for path in (cache_dir / "chunks").rglob("*") if path.is_file()}
        assert digests <= cached
        nginx.clear_log()
        drop_kernel_caches()
        for path, data in FILES.items():
            assert read_all(mount_dir, path) == data
        assert blob_requests(nginx, blob_uri) == []


# --- faults ------------------------------------------------------------------------------------
#
# One test shape for every fault (test_every_fault_keeps_the_four_promises): mount through the
# proxy, read two files while all is well, inject the fault, run the same workload of reads,
# then check the four promises:
#   1. every read returns the right bytes or EIO, never other bytes;
#   2. the daemon lives: it still serves the files it had, `lazyfs stats` answers, and for a
#      fault that caused an EIO, stats' last error names the cause;
#   3. nothing unverified entered the cache: every chunk file hashes to its name (a chunk digest
#      of this image), every TOC record to the checksum in front of it, and no temp file is left;
#   4. once the fault clears, every file reads right.

# Two files read before the fault: during it, they must still be served (from the cache).
WARM = ("app/start.py", "data/small.txt")
# The workload under the fault, as (path, offset, size): chunk 1 of a.bin alone first, then,
# at once, the first 3 chunks of a.bin (chunks 0 and 2 are missing with chunk 1 between them:
# a multi-range request), all of b.bin (one merged range) and a few bytes in app/lib.bin.
FIRST_READ = ("data/a.bin", CHUNK + 1000, 10)
THEN_READS = (("data/a.bin", 0, 3 * CHUNK), ("data/b.bin", 0, 3 * CHUNK),
              ("app/lib.bin", 300 * KiB, 5000))
RIGHT, EIO = "right bytes", "EIO"
# For the faults that wait for the read timeout: each failing read costs 3 of them.
SHORT_TIMEOUT = ("--timeout", "0.5")


@dataclass(frozen=True)
class FaultCase:
    name: str
    kind: str
    params: dict = field(default_factory=dict)
    # What the reads see: EIO for some of them, or only RIGHT (retries or a fallback absorb it).
    outcome: str = EIO
    # A regular expression that stats' last error must match when a read got EIO.
    cause: str = ""
    # Further checks of the layer's stats after the faulty run, or None.
    check: Callable[[dict], bool] | None = None
    # The fault ends by itself (a burst): it must be used up before the test clears it.
    ends_by_itself: bool = False
    # Mount options (after FAST_FAILURE, so they win).
    mount_args: tuple[str, ...] = ()
    layout: str = "estargz_layout"  # the fixture with the image in the format to test


def multi_range_reads(method, path, headers) -> bool:
    return blob_reads(method, path, headers) and "," in headers.get("Range", "")


FAULT_CASES = [
    FaultCase("reset", "reset", cause=r"FetchError: .*GET failed: .*\(gave up after 3 attempts\)"),
    FaultCase("reset-twice", "reset", {"times": 2}, outcome=RIGHT,
              check=lambda layer: layer["retries"] >= 2),
    FaultCase("delay-below-timeout", "delay", {"seconds": 0.3}, outcome=RIGHT),
    FaultCase("delay-past-timeout", "delay", {"seconds": 1.5},
              cause=r"GET timed out after .*gave up after 3 attempts",
              mount_args=SHORT_TIMEOUT),
    # Headers and half the body, then silence: the read timeout fires mid-body.
    # The members that arrived before the silence are delivered and kept: a 3-chunk range (b.bin)
    # stalled half-way still yields its first chunk, so more than the 2 WARM chunks are fetched.
    FaultCase("stall", "stall", {"seconds": 30},
              cause=r"connection lost after \d+ bytes of the body: timed out waiting for more "
                    r"bytes \(gave up after 3 attempts\)", mount_args=SHORT_TIMEOUT,
              check=lambda layer: layer["chunks_fetched"] > len(WARM)),
    FaultCase("truncate", "truncate", cause=r"(ended after|connection lost).*gave up after 3"),
    FaultCase("5xx", "status", {"status": 500}, cause=r"HTTP 500.*gave up after 3 attempts"),
    # 6 answers of 503: more than the 3 attempts of one read, then the server is back.
    FaultCase("5xx-burst", "status", {"status": 503, "times": 6},
              cause=r"HTTP 503.*gave up after 3 attempts", ends_by_itself=True),
    FaultCase("ignore-range", "ignore_range", cause=r"RangeNotSupported: .*ignored the Range",
              check=lambda layer: layer["retries"] == 0),
    FaultCase("wrong-content-range", "wrong_range",
              cause=r"RangeNotSupported: .*server answered Content-Range"),
    FaultCase("lying-content-range", "wrong_range", {"lie": True},
              cause=r"VerificationError|FormatError"),
    FaultCase("flip-one-byte", "corrupt", cause=r"VerificationError|FormatError"),
    FaultCase("flip-several-bytes", "flip", {"count": 5}, cause=r"VerificationError|FormatError"),
    # The zstd codec decodes a bounded prefix and may stop before a frame's own checksum:
    # whatever the codec lets through, the chunk digest must refuse.
    FaultCase("flip-several-bytes-zstd", "flip", {"count": 5},
              cause=r"VerificationError|FormatError", layout="zstd_layout"),
    # The multipart framing is intact: the parts are believed, and each must fail its check.
    FaultCase("flip-in-multipart", "flip", {"count": 3, "match": multi_range_reads},
              cause=r"VerificationError|FormatError",
              check=lambda layer: layer["multi_range"] is True),
    # Silent after half of a multi-range answer: the parts that came in are kept, and the
    # retry, for what is missing, is one range (not stalled).
    FaultCase("stall-in-multipart", "stall", {"match": multi_range_reads}, outcome=RIGHT,
              check=lambda layer: layer["retries"] >= 1, mount_args=SHORT_TIMEOUT),
    # Cut in the middle of the second part: the first part is kept, the rest retried.
    FaultCase("truncate-multipart", "truncate_multipart", outcome=RIGHT,
              check=lambda layer: layer["retries"] >= 1),
    FaultCase("no-multirange", "no_multirange", outcome=RIGHT,
              check=lambda layer: layer["multi_range"] is False),
    FaultCase("bad-multipart", "bad_multipart", outcome=RIGHT,
              check=lambda layer: layer["multi_range"] is False),
]


@pytest.mark.parametrize("case", FAULT_CASES, ids=lambda case: case.name)
def test_every_fault_keeps_the_four_promises(case, request, nginx, tmp_path):
    _, entries, _ = _publish(request.getfixturevalue(case.layout), nginx)
    cache_dir = tmp_path / "cache"
    mount_dir = tmp_path / "mnt"
    with FaultProxy(nginx.url) as proxy, \
            mounted(f"{proxy.url}/layout:{TAG}", mount_dir, "--no-background-fetch",
                    "--no-prefetch", *FAST_FAILURE, *case.mount_args,
                    cache_dir=cache_dir) as daemon:
        for path in WARM:
            assert read_all(mount_dir, path) == FILES[path]
        params = {"match": blob_reads, **case.params}
        proxy.inject(case.kind, **params)

        outcomes = run_workload(mount_dir)  # promise 1 is checked read by read
        assert proxy.faults_applied >= 1, "the fault never applied: the test proves nothing"
        if case.outcome == RIGHT:
            assert set(outcomes) == {RIGHT}, outcomes
        else:
            assert EIO in outcomes, outcomes

        # 2. The daemon lives, serves what it has, and says what went wrong.
        assert daemon.poll() is None
        for path in WARM:
            forget_pages(mount_dir / path)
            assert direct_read(mount_dir / path, 0, len(FILES[path])) == FILES[path]
        [layer] = lazyfs_stats(mount_dir)["layers"]
        if EIO in outcomes:
            assert re.search(case.cause, layer["last_error"]), layer["last_error"]
        if case.check is not None:
            # Polled: some effects come after the reads return (a readahead's retry).
            deadline = time.monotonic() + 10
            while not case.check(layer):
                assert time.monotonic() < deadline, layer
                time.sleep(0.05)
                layer = stats(mount_dir)

        # 3. Only verified chunks (of this image) in the cache, no temp files.
        assert_cache_holds_only_verified(cache_dir, chunk_digests(entries))

        # 4. Once the fault is over, everything reads right.
        if case.ends_by_itself:
            assert proxy.active is None
        proxy.clear()
        for path, data in FILES.items():
            forget_pages(mount_dir / path)
            assert read_all(mount_dir, path) == data
        assert daemon.poll() is None


def run_workload(mount_dir: Path) -> list[str]:
    """The outcome of each read of the workload (RIGHT or EIO); any other outcome fails the
    test at once. The reads after the first run at once, as a program's threads would."""
    outcomes = [checked_read(mount_dir, *FIRST_READ)]
    with concurrent.futures.ThreadPoolExecutor(len(THEN_READS)) as pool:
        outcomes += pool.map(lambda read: checked_read(mount_dir, *read), THEN_READS)
    return outcomes


def checked_read(mount_dir: Path, path: str, offset: int, size: int) -> str:
    try:
        data = direct_read(mount_dir / path, offset, size)
    except OSError as exc:
        assert exc.errno == errno.EIO, exc
        return EIO
    assert data == FILES[path][offset:offset + size], f"wrong bytes from {path} at {offset}"
    return RIGHT


# --- what a fault does to the fetch engine, beyond the promises --------------------------------

@pytest.fixture
def proxied(published_estargz, nginx, tmp_path):
    """Mount through a FaultProxy; yields (proxy, mount_dir). No prefetch or background fetch:
    every blob request comes from the reads under test."""
    with FaultProxy(nginx.url) as proxy:
        mount_dir = tmp_path / "mnt"
        with mounted(f"{proxy.url}/layout:{TAG}", mount_dir, "--no-background-fetch",
                     "--no-prefetch", *FAST_FAILURE, *EXACT_READS, cache_dir=tmp_path / "cache"):
            yield proxy, mount_dir


def blob_reads(method, path, headers) -> bool:
    return "/blobs/" in path and "Range" in headers


@pytest.mark.parametrize("fault", ["no_multirange", "bad_multipart"])
def test_servers_without_multi_range_get_single_ranges(proxied, fault):
    proxy, mount_dir = proxied
    proxy.inject(fault)

    def read_around_the_second_chunk(path):
        # The second chunk alone, then the first three: chunks 0 and 2 are missing, with the
        # second one between them, so the read needs two ranges.
        assert pread(mount_dir, path, CHUNK + 1000, 10) == FILES[path][CHUNK + 1000:CHUNK + 1010]
        assert pread(mount_dir, path, 0, 3 * CHUNK) == FILES[path][:3 * CHUNK]

    read_around_the_second_chunk("data/a.bin")
    assert proxy.faults_applied == 1  # the one multi-range attempt
    assert stats(mount_dir)["multi_range"] is False
    # Remembered: the next read needing two ranges sends two single-range requests.
    seen = len(proxy.seen)
    read_around_the_second_chunk("data/b.bin")
    new_ranges = [header for _, path, header in proxy.seen[seen:] if "/blobs/" in path]
    assert len(new_ranges) == 3 and not any("," in header for header in new_ranges)
    assert proxy.faults_applied == 1


@pytest.mark.parametrize("kind", ["flip", "stall"])
def test_faults_during_the_prefetch_and_the_background_fetch(kind, published_estargz, nginx,
                                                             tmp_path):
    """The same promises for the fetches nobody waits on: the prefetch at mount (which the
    reads of prioritized files wait for) and the background fetch. And an unmount while they
    are stuck does not wait for them."""
    _, entries, _ = published_estargz
    cache_dir = tmp_path / "cache"
    mount_dir = tmp_path / "mnt"
    with FaultProxy(nginx.url) as proxy:
        image = f"{proxy.url}/layout:{TAG}"
        # A first mount that fetches nothing but the TOC, so that the second one finds it in
        # the TOC cache: the fault then hits every blob request, and the mount still appears.
        with mounted(image, mount_dir, "--no-prefetch", "--no-background-fetch",
                     cache_dir=cache_dir):
            pass
        proxy.inject(kind, match=blob_reads)
        with mounted(image, mount_dir, *FAST_FAILURE, *SHORT_TIMEOUT,
                     cache_dir=cache_dir) as daemon:
            # The reads of the prioritized files wait for the prefetch: right bytes or EIO.
            outcomes = [checked_read(mount_dir, path, 0, len(FILES[path]))
                        for path in PRIORITIZED]
            assert EIO in outcomes
            # The background fetch's first pass fails too (its requests are retried first); it
            # is over when no request came for longer than a retry's wait (the next pass is
            # 30 s away).
            wait_for_quiet(proxy, mount_dir, quiet_s=1.5)
            assert daemon.poll() is None
            [layer] = lazyfs_stats(mount_dir)["layers"]
            assert layer["errors"] >= 1
            assert re.search(r"FormatError|timed out", layer["last_error"]), layer["last_error"]
            assert_cache_holds_only_verified(cache_dir, chunk_digests(entries))
            proxy.clear()
            for path, data in FILES.items():
                assert read_all(mount_dir, path) == data
            started = time.monotonic()
            if kind == "stall":  # a background request stuck in the silence at unmount
                proxy.inject(kind, match=blob_reads)
        assert time.monotonic() - started < 10


def wait_for_quiet(proxy, mount_dir: Path, quiet_s: float, timeout_s: float = 30) -> None:
    """Until the prefetch is done, the background fetch has started, and the proxy has seen
    no request for `quiet_s`."""
    deadline = time.monotonic() + timeout_s
    seen, since = len(proxy.seen), time.monotonic()
    while True:
        layer = stats(mount_dir)
        if len(proxy.seen) != seen:
            seen, since = len(proxy.seen), time.monotonic()
        elif (layer["prefetch_done"] and layer["background_chunks_left"] >= 0
              and time.monotonic() - since >= quiet_s):
            return
        assert time.monotonic() < deadline, layer
        time.sleep(0.05)


def test_faults_while_mounting_are_retried(published_estargz, nginx, tmp_path):
    """Opening the image (index, manifest, config, then each layer's TOC) meets the same faults
    as reads and is retried the same way: a reset or two do not fail the mount, a server that
    keeps failing does, with the cause, the attempts and the fetch error's exit code."""
    cache_dir = tmp_path / "cache"
    mount_dir = tmp_path / "mnt"
    mount_dir.mkdir()
    with FaultProxy(nginx.url) as proxy:
        image = f"{proxy.url}/layout:{TAG}"

        def mount(cache_name: str) -> subprocess.CompletedProcess:
            # A cache of its own for each mount: a cached TOC would skip the TOC read.
            return subprocess.run(lazyfs_cmd("mount", "--cache-dir", cache_dir / cache_name,
                                             *FAST_FAILURE, image, mount_dir),
                                  capture_output=True, text=True, timeout=60)

        proxy.inject("status", status=503, match=blob_reads)  # the TOC read, for good
        failed = mount("failed")
        assert failed.returncode == 5, failed.stderr
        assert re.search(r"HTTP 503.*\(gave up after 3 attempts\)", failed.stderr), failed.stderr
        assert not os.path.ismount(mount_dir)

        for number, fault in enumerate((
                {"kind": "reset", "times": 2},  # the first documents
                {"kind": "reset", "times": 2, "match": blob_reads})):  # the TOC read
            proxy.inject(**fault)
            done = mount(str(number))
            try:
                assert done.returncode == 0, done.stderr
                assert proxy.active is None  # both faults were met
                assert read_all(mount_dir, "data/a.bin") == FILES["data/a.bin"]
            finally:
                subprocess.run(lazyfs_cmd("umount", mount_dir), capture_output=True, timeout=60)
