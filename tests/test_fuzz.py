"""Fuzzing the parsers of untrusted input: footers, TOCs (JSON and their compressed members),
the merged tree, and the converter's tar reader.

Each target takes bytes and either parses them into something that satisfies the invariants
the rest of lazyfs relies on, or raises a LazyfsError. Any other exception, an allocation far
beyond the input's size, or an example slower than the deadline fails the test.

Inputs are structurally valid documents (built by hypothesis strategies) put through mutations:
byte flips, truncation, inserted bytes, and fields swapped for hostile values ("..", absolute
names, NUL bytes, negative and enormous numbers, wrong types, deep nesting).

In CI every test runs FUZZ_EXAMPLES examples (the whole file in well under 30 s). To fuzz for
longer by hand:

    LAZYFS_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py -q

Hypothesis keeps failing examples in .hypothesis/ and replays them first; a crash found this way
goes into tests/fuzz_corpus/ (see test_the_corpus_replays_cleanly) once fixed.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import os
import tarfile
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from converter.layer import LayerOptions, convert_layer
from converter.tarinput import scan_members
from lazyfs.errors import LazyfsError
from lazyfs.format import estargz, seekable, zstdchunked
from lazyfs.format.codec import ZstdCodec
from lazyfs.format.estargz import MAX_TOC_COMPRESSED_SIZE, read_toc_member, toc_tar_bytes
from lazyfs.format.seekable import locate_toc, region_from_position_annotation
from lazyfs.format.toc import MAX_CHUNK_SIZE, dump_toc, parse_toc, resolve
from lazyfs.format.zstdchunked import TOCLocation, read_toc_frame
from lazyfs.tree import build_tree
from tests.tarbuild import tar_bytes
from tests.test_tree import check_invariants

FUZZ_EXAMPLES = int(os.environ.get("LAZYFS_FUZZ_EXAMPLES", "120"))
CORPUS = Path(__file__).parent / "fuzz_corpus"
MiB = 1 << 20

fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES,
    # Generous, so a busy CI machine is not a failure; a hang or a quadratic blow-up is.
    deadline=datetime.timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _event(name: str) -> None:
    """Counted by --hypothesis-show-statistics (to see that examples do not all fail early)."""
    if currently_in_test_context():
        event(name)


@contextlib.contextmanager
def bounded_memory(input_size: int):
    """Fail if the block allocates (in Python objects) more than a generous multiple of its
    input: a huge allocation is what a hostile size field would cause."""
    limit = 32 * MiB + 64 * input_size
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if started:
            tracemalloc.stop()
    assert peak - base < limit, f"allocated {peak - base} bytes for {input_size} bytes of input"


# --- targets: each returns normally or raises LazyfsError ----------------------------------------

def check_footer(tail: bytes, blob_size: int) -> None:
    try:
        region = locate_toc(tail, blob_size)
    except LazyfsError:
        return
    assert region.format in seekable.FORMATS
    assert 0 <= region.data_end <= region.toc_start < region.toc_end
    assert region.toc_end <= blob_size - region.footer_size
    assert region.toc_end - region.toc_start <= MAX_TOC_COMPRESSED_SIZE


def check_position_annotation(value: str, blob_size: int) -> None:
    try:
        region = region_from_position_annotation(value, blob_size)
    except LazyfsError:
        return
    assert 0 <= region.data_end <= region.toc_start < region.toc_end <= blob_size


def check_toc_json(toc_json: bytes, toc_offset: int = 1 << 40) -> None:
    """parse_toc → resolve → build_tree, each either a LazyfsError or sound."""
    with bounded_memory(len(toc_json)):
        try:
            toc = parse_toc(toc_json)
        except LazyfsError:
            _event("toc: refused by parse_toc")
            return
        # What parses is what it says: written back and parsed again, the same entries. (A
        # lone surrogate, which JSON escapes allow, cannot be written back as UTF-8; the mount
        # never writes a TOC, and the tree keeps such a name's bytes: see tree._name_bytes.)
        try:
            written = dump_toc(toc)
        except UnicodeEncodeError:
            written = None
        if written is not None:
            assert parse_toc(written) == toc
        try:
            entries = resolve(toc, toc_offset)
        except LazyfsError:
            _event("toc: refused by resolve")
            return
        for item in entries:
            check_resolved(item, toc_offset)
        try:
            tree = build_tree([entries, entries])  # a layer over itself: every merge path
        except LazyfsError:
            _event("toc: refused by build_tree")
            return
        _event("toc: mounted")
        check_invariants(tree)


def check_resolved(item, toc_offset: int) -> None:
    path = item.path
    assert not path.startswith("/") and not path.endswith("/") and "//" not in path, path
    assert ".." not in path.split("/") and "." not in path.split("/"), path
    assert "\x00" not in path
    if item.entry.type != "reg":
        assert not item.chunks
        return
    expected = 0
    for chunk in item.chunks:
        assert chunk.file_offset == expected and chunk.size > 0
        assert 0 <= chunk.blob_offset < chunk.blob_end <= toc_offset
        assert chunk.inner_offset + chunk.size <= MAX_CHUNK_SIZE
        expected += chunk.size
    assert expected == item.entry.size


def check_toc_member(member: bytes) -> None:
    with bounded_memory(len(member)):
        try:
            toc, digest = read_toc_member(member)
        except LazyfsError:
            return
        assert digest.startswith("sha256:") and isinstance(toc.entries, list)


def check_toc_frame(compressed: bytes, declared: int | None) -> None:
    with bounded_memory(len(compressed) + (declared or 0)):
        try:
            toc, _ = read_toc_frame(compressed, declared)
        except LazyfsError:
            return
        assert isinstance(toc.entries, list)


def check_tar(raw: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(raw)
        f.flush()
        with bounded_memory(len(raw)):
            try:
                members = scan_members(f.name)
            except LazyfsError:
                return
    for member in members:
        name = member.info.name
        assert not name.startswith("/") or not name.strip("/"), name
        assert ".." not in name.split("/") and "\x00" not in name, name
        assert member.info.size >= 0


# --- strategies: valid documents, then mutations -------------------------------------------------

NAME_PART = st.sampled_from(["a", "b", "etc", "usr", ".wh.a", ".wh..wh..opq", "x y", "é", "."])
HOSTILE_NAMES = ["..", "../x", "/etc/passwd", "a/../..", "a\x00b", "", "/", "//", "./..",
                 "a/" * 300 + "z", "\udcff"]
HOSTILE_VALUES = [-1, -(1 << 70), 1 << 63, (1 << 63) - 1, 1 << 62, 1 << 32, 1.5, True, None,
                  "7", [], {}, {"user.a\x00b": ""}, {"": ""}, {"user.x": "AAAA"},
                  "sha256:" + "0" * 64, "sha256:../../x", *HOSTILE_NAMES,
                  [[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]
FIELDS = ["name", "type", "size", "offset", "chunkOffset", "chunkSize", "innerOffset",
          "endOffset", "linkName", "uid", "gid", "mode", "digest", "chunkDigest", "xattrs",
          "devMajor", "userName", "modtime"]


@st.composite
def toc_entries(draw) -> list[dict]:
    """A structurally valid entry list: directories, files with one or more chunks (offsets
    increasing through a blob), symlinks, hardlinks and devices."""
    entries: list[dict] = []
    blob_offset = 10
    names: list[str] = []
    for _ in range(draw(st.integers(0, 12))):
        name = "/".join(draw(st.lists(NAME_PART, min_size=1, max_size=4)))
        kind = draw(st.sampled_from(["dir", "reg", "reg", "symlink", "hardlink", "char", "fifo"]))
        entry: dict = {"name": name, "type": kind, "mode": draw(st.sampled_from([0o644, 0o755]))}
        if kind == "reg":
            size = draw(st.integers(0, 3000))
            entry["size"] = size
            digest = "sha256:" + draw(st.sampled_from("0123456789abcdef")) * 64
            entry["digest"] = digest
            if size:
                chunk = draw(st.integers(1, max(1, size)))
                entry.update(offset=blob_offset, chunkSize=chunk if chunk < size else 0,
                             chunkDigest=digest)
                blob_offset += draw(st.integers(1, 500))
                entries.append(entry)
                done = chunk
                while done < size:
                    length = min(size - done, chunk)
                    entries.append({"type": "chunk", "offset": blob_offset, "chunkOffset": done,
                                    "chunkSize": length if done + length < size else 0,
                                    "chunkDigest": digest})
                    blob_offset += draw(st.integers(1, 500))
                    done += length
                names.append(name)
                continue
        elif kind in ("symlink", "hardlink"):
            entry["linkName"] = draw(st.sampled_from(names + ["target", "../up", "/abs"])) \
                if kind == "symlink" else draw(st.sampled_from(names or ["missing"]))
        elif kind == "char":
            entry.update(devMajor=draw(st.integers(0, 300)), devMinor=draw(st.integers(0, 300)))
        entries.append(entry)
        names.append(name)
    return entries


# Values of the right JSON type that a parser must still judge: they reach resolve and the tree.
HOSTILE_INTS = [0, 1, 7, 1 << 30, (1 << 30) + 1, 1 << 32, 1 << 62, (1 << 63) - 1, 4999, 5000]
NAME_FIELDS = {"name", "linkName"}
INT_FIELDS = {"size", "offset", "chunkOffset", "chunkSize", "innerOffset", "endOffset", "uid",
              "gid", "mode", "devMajor"}


@st.composite
def field_swaps(draw, entries: list[dict]) -> list[dict]:
    """Entries with some fields set to hostile values of the right type (which get past the
    type checks), of any type, or removed; and symlinks slipped in over later entries' parents."""
    for _ in range(draw(st.integers(0, 4))):
        if not entries:
            break
        index = draw(st.integers(0, len(entries) - 1))
        entry = entries[index]
        field = draw(st.sampled_from(FIELDS))
        how = draw(st.sampled_from(["typed", "typed", "any", "remove", "symlink", "symlink"]))
        nested = [i for i, e in enumerate(entries) if "/" in str(e.get("name", ""))]
        if how == "symlink" and nested:
            index = draw(st.sampled_from(nested))
            parent = entries[index]["name"].rpartition("/")[0]
            entries.insert(draw(st.integers(0, index)),
                           {"name": parent, "type": "symlink",
                            "linkName": draw(st.sampled_from([".", "..", "/etc", parent]))})
        elif how == "typed" and field in NAME_FIELDS:
            entry[field] = draw(st.sampled_from(HOSTILE_NAMES))
        elif how == "typed" and field in INT_FIELDS:
            entry[field] = draw(st.sampled_from(HOSTILE_INTS))
        elif how == "remove":
            entry.pop(field, None)
        else:
            entry[field] = draw(st.sampled_from(HOSTILE_VALUES))
    return entries


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """Flips, truncation and insertions: what a corrupted or crafted file looks like."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "set"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(
                [b"\x00", b"..", b"[[[[[[", b"9" * 30, b"-", b'"', b"\xff\xfe", b"/"]))
        else:
            data[at] = draw(st.sampled_from(b"0f9\x00\xff/.:[{"))
    return bytes(data)


def toc_json_of(entries: list[dict]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}).encode()


@st.composite
def hostile_toc_json(draw) -> bytes:
    entries = draw(field_swaps(draw(toc_entries())))
    try:
        raw = json.dumps({"version": 1, "entries": entries}, ensure_ascii=False)
        data = raw.encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        data = toc_json_of([])
    if draw(st.integers(0, 2)) == 0:  # most byte flips make JSON invalid: a third is enough
        data = draw(byte_mutations(data))
    return data


# --- the fuzz tests ------------------------------------------------------------------------------

@fuzz_settings
@given(st.data())
def test_fuzz_footers(data):
    fmt = data.draw(st.sampled_from(["estargz", "zstd", "legacy", "random"]))
    blob_size = data.draw(st.one_of(st.integers(0, 1 << 20), st.integers(0, 1 << 64)))
    number = st.one_of(st.integers(0, 2000), st.integers(0, (1 << 64) - 1))
    if fmt == "estargz":
        tail = estargz.build_footer(data.draw(st.integers(0, (1 << 64) - 1)))
    elif fmt == "legacy":
        tail = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x16\x00"
                + b"%016x" % data.draw(st.integers(0, (1 << 64) - 1)) + b"STARGZ"
                + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)
    elif fmt == "zstd":
        tail = zstdchunked.build_footer(TOCLocation(data.draw(number), data.draw(number),
                                                    data.draw(number), 48))
    else:
        tail = data.draw(st.binary(max_size=128))
    tail = data.draw(byte_mutations(tail))
    check_footer(tail, max(blob_size, len(tail)))


@fuzz_settings
@given(st.text(alphabet="0123456789:-x ", max_size=60), st.integers(0, 1 << 64))
def test_fuzz_position_annotations(value, blob_size):
    check_position_annotation(value, blob_size)


@fuzz_settings
@given(hostile_toc_json(), st.sampled_from([1 << 40, 5000, 300, 0]))
def test_fuzz_toc_json_resolve_and_tree(toc_json, toc_offset):
    check_toc_json(toc_json, toc_offset)


@fuzz_settings
@given(st.data())
def test_fuzz_toc_members(data):
    """The compressed TOC as the mount fetches it: gzip member holding a tar, or zstd frame."""
    toc_json = data.draw(hostile_toc_json())
    if data.draw(st.booleans()):
        member = gzip.compress(toc_tar_bytes(toc_json), compresslevel=1)
        check_toc_member(data.draw(byte_mutations(member)))
    else:
        frame = ZstdCodec(1).compress(toc_json)
        declared = data.draw(st.sampled_from([None, len(toc_json), 0, 5, 1 << 40]))
        check_toc_frame(data.draw(byte_mutations(frame)), declared)


TAR_NAMES = st.sampled_from(["a", "a/b", "./c", "d/", "../x", "/abs", "s", "s/x", "h", "a\x00b",
                             "x" * 120, "é"])


@st.composite
def tar_members(draw):
    members = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(TAR_NAMES)
        kind = draw(st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                                     tarfile.LNKTYPE]))
        info = tarfile.TarInfo(name)
        info.type = kind
        data = None
        if kind == tarfile.REGTYPE:
            data = draw(st.binary(max_size=700))
            info.size = len(data)
        elif kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            info.linkname = draw(TAR_NAMES)
        if draw(st.integers(0, 4)) == 0:
            info.pax_headers = {draw(st.sampled_from(["path", "linkpath", "uid", "size",
                                                       "SCHILY.xattr.user.a", "SCHILY.xattr.",
                                                       "SCHILY.xattr.a\x00b"])):
                                draw(st.sampled_from(["..", "/etc", "a\x00b", "-1", "99999999999",
                                                      "1e9", "x"]))}
        members.append((info, data))
    return members


@fuzz_settings
@given(st.data())
def test_fuzz_tar_reader(data):
    try:
        raw = tar_bytes(*data.draw(tar_members()),
                        format=data.draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])))
    except (ValueError, UnicodeError):  # tarfile refuses to write some of these headers
        raw = tar_bytes()
    check_tar(data.draw(byte_mutations(raw)))


@settings(fuzz_settings, max_examples=max(10, FUZZ_EXAMPLES // 4))
@given(st.data())
def test_fuzz_convert_then_mount_agree(data):
    """Whatever tar the converter accepts, the mount's parsers accept its output: a converter
    that passed a hostile name through would make images nobody can mount (or worse)."""
    try:
        raw = tar_bytes(*data.draw(tar_members()))
    except (ValueError, UnicodeError):
        raw = tar_bytes()
    check_convert(raw, data.draw(st.sampled_from(seekable.FORMATS)))


def check_convert(raw: bytes, layer_format: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "in.tar"), os.path.join(tmp, "out.blob")
        with open(src, "wb") as f:
            f.write(raw)
        try:
            convert_layer(src, out, LayerOptions(chunk_size=256, format=layer_format, workers=1))
        except LazyfsError:
            assert not os.path.exists(out)
            _event("convert: refused")
            return
        _event("convert: converted")
        with open(out, "rb") as f:
            blob = f.read()
    region = locate_toc(blob[-seekable.MAX_FOOTER_SIZE:], len(blob))
    toc, _ = seekable.parse_toc_region(region, blob[region.toc_start:region.toc_end])
    entries = resolve(toc, region.data_end)  # raises (fails the test) if the mount would refuse
    for item in entries:
        check_resolved(item, region.data_end)
    check_invariants(build_tree([entries]))


# --- the corpus: inputs that once crashed or hung a parser -----------------------------------------
# tests/fuzz_corpus/<target>-<what>.<ext>; the target is the file name's first word.

def _corpus_files():
    return sorted(p.name for p in CORPUS.iterdir() if not p.name.endswith(".md"))


@pytest.mark.parametrize("name", _corpus_files())
def test_the_corpus_replays_cleanly(name):
    data = (CORPUS / name).read_bytes()
    target = name.split("-", 1)[0]
    if target == "toc":
        check_toc_json(data)
    elif target == "footer":  # the whole (small) blob: its tail and its size
        check_footer(data[-seekable.MAX_FOOTER_SIZE:], len(data))
    elif target == "member":
        check_toc_member(data)
    elif target == "frame":
        check_toc_frame(data, None)
    elif target == "tar":
        check_tar(data)
        check_convert(data, "estargz")
    else:
        raise AssertionError(f"unknown corpus target {target!r} in {name}")


def test_the_corpus_covers_every_target():
    assert {name.split("-", 1)[0] for name in _corpus_files()} >= {"toc", "footer", "tar"}
