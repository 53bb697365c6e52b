"""Single-layer conversion: every tar feature survives, the layout is eStargz, bad input fails."""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib

import pytest
import zstandard

from converter import layer as layer_module
from converter.layer import JOIN_GAP_BYTES, LayerOptions, chunk_plan, convert_layer
from lazyfs.fetchoptions import DEFAULT_MERGE_GAP_BYTES
from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.errors import FormatError, NotFound, VerificationError
from lazyfs.format import oci, zstdchunked
from lazyfs.format.workload import merge_extents
from lazyfs.format.codec import GzipCodec, ZstdCodec, codec_for, startup_codec_for
from lazyfs.format.estargz import FOOTER_SIZE, parse_footer
from lazyfs.format.seekable import MAX_FOOTER_SIZE
from lazyfs.verify import LayerCheck, verify_layer
from tests.tarbuild import (ESTARGZ_EXTRAS, blockdev, chardev, dir_, extract, fifo, file_, hardlink,
                            symlink, tar_bytes, tar_of, tree_of)

CHUNK = 64 * 1024
BIG = os.urandom(3 * CHUNK + 123)


def every_feature():
    return [
        dir_("./"),
        dir_("./etc/", mode=0o755, uid=0, gid=0),
        file_("./etc/passwd", b"root:x:0:0\n", uid=0, gid=0),
        file_("./etc/empty"),
        file_("./etc/suid", b"#!/bin/sh\n", mode=0o4755),
        file_("./etc/sgid-sticky", b"x", mode=0o3755),
        dir_("./home/", mode=0o1777),
        file_("./home/owned", b"mine", uid=1000, gid=1001, uname="alice", gname="staff"),
        file_("./home/owned2", b"mine too", uid=1000, gid=1001, uname="alice", gname="staff"),
        file_("./home/other", b"g", uid=1002, gid=1001, uname="bob", gname="staff"),
        file_("./big", BIG),
        hardlink("./big-link", "./big"),
        hardlink("./etc/passwd-link", "./etc/passwd"),
        symlink("./etc/rel-link", "passwd"),
        symlink("./abs-link", "/etc/passwd"),
        chardev("./dev-null", 1, 3),
        blockdev("./dev-sda", 8, 0),
        fifo("./pipe"),
        file_("./xattr-file", b"x", xattrs={"user.note": b"hello", "security.capability": b"\x01\x00\x00\x02\xff"}),
        dir_("./" + "d" * 90 + "/"),
        file_("./" + "d" * 90 + "/" + "long-name-" * 12, b"long"),
        symlink("./long-link", "/" + "t" * 150),
        dir_("./wh/"),
        file_("./wh/.wh.deleted"),
        file_("./wh/.wh..wh..opq"),
        file_("./dup", b"first"),
        file_("./dup", b"second wins"),
        file_("./unicode-\u00e9\u4e2d", b"utf8 name"),
        file_("./old", b"old mtime", mtime=1),
    ]


def convert(tmp_path, layer_format, tar_path, out_name="out.blob", **options):
    out = tmp_path / out_name
    result = convert_layer(str(tar_path), str(out),
                           LayerOptions(chunk_size=CHUNK, format=layer_format, **options))
    return out, result


def verify_all_pins(out, result) -> None:
    """verify_layer with every digest and size the conversion reported pinned."""
    verify_layer(str(out), LayerCheck(toc_digest=result.toc_digest, blob_digest=result.blob_digest,
                                      diff_id=result.diff_id, uncompressed_size=result.uncompressed_size))


def test_extracts_to_the_same_tree_as_the_input(tmp_path, layer_format):
    src = tar_of(tmp_path, *every_feature())
    out, result = convert(tmp_path, layer_format, src)
    expected = tree_of(extract(src, tmp_path / "a"))
    actual = tree_of(extract(out, tmp_path / "b", compression=layer_format), ignore=ESTARGZ_EXTRAS)
    assert actual == expected
    assert (tmp_path / "b" / "dup").read_bytes() == b"second wins"
    verify_all_pins(out, result)


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_gnu_and_ustar_inputs(tmp_path, layer_format, tar_format):
    members = [dir_("a/"), file_("a/" + "n" * 120 if tar_format == tarfile.GNU_FORMAT else "a/n", b"z" * 5000)]
    src = tar_of(tmp_path, *members, format=tar_format)
    out, _ = convert(tmp_path, layer_format, src)
    assert tree_of(extract(out, tmp_path / "b", compression=layer_format), ESTARGZ_EXTRAS) == tree_of(extract(src, tmp_path / "a"))


def test_every_payload_and_chunk_starts_a_member(tmp_path, layer_format):
    out, _ = convert(tmp_path, layer_format, tar_of(tmp_path, *every_feature()))
    blob = out.read_bytes()
    with LocalBlob(str(out)) as local:
        layer = SeekableLayer.open(local)
        files = {item.path: item for item in layer.entries}
        chunks = files["big"].chunks
        assert [c.file_offset for c in chunks] == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
        assert files["big"].entry.chunk_size == CHUNK  # first chunk of a chunked file says its size
        data = b"".join(layer.read_chunk(c) for c in chunks)
        assert layer.format == layer_format
    assert data == BIG
    for chunk in chunks:
        # Each chunk's member inflates on its own, starting with the chunk's own bytes.
        member = blob[chunk.blob_offset:chunk.blob_end]
        alone = layer.codec.decompress_prefix(member, chunk.size)
        assert alone == BIG[chunk.file_offset:chunk.file_offset + chunk.size]
        if layer_format == "zstd:chunked":
            # ... and holds nothing else: [offset, endOffset) is exactly the chunk.
            assert zstandard.ZstdDecompressor().decompress(member) == alone
        else:
            assert zlib.decompressobj(31).decompress(member)[:chunk.size] == alone
    if layer_format == "estargz":
        footer = parse_footer(blob[-FOOTER_SIZE:])
        assert blob[footer.toc_blob_offset:footer.toc_blob_offset + 2] == b"\x1f\x8b"
    else:
        location = zstdchunked.parse_footer(blob[-zstdchunked.FOOTER_SIZE:])
        assert blob[location.offset - 8:location.offset - 4] == zstdchunked.SKIPPABLE_MAGIC


def test_toc_records_every_field(tmp_path, layer_format):
    out, _ = convert(tmp_path, layer_format, tar_of(tmp_path, *every_feature()))
    with LocalBlob(str(out)) as local:
        items = {item.path: item for item in SeekableLayer.open(local).entries}
    assert items[".no.prefetch.landmark"] is next(iter(items.values()))
    assert items["etc/suid"].entry.mode == 0o4755
    assert items["home/owned2"].user_name == "alice" and items["home/owned2"].group_name == "staff"
    assert items["home/owned2"].entry.user_name == ""  # names are written once per id
    assert items["home/other"].user_name == "bob" and items["home/other"].group_name == "staff"
    assert items["dev-sda"].entry.type == "block" and (items["dev-sda"].entry.dev_major, items["dev-sda"].entry.dev_minor) == (8, 0)
    assert items["dev-null"].entry.type == "char"
    assert items["pipe"].entry.type == "fifo"
    assert items["big-link"].entry.type == "hardlink" and items["big-link"].entry.link_name == "./big"
    assert items["long-link"].entry.link_name == "/" + "t" * 150
    assert items["xattr-file"].entry.xattrs == {"user.note": b"hello", "security.capability": b"\x01\x00\x00\x02\xff"}
    assert items["wh/.wh..wh..opq"].entry.type == "reg"
    assert items["old"].entry.modtime == "1970-01-01T00:00:01Z"
    assert items["etc/empty"].entry.digest == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert all(c.digest for item in items.values() for c in item.chunks)


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_compressed_inputs(tmp_path, layer_format, compress):
    raw = tar_bytes(*every_feature())
    packed = gzip.compress(raw) if compress == "gzip" else zstandard.ZstdCompressor().compress(raw)
    src = tmp_path / "layer.tar.x"
    src.write_bytes(packed)
    plain = tmp_path / "plain.tar"
    plain.write_bytes(raw)
    out_packed, r1 = convert(tmp_path, layer_format, src)
    blob = out_packed.read_bytes()
    out_plain, r2 = convert(tmp_path, layer_format, plain)
    assert blob == out_plain.read_bytes() and r1 == r2


def test_reconverting_an_estargz_blob_gives_the_same_blob(tmp_path, layer_format):
    out, first = convert(tmp_path, layer_format, tar_of(tmp_path, *every_feature()))
    again = tmp_path / "again.esgz"
    second = convert_layer(str(out), str(again), LayerOptions(chunk_size=CHUNK, format=layer_format))
    assert again.read_bytes() == out.read_bytes() and second.toc_digest == first.toc_digest


def test_output_does_not_depend_on_worker_count(tmp_path, layer_format):
    members = [file_(f"f{i}", os.urandom(i * 7000)) for i in range(40)] + [file_("big", BIG)]
    src = tar_of(tmp_path, *members)
    blobs = set()
    for workers in (1, 2, 7):
        out = tmp_path / f"out{workers}"
        convert_layer(str(src), str(out), LayerOptions(chunk_size=CHUNK, workers=workers,
                                                               format=layer_format))
        blobs.add(out.read_bytes())
    assert len(blobs) == 1


def test_prioritized_files_come_first_with_parents_and_link_targets(tmp_path, layer_format):
    src = tar_of(tmp_path, dir_("usr/"), dir_("usr/bin/"), file_("usr/bin/a", b"a"),
                 dir_("lib/"), file_("lib/libc", b"libc"), hardlink("usr/bin/b", "lib/libc"),
                 file_("usr/bin/c", b"c"), file_("z", b"z"))
    out, _ = convert(tmp_path, layer_format, src, prioritized_files=("/usr/bin/b", "z"))
    with LocalBlob(str(out)) as local:
        order = [item.path for item in SeekableLayer.open(local).entries]
    assert order == ["usr", "usr/bin", "lib", "lib/libc", "usr/bin/b", "z", ".prefetch.landmark",
                     "usr/bin/a", "usr/bin/c"]
    assert tree_of(extract(out, tmp_path / "b", compression=layer_format), ESTARGZ_EXTRAS) == tree_of(extract(src, tmp_path / "a"))


def test_recorded_reads_cut_prioritized_files_and_name_the_read_chunks(tmp_path, layer_format):
    """A prioritized file with recorded reads is cut along them (reads closer than
    JOIN_GAP_BYTES join); the prefetch ranges annotation covers exactly the read chunks of
    prioritized files (a prioritized file with no reads counts whole), joined across gaps
    under the mount's merge gap; the layer reads back and verifies like any other."""
    big = os.urandom(40 * CHUNK)  # incompressible: blob gaps as big as file gaps
    src = tar_of(tmp_path, file_("lib", big), file_("whole", b"w" * 1000), file_("cold", big))
    reads = (("lib", ((0, 5000), (5 * CHUNK, 6 * CHUNK), (6 * CHUNK + 100, 6 * CHUNK + 200),
                      (30 * CHUNK, 40 * CHUNK + 10))),
             ("cold", ((0, 100),)))  # not prioritized: no effect
    out, result = convert(tmp_path, layer_format, src, prioritized_files=("lib", "whole"),
                          prioritized_reads=reads)
    with LocalBlob(str(out)) as local:
        layer = SeekableLayer.open(local)
        files = {item.path: item for item in layer.entries}
        cuts = [(chunk.file_offset, chunk.size) for chunk in files["lib"].chunks]
        assert b"".join(layer.read_chunk(c) for c in files["lib"].chunks) == big
    # Read: [0, 5000), [5, 6 chunks + 200) (the 100-byte gap joined), [30, 40 chunks) (cut
    # at the file's end): each starts and ends a chunk, and no chunk is part read.
    read_spans = [(0, 5000), (5 * CHUNK, 6 * CHUNK + 200), (30 * CHUNK, 40 * CHUNK)]
    for file_offset, size in cuts:  # every chunk is all read or all unread
        inside = any(a <= file_offset and file_offset + size <= b for a, b in read_spans)
        outside = all(file_offset + size <= a or b <= file_offset for a, b in read_spans)
        assert inside != outside, (file_offset, size)
        assert size <= CHUNK
    starts = {file_offset for file_offset, _ in cuts} | {40 * CHUNK}
    assert {edge for span in read_spans for edge in span} <= starts
    read_chunks = [c for c in files["lib"].chunks
                   if any(a <= c.file_offset < b for a, b in read_spans)]
    expected = merge_extents([(c.blob_offset, c.blob_end) for c in read_chunks]
                             + [(c.blob_offset, c.blob_end) for c in files["whole"].chunks],
                             DEFAULT_MERGE_GAP_BYTES)
    ranges = oci.parse_ranges(result.annotations[oci.ANNOTATION_PREFETCH_RANGES])
    assert ranges == expected and len(ranges) == 3  # lib's three reads; whole joins the last
    assert all(c.blob_offset >= int(result.annotations[oci.ANNOTATION_PREFETCH_END])
               for c in files["cold"].chunks)
    assert tree_of(extract(out, tmp_path / "b", compression=layer_format), ESTARGZ_EXTRAS) == \
        tree_of(extract(src, tmp_path / "a"))
    verify_all_pins(out, result)
    # Without recorded reads, no ranges: the mount prefetches the prioritized files whole.
    _, plain = convert(tmp_path, layer_format, src, out_name="plain.blob",
                       prioritized_files=("lib", "whole"))
    assert oci.ANNOTATION_PREFETCH_RANGES not in plain.annotations


def test_reads_recorded_through_a_hardlink_cut_the_file_that_holds_the_content(tmp_path):
    big = os.urandom(8 * CHUNK)
    src = tar_of(tmp_path, file_("lib", big), hardlink("alias", "lib"))
    out, result = convert(tmp_path, "zstd:chunked", src, prioritized_files=("alias",),
                          prioritized_reads=(("alias", ((2 * CHUNK, 3 * CHUNK),)),))
    with LocalBlob(str(out)) as local:
        [chunk] = [c for item in SeekableLayer.open(local).entries if item.path == "lib"
                   for c in item.chunks if c.file_offset == 2 * CHUNK]
    assert oci.parse_ranges(result.annotations[oci.ANNOTATION_PREFETCH_RANGES]) == \
        [(chunk.blob_offset, chunk.blob_end)]


@pytest.mark.parametrize("size, reads, plan", [
    (10, None, [(0, 4, True), (4, 4, True), (8, 2, True)]),
    (10, [], [(0, 4, False), (4, 4, False), (8, 2, False)]),
    (10, [(2, 3)], [(0, 2, False), (2, 1, True), (3, 4, False), (7, 3, False)]),
    (10, [(8, 50)], [(0, 4, False), (4, 4, False), (8, 2, True)]),  # clipped to the file
    (0, [(0, 10)], []),
])
def test_chunk_plan(size, reads, plan, monkeypatch):
    monkeypatch.setattr(layer_module, "JOIN_GAP_BYTES", 1)
    assert chunk_plan(size, 4, reads) == plan


def test_chunk_plan_joins_reads_closer_than_the_join_gap():
    plan = chunk_plan(1 << 20, 1 << 20, [(0, 10), (JOIN_GAP_BYTES, JOIN_GAP_BYTES + 10)])
    assert plan == [(0, JOIN_GAP_BYTES + 10, True), (JOIN_GAP_BYTES + 10,
                                                     (1 << 20) - JOIN_GAP_BYTES - 10, False)]


# Levels whose output differs on the text below: each member tells which level made it.
LEVELS = {"estargz": (1, 9), "zstd:chunked": (1, 19)}


def _recompressed(member: bytes, layer_format: str, level: int) -> bytes:
    """The member's whole content compressed again by our codec at `level`."""
    if layer_format == "estargz":
        return GzipCodec(level).compress(zlib.decompressobj(31).decompress(member))
    return ZstdCodec(level).compress(zstandard.ZstdDecompressor().decompress(member))


def test_toc_and_prioritized_files_get_the_startup_level(tmp_path, layer_format):
    """What a cold mount waits for (the TOC, the files before the landmark) is compressed at
    the startup level, everything else at the layer's level; readers see no difference."""
    level, startup_level = LEVELS[layer_format]
    words = [os.urandom(6).hex().encode() for _ in range(300)]
    text = b" ".join(words[(i * 7919) % 300] for i in range(40_000))  # compressible, not trivially
    src = tar_of(tmp_path, file_("hot", text), file_("cold", text), file_("warm", text[:5000]))
    out, result = convert(tmp_path, layer_format, src, prioritized_files=("hot", "warm"),
                          compression_level=level, startup_compression_level=startup_level)
    blob = out.read_bytes()
    with LocalBlob(str(out)) as local:
        layer = SeekableLayer.open(local)
        files = {item.path: item for item in layer.entries}
        for path, expected_level in (("hot", startup_level), ("warm", startup_level),
                                     ("cold", level)):
            for chunk in files[path].chunks:
                member = blob[chunk.blob_offset:chunk.blob_end]
                assert member == _recompressed(member, layer_format, expected_level), path
            content = text[:5000] if path == "warm" else text
            assert b"".join(layer.read_chunk(c) for c in files[path].chunks) == content
    if layer_format == "estargz":
        toc_start = parse_footer(blob[-FOOTER_SIZE:]).toc_blob_offset
        toc_member = blob[toc_start:len(blob) - FOOTER_SIZE]
    else:
        location = zstdchunked.parse_footer(blob[-zstdchunked.FOOTER_SIZE:])
        toc_member = blob[location.offset:location.offset + location.compressed_size]
    assert toc_member == _recompressed(toc_member, layer_format, startup_level)
    verify_all_pins(out, result)


def test_startup_level_defaults_to_the_strongest_fast_decoding_level():
    assert startup_codec_for("zstd").level == 19
    assert startup_codec_for("gzip").level == 9
    assert codec_for("zstd").level == 3


def test_missing_prioritized_file_is_an_error_and_leaves_nothing(tmp_path, layer_format):
    src = tar_of(tmp_path, file_("a", b"a"))
    with pytest.raises(NotFound, match="not-there"):
        convert(tmp_path, layer_format, src, prioritized_files=("not-there",))
    assert os.listdir(tmp_path) == ["layer.tar"]


@pytest.mark.parametrize("mangle, message", [
    (lambda raw: raw[:len(raw) // 2 + 100], "truncated"),
    (lambda raw: raw[:512 + 200], "truncated"),
    (lambda raw: b"this is not a tar file at all" * 40, "not a valid tar"),
    (lambda raw: raw[:2560] + b"garbage!" * 64 + b"\0" * 1024, "invalid header"),
    (lambda raw: gzip.compress(raw)[:-30], "truncated"),
    (lambda raw: gzip.compress(raw)[:40] + b"\xff" * 200 + gzip.compress(raw)[240:], "corrupt"),
])
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, layer_format, mangle, message):
    raw = tar_bytes(file_("a", os.urandom(2000)), file_("b", os.urandom(5000)), file_("c", b"c"))
    src = tmp_path / "bad.tar"
    src.write_bytes(mangle(raw))
    with pytest.raises(FormatError, match=message):
        convert(tmp_path, layer_format, src)
    assert os.listdir(tmp_path) == ["bad.tar"]


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def test_verify_catches_a_tampered_chunk(tmp_path, layer_format):
    out, result = convert(tmp_path, layer_format, tar_of(tmp_path, file_("a", b"hello " * 1000), file_("big", BIG)))
    with LocalBlob(str(out)) as local:
        chunk = {i.path: i for i in SeekableLayer.open(local).entries}["big"].chunks[1]
    flip_byte(out, chunk.blob_offset + 40)
    with pytest.raises(FormatError, match="'big', chunk at file offset 65536"):
        verify_layer(str(out), LayerCheck(toc_digest=result.toc_digest))


def test_verify_catches_a_recompressed_chunk_with_other_content(tmp_path):
    """A member that inflates fine but to other bytes fails its digest, not the gzip CRC."""
    from lazyfs.format.codec import GzipCodec

    # Level 0 stores blocks, so the forged member has the same length and every offset in the
    # TOC stays right: only the digest can tell.
    out, result = convert(tmp_path, "estargz", tar_of(tmp_path, file_("a", b"A" * 3000), file_("b", b"B" * 3000)),
                          compression_level=0)
    blob = out.read_bytes()
    with LocalBlob(str(out)) as local:
        chunk = {i.path: i for i in SeekableLayer.open(local).entries}["a"].chunks[0]
    member = blob[chunk.blob_offset:chunk.blob_end]
    original = zlib.decompressobj(31).decompress(member)
    forged = GzipCodec(0).compress(b"X" + original[1:])
    assert len(forged) == len(member)
    out.write_bytes(blob[:chunk.blob_offset] + forged + blob[chunk.blob_end:])
    with pytest.raises(VerificationError, match="'a'"):
        verify_layer(str(out), LayerCheck())


def test_verify_catches_a_tampered_toc(tmp_path, layer_format):
    out, result = convert(tmp_path, layer_format, tar_of(tmp_path, file_("a", b"hello")))
    other, _ = convert(tmp_path, layer_format, tar_of(tmp_path, file_("a", b"hellO"), name="other.tar"), "other.blob")
    with pytest.raises(VerificationError, match="TOC digest"):
        verify_layer(str(out), LayerCheck(toc_digest=_digest_of_other(other)))
    flip_byte(out, os.path.getsize(out) - MAX_FOOTER_SIZE - 20)  # inside the TOC
    with pytest.raises(FormatError):
        verify_layer(str(out), LayerCheck(toc_digest=result.toc_digest))


def _digest_of_other(path):
    with LocalBlob(str(path)) as local:
        return SeekableLayer.open(local).toc_digest


def test_verify_rejects_a_file_that_is_not_seekable(tmp_path):
    src = tar_of(tmp_path, file_("a", b"a"))
    plain_gz = tmp_path / "plain.tar.gz"
    plain_gz.write_bytes(gzip.compress(src.read_bytes()))
    with pytest.raises(FormatError, match="no eStargz or zstd:chunked footer"):
        verify_layer(str(plain_gz), LayerCheck())


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_sparse_files_become_dense_regular_files(tmp_path, layer_format, tar_format):
    """GNU tar stores sparse files specially; the layer must hold their real bytes."""
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(tree / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(3 * CHUNK)
        f.write(b"middle")
        f.truncate(5 * CHUNK)
    src = tmp_path / "sparse.tar"
    import subprocess
    subprocess.run(["tar", "-cf", str(src), "--sparse", f"--format={tar_format}", "-C", str(tree), "sparse"],
                   check=True)
    out, result = convert(tmp_path, layer_format, src)
    extracted = extract(out, tmp_path / "b", compression=layer_format)
    assert (extracted / "sparse").read_bytes() == (tree / "sparse").read_bytes()
    verify_layer(str(out), LayerCheck(toc_digest=result.toc_digest))
