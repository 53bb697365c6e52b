"""The fetch engine through a real mount against a real nginx, with and without faults.

nginx's access log proves what went over the wire: a multi-chunk read is one request (merged,
or multi-range), the prefetch of the prioritized files is one request at mount, and reads of
those files wait for it. Faults come from tests/faultproxy.py between the mount and nginx:
connection resets, delays past the timeout, 5xx, a server ignoring Range, truncated bodies,
wrong bytes, servers without (or with broken) multi-range support. Through all of them a read
returns the right bytes or EIO, never wrong bytes, and reads succeed again once the fault
clears.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from converter.image import convert_image
from converter.layer import LayerOptions
from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.format.seekable import FORMATS
from lazyfs.oci_layout import open_image
from lazyfs.prefetch import prioritized_chunks
from tests.faultproxy import FaultProxy
from tests.imagebuild import write_layout
from tests.mounting import mounted, require_fuse
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
    fd = os.open(mount_dir / path, os.O_RDONLY)
    try:
        out = b""
        while len(out) < size:
            part = os.pread(fd, size - len(out), offset + len(out))
            if not part:
                break
            out += part
        return out
    finally:
        os.close(fd)


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
        # landmark at once, before (and side by side with) the TOC; the prefetch consumes it.
        expected = (0, landmark_offset - 1)
        assert prioritized[-1].blob_end <= landmark_offset  # everything before the landmark
        # (The other blob request is the mount's read of the TOC, at the end of the blob.)
        prefetch = [r for r in blob_requests(nginx, blob_uri)
                    if ranges_of(r)[0][0] < landmark_offset]
        assert [ranges_of(r) for r in prefetch] == [[expected]]
        assert prefetch[0].status == 206
        assert layer["chunks_prefetched"] == len(prioritized) == 4
        nginx.clear_log()
        for path in PRIORITIZED:
            assert read_all(mount_dir, path) == FILES[path]
        assert blob_requests(nginx, blob_uri) == []  # served from what the prefetch fetched


def test_reads_during_the_prefetch_wait_for_it(published, nginx, tmp_path):
    blob_uri, entries, prioritized = published
    prefetch_start = 0  # the prefetch asks for everything before the landmark (see above)
    landmark_offset = entries[".prefetch.landmark"].chunks[0].blob_offset
    with FaultProxy(nginx.url) as proxy:
        # The prefetch answer takes a second: the reads below arrive while it is on its way.
        proxy.inject("delay", seconds=1.0, match=lambda method, path, headers: headers.get(
            "Range", "").startswith(f"bytes={prefetch_start}-"))
        mount_dir = tmp_path / "mnt"
        with mounted(f"{proxy.url}/layout:{TAG}", mount_dir, "--no-background-fetch",
                     cache_dir=tmp_path / "cache"):
            started = time.monotonic()
            assert read_all(mount_dir, "app/lib.bin") == FILES["app/lib.bin"]
            assert read_all(mount_dir, "app/start.py") == FILES["app/start.py"]
            waited_s = time.monotonic() - started
            assert proxy.faults_applied == 1
    chunk_reads = [r for r in blob_requests(nginx, blob_uri)
                   if ranges_of(r)[0][0] < prioritized[-1].blob_end]
    assert [ranges_of(r) for r in chunk_reads] == [[(prefetch_start, landmark_offset - 1)]]
    assert waited_s < 5


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
        digests = {chunk.digest.split(":")[1] for item in entries.values() for chunk in item.chunks}
        cached = {path.name for path in (cache_dir / "chunks").rglob("*") if path.is_file()}
        assert digests <= cached
        nginx.clear_log()
        drop_kernel_caches()
        for path, data in FILES.items():
            assert read_all(mount_dir, path) == data
        assert blob_requests(nginx, blob_uri) == []


# --- faults ------------------------------------------------------------------------------------

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


def test_connection_resets_are_retried(proxied):
    proxy, mount_dir = proxied
    proxy.inject("reset", times=2, match=blob_reads)
    assert read_all(mount_dir, "data/a.bin") == FILES["data/a.bin"]
    assert proxy.faults_applied == 2
    assert stats(mount_dir)["retries"] >= 2


def test_5xx_is_retried_then_eio_then_recovers(proxied):
    proxy, mount_dir = proxied
    proxy.inject("status", status=503, times=2, match=blob_reads)
    assert read_all(mount_dir, "data/b.bin") == FILES["data/b.bin"]
    proxy.inject("status", status=503, match=blob_reads)
    assert_eio(mount_dir, "data/a.bin")
    layer = stats(mount_dir)
    assert "HTTP 503" in layer["last_error"] and "gave up after 3 attempts" in layer["last_error"]
    proxy.clear()
    assert read_all(mount_dir, "data/a.bin") == FILES["data/a.bin"]


def test_a_server_ignoring_range_is_a_clear_eio_without_retries(proxied):
    proxy, mount_dir = proxied
    proxy.inject("ignore_range", match=blob_reads)
    assert_eio(mount_dir, "data/small.txt")
    layer = stats(mount_dir)
    assert "RangeNotSupported" in layer["last_error"]
    assert "ignored the Range header" in layer["last_error"]
    assert layer["retries"] == 0
    proxy.clear()
    assert read_all(mount_dir, "data/small.txt") == FILES["data/small.txt"]


def test_truncated_bodies_are_retried_then_eio_then_recover(proxied):
    proxy, mount_dir = proxied
    proxy.inject("truncate", times=1, match=blob_reads)
    assert read_all(mount_dir, "data/b.bin") == FILES["data/b.bin"]
    # For good now: a read of one chunk fails after the retries. (A sequential read may still
    # get through: each answer's first half delivers the chunk it needs, and a retry asks only
    # for what is still missing.)
    proxy.inject("truncate", match=blob_reads)
    with pytest.raises(OSError) as info:
        pread(mount_dir, "data/a.bin", 5 * CHUNK + 100, 10)
    assert info.value.errno == errno.EIO
    assert "gave up after 3 attempts" in stats(mount_dir)["last_error"]
    proxy.clear()
    assert read_all(mount_dir, "data/a.bin") == FILES["data/a.bin"]


def test_wrong_bytes_are_never_served_nor_cached(proxied, tmp_path):
    proxy, mount_dir = proxied
    proxy.inject("corrupt", match=blob_reads)
    for path in ("data/a.bin", "data/b.bin", "app/lib.bin"):
        try:
            data = read_all(mount_dir, path)
        except OSError as exc:
            assert exc.errno == errno.EIO
        else:  # a flipped byte in a gap between members would be harmless: still exact
            assert data == FILES[path]
    layer = stats(mount_dir)
    assert "VerificationError" in layer["last_error"] or "FormatError" in layer["last_error"]
    # Whatever reached the disk cache is what its name (the chunk digest) says.
    for chunk_file in (tmp_path / "cache" / "chunks").rglob("*"):
        if chunk_file.is_file():
            assert hashlib.sha256(chunk_file.read_bytes()).hexdigest() == chunk_file.name
    proxy.clear()
    for path in ("data/a.bin", "data/b.bin", "app/lib.bin"):
        assert read_all(mount_dir, path) == FILES[path]


def test_delays_below_the_timeout_are_fine_and_above_it_eio(proxied):
    proxy, mount_dir = proxied
    proxy.inject("delay", seconds=0.3, match=blob_reads)
    assert read_all(mount_dir, "data/small.txt") == FILES["data/small.txt"]
    proxy.inject("delay", seconds=2.5, match=blob_reads)
    started = time.monotonic()
    assert_eio(mount_dir, "data/b.bin")
    # 3 attempts of a 1 s read timeout and at most 0.2 + 0.4 s of backoff (and the kernel's
    # readahead may ask twice).
    assert time.monotonic() - started < 10
    assert "timed out" in stats(mount_dir)["last_error"]
    proxy.clear()
    assert read_all(mount_dir, "data/b.bin") == FILES["data/b.bin"]


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
