"""The format layer alone: footers, TOC JSON, chunk resolution, the gzip codec."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.errors import FormatError
from lazyfs.format import oci, workload
from lazyfs.format.codec import GzipCodec
from lazyfs.format.estargz import (FOOTER_SIZE, LEGACY_FOOTER_SIZE, TOC_TAR_NAME, build_footer,
                                   build_toc_blob, parse_footer, read_toc_member)
from lazyfs.format.toc import TOC, TOCEntry, dump_toc, format_modtime, parse_modtime, parse_toc, resolve


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_footer_round_trip(offset):
    footer = build_footer(offset)
    assert len(footer) == FOOTER_SIZE
    assert parse_footer(b"junk before" + footer).toc_blob_offset == offset
    # The footer is itself a valid, empty gzip member.
    assert gzip.decompress(footer) == b""


def test_footer_bytes_match_the_documented_layout():
    footer = build_footer(0x1234)
    assert footer[:10] == bytes.fromhex("1f8b0804000000000 0ff".replace(" ", ""))
    assert footer[10:16] == b"\x1a\x00SG\x16\x00"
    assert footer[16:38] == b"0000000000001234STARGZ"
    assert footer[38:] == bytes.fromhex("010000ffff") + b"\0" * 8


def legacy_footer(offset: int) -> bytes:
    extra = b"%016xSTARGZ" % offset
    footer = (bytes.fromhex("1f8b08040000000000ff") + len(extra).to_bytes(2, "little") + extra
              + bytes.fromhex("010000ffff") + b"\0" * 8)
    assert len(footer) == LEGACY_FOOTER_SIZE
    return footer


def test_legacy_crfs_footer_is_read():
    parsed = parse_footer(b"x" * 100 + legacy_footer(987654))
    assert (parsed.toc_blob_offset, parsed.size) == (987654, LEGACY_FOOTER_SIZE)
    assert gzip.decompress(legacy_footer(5)) == b""


@pytest.mark.parametrize("tail", [b"", b"\0" * 51, gzip.compress(b"not a footer" * 10),
                                  build_footer(5)[:-1], build_footer(5).replace(b"STARGZ", b"STARGX"),
                                  build_footer(5).replace(b"0000000000000005", b"zzzzzzzzzzzzzzzz")])
def test_bad_footers_are_refused(tail):
    with pytest.raises(FormatError):
        parse_footer(tail)


names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=40)
small_ints = st.integers(min_value=0, max_value=(1 << 40))
entries = st.builds(
    TOCEntry, name=names, type=st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo"]),
    size=small_ints, modtime=st.sampled_from(["", "2023-11-14T22:13:20Z"]), link_name=st.text(max_size=20).filter(lambda s: "\x00" not in s),
    mode=st.integers(0, 0o7777), uid=small_ints, gid=small_ints, user_name=st.sampled_from(["", "root", "ü"]),
    blob_offset=small_ints, dev_major=small_ints, dev_minor=small_ints,
    xattrs=st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda s: "\x00" not in s),
                           st.binary(max_size=10), max_size=3),
    digest=st.sampled_from(["", "sha256:" + "ab" * 32]), file_offset=small_ints, chunk_size=small_ints,
    chunk_digest=st.sampled_from(["", "sha256:" + "01" * 32]), inner_offset=small_ints)


@given(st.lists(entries, max_size=8))
def test_toc_json_round_trip(items):
    assert parse_toc(dump_toc(TOC(items))).entries == items


def test_toc_uses_the_wire_names_and_base64_xattrs():
    doc = json.loads(dump_toc(TOC([TOCEntry(name="a", type="reg", size=3, blob_offset=10, file_offset=0,
                                            chunk_size=2, link_name="", xattrs={"user.x": b"\x00\xff"},
                                            inner_offset=4, user_name="u", group_name="g")])))
    assert doc == {"version": 1, "entries": [{
        "name": "a", "type": "reg", "size": 3, "userName": "u", "groupName": "g", "offset": 10,
        "xattrs": {"user.x": base64.b64encode(b"\x00\xff").decode()}, "chunkSize": 2, "innerOffset": 4}]}


@pytest.mark.parametrize("doc, message", [
    (b"{", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b'{"version": 2, "entries": []}', "unsupported TOC version"),
    (b'{"version": 1}', "no 'entries'"),
    (b'{"version": 1, "entries": [5]}', "entry 0 is not an object"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "sock"}]}', "unknown type"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": -1}]}', "out of range"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": true}]}', "not an integer"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": 1e3}]}', "not an integer"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "offset": 9223372036854775808}]}', "out of range"),
    (b'{"version": 1, "entries": [{"name": "a\\u0000b", "type": "reg"}]}', "NUL"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "digest": "md5:00"}]}', "not a sha256"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "xattrs": {"k": "!!"}}]}', "base64"),
    (b'{"version": 1, "entries": [{"type": "reg"}]}', "has no name"),
])
def test_malformed_tocs_are_refused_with_a_precise_message(doc, message):
    with pytest.raises(FormatError, match=message):
        parse_toc(doc)


def reg(name, size, offset, chunk_size=0, **kw):
    return TOCEntry(name=name, type="reg", size=size, blob_offset=offset, chunk_size=chunk_size, **kw)


def chunk(offset, file_offset, chunk_size=0):
    return TOCEntry(name="", type="chunk", blob_offset=offset, file_offset=file_offset, chunk_size=chunk_size)


def test_resolve_attaches_chunks_and_fills_implicit_values():
    toc = TOC([
        TOCEntry(name="./d/", type="dir", uid=5, user_name="five", gid=6, group_name="six"),
        reg("d/f", 10, 100, chunk_size=4, uid=5, gid=6),
        chunk(150, 4, 4),
        chunk(170, 8),
        reg("g", 3, 200),
        TOCEntry(name="e", type="reg"),  # empty file: no chunk
    ])
    items = resolve(toc, toc_blob_offset=300)
    assert [i.path for i in items] == ["d", "d/f", "g", "e"]
    f = items[1]
    assert (f.user_name, f.group_name) == ("five", "six")  # carried forward; group from the group map
    assert [(c.file_offset, c.size, c.blob_offset, c.blob_end) for c in f.chunks] == [
        (0, 4, 100, 150), (4, 4, 150, 170), (8, 2, 170, 200)]
    assert [(c.size, c.blob_end) for c in items[2].chunks] == [(3, 300)]
    assert items[3].chunks == []


@pytest.mark.parametrize("toc_entries, message", [
    ([chunk(10, 0)], "chunk with no regular file"),
    ([reg("a", 10, 5, chunk_size=4), chunk(20, 5)], "do not tile"),
    ([reg("a", 10, 5, chunk_size=4)], "cover 4 bytes"),
    ([reg("a", 10, 500)], "not before the TOC"),
    ([reg("a", 4, 5, chunk_size=4), chunk(20, 4, 4)], "cover 8 bytes, file size is 4"),
])
def test_resolve_refuses_inconsistent_chunks(toc_entries, message):
    with pytest.raises(FormatError, match=message):
        resolve(TOC(toc_entries), toc_blob_offset=300)


@given(st.binary(max_size=5000), st.integers(0, 9))
@settings(max_examples=50)
def test_gzip_codec_members_are_standard_gzip(data, level):
    member = GzipCodec(level).compress(data)
    assert gzip.decompress(member) == data
    codec = GzipCodec(level)
    assert codec.decompress_prefix(member + b"next member", len(data)) == data
    if data:
        assert codec.decompress_prefix(member, len(data) - 1) == data[:-1]


def test_gzip_codec_never_inflates_past_the_asked_length():
    bomb = GzipCodec(9).compress(b"\0" * (50 << 20))
    assert len(GzipCodec().decompress_prefix(bomb, 10)) == 10
    with pytest.raises(FormatError, match="ends after"):
        GzipCodec().decompress_prefix(GzipCodec().compress(b"abc"), 4)
    with pytest.raises(FormatError, match="corrupt"):
        GzipCodec().decompress_prefix(b"\x1f\x8b\x08\x00" + b"\xff" * 30, 4)


def test_toc_member_round_trip_and_digest():
    toc = TOC([reg("a", 1, 0)])
    blob = build_toc_blob(toc, 1234, GzipCodec())
    parsed, digest = read_toc_member(blob.tail[:-FOOTER_SIZE])
    assert parsed == toc and digest == blob.toc_digest
    assert parse_footer(blob.tail).toc_blob_offset == 1234
    # The member holds a tar entry named stargz.index.json whose content is the TOC JSON.
    assert TOC_TAR_NAME.encode() in zlib.decompress(blob.tail[:-FOOTER_SIZE], 31)


def test_toc_member_with_another_name_is_refused():
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("evil.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(FormatError, match="not 'stargz.index.json'"):
        read_toc_member(gzip.compress(buf.getvalue()))


def test_modtime_formatting():
    assert format_modtime(0) == ""
    assert format_modtime(1700000000.4) == "2023-11-14T22:13:20Z"
    assert parse_modtime("2023-11-14T22:13:20Z") == 1700000000
    assert parse_modtime("2023-11-15T00:13:20+02:00") == 1700000000
    assert parse_modtime("") == 0 and parse_modtime("yesterday") == 0


# --- zstd:chunked ---------------------------------------------------------------------------

from lazyfs.format import zstdchunked  # noqa: E402
from lazyfs.format.codec import ZstdCodec  # noqa: E402
from lazyfs.format.seekable import locate_toc, region_from_position_annotation  # noqa: E402


@given(st.integers(0, 1 << 40), st.integers(1, 1 << 30), st.integers(0, 1 << 28))
def test_zstd_footer_round_trip(offset, compressed, uncompressed):
    location = zstdchunked.TOCLocation(offset, compressed, uncompressed, zstdchunked.FOOTER_SIZE)
    footer = zstdchunked.build_footer(location)
    assert len(footer) == 48 and footer.endswith(b"GnUlInUx") and footer[:4] == b"\x50\x2a\x4d\x18"
    assert zstdchunked.parse_footer(b"frames" + footer) == location


def storage_footer(offset, compressed, uncompressed, magic=b"GNUlInUx"):
    """containers/storage's 64-byte footer, with a tar-split location before the magic."""
    data = struct.pack("<QQQQQQQ", offset, compressed, uncompressed, 1, 999, 88, 777) + magic
    return b"\x50\x2a\x4d\x18" + struct.pack("<I", len(data)) + data


@pytest.mark.parametrize("magic", [b"GNUlInUx", b"GnUlInUx"])
def test_containers_storage_footer_is_read(magic):
    parsed = zstdchunked.parse_footer(b"x" * 100 + storage_footer(1000, 200, 5000, magic))
    assert (parsed.offset, parsed.compressed_size, parsed.uncompressed_size, parsed.footer_size) == \
        (1000, 200, 5000, 72)


@pytest.mark.parametrize("tail, message", [
    (b"\0" * 40 + b"GnUlInUx", "skippable frame of 40 or 64"),
    (zstdchunked.skippable_frame(struct.pack("<QQQQ", 10, 5, 5, 2) + b"GnUlInUx"), "manifest type 2"),
    (b"no footer here" * 5, "no zstd:chunked footer"),
])
def test_bad_zstd_footers_are_refused(tail, message):
    with pytest.raises(FormatError, match=message):
        zstdchunked.parse_footer(tail)


def test_zstd_toc_outside_the_blob_is_refused():
    footer = zstdchunked.build_footer(zstdchunked.TOCLocation(900, 500, 10, zstdchunked.FOOTER_SIZE))
    with pytest.raises(FormatError, match="outside the blob"):
        locate_toc(footer, 1000)


def test_position_annotation():
    region = region_from_position_annotation("100:50:400:1", 1000)
    assert (region.toc_start, region.toc_end, region.data_end, region.format) == (100, 150, 92, "zstd:chunked")
    for bad in ("100:50:400", "a:b:c:d", "100:50:400:2", "-1:50:400:1"):
        with pytest.raises(FormatError):
            region_from_position_annotation(bad, 1000)


def test_zstd_toc_frame_round_trip_and_bounds():
    toc = TOC([reg("a", 1, 0)])
    frames = zstdchunked.build_toc_frames(toc, 4096, ZstdCodec())
    assert frames.location.offset == 4096 + 8
    parsed, digest = zstdchunked.read_toc_frame(frames.compressed_toc, frames.location.uncompressed_size)
    assert parsed == toc and digest == frames.toc_digest
    with pytest.raises(FormatError, match="declared"):
        zstdchunked.read_toc_frame(frames.compressed_toc, frames.location.uncompressed_size - 5)


@given(st.binary(max_size=5000), st.sampled_from([1, 3, 19]))
@settings(max_examples=30)
def test_zstd_codec_frames_are_standard_zstd(data, level):
    import zstandard
    frame = ZstdCodec(level).compress(data)
    assert zstandard.ZstdDecompressor().decompress(frame) == data
    if data:
        assert ZstdCodec().decompress_prefix(frame + b"next", len(data)) == data
        with pytest.raises(FormatError, match="ends after"):
            ZstdCodec().decompress_prefix(frame, len(data) + 1)


def test_end_offset_bounds_a_chunk_range():
    toc = TOC([reg("a", 10, 100, end_offset=150), reg("b", 5, 300, end_offset=320)])
    items = resolve(toc, toc_blob_offset=400)
    assert (items[0].chunks[0].blob_end, items[1].chunks[0].blob_end) == (150, 320)
    with pytest.raises(FormatError, match="endOffset"):
        resolve(TOC([reg("a", 10, 100, end_offset=90)]), toc_blob_offset=400)


# --- the fast parser against the field-by-field reference ------------------------------------

from lazyfs.format import toc as toc_mod  # noqa: E402
from lazyfs.format.toc import Chunk, clean_name  # noqa: E402

_WIRE_NAMES = [wire for _, wire, _ in toc_mod._FIELDS] + ["unknownField"]
_JSON_VALUES = st.one_of(
    st.integers(min_value=-2, max_value=3), st.sampled_from([(1 << 63) - 1, 1 << 63, 10**30]),
    st.booleans(), st.none(), st.floats(allow_nan=False, max_value=10, min_value=-10),
    st.sampled_from(["", "a", "a\x00", "reg", "dir", "chunk", "sock", "2023-11-14T22:13:20Z",
                     "sha256:" + "ab" * 32, "sha256:" + "ab" * 32 + "\n", "sha256:" + "AB" * 32,
                     "md5:00", "ü/./x"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["user.a", "k"]), st.sampled_from(["", "AAE=", "!!", 5]),
                    max_size=2),
)
_RAW_ENTRIES = st.dictionaries(st.sampled_from(_WIRE_NAMES), _JSON_VALUES, max_size=8)


def _outcome(build):
    try:
        return build()
    except FormatError as exc:
        return f"FormatError: {exc}"


@given(st.lists(st.one_of(_RAW_ENTRIES, _JSON_VALUES), max_size=4))
@settings(max_examples=500)
def test_the_fast_parser_agrees_with_the_reference_on_any_input(raws):
    """Same entries, or the same error (message included), as `_entry_from_json` one by one."""
    def reference():
        return [toc_mod._entry_from_json(i, raw) for i, raw in enumerate(raws)]

    assert _outcome(lambda: toc_mod._entries_from_json(list(raws))) == _outcome(reference)


@given(st.lists(entries, max_size=8))
def test_parsed_entries_share_repeated_strings(items):
    parsed = parse_toc(dump_toc(TOC(items + items))).entries
    half = len(items)
    for a, b in zip(parsed[:half], parsed[half:]):
        assert a.type is b.type and a.modtime is b.modtime and a.user_name is b.user_name
        assert a.digest is b.digest and a.chunk_digest is b.chunk_digest
    # ...and the entries are still independent objects (xattrs included).
    for a, b in zip(parsed[:half], parsed[half:]):
        assert a is not b and a.xattrs is not b.xattrs


def test_a_digest_with_a_trailing_newline_is_refused():
    doc = json.dumps({"version": 1, "entries": [
        {"name": "a", "type": "reg", "digest": "sha256:" + "ab" * 32 + "\n"}]}).encode()
    with pytest.raises(FormatError, match="entry 0 field 'digest' is not a sha256 digest"):
        parse_toc(doc)


def test_the_first_bad_field_in_wire_order_is_named():
    # Two bad fields, JSON order the reverse of _FIELDS order: the message names the first of
    # _FIELDS, as the field-by-field parser always did.
    doc = b'{"version": 1, "entries": [{"name": "a", "chunkSize": -1, "type": "reg", "size": "x"}]}'
    with pytest.raises(FormatError, match="entry 0 field 'size' is not an integer"):
        parse_toc(doc)


_NAME_PARTS = st.sampled_from(["a", "b", "é", "\udc80", ".", "..", "", ".a", "a.", "..a"])


@given(st.lists(_NAME_PARTS, max_size=6), st.sampled_from(["", "/", "./", "//"]),
       st.sampled_from(["", "/", "/.", "//"]))
def test_clean_name_fast_path_agrees_with_normpath(parts, prefix, suffix):
    import posixpath
    name = prefix + "/".join(parts) + suffix
    expected = posixpath.normpath("/" + name).lstrip("/")
    assert clean_name(name) == ("" if expected == "." else expected)


def test_resolved_chunks_are_ordinary_frozen_chunks():
    items = resolve(TOC([reg("a", 10, 100, chunk_size=4, chunk_digest="sha256:" + "01" * 32),
                         chunk(150, 4)]), toc_blob_offset=300)
    first, second = items[0].chunks
    assert first == Chunk(file_offset=0, size=4, blob_offset=100, blob_end=150, inner_offset=0,
                          digest="sha256:" + "01" * 32)
    assert hash(second) == hash(Chunk(4, 6, 150, 300, 0, ""))
    with pytest.raises(AttributeError):
        first.size = 5


def test_resolve_checks_tiling_after_every_chunk_is_attached():
    # A file that does not tile, then a chunk entry past the TOC: the offset error comes first,
    # as the checks always ran in that order.
    with pytest.raises(FormatError, match="not before the TOC"):
        resolve(TOC([reg("a", 10, 5, chunk_size=4), reg("b", 3, 50), chunk(500, 1)]),
                toc_blob_offset=300)


def test_parse_and_resolve_leave_the_garbage_collector_as_they_found_it():
    import gc
    doc = dump_toc(TOC([reg("a", 1, 0)]))
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            resolve(parse_toc(doc), 10)
            with pytest.raises(FormatError):
                parse_toc(b'{"version": 1, "entries": [5]}')
            assert gc.isenabled() is enabled
        finally:
            gc.enable()


def test_parsed_entries_keep_no_object_of_the_json_document(monkeypatch):
    """So that the document's memory can go back to the system whole (see _entries_from_json)."""
    documents = []
    real_loads = json.loads

    def loads(data):
        documents.append(real_loads(data))
        return documents[-1]

    monkeypatch.setattr(toc_mod.json, "loads", loads)
    items = [reg(f"dir/file{i}", 1000 + i, 5000 + i, chunk_size=0, uid=1000, user_name="user",
                 modtime="2023-11-14T22:13:20Z", digest="sha256:" + "ab" * 32,
                 chunk_digest="sha256:" + "cd" * 32, mode=0o644) for i in range(3)]
    items.append(TOCEntry(name="link", type="symlink", link_name="dir/file0", mode=0o777))
    parsed = parse_toc(dump_toc(TOC(items))).entries
    assert parsed == items
    in_document = {id(value) for raw in documents[0]["entries"] for value in raw.values()}
    for entry in parsed:
        for attr in toc_mod._ENTRY_ATTRS:
            value = getattr(entry, attr)
            if (isinstance(value, int) and value > 256) or (isinstance(value, str) and len(value) > 1):
                assert id(value) not in in_document, (entry.name, attr)


# --- the workload list (lazyfs/format/workload.py) and the prefetch ranges annotation ----------

def test_a_workload_list_has_paths_in_order_and_the_reads_of_each_merged():
    text = ("usr/bin/app\n"
            "#read 0 4096 usr/bin/app\n"
            "# a comment\n"
            "\n"
            "  lib/with space.so  \n"
            "#read 8192 4096 lib/with space.so\n"
            "#read 4096 4096 usr/bin/app\n"  # touches the first: one range
            "#read 100000 10 usr/bin/app\n"
            "odd\x1cname\n")  # not a line break in a list
    listed = workload.parse(text)
    assert listed.paths == ["usr/bin/app", "lib/with space.so", "odd\x1cname"]
    assert listed.reads == {"usr/bin/app": [(0, 8192), (100000, 100010)],
                            "lib/with space.so": [(8192, 12288)]}
    assert workload.read_line(5, 7, "a b") == "#read 5 7 a b"
    assert workload.parse(workload.read_line(5, 7, "a b")).reads == {"a b": [(5, 12)]}
    extents = [(10, 20), (0, 5), (7, 7), (25, 30)]  # (7, 7) is empty
    assert workload.merge_extents(extents, gap_bytes=4) == [(0, 5), (10, 20), (25, 30)]
    assert workload.merge_extents(extents, gap_bytes=5) == [(0, 30)]
    merged = [(0, 5), (10, 20), (25, 30)]
    assert [workload.range_holding(merged, start, end) for start, end in
            ((0, 5), (12, 20), (25, 26), (4, 11), (5, 10), (30, 31), (-1, 0))] == \
        [0, 1, 2, None, None, None, None]


@pytest.mark.parametrize("line", ["#read 1 2", "#read x 2 a", "#read 1 -2 a", "#read 1 2 "])
def test_a_malformed_read_line_is_an_error_that_names_its_line(line):
    with pytest.raises(FormatError, match=r"my.list, line 2: a read line is"):
        workload.parse(f"a\n{line}\n", where="my.list")


def test_prefetch_ranges_round_trip_and_bad_values_are_refused():
    ranges = [(0, 10), (20, 25), (1 << 40, (1 << 40) + 1)]
    assert oci.parse_ranges(oci.format_ranges(ranges)) == ranges
    assert oci.parse_ranges("") == []
    for text, message in (("5", "not OFFSET:LENGTH"), ("0:0", "not OFFSET:LENGTH"),
                          ("0:-1", "not OFFSET:LENGTH"), ("10:5,12:1", "overlaps or precedes"),
                          ("10:5,0:1", "overlaps or precedes"), ("0:101", "past the blob")):
        with pytest.raises(FormatError, match=message):
            oci.parse_ranges(text, blob_size=100)
    with pytest.raises(FormatError, match="more than"):
        oci.parse_ranges(",".join(f"{2 * i}:1" for i in range(oci.MAX_PREFETCH_RANGES + 1)))
