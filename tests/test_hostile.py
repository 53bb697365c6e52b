"""Hostile input: every case of issue 7 probed through the public entry points.

Each test is one row of docs/security.md ("Hostile input"): the input, where it is caught,
and what the user sees. The parsers are called as the mount and `inspect` call them (parse_toc, locate_toc,
resolve, read_toc_member/read_toc_frame, the codecs, build_tree), the converter through
convert_layer and `lazyfs convert`, and a few crafted blobs through a real `lazyfs mount`.
The property throughout: a clear LazyfsError (FormatError: exit code 2), never another
exception, a hang or an allocation the input did not pay for.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import tracemalloc
import zlib

import pytest
import zstandard

from converter.layer import LayerOptions, convert_layer
from lazyfs.cache import ChunkCache
from lazyfs.errors import FormatError
from lazyfs.format import estargz, seekable, zstdchunked
from lazyfs.format.codec import GzipCodec, ZstdCodec, codec_for
from lazyfs.format.estargz import build_footer, read_toc_member, toc_tar_bytes
from lazyfs.format.seekable import locate_toc, parse_toc_region
from lazyfs.format.toc import MAX_CHUNK_SIZE, MAX_TOC_JSON_SIZE, parse_toc, resolve
from lazyfs.format.zstdchunked import TOCLocation, read_toc_frame
from lazyfs.tree import build_tree
from tests.mounting import lazyfs_cmd, mounted
from tests.tarbuild import dir_, file_, hardlink, symlink, tar_bytes

MiB = 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- crafted blobs -------------------------------------------------------------------------------
# A blob the mount accepts needs only members the TOC points at, then the TOC and the footer:
# nothing checks that the members also make a tar (only `verify` does).

def toc_doc(*entries: dict) -> bytes:
    return json.dumps({"version": 1, "entries": list(entries)}).encode()


def estargz_tail(toc_json: bytes, toc_offset: int, codec=None) -> bytes:
    """TOC member and footer for raw TOC JSON (which dump_toc could not write)."""
    codec = codec or GzipCodec(1)
    return codec.compress(toc_tar_bytes(toc_json)) + build_footer(toc_offset)


def zstd_tail(toc_json: bytes, data_end: int) -> bytes:
    compressed = ZstdCodec(1).compress(toc_json)
    location = TOCLocation(data_end + 8, len(compressed), len(toc_json),
                           zstdchunked.FOOTER_SIZE)
    return zstdchunked.skippable_frame(compressed) + zstdchunked.build_footer(location)


def crafted_blob(layer_format: str, members: list[bytes], toc_json) -> tuple[bytes, str]:
    """(blob, TOC digest): compressed `members` one after another, then the TOC. `toc_json`
    is bytes, or a function of the members' blob offsets returning bytes."""
    blob, offsets = b"", []
    for member in members:
        offsets.append(len(blob))
        blob += member
    if callable(toc_json):
        toc_json = toc_json(offsets)
    tail = estargz_tail(toc_json, len(blob)) if layer_format == "estargz" \
        else zstd_tail(toc_json, len(blob))
    return blob + tail, sha256(toc_json)


def open_blob(blob: bytes):
    """What the mount does with a blob: footer, TOC, resolve (FormatError on the way)."""
    region = locate_toc(blob[-seekable.MAX_FOOTER_SIZE:], len(blob))
    toc, _ = parse_toc_region(region, blob[region.toc_start:region.toc_end])
    return resolve(toc, region.data_end)


def bomb_member(layer_format: str, total: int) -> bytes:
    """One gzip member or zstd frame of `total` zero bytes (~1000x smaller), made in pieces."""
    block = b"\0" * MiB
    if layer_format == "estargz":
        deflater = zlib.compressobj(1, zlib.DEFLATED, 31)
        return b"".join(deflater.compress(block) for _ in range(total // MiB)) + deflater.flush()
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    return b"".join(compressor.compress(block) for _ in range(total // MiB)) + compressor.flush()


def reg(name: str, data: bytes, offset: int, **extra) -> dict:
    return {"name": name, "type": "reg", "size": len(data), "offset": offset,
            "digest": sha256(data), "chunkDigest": sha256(data), **extra}


# --- the TOC parser ------------------------------------------------------------------------------

HOSTILE_FIELDS = {
    "nul-in-name": ({"name": "a\x00b", "type": "reg"}, "field 'name' contains a NUL byte"),
    "nul-in-link": ({"name": "l", "type": "symlink", "linkName": "/etc\x00/passwd"},
                    "'linkName' contains a NUL"),
    "nul-in-owner": ({"name": "a", "type": "dir", "userName": "ro\x00ot"}, "'userName' contains a NUL"),
    "negative-size": ({"name": "a", "type": "reg", "size": -1}, "'size' is out of range: -1"),
    "offset-2-pow-63": ({"name": "a", "type": "reg", "offset": 1 << 63}, "'offset' is out of range"),
    "enormous-negative": ({"name": "a", "type": "reg", "chunkSize": -(1 << 70)},
                          "'chunkSize' is out of range"),
    "float": ({"name": "a", "type": "reg", "size": 1.5}, "'size' is not an integer"),
    "bool": ({"name": "a", "type": "reg", "size": True}, "'size' is not an integer"),
    "string-number": ({"name": "a", "type": "reg", "size": "12"}, "'size' is not an integer"),
    "infinity": ({"name": "a", "type": "dir", "uid": float("inf")}, "'uid' is not an integer"),
    "name-not-a-string": ({"name": 7, "type": "dir"}, "'name' is not a string"),
    "unknown-type": ({"name": "a", "type": "whiteout"}, "unknown type"),
    "path-as-digest": ({"name": "a", "type": "reg", "digest": "sha256:../../../../etc/passwd"},
                       "not a sha256"),
    "xattr-name-with-nul": ({"name": "a", "type": "dir", "xattrs": {"user.a\x00security.b": ""}},
                            "one with a NUL byte"),
    "xattr-empty-name": ({"name": "a", "type": "dir", "xattrs": {"": "eA=="}}, "an empty name"),
    "xattr-not-base64": ({"name": "a", "type": "dir", "xattrs": {"user.x": "not base64!"}},
                         "not base64"),
}


@pytest.mark.parametrize("entry, message", HOSTILE_FIELDS.values(), ids=HOSTILE_FIELDS.keys())
def test_hostile_fields_are_refused_by_the_parser(entry, message):
    with pytest.raises(FormatError, match=message):
        parse_toc(json.dumps({"version": 1, "entries": [entry]}).encode())


@pytest.mark.parametrize("toc_json", [
    b'{"version":1,"entries":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"version":1,"entries":[{"name":"a","type":"dir","x":' + b'{"a":' * 50_000 + b"1"
    + b"}" * 50_001 + b"]}",
], ids=["nested-arrays", "nested-objects-in-an-unknown-field"])
def test_deep_json_nesting_is_a_format_error(toc_json):
    with pytest.raises(FormatError, match="nested too deeply"):
        parse_toc(toc_json)


def test_a_number_with_thousands_of_digits_is_a_format_error():
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_toc(b'{"version":1,"entries":[{"name":"a","type":"reg","size":' + b"9" * 5000
                  + b"}]}")


def test_toc_json_over_the_limit_is_refused_before_parsing():
    huge = b" " * (MAX_TOC_JSON_SIZE + 1)  # would parse as nothing; refused for its size
    with pytest.raises(FormatError, match="larger than the"):
        parse_toc(huge)


# --- the footers and the TOC's size --------------------------------------------------------------

def test_estargz_footer_pointing_outside_the_blob_is_refused():
    with pytest.raises(FormatError, match="outside the blob"):
        locate_toc(build_footer(10_000), 5_000)


def test_estargz_toc_region_of_hundreds_of_mb_is_refused_before_it_is_fetched():
    # A 300 MB blob whose footer says the TOC starts at 0: the mount would fetch 300 MB before
    # inflating anything. locate_toc sees it from the footer alone.
    blob_size = 300 * 1000 * 1000
    with pytest.raises(FormatError, match="larger than the"):
        locate_toc(build_footer(0), blob_size)


@pytest.mark.parametrize("offset, compressed, uncompressed, message", [
    ((1 << 64) - 1, 100, 100, "outside the blob"),  # offset + size wraps nowhere: Python ints
    (0, (1 << 64) - 1, 100, "outside the blob"),
    (0, 0, 100, "outside the blob"),
    (10, 100, MAX_TOC_JSON_SIZE + 1, "larger than the"),
])
def test_zstd_footer_with_hostile_numbers_is_refused(offset, compressed, uncompressed, message):
    footer = zstdchunked.build_footer(TOCLocation(offset, compressed, uncompressed, 48))
    with pytest.raises(FormatError, match=message):
        locate_toc(footer, 1000)


def test_zstd_compressed_toc_of_hundreds_of_mb_is_refused_before_it_is_fetched():
    size = 400 * MiB
    footer = zstdchunked.build_footer(TOCLocation(8, size, 1000, 48))
    with pytest.raises(FormatError, match="larger than the"):
        locate_toc(footer, size + 100)


def _gzip_toc_member(declared_size: int, total: int) -> bytes:
    """A TOC member whose tar header declares `declared_size` bytes of JSON and whose gzip
    stream inflates to `total` bytes after it: a TOC bomb, made without holding the bytes."""
    info = tarfile.TarInfo(estargz.TOC_TAR_NAME)
    info.size = declared_size
    deflater = zlib.compressobj(1, zlib.DEFLATED, 31)
    block = b" " * MiB
    parts = [deflater.compress(info.tobuf(tarfile.GNU_FORMAT))]  # GNU: base-256 sizes
    parts += [deflater.compress(block) for _ in range(total // MiB)]
    return b"".join(parts) + deflater.flush()


@pytest.mark.parametrize("declared", [300 * MiB, 1 << 33, 200])
def test_estargz_toc_bomb_is_cut_at_the_declared_size_or_refused_by_its_header(declared):
    member = _gzip_toc_member(declared, 300 * MiB)  # 300 MB of "TOC" in ~300 KB
    assert len(member) < 2 * MiB
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="larger than the|not valid JSON"):
            read_toc_member(member)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, peak  # vs the 300 MiB the member holds


def test_zstd_toc_frame_inflating_past_its_declared_size_is_refused():
    bomb = zstandard.ZstdCompressor(level=1).compress(b" " * (64 * MiB))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="inflates past its declared 1000 bytes"):
            read_toc_frame(bomb, 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, peak


# --- resolve: names, chunks, numbers -------------------------------------------------------------

HOSTILE_NAMES = {
    "dotdot": ({"name": "../../etc/passwd", "type": "reg"}, "'..' component"),
    "dotdot-inside": ({"name": "a/../../b", "type": "dir"}, "'..' component"),
    "dotdot-alone": ({"name": "..", "type": "dir"}, "'..' component"),
    "absolute": ({"name": "/etc/passwd", "type": "reg"}, "is absolute"),
    "absolute-double-slash": ({"name": "//etc", "type": "dir"}, "is absolute"),
    "hardlink-dotdot": ({"name": "x", "type": "hardlink", "linkName": "../../etc/shadow"},
                        "'..' component"),
    "hardlink-absolute": ({"name": "x", "type": "hardlink", "linkName": "/etc/shadow"},
                          "is absolute"),
    "uid-over-32-bits": ({"name": "a", "type": "dir", "uid": 1 << 32}, "does not fit 32 bits"),
    "gid-over-32-bits": ({"name": "a", "type": "dir", "gid": 1 << 40}, "does not fit 32 bits"),
}


@pytest.mark.parametrize("entry, message", HOSTILE_NAMES.values(), ids=HOSTILE_NAMES.keys())
def test_hostile_names_and_owners_refuse_the_whole_toc(entry, message):
    toc = parse_toc(toc_doc({"name": "ok", "type": "dir"}, entry))
    with pytest.raises(FormatError, match=message):
        resolve(toc, 1000)


def test_names_that_only_look_odd_are_kept():
    # The root as "/" or "./", dot files, "..." and "..x" are ordinary; symlink targets are
    # never resolved by lazyfs, so "../.." and absolute targets are kept as they are.
    toc = parse_toc(toc_doc({"name": "/", "type": "dir"}, {"name": "./", "type": "dir"},
                            {"name": "./.hidden", "type": "dir"}, {"name": "a/...", "type": "dir"},
                            {"name": "..x", "type": "dir"},
                            {"name": "l", "type": "symlink", "linkName": "../../../etc/passwd"},
                            {"name": "m", "type": "symlink", "linkName": "/etc/passwd"}))
    assert [e.path for e in resolve(toc, 1000)] == ["", "", ".hidden", "a/...", "..x", "l", "m"]


@pytest.mark.parametrize("entries, message", [
    ([{"name": "a", "type": "reg", "size": 10, "offset": 5000}], "not before the TOC"),
    ([{"name": "a", "type": "reg", "size": 10, "offset": 10, "endOffset": 99_999}],
     "endOffset 99999"),
    ([{"name": "a", "type": "reg", "size": 10, "offset": 10, "endOffset": 5}], "endOffset 5"),
    # overlapping chunks: the second starts inside the first
    ([{"name": "a", "type": "reg", "size": 10, "offset": 10, "chunkSize": 6},
      {"type": "chunk", "offset": 20, "chunkOffset": 4, "chunkSize": 6}], "do not tile"),
    # a chunk past the end of its file
    ([{"name": "a", "type": "reg", "size": 10, "offset": 10, "chunkSize": 6},
      {"type": "chunk", "offset": 20, "chunkOffset": 6, "chunkSize": 60}], "cover 66 bytes"),
    # a chunk offset past the end of the file ("to the end" would be negative)
    ([{"name": "a", "type": "reg", "size": 10, "offset": 10, "chunkOffset": 50}], "do not tile"),
    ([{"type": "chunk", "offset": 20, "chunkSize": 6}], "no regular file before it"),
    ([{"name": "a", "type": "reg", "size": MAX_CHUNK_SIZE + 1, "offset": 10}], "byte limit"),
    ([{"name": "a", "type": "reg", "size": 1 << 62, "offset": 10, "chunkSize": 1 << 61},
      {"type": "chunk", "offset": 20, "chunkOffset": 1 << 61}], "byte limit"),
    ([{"name": "a", "type": "reg", "size": 10, "offset": 10, "innerOffset": (1 << 63) - 1}],
     "byte limit"),
], ids=["offset-past-toc", "end-past-toc", "end-before-start", "overlap", "past-file-end",
        "chunk-offset-past-end", "orphan-chunk", "enormous-chunk", "enormous-file",
        "enormous-inner-offset"])
def test_chunks_outside_the_blob_or_the_file_refuse_the_whole_toc(entries, message):
    with pytest.raises(FormatError, match=message):
        resolve(parse_toc(toc_doc(*entries)), 1000)


def test_files_sharing_a_member_are_allowed():
    # As the reference writes small files: one member, each file at its inner offset. Each
    # chunk is checked against its own digest when read, so sharing gives nothing away.
    entries = resolve(parse_toc(toc_doc(
        {"name": "a", "type": "reg", "size": 3, "offset": 10},
        {"name": "b", "type": "reg", "size": 4, "offset": 10, "innerOffset": 3},
        {"name": "c", "type": "reg", "size": 4, "offset": 10, "innerOffset": 1})), 1000)
    assert [(c.blob_offset, c.blob_end, c.inner_offset) for e in entries for c in e.chunks] == \
        [(10, 1000, 0), (10, 1000, 3), (10, 1000, 1)]


# --- a chunk that inflates to more than it says ---------------------------------------------------

@pytest.mark.parametrize("layer_format", seekable.FORMATS)
def test_a_chunk_bomb_inflates_only_its_declared_size(layer_format):
    codec = codec_for(seekable.MEDIA_CODEC[layer_format], 1)
    member = bomb_member(layer_format, 256 * MiB)
    tracemalloc.start()
    try:
        assert codec.decompress_prefix(member, 4096) == b"\0" * 4096
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, peak  # vs the 256 MiB the member holds


@pytest.mark.parametrize("layer_format", seekable.FORMATS)
def test_a_chunk_declaring_more_than_its_member_holds_allocates_what_it_holds(layer_format):
    codec = codec_for(seekable.MEDIA_CODEC[layer_format], 1)
    member = codec.compress(b"x" * 1000)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="ends after 1000 bytes"):
            codec.decompress_prefix(member, MAX_CHUNK_SIZE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, peak


# --- the merged tree ------------------------------------------------------------------------------

def tree_of_tocs(*tocs: bytes):
    return build_tree([resolve(parse_toc(t), 1 << 40) for t in tocs])


@pytest.mark.parametrize("entries", [
    [{"name": "x", "type": "symlink", "linkName": "/etc"}, {"name": "x/passwd", "type": "dir"}],
    [{"name": "x", "type": "symlink", "linkName": "."}, {"name": "x/x/x/y", "type": "dir"}],
    [{"name": "d", "type": "dir"}, {"name": "d/l", "type": "symlink", "linkName": ".."},
     {"name": "d/l/escape", "type": "fifo"}],
], ids=["symlink-to-etc", "symlink-loop", "symlink-to-parent"])
def test_an_entry_under_a_symlink_of_the_same_layer_refuses_the_image(entries):
    with pytest.raises(FormatError, match="a symlink of the same layer"):
        tree_of_tocs(toc_doc(*entries))


def test_an_entry_under_a_lower_layers_symlink_replaces_it_with_a_directory():
    tree = tree_of_tocs(toc_doc({"name": "x", "type": "symlink", "linkName": "/etc"}),
                        toc_doc({"name": "x/passwd", "type": "fifo"}))
    assert tree.lookup_path("x").is_dir and tree.lookup_path("x/passwd") is not None
    assert "replaced by a directory" in tree.warnings[0]


def test_hostile_hardlinks_are_skipped_and_nothing_loops():
    # Missing target, a later target, itself, a directory, and a cycle through three names.
    tree = tree_of_tocs(toc_doc(
        {"name": "d", "type": "dir"},
        {"name": "h1", "type": "hardlink", "linkName": "missing"},
        {"name": "h2", "type": "hardlink", "linkName": "later"},
        {"name": "h3", "type": "hardlink", "linkName": "h3"},
        {"name": "h4", "type": "hardlink", "linkName": "d"},
        {"name": "c1", "type": "hardlink", "linkName": "c3"},
        {"name": "c2", "type": "hardlink", "linkName": "c1"},
        {"name": "c3", "type": "hardlink", "linkName": "c2"},
        {"name": "later", "type": "fifo"}))
    assert sorted(name for name, _ in tree.walk()) == [b"", b"d", b"later"]
    assert tree.warning_count == 7


def test_duplicate_and_conflicting_entries_last_one_wins():
    tree = tree_of_tocs(toc_doc({"name": "a", "type": "dir"}, {"name": "a/f", "type": "fifo"},
                                {"name": "a", "type": "symlink", "linkName": "/"},
                                {"name": "b", "type": "fifo"}, {"name": "b", "type": "dir"}))
    assert tree.lookup_path("a").link_target == b"/" and tree.lookup_path("b").is_dir
    assert tree.lookup_path("a/f") is None


# --- the converter's tar reader -------------------------------------------------------------------

def convert_tar(tmp_path, raw: bytes):
    src = tmp_path / "in.tar"
    src.write_bytes(raw)
    return convert_layer(str(src), str(tmp_path / "out.blob"), LayerOptions(chunk_size=1 << 16))


def pax_member(name: str, type_=tarfile.REGTYPE, **pax):
    info = tarfile.TarInfo(name)
    info.type = type_
    info.pax_headers = pax
    return info, (b"" if type_ == tarfile.REGTYPE else None)


def latin1_member(name: str):
    """A member whose name is written as Latin-1 bytes: not UTF-8 (tarfile reads it back as
    lone surrogates)."""
    info = tarfile.TarInfo(name.encode("latin-1").decode("utf-8", "surrogateescape"))
    return info, b""


HOSTILE_TARS = {
    "dotdot-name": ([file_("../escape", b"x")], "its name '../escape' has a '..' component"),
    "dotdot-inside": ([file_("a/../../escape", b"x")], "has a '..' component"),
    "absolute-name": ([file_("/etc/passwd", b"x")], "its name '/etc/passwd' is absolute"),
    "dotdot-hardlink": ([hardlink("h", "../../etc/shadow")],
                        "its hardlink target '../../etc/shadow' has a '..' component"),
    "absolute-hardlink": ([hardlink("h", "/etc/shadow")],
                          "its hardlink target '/etc/shadow' is absolute"),
    "hardlink-to-itself": ([hardlink("h", "./h")], "hardlink to itself"),
    "hardlink-to-later": ([hardlink("h", "f"), file_("f", b"x")], "comes later"),
    "hardlink-cycle": ([hardlink("a", "b"), hardlink("b", "a")], "comes later"),
    "hardlink-to-dir": ([dir_("d/"), hardlink("h", "d")], "hardlink to the directory"),
    "under-a-symlink": ([symlink("x", "/etc"), file_("x/passwd", b"x")], "a symlink earlier"),
    "under-a-symlink-loop": ([symlink("x", "."), file_("x/x/y", b"x")], "a symlink earlier"),
    "under-a-hardlinked-symlink": ([symlink("s", "/"), hardlink("h", "s"), dir_("h/etc/")],
                                   "a symlink earlier"),
    "under-a-symlink-behind-a-dangling-hardlink": (
        [symlink("a", "/etc"), hardlink("a", "not-in-this-tar"), file_("a/b", b"x")],
        "a symlink earlier"),
    "nul-in-pax-path": ([pax_member("x", path="a\x00b")], "NUL byte in its name"),
    "nul-in-pax-linkpath": ([pax_member("x", tarfile.SYMTYPE, linkpath="/a\x00b")],
                            "NUL byte in its link target"),
    "huge-pax-uid": ([pax_member("x", uid=str(1 << 40))], "outside 0..4294967295"),
    "negative-pax-size": ([pax_member("x", size="-1")], "negative size"),
    "non-utf8-name": ([latin1_member("caf\xe9")], "name that is not UTF-8"),
    "nul-in-xattr-name": ([pax_member("x", **{"SCHILY.xattr.user.a\x00b": "v"})],
                          "extended attribute name"),
    "empty-xattr-name": ([pax_member("x", **{"SCHILY.xattr.": "v"})], "extended attribute name"),
}


@pytest.mark.parametrize("members, message", HOSTILE_TARS.values(), ids=HOSTILE_TARS.keys())
def test_hostile_tars_are_refused_by_the_converter(tmp_path, members, message):
    with pytest.raises(FormatError, match=message):
        convert_tar(tmp_path, tar_bytes(*members))
    assert not (tmp_path / "out.blob").exists()


def test_odd_but_harmless_tars_convert(tmp_path):
    convert_tar(tmp_path, tar_bytes(
        dir_("./"), dir_("/"), file_("dup", b"1"), file_("dup", b"22"),   # last one wins
        hardlink("lower", "usr/bin/in-a-lower-layer"),                    # target not here
        symlink("s", "/etc"), dir_("s/"), file_("s/f", b"x"),             # replaced, then used
        symlink("up", "../../.."), file_("..x", b"y"),
        file_("/".join(["d"] * 2000) + "/deep", b"z")))                   # deep, not recursive
    entries = open_blob((tmp_path / "out.blob").read_bytes())
    assert [e.entry.size for e in entries if e.path == "dup"] == [1, 2]


def test_a_tar_with_a_hostile_size_field_is_refused(tmp_path):
    raw = bytearray(tar_bytes(file_("a", b"x" * 10), format=tarfile.USTAR_FORMAT))
    raw[124:136] = b"\x80" + b"\x00" * 3 + (1 << 62).to_bytes(8, "big")  # base-256 size 2**62
    header = raw[:512]
    header[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(FormatError, match="size is impossible|truncated"):
        convert_tar(tmp_path, bytes(raw))


def test_a_chunk_size_readers_would_refuse_is_refused_by_the_converter(tmp_path):
    with pytest.raises(ValueError, match="chunk size must be"):
        convert_layer(str(tmp_path / "in.tar"), str(tmp_path / "out.blob"),
                      LayerOptions(chunk_size=MAX_CHUNK_SIZE + 1))
    result = subprocess.run(lazyfs_cmd("convert", "--chunk-size", MAX_CHUNK_SIZE + 1, "in", "out"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--chunk-size: must be at most" in result.stderr


def test_lazyfs_convert_refuses_an_escaping_tar_with_exit_code_2(tmp_path):
    src = tmp_path / "evil.tar"
    src.write_bytes(tar_bytes(dir_("etc/"), file_("../../../tmp/pwned", b"x")))
    result = subprocess.run(lazyfs_cmd("convert", src, tmp_path / "out.blob"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert ("error: tar entry '../../../tmp/pwned': its name '../../../tmp/pwned' has a '..' "
            "component") in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["evil.tar"]


# --- the cache: paths come only from validated digests --------------------------------------------

HOSTILE_DIGESTS = [
    "sha256:../../../../../../tmp/x",
    "sha256:" + "a" * 62 + "/..",
    "sha256:" + "A" * 64,  # uppercase: another file name for the same digest
    "sha256:" + "a" * 64 + "\n",
    "sha256:" + "a" * 64 + "/x",
    "sha256:" + "a" * 63,
    "sha512:" + "a" * 128,
    "sha256:" + "a" * 63 + "\x00",
    "../" + "a" * 64,
    "",
]


@pytest.mark.parametrize("digest", HOSTILE_DIGESTS)
def test_a_hostile_digest_never_becomes_a_cache_path(tmp_path, digest):
    # The TOC parser refuses it, so no chunk or TOC can carry it to the cache...
    entry = {"name": "a", "type": "reg", "size": 1, "offset": 1, "chunkDigest": digest}
    if digest:
        with pytest.raises(FormatError, match="not a sha256 digest|NUL"):
            parse_toc(toc_doc(entry))
    # ...and the cache refuses it too, before any path is made of it.
    cache = ChunkCache(str(tmp_path / "cache"))
    before = sorted(p for p in tmp_path.rglob("*"))
    for call in (lambda: cache.get(digest), lambda: cache.put(digest, b"x"),
                 lambda: cache.contains(digest), lambda: cache.read_range(digest, 0, 1),
                 lambda: cache.get_toc(digest), lambda: cache.put_toc(digest, b"r")):
        with pytest.raises(ValueError, match="not a sha256 digest"):
            call()
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_the_cache_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    cache = ChunkCache(str(tmp_path / "cache"))
    data = b"chunk"
    hex_ = hashlib.sha256(data).hexdigest()
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    path = tmp_path / "cache/chunks/sha256" / hex_[:2] / hex_
    path.parent.mkdir()
    path.symlink_to(outside)
    cache.put(sha256(data), data)
    assert outside.read_bytes() == b"precious"
    assert not path.is_symlink() and cache.get(sha256(data)) == data


# --- real mounts of crafted blobs -----------------------------------------------------------------

def refused_mount(tmp_path, blob: bytes, toc_digest: str, *extra):
    path = tmp_path / "crafted.blob"
    if blob:
        path.write_bytes(blob)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    result = subprocess.run(lazyfs_cmd("mount", "--cache-dir", tmp_path / "cache",
                                       "--toc-digest", toc_digest, *extra, path, mountpoint),
                            capture_output=True, text=True, timeout=120)
    assert not os.path.ismount(mountpoint)
    assert "Traceback" not in result.stderr
    return result


HOSTILE_MOUNTS = {
    "dotdot": (toc_doc({"name": "../../../etc/cron.d/x", "type": "fifo"}), "'..' component"),
    "symlink-parent": (toc_doc({"name": "x", "type": "symlink", "linkName": "/etc"},
                               {"name": "x/passwd", "type": "fifo"}), "symlink of the same layer"),
    "deep-json": (b'{"version":1,"entries":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                  "nested too deeply"),
    "chunk-size": (toc_doc({"name": "a", "type": "reg", "size": 1 << 40, "offset": 0,
                            "chunkDigest": "sha256:" + "0" * 64}), "byte limit"),
}


@pytest.mark.parametrize("layer_format", seekable.FORMATS)
@pytest.mark.parametrize("toc_json, message", HOSTILE_MOUNTS.values(), ids=HOSTILE_MOUNTS.keys())
def test_mount_refuses_a_structurally_hostile_toc(tmp_path, layer_format, toc_json, message):
    blob, toc_digest = crafted_blob(layer_format, [codec_for("gzip").compress(b"")], toc_json)
    result = refused_mount(tmp_path, blob, toc_digest)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_mount_refuses_a_footer_claiming_a_toc_of_hundreds_of_mb(tmp_path):
    # A sparse 300 MB blob: the footer alone says the TOC would be 300 MB; nothing is fetched.
    path = tmp_path / "crafted.blob"
    with open(path, "wb") as f:
        f.write(GzipCodec().compress(b""))  # starts as a blob does, not as an archive
        f.truncate(300 * 1000 * 1000 - estargz.FOOTER_SIZE)
        f.seek(0, os.SEEK_END)
        f.write(build_footer(0))
    result = refused_mount(tmp_path, b"", "sha256:" + "0" * 64)
    assert result.returncode == 2 and "larger than the" in result.stderr, result.stderr


@pytest.mark.parametrize("layer_format", seekable.FORMATS)
def test_mount_of_odd_names_and_a_chunk_bomb_stays_inside_its_directories(tmp_path,
                                                                          layer_format):
    """Names that are odd but accepted, symlinks pointing out of the image, and a chunk whose
    member inflates to 256 MiB: the mount serves the declared bytes, its memory stays small,
    and nothing appears outside its cache directory and mountpoint."""
    codec = codec_for(seekable.MEDIA_CODEC[layer_format], 1)
    small, declared = b"hello\n", b"\0" * 4096
    members = [codec.compress(small), bomb_member(layer_format, 256 * MiB)]
    blob, toc_digest = crafted_blob(layer_format, members, lambda offsets: toc_doc(
        {"name": "./", "type": "dir", "mode": 0o755},
        {"name": "./a//b/./c", "type": "dir", "mode": 0o755},
        reg("a/b/c/.hidden", small, offsets[0], mode=0o644),
        reg("bomb", declared, offsets[1], mode=0o644),
        {"name": "up", "type": "symlink", "linkName": "../../../../etc/passwd"},
        {"name": "abs", "type": "symlink", "linkName": "/etc/shadow"},
        {"name": "ln", "type": "hardlink", "linkName": "./a/b/c/.hidden"},
        {"name": "nope", "type": "hardlink", "linkName": "missing"}))
    path = tmp_path / "crafted.blob"
    path.write_bytes(blob)
    mountpoint, cache = tmp_path / "mnt", tmp_path / "cache"
    with mounted(path, mountpoint, "--toc-digest", toc_digest, "--no-background-fetch",
                 cache_dir=cache) as daemon:
        assert sorted(os.listdir(mountpoint)) == ["a", "abs", "bomb", "ln", "up"]
        assert (mountpoint / "a/b/c/.hidden").read_bytes() == small
        assert (mountpoint / "ln").read_bytes() == small
        assert os.stat(mountpoint / "ln").st_nlink == 2
        assert os.readlink(mountpoint / "up") == "../../../../etc/passwd"
        assert (mountpoint / "bomb").read_bytes() == declared
        with open(f"/proc/{daemon.pid}/status") as status:
            peak_kib = int(next(line for line in status if line.startswith("VmHWM")).split()[1])
        assert peak_kib < 200 * 1024, f"daemon peak RSS {peak_kib} KiB"
    made = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert made == {"crafted.blob", "mnt", "mnt.log", "cache"}
