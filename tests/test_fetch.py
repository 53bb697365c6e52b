"""The fetcher alone, over a recording source: single flight, caching, verification."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from converter.layer import LayerOptions, convert_layer
from lazyfs.cache import ChunkCache
from lazyfs.errors import FormatError, VerificationError
from lazyfs.fetch import ChunkFetcher
from lazyfs.format import estargz, oci
from lazyfs.format.estargz import MAX_TOC_COMPRESSED_SIZE
from lazyfs.format.seekable import MAX_FOOTER_SIZE
from lazyfs.layer import TAIL_READ_BYTES, LayerSpec, _tail_offset, open_layer
from lazyfs.priority import Priority
from tests.tarbuild import file_, tar_of

CHUNK = 64 * 1024


class RecordingSource:
    """A blob in memory that logs every read and can be made to return forged bytes."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.reads: list[tuple[int, int]] = []
        self.requests = 0
        self.gate = threading.Event()
        self.gate.set()

    def size(self) -> int:
        return len(self.data)

    def read(self, blob_offset: int, length: int) -> bytes:
        self.gate.wait(10)
        self.reads.append((blob_offset, length))
        self.requests += 1
        return bytes(self.data[blob_offset:blob_offset + length])

    def describe(self) -> str:
        return "memory"


@pytest.fixture
def layer_setup(tmp_path, layer_format):
    content = {f"f{i}": os.urandom(CHUNK * 2 + i) for i in range(3)}
    src = tar_of(tmp_path, *(file_(name, data) for name, data in content.items()))
    out = tmp_path / "layer.blob"
    result = convert_layer(str(src), str(out), LayerOptions(chunk_size=CHUNK, format=layer_format))
    source = RecordingSource(out.read_bytes())
    cache = ChunkCache(str(tmp_path / "cache"))
    layer = open_layer(0, LayerSpec(source, result.toc_digest, "test"), cache)
    files = {item.path: item for item in layer.entries}
    return source, cache, layer, files, content


def read(fetcher, layer, item, offset, size):
    return trio.run(fetcher.read, layer, item.chunks, offset, size)


def test_reads_fetch_only_the_chunks_they_touch(layer_setup):
    source, cache, layer, files, content = layer_setup
    source.reads.clear()
    fetcher = ChunkFetcher([layer], cache)
    item = files["f1"]
    assert read(fetcher, layer, item, CHUNK + 5, 100) == content["f1"][CHUNK + 5:CHUNK + 105]
    chunk = item.chunks[1]
    assert source.reads == [(chunk.blob_offset, chunk.blob_end - chunk.blob_offset)]
    # Again: from memory, no request.
    assert read(fetcher, layer, item, CHUNK, 10) == content["f1"][CHUNK:CHUNK + 10]
    assert len(source.reads) == 1
    # A new fetcher (a remount) with the same disk cache: still no request.
    assert read(ChunkFetcher([layer], cache), layer, item, CHUNK, 10) == content["f1"][CHUNK:CHUNK + 10]
    assert len(source.reads) == 1
    # A read across all chunks of a file returns exactly the file.
    assert read(fetcher, layer, files["f2"], 0, 10 * CHUNK) == content["f2"]


def test_concurrent_readers_of_one_chunk_share_one_fetch(layer_setup):
    source, cache, layer, files, content = layer_setup
    source.reads.clear()
    fetcher = ChunkFetcher([layer], cache)
    item = files["f0"]
    results = []

    async def reader():
        results.append(await fetcher.read(layer, item.chunks, 0, 1000))

    async def main():
        source.gate.clear()  # hold the first fetch so that the others pile up behind it
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(reader)
            await trio.sleep(0.2)
            source.gate.set()

    trio.run(main)
    assert results == [content["f0"][:1000]] * 10
    assert len(source.reads) == 1


def test_forged_chunk_bytes_are_refused_and_not_cached(layer_setup):
    source, cache, layer, files, content = layer_setup
    chunk = files["f0"].chunks[0]
    member = bytes(source.data[chunk.blob_offset:chunk.blob_end])
    # A perfectly valid member (gzip CRC or zstd checksum and all) with other content, padded
    # to the original length so every offset stays right: only the chunk digest can tell.
    forged = layer.codec.compress(b"X" * chunk.size)
    assert len(forged) < len(member)
    source.data[chunk.blob_offset:chunk.blob_end] = forged + bytes(len(member) - len(forged))
    fetcher = ChunkFetcher([layer], cache)
    with pytest.raises(VerificationError):
        read(fetcher, layer, files["f0"], 0, 10)
    assert not cache.contains(chunk.digest)
    assert "VerificationError" in fetcher.stats[0].last_error
    # The failure is not sticky: once the source is right again, the read succeeds.
    source.data[chunk.blob_offset:chunk.blob_end] = member
    assert read(fetcher, layer, files["f0"], 0, 10) == content["f0"][:10]


def test_a_garbled_member_is_a_format_error(layer_setup):
    source, cache, layer, files, _ = layer_setup
    chunk = files["f2"].chunks[0]
    source.data[chunk.blob_offset:chunk.blob_offset + 4] = b"\0\0\0\0"
    with pytest.raises(FormatError):
        read(ChunkFetcher([layer], cache), layer, files["f2"], 0, 10)


def test_toc_is_cached_and_checked(layer_setup, tmp_path):
    source, cache, layer, _, _ = layer_setup
    source.reads.clear()
    again = open_layer(0, LayerSpec(source, layer.toc_digest, "test"), cache)
    assert source.reads == [] and len(again.entries) == len(layer.entries)
    with pytest.raises(VerificationError, match="pinned"):
        open_layer(0, LayerSpec(source, "sha256:" + "0" * 64, "test"), ChunkCache(str(tmp_path / "c2")))


def test_small_reads_from_the_disk_cache_check_only_their_blocks(layer_setup):
    source, cache, layer, files, content = layer_setup
    item = files["f1"]
    assert read(ChunkFetcher([layer], cache), layer, item, 0, 10) == content["f1"][:10]
    fetched = len(source.reads)
    before = cache.stats.range_hits
    # A new fetcher has nothing in memory: a 4 KiB read comes from the cache file's blocks.
    assert read(ChunkFetcher([layer], cache), layer, item, 5000, 4096) == content["f1"][5000:9096]
    assert cache.stats.range_hits == before + 1 and len(source.reads) == fetched
    # A damaged block is caught: the file is dropped and the chunk fetched again, correctly.
    path = next(p for p in (Path(cache.root) / "chunks").rglob(item.chunks[0].digest.split(":")[1]))
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert read(ChunkFetcher([layer], cache), layer, item, 5000, 4096) == content["f1"][5000:9096]
    assert len(source.reads) == fetched + 1


class TricklingSource(RecordingSource):
    """Streams every range in small pieces, as a network answer arrives: piece boundaries fall
    anywhere, inside members and inside the gaps between them."""

    piece_bytes = 1000

    def read_ranges(self, ranges):
        for index, (blob_offset, length) in enumerate(ranges):
            data = self.read(blob_offset, length)
            for start in range(0, len(data), self.piece_bytes):
                yield index, data[start:start + self.piece_bytes]


def test_a_merged_range_with_gaps_streamed_in_small_pieces_is_cut_right(tmp_path, layer_format):
    """Members of one merged range separated by gaps (other files' chunks, headers), arriving
    in pieces that end inside those gaps: each member must still be cut at its own offsets."""
    content = {f"f{i}": os.urandom(CHUNK // 4 + i) for i in range(6)}
    src = tar_of(tmp_path, *(file_(name, data) for name, data in content.items()))
    out = tmp_path / "layer.blob"
    result = convert_layer(str(src), str(out), LayerOptions(chunk_size=CHUNK, format=layer_format))
    source = TricklingSource(out.read_bytes())
    layer = open_layer(0, LayerSpec(source, result.toc_digest, "test"), None)
    files = {item.path: item for item in layer.entries}
    source.reads.clear()
    # Every other file: one merged range, the files between them its gaps (16 KiB each, under
    # the 64 KiB merge gap).
    wanted = [files[f"f{i}"].chunks[0] for i in range(0, 6, 2)]
    fetcher = ChunkFetcher([layer], None)
    datas = trio.run(fetcher.get_chunks, layer, wanted, Priority.DEMAND)
    assert len(source.reads) == 1  # one request: the gaps were merged in
    for i, data in zip(range(0, 6, 2), datas):
        assert data == content[f"f{i}"]
    assert all(s.errors == 0 for s in fetcher.stats)


@pytest.mark.parametrize("hint", ["exact", "late", "early", "past-end", "absent"])
def test_the_toc_offset_hint_only_decides_how_much_of_the_tail_is_read(tmp_path, hint):
    """The converter's dev.lazyfs.toc.offset annotation makes a mount read exactly the TOC
    and the footer; a lying one costs a second read or a bigger first one, never a wrong
    TOC (the footer decides where it is) nor more than a TOC's size limit."""
    content = {f"f{i}": os.urandom(CHUNK * 2 + i) for i in range(3)}
    src = tar_of(tmp_path, *(file_(name, data) for name, data in content.items()))
    out = tmp_path / "layer.blob"
    result = convert_layer(str(src), str(out), LayerOptions(chunk_size=CHUNK, format="estargz"))
    toc_start = int(result.annotations[oci.ANNOTATION_TOC_OFFSET])
    blob = out.read_bytes()
    # The footer says the same.
    assert estargz.parse_footer(blob[-estargz.FOOTER_SIZE:]).toc_blob_offset == toc_start
    value = {"exact": toc_start, "late": toc_start + 100, "early": 1000,
             "past-end": len(blob) + 5,
             "absent": None}[hint]
    source = RecordingSource(blob)
    layer = open_layer(0, LayerSpec(source, result.toc_digest, "test", toc_offset=value), None)
    assert layer.toc_blob_offset == toc_start and {item.path for item in layer.entries} >= \
        set(content)
    default_start = max(0, len(blob) - TAIL_READ_BYTES)
    expected = {"exact": [(toc_start, len(blob) - toc_start)],
                "late": [(toc_start + 100, len(blob) - toc_start - 100),
                         (toc_start, 100)],  # the footer points before the first read
                "early": [(1000, len(blob) - 1000)],
                "past-end": [(default_start, len(blob) - default_start)],
                "absent": [(default_start, len(blob) - default_start)]}[hint]
    assert source.reads == expected


def test_a_toc_offset_hint_asking_for_more_than_a_toc_can_be_is_ignored():
    blob_size = 1 << 40
    limit = MAX_TOC_COMPRESSED_SIZE + MAX_FOOTER_SIZE
    assert _tail_offset(blob_size - limit, blob_size) == blob_size - limit
    assert _tail_offset(blob_size - limit - 1, blob_size) == blob_size - TAIL_READ_BYTES
    assert _tail_offset(0, blob_size) == blob_size - TAIL_READ_BYTES
