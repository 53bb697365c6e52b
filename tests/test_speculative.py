"""The speculative prefetch download (lazyfs/source/speculative.py) over a real nginx: the
windows are fetched once, in one request with the TOC's range, served to the requests inside
them until the prefetch is over, and never trusted more than any other source's bytes; and
the converter writes the annotations that start it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from converter.image import convert_image
from converter.layer import LayerOptions
from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.errors import FetchError
from lazyfs.format import oci
from lazyfs.oci_layout import open_image
from lazyfs.source.http import HttpSource
from lazyfs.source import speculative
from lazyfs.source.speculative import MAX_SPECULATIVE_BYTES, SpeculativeSource
from tests.imagebuild import write_layout
from tests.mounting import mounted
from tests.servers import PyHttpServer
from tests.tarbuild import dir_, file_

BLOB = random.Random(5).randbytes(3 << 20)
WINDOW = 2 << 20


@pytest.fixture
def blob_url(nginx):
    (Path(nginx.root) / "blob").write_bytes(BLOB)
    return f"{nginx.url}/blob"


def blob_ranges(nginx) -> list[str]:
    return [r.range for r in nginx.requests() if r.uri == "/blob"]


def test_the_window_is_downloaded_once_and_streamed_to_its_request(nginx, blob_url):
    source = SpeculativeSource(HttpSource(blob_url), [(0, WINDOW)])
    try:
        # Something else first (as the TOC read is): it goes to the server, the window stays.
        assert source.read(len(BLOB) - 100, 100) == BLOB[-100:]
        pieces = list(source.read_ranges([(198, 1000), (5000, WINDOW - 5000)]))
        assert b"".join(p for i, p in pieces if i == 0) == BLOB[198:1198]
        assert b"".join(p for i, p in pieces if i == 1) == BLOB[5000:WINDOW]
        # One request for both, the TOC's range first.
        assert blob_ranges(nginx) == [f"bytes={len(BLOB) - 100}-{len(BLOB) - 1},0-{WINDOW - 1}"]
        # Until the prefetch is over, the window serves every request inside it (the prefetch
        # may need several); then its memory goes, and the same range is a new request.
        assert source.read(198, 1000) == BLOB[198:1198]
        assert len(blob_ranges(nginx)) == 1
        source.discard()
        assert source.read(198, 1000) == BLOB[198:1198]
        assert len(blob_ranges(nginx)) == 2
    finally:
        source.close()


class AskLog:
    """A source that records each read_ranges call's first offset, in order."""

    def __init__(self, inner):
        self.inner, self.asked = inner, []

    def read_ranges(self, ranges):
        self.asked.append(ranges[0][0])
        yield from self.inner.read_ranges(ranges)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextmanager
def watched(blob_url, monkeypatch, start_wait_s):
    """(its AskLog, a SpeculativeSource over it) for the blob, the download's wait set; the
    source is closed at the end."""
    monkeypatch.setattr(speculative, "START_WAIT_S", start_wait_s)
    inner = AskLog(HttpSource(blob_url))
    source = SpeculativeSource(inner, [(0, WINDOW)])
    try:
        yield inner, source
    finally:
        source.close()


def wait_until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_toc_read_goes_first_and_carries_the_download(nginx, blob_url, monkeypatch):
    with watched(blob_url, monkeypatch, 30.0) as (inner, source):
        time.sleep(0.2)
        assert inner.asked == []  # no window download before the TOC's read
        tail = len(BLOB) - 1000
        assert source.read(tail, 1000) == BLOB[tail:]
        assert inner.asked == [tail]  # one request, the TOC's range first
        assert source.read(0, WINDOW) == BLOB[:WINDOW]
        assert inner.asked == [tail]


def test_a_server_without_multi_range_gets_the_toc_then_the_window(tmp_path, monkeypatch):
    (tmp_path / "blob").write_bytes(BLOB)
    # It answers several ranges with the whole blob.
    with PyHttpServer(tmp_path) as server, \
            watched(f"{server.url}/blob", monkeypatch, 30.0) as (_, source):
        tail = len(BLOB) - 1000
        assert source.read(tail, 1000) == BLOB[tail:]
        assert source.read(0, WINDOW) == BLOB[:WINDOW]
        ranges = [r.headers.get("Range") for r in server.received]
        assert ranges == [f"bytes={tail}-{len(BLOB) - 1},0-{WINDOW - 1}",
                          f"bytes={tail}-{len(BLOB) - 1}", f"bytes=0-{WINDOW - 1}"]


def test_a_failed_toc_read_reaches_its_reader_and_the_window_is_fetched_again(nginx, blob_url,
                                                                              monkeypatch):
    with watched(blob_url, monkeypatch, 30.0) as (inner, source):
        with pytest.raises(FetchError, match="past the end"):
            source.read(len(BLOB) + 10, 100)  # the request fails (416) before the window
        with pytest.raises(FetchError) as caught:
            source.read(0, WINDOW)  # the prefetch's first try: the download failed too
        assert caught.value.retriable
        assert source.read(0, WINDOW) == BLOB[:WINDOW]  # its retry goes to the server


def test_a_read_reaching_into_the_window_does_not_carry_it(nginx, blob_url, monkeypatch):
    # As a small blob's tail read would: it goes alone, and the window's download starts.
    with watched(blob_url, monkeypatch, 30.0) as (inner, source):
        assert source.read(WINDOW - 10, 20) == BLOB[WINDOW - 10:WINDOW + 10]
        wait_until(lambda: len(inner.asked) == 2)
        assert sorted(inner.asked) == [0, WINDOW - 10]
        assert source.read(0, WINDOW) == BLOB[:WINDOW]


def test_without_an_outside_read_the_download_starts_after_a_while(nginx, blob_url,
                                                                     monkeypatch):
    with watched(blob_url, monkeypatch, 0.1) as (inner, source):
        wait_until(lambda: inner.asked == [0])
        assert source.read(10, 100) == BLOB[10:110]


def test_a_read_of_the_window_starts_the_download_at_once(nginx, blob_url, monkeypatch):
    with watched(blob_url, monkeypatch, 30.0) as (inner, source):
        started = time.monotonic()
        assert source.read(0, WINDOW) == BLOB[:WINDOW]
        assert time.monotonic() - started < 10 and inner.asked == [0]


def test_a_window_given_up_before_it_started_is_never_asked_for(nginx, blob_url, monkeypatch):
    with watched(blob_url, monkeypatch, 30.0) as (inner, source):
        source.discard()
        source._thread.join(5)
        assert not source._thread.is_alive() and inner.asked == []
        assert source.read(10, 100) == BLOB[10:110]  # later reads go to the server


def test_a_request_past_the_window_goes_to_the_server(nginx, blob_url):
    source = SpeculativeSource(HttpSource(blob_url), [(0, WINDOW)])
    try:
        assert source.read(WINDOW - 10, 20) == BLOB[WINDOW - 10:WINDOW + 10]
        assert f"bytes={WINDOW - 10}-{WINDOW + 9}" in blob_ranges(nginx)
        source.discard()  # the prefetch ended without using it: the memory goes
        assert source.read(0, 10) == BLOB[:10]
    finally:
        source.close()


def test_a_failed_download_is_a_retriable_error_then_the_server_is_asked(nginx, blob_url):
    # A window past the end of the blob: the download fails (416), as a lying annotation would.
    source = SpeculativeSource(HttpSource(blob_url), [(0, len(BLOB) + 4096)])
    try:
        with pytest.raises(FetchError) as caught:
            source.read(0, 100)
        assert caught.value.retriable
        assert source.read(0, 100) == BLOB[:100]  # the fetcher's retry
    finally:
        source.close()


def test_a_huge_annotation_is_capped():
    class Recorder:
        requests = 0
        asked: list = []
        done = threading.Event()

        def read(self, blob_offset, length):
            self.asked.append((blob_offset, length))
            self.done.set()
            return bytes(length)

        def describe(self):
            return "recorder"

        def close(self):
            pass

    inner = Recorder()
    source = SpeculativeSource(inner, [(0, 10 << 40)])
    assert inner.done.wait(10)
    assert inner.asked == [(0, MAX_SPECULATIVE_BYTES)]
    source.close()


def test_several_windows_come_in_one_request_and_serve_the_ranges_inside_them(nginx,
                                                                              blob_url):
    windows = [(1000, 5000), (100_000, 300_000), (2_000_000, 2_100_000)]
    source = SpeculativeSource(HttpSource(blob_url), windows)
    try:
        tail = len(BLOB) - 100
        assert source.read(tail, 100) == BLOB[tail:]
        wanted = [(1000, 4000), (150_000, 100_000), (2_050_000, 50_000)]
        pieces = list(source.read_ranges(wanted))
        for index, (offset, length) in enumerate(wanted):
            assert b"".join(p for i, p in pieces if i == index) == BLOB[offset:offset + length]
        assert source.read(100_000, 10) == BLOB[100_000:100_010]  # a second request inside
        assert blob_ranges(nginx) == [f"bytes={tail}-{len(BLOB) - 1},1000-4999,"
                                      "100000-299999,2000000-2099999"]
        # A range across a gap between two windows, and one in no window: from the server.
        assert source.read(4000, 100_000) == BLOB[4000:104_000]
        assert source.read(500_000, 10) == BLOB[500_000:500_010]
        assert blob_ranges(nginx)[1:] == ["bytes=4000-103999", "bytes=500000-500009"]
    finally:
        source.close()


def test_too_many_windows_are_joined_across_their_smallest_gaps():
    windows, start = [], 0
    for index in range(40):  # gaps of 100, 101, ...: the first ones are the smallest
        windows.append((start, start + 10))
        start += 10 + 100 + index
    joined = speculative._bounded(windows)
    assert len(joined) == speculative.MAX_WINDOWS == 31
    assert joined[0] == (windows[0][0], windows[9][1]) and joined[1:] == windows[10:]
    # The bytes cap cuts the last windows.
    capped = speculative._bounded([(0, MAX_SPECULATIVE_BYTES - 10), (MAX_SPECULATIVE_BYTES, 1 << 40)])
    assert capped == [(0, MAX_SPECULATIVE_BYTES - 10), (MAX_SPECULATIVE_BYTES, MAX_SPECULATIVE_BYTES + 10)]


def test_the_converter_records_where_the_prioritized_files_end(tmp_path, layer_format):
    members = [dir_("app/"), file_("app/first", b"a" * 5000), file_("app/later", b"b" * 7000)]
    source = write_layout(tmp_path / "source", [members], "t")
    out = tmp_path / "out"
    convert_image(f"{source}:t", str(out), archive=False,
                  options=LayerOptions(format=layer_format, prioritized_files=("app/first",)))
    plain = tmp_path / "plain"
    convert_image(f"{source}:t", str(plain), archive=False,
                  options=LayerOptions(format=layer_format))
    with open_image(f"{out}:t") as image:
        [desc] = image.layers
        end = int(desc.annotations[oci.ANNOTATION_PREFETCH_END])
        with LocalBlob(image.blob_path(desc)) as blob:
            entries = {item.path: item for item in SeekableLayer.open(blob).entries}
    assert end == entries[".prefetch.landmark"].chunks[0].blob_offset
    assert entries["app/first"].chunks[-1].blob_end <= end
    with open_image(f"{plain}:t") as image:
        assert oci.ANNOTATION_PREFETCH_END not in image.layers[0].annotations


def read_exactly(path: Path, offset: int, size: int) -> bytes:
    """The bytes, with the kernel told not to read ahead: the mount sees just this read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _bdi_readahead_kib(mount_dir: Path) -> int:
    device = os.stat(mount_dir).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
               .read_text())


def _stats(mount_dir: Path) -> dict:
    return json.loads(os.getxattr(mount_dir, "user.lazyfs.stats"))


def test_a_mount_prefetches_only_what_the_recorded_start_up_read(tmp_path, nginx, layer_format):
    """An image converted with recorded reads, mounted over HTTP: the first blob request asks
    for the TOC and exactly the annotated ranges; those parts read with no further request;
    the rest of a prioritized file comes on demand; the kernel readahead is the start-up
    window until the mount has settled, then the normal one."""
    chunk = 64 << 10
    lib = random.Random(7).randbytes(24 * chunk)
    members = [dir_("app/"), file_("app/lib", lib), file_("app/conf", b"c" * 100),
               file_("app/other", b"o" * 5000)]
    source = write_layout(tmp_path / "source", [members], "t")
    out = Path(nginx.root) / "sparse"
    reads = (("app/lib", ((0, chunk), (10 * chunk, 12 * chunk))),)
    convert_image(f"{source}:t", str(out), archive=False,
                  options=LayerOptions(format=layer_format, chunk_size=chunk,
                                       prioritized_files=("app/lib", "app/conf"),
                                       prioritized_reads=reads))
    with open_image(f"{out}:t") as image:
        [desc] = image.layers
        ranges = oci.parse_ranges(desc.annotations[oci.ANNOTATION_PREFETCH_RANGES])
        if layer_format == "zstd:chunked":
            toc_offset, toc_length = map(int, desc.annotations[
                oci.ANNOTATION_ZSTD_MANIFEST_POSITION].split(":")[:2])
        else:  # the TOC member and the footer: the rest of the blob
            toc_offset = int(desc.annotations[oci.ANNOTATION_TOC_OFFSET])
            toc_length = desc.size - toc_offset
    blob_uri = f"/sparse/blobs/sha256/{desc.digest.split(':')[1]}"
    assert len(ranges) == 3  # lib's first chunk, its chunks 10-11, and conf (after lib)
    nginx.clear_log()
    mount_dir = tmp_path / "mnt"
    with mounted(f"{nginx.url}/sparse:t", mount_dir, "--no-background-fetch",
                 cache_dir=tmp_path / "cache"):
        assert _bdi_readahead_kib(mount_dir) == 128
        deadline = time.monotonic() + 20
        while not _stats(mount_dir)["layers"][0]["prefetch_done"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first = [r.range for r in nginx.requests() if r.uri == blob_uri]
        assert first == [f"bytes={toc_offset}-{toc_offset + toc_length - 1},"
                         + ",".join(f"{start}-{end - 1}" for start, end in ranges)]
        # The recorded reads again, exactly (no kernel readahead around them): no request.
        assert read_exactly(mount_dir / "app/lib", 0, chunk) == lib[:chunk]
        assert read_exactly(mount_dir / "app/lib", 10 * chunk, 2 * chunk) == \
            lib[10 * chunk:12 * chunk]
        assert (mount_dir / "app/conf").read_bytes() == b"c" * 100
        assert len([r for r in nginx.requests() if r.uri == blob_uri]) == 1
        # Not read at start-up: on demand.
        assert read_exactly(mount_dir / "app/lib", 5 * chunk, 1000) == \
            lib[5 * chunk:5 * chunk + 1000]
        assert len([r for r in nginx.requests() if r.uri == blob_uri]) == 2
        deadline = time.monotonic() + 20  # quiet for FetchOptions.background_quiet_s
        while _bdi_readahead_kib(mount_dir) != 1024:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (mount_dir / "app/lib").read_bytes() == lib


def test_a_malformed_prefetch_ranges_annotation_falls_back_to_the_whole_window(tmp_path, nginx):
    members = [dir_("app/"), file_("app/first", b"a" * 5000), file_("app/later", b"b" * 7000)]
    source = write_layout(tmp_path / "source", [members], "t")
    out = Path(nginx.root) / "layout"
    convert_image(f"{source}:t", str(out), archive=False,
                  options=LayerOptions(format="zstd:chunked", prioritized_files=("app/first",),
                                       prioritized_reads=(("app/first", ((0, 10),)),)))
    with open_image(f"{out}:t") as image:
        [desc] = image.layers
        end = int(desc.annotations[oci.ANNOTATION_PREFETCH_END])
    rewrite_layer_annotation(out, oci.ANNOTATION_PREFETCH_RANGES, "0:10,5:1")
    nginx.clear_log()
    mount_dir = tmp_path / "mnt"
    log = tmp_path / "mount.log"
    with mounted(f"{nginx.url}/layout:t", mount_dir, "--no-background-fetch", log=log,
                 cache_dir=tmp_path / "cache"):
        assert (mount_dir / "app/first").read_bytes() == b"a" * 5000
        assert _bdi_readahead_kib(mount_dir) == 1024  # no start-up window without ranges
    blob_requests = [r.range for r in nginx.requests() if r.range]
    assert blob_requests[0].endswith(f",0-{end - 1}")  # the TOC's range, then [0, end)
    assert "ignored" in log.read_text() and "overlaps or precedes" in log.read_text()


def rewrite_layer_annotation(layout: Path, key: str, value: str) -> None:
    """Set an annotation of the first layer of the layout's one manifest (a new manifest blob,
    and the index pointing at it), as an image edited by another tool would be."""
    index = json.loads((layout / "index.json").read_text())
    descriptor = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / descriptor["digest"].split(":")[1]).read_bytes())
    manifest["layers"][0]["annotations"][key] = value
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    descriptor.update(digest=f"sha256:{digest}", size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
