"""The table of contents (TOC) shared by eStargz and zstd:chunked.

The TOC is a JSON document `{"version": 1, "entries": [...]}`: one entry per tar entry, in blob
order, plus one `"chunk"` entry for every chunk of a regular file after its first. Wire names
(`chunkOffset`, `userName`, ...) appear only in `_FIELDS` below; Python code uses the snake_case
names, with units: `blob_offset` is a position in the compressed blob, `file_offset` a position in
the uncompressed file.

Parsing checks types and ranges of every field (a TOC is untrusted input); `resolve()` then turns
the entry list into files with their chunk lists, filling what the JSON leaves implicit.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime
import gc
import json
import posixpath
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields

from lazyfs.errors import FormatError

TOC_VERSION = 1

# Entry types. "chunk" continues the regular file named by the preceding "reg" entry.
ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})

# Digests are OCI digests; only sha256 is written or accepted. Used with fullmatch: no trailing
# newline or other junk slips by (the cache, which makes paths of digests, is as strict).
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")

# Largest value accepted for any integer field: offsets and sizes must fit a signed 64-bit int,
# as they do in the reference implementation.
_INT_MAX = (1 << 63) - 1

# A TOC larger than this is refused before it is parsed (and, by the framing code, before it is
# fetched or inflated past this size). A typical entry takes ~325 bytes of JSON, so this is
# ~400,000 entries; parsing, resolving and building the tree take about 3 bytes of memory per
# byte of JSON at their peak, so a hostile blob can claim at most ~400 MiB this way.
MAX_TOC_JSON_SIZE = 128 << 20

# Largest uncompressed member prefix a chunk may need (its inner offset plus its size). A
# chunk is inflated whole into memory to be verified, and the fetcher decodes up to 8 chunks
# of a source at once, so this bounds what a hostile TOC can make the daemon allocate (8 x 256
# MiB). Real chunks are far smaller (4 MiB by default; containers/storage splits files into
# pieces of tens of KiB), and a chunk this big would defeat lazy fetching anyway; the
# converter refuses a larger --chunk-size.
MAX_CHUNK_SIZE = 256 << 20

# uid_t and gid_t are 32-bit: a larger owner cannot be shown by the kernel.
_ID_MAX = (1 << 32) - 1


@dataclass(slots=True)
class TOCEntry:
    name: str
    type: str
    size: int = 0
    modtime: str = ""  # RFC 3339, UTC, whole seconds; "" means zero/unknown
    link_name: str = ""
    mode: int = 0  # permission bits plus setuid/setgid/sticky, as in the tar header
    uid: int = 0
    gid: int = 0
    user_name: str = ""  # may be written only for the first entry with this uid
    group_name: str = ""  # may be written only for the first entry with this gid
    blob_offset: int = 0  # where the compressed member holding this chunk starts
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""  # sha256 of the whole regular file
    file_offset: int = 0  # where this chunk starts in the file
    chunk_size: int = 0  # 0 in JSON means "to the end of the file"
    chunk_digest: str = ""  # sha256 of this chunk's uncompressed bytes
    inner_offset: int = 0  # where the chunk starts inside the decompressed member
    end_offset: int = 0  # zstd:chunked: where this entry's compressed frames end in the blob

    @property
    def is_data(self) -> bool:
        return self.type in ("reg", "chunk")


# (python attribute, JSON name, kind). The only place wire names appear. Order follows the
# reference implementation's struct so that our JSON reads the same way as theirs.
_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("name", "name", "str"),
    ("type", "type", "str"),
    ("size", "size", "int"),
    ("modtime", "modtime", "str"),
    ("link_name", "linkName", "str"),
    ("mode", "mode", "int"),
    ("uid", "uid", "int"),
    ("gid", "gid", "int"),
    ("user_name", "userName", "str"),
    ("group_name", "groupName", "str"),
    ("blob_offset", "offset", "int"),
    ("dev_major", "devMajor", "int"),
    ("dev_minor", "devMinor", "int"),
    ("xattrs", "xattrs", "xattrs"),
    ("digest", "digest", "digest"),
    ("file_offset", "chunkOffset", "int"),
    ("chunk_size", "chunkSize", "int"),
    ("chunk_digest", "chunkDigest", "digest"),
    ("inner_offset", "innerOffset", "int"),
    ("end_offset", "endOffset", "int"),
)


@dataclass
class TOC:
    entries: list[TOCEntry]
    version: int = TOC_VERSION


def entry_to_json(entry: TOCEntry) -> dict:
    """Wire form of one entry; zero values other than the name are omitted, as `omitempty`
    does in Go."""
    out: dict = {}
    for attr, wire, kind in _FIELDS:
        value = getattr(entry, attr)
        if not value:
            # A name is always written, as the reference does: "" is the root (a tar's "/"),
            # and readers refuse an entry with no name. Chunk entries may leave it out.
            if attr == "name" and entry.type != "chunk":
                out[wire] = value
            continue
        if kind == "xattrs":
            # Go's encoding/json writes []byte as standard base64; readers expect that.
            value = {k: base64.b64encode(v).decode("ascii") for k, v in sorted(value.items())}
        out[wire] = value
    return out


def dump_toc(toc: TOC) -> bytes:
    """Serialize a TOC. The digest of these exact bytes is the layer's TOC digest."""
    doc = {"version": toc.version, "entries": [entry_to_json(e) for e in toc.entries]}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_toc(toc_json: bytes) -> TOC:
    """Parse and type-check a TOC. Raises FormatError naming the first bad entry and field."""
    if len(toc_json) > MAX_TOC_JSON_SIZE:
        raise FormatError(f"TOC of {len(toc_json)} bytes is larger than the "
                          f"{MAX_TOC_JSON_SIZE} byte limit")
    with _gc_paused():
        try:
            doc = json.loads(toc_json)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"TOC is not valid JSON: {exc}") from None
        except RecursionError:  # the C decoder recurses once per nested array or object
            raise FormatError("TOC is not valid JSON: nested too deeply") from None
        if not isinstance(doc, dict):
            raise FormatError("TOC is not a JSON object")
        version = doc.get("version")
        if version != TOC_VERSION:
            raise FormatError(f"unsupported TOC version {version!r} (want {TOC_VERSION})")
        raw_entries = doc.get("entries")
        if not isinstance(raw_entries, list):
            raise FormatError("TOC has no 'entries' list")
        entries = _entries_from_json(raw_entries)
        del doc, raw_entries  # freed at once, now that no entry refers to any of it
        return TOC(entries=entries)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (if it runs) for a burst of allocations.

    Parsing and resolving a 100,000-entry TOC allocate a few hundred thousand objects and make
    no reference cycles, but every few hundred allocations trigger a collection, and the older
    generations are traversed again and again as the objects pile up: about a fifth of the time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# The parser's tables, derived from `_FIELDS` and TOCEntry so that they cannot disagree.
# Kinds: the checks of `_check_value`, plus two that only say what the fast path shares.
_K_INT, _K_STR, _K_SHARED_STR, _K_DIGEST, _K_XATTRS, _K_TYPE = range(6)
_ENTRY_ATTRS = tuple(f.name for f in fields(TOCEntry))
# Strings that repeat from entry to entry: one object per distinct value saves ~50-120 bytes
# a field an entry for as long as the entries live (the type is shared through ENTRY_TYPES).
_SHARED_ATTRS = frozenset({"modtime", "user_name", "group_name"})
_WIRE_SPEC: dict[str, tuple[int, int]] = {
    wire: (_ENTRY_ATTRS.index(attr),
           _K_TYPE if attr == "type" else
           _K_SHARED_STR if attr in _SHARED_ATTRS else
           {"int": _K_INT, "str": _K_STR, "digest": _K_DIGEST, "xattrs": _K_XATTRS}[kind])
    for attr, wire, kind in _FIELDS
}
assert set(_ENTRY_ATTRS) == {attr for attr, _, _ in _FIELDS}, "_FIELDS must cover TOCEntry"
# Positional arguments of TOCEntry with every field at its default; None for the fields that
# have no plain default: name and type (required) and xattrs (a new dict per entry).
_ENTRY_DEFAULTS = [None if f.default is MISSING else f.default for f in fields(TOCEntry)]
_NAME_POS = _ENTRY_ATTRS.index("name")
_TYPE_POS = _ENTRY_ATTRS.index("type")
_XATTRS_POS = _ENTRY_ATTRS.index("xattrs")
_TYPE_NAMES = {name: name for name in ENTRY_TYPES}


def _entries_from_json(raw_entries: list) -> list[TOCEntry]:
    """The entries, checked as `_entry_from_json` checks them, in one tight loop.

    Every check of `_entry_from_json` is made here too, without building any message. An entry
    this loop does not accept is handed to `_entry_from_json`, which raises the precise error
    (the first bad field in `_FIELDS` order, as always) or, should this loop be stricter than
    it somewhere, builds the entry. Strings that repeat across entries (types, times, owner
    names, digests: a one-chunk file's digest is its chunk digest, and empty files share one)
    become one object each, and each distinct digest is matched against the pattern once.

    The entries keep no object of the JSON document: every string and int they keep is a copy
    made here (shared ones once). The document is then freed whole, and the memory it took goes
    back to the system, because CPython's allocator returns a 1 MiB arena only once nothing in
    it is alive: entries holding on to a name or an offset in each arena of the document would
    keep all of it (for a typical TOC, ~350 bytes an entry more in the daemon's RSS for the
    life of the mount). Small ints (to 256) are static objects in CPython; they are left alone.
    """
    entries: list[TOCEntry] = []
    append = entries.append
    spec_of = _WIRE_SPEC.get
    type_of = _TYPE_NAMES.get
    defaults = _ENTRY_DEFAULTS
    make = TOCEntry
    int_max = _INT_MAX
    is_digest = _DIGEST_RE.fullmatch
    strings: dict[str, str] = {}  # checked as strings; never mixed with digests
    digests: dict[str, str] = {"": ""}  # checked as digests
    ints: dict[int, int] = {}  # every int above 256 seen, as its copy
    # join((s, "")) is a new string equal to s: join returns its part itself only when there
    # is one part.
    join = "".join
    for index, raw in enumerate(raw_entries):
        if type(raw) is not dict:  # json.loads makes exact dicts, ints and strs, no subclasses
            append(_entry_from_json(index, raw))
            continue
        values = defaults.copy()
        for wire, value in raw.items():
            spec = spec_of(wire)
            if spec is None:
                continue  # an unknown field: ignored, as by the reference implementation
            position, kind = spec
            value_type = type(value)
            if kind == _K_INT:
                if value_type is not int or not 0 <= value <= int_max:
                    break
                if value > 256:
                    shared = ints.get(value)
                    if shared is None:
                        shared = ints[value] = value + 0  # a new object, equal to value
                    value = shared
            elif kind == _K_DIGEST:
                shared = digests.get(value) if value_type is str else None
                if shared is None:
                    if value_type is not str or not is_digest(value):
                        break
                    shared = digests[value] = join((value, ""))
                value = shared
            elif kind == _K_STR:
                if value_type is not str or "\x00" in value:
                    break
                value = join((value, ""))
            elif kind == _K_SHARED_STR:
                shared = strings.get(value) if value_type is str else None
                if shared is None:
                    if value_type is not str or "\x00" in value:
                        break
                    shared = strings[value] = join((value, ""))
                value = shared
            elif kind == _K_TYPE:
                value = type_of(value) if value_type is str else None
                if value is None:
                    break
            else:  # _K_XATTRS: rare, and the check builds a new dict anyway
                try:
                    value = _check_value(index, wire, "xattrs", value)
                except FormatError:
                    break
            values[position] = value
        else:
            if values[_TYPE_POS] is not None:
                if values[_NAME_POS] is None:
                    if values[_TYPE_POS] != "chunk":
                        append(_entry_from_json(index, raw))  # raises: no name
                        continue
                    values[_NAME_POS] = ""
                if values[_XATTRS_POS] is None:
                    values[_XATTRS_POS] = {}
                append(make(*values))
                continue
        append(_entry_from_json(index, raw))  # raises the precise error
    return entries


def _entry_from_json(index: int, raw: object) -> TOCEntry:
    """One entry, checked field by field: the reference for `_entries_from_json`."""
    if not isinstance(raw, dict):
        raise FormatError(f"TOC entry {index} is not an object")
    values = {}
    for attr, wire, kind in _FIELDS:
        if wire in raw:
            values[attr] = _check_value(index, wire, kind, raw[wire])
    if "name" not in values and values.get("type") != "chunk":
        raise FormatError(f"TOC entry {index} has no name")
    values.setdefault("name", "")
    if values.get("type") not in ENTRY_TYPES:
        raise FormatError(f"TOC entry {index} has unknown type {raw.get('type')!r}")
    return TOCEntry(**values)


def _check_value(index: int, wire: str, kind: str, value: object):
    def where() -> str:  # made only for a message
        return f"TOC entry {index} field {wire!r}"

    if kind == "int":
        # bool is an int subclass in Python; JSON true is not a number.
        if not isinstance(value, int) or isinstance(value, bool):
            raise FormatError(f"{where()} is not an integer: {value!r}")
        if not 0 <= value <= _INT_MAX:
            raise FormatError(f"{where()} is out of range: {value}")
        return value
    if kind in ("str", "digest"):
        if not isinstance(value, str):
            raise FormatError(f"{where()} is not a string")
        if "\x00" in value:
            raise FormatError(f"{where()} contains a NUL byte")
        if kind == "digest" and value and not _DIGEST_RE.fullmatch(value):
            raise FormatError(f"{where()} is not a sha256 digest: {value[:80]!r}")
        return value
    if kind == "xattrs":
        if not isinstance(value, dict):
            raise FormatError(f"{where()} is not an object")
        if any("\x00" in name or not name for name in value):
            # listxattr separates names with NUL: such a name would list as other names.
            raise FormatError(f"{where()} has an empty name or one with a NUL byte")
        try:
            return {str(k): base64.b64decode(v, validate=True) for k, v in value.items()}
        except (binascii.Error, TypeError, ValueError):
            raise FormatError(f"{where()} has a value that is not base64") from None
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------
# Resolution: from the flat entry list to files with chunk lists.


@dataclass(frozen=True, slots=True)
class Chunk:
    """One independently compressed piece of a regular file."""

    file_offset: int  # where the chunk's bytes start in the file
    size: int  # uncompressed length
    blob_offset: int  # start of the compressed member (gzip member or zstd frame)
    blob_end: int  # start of the next member, or of the TOC: the compressed range to fetch
    inner_offset: int  # the chunk's start inside the decompressed member
    digest: str  # sha256 of the uncompressed chunk; "" if the TOC has none


@dataclass(slots=True)
class ResolvedEntry:
    """A non-chunk TOC entry with implicit values filled and its chunks attached."""

    entry: TOCEntry
    path: str  # cleaned name: no leading "./" or "/", no trailing "/"; "" is the root
    user_name: str
    group_name: str
    chunks: list[Chunk]


def clean_name(name: str) -> str:
    """Canonical path of a tar or TOC name, as readers of both formats compute it."""
    # Most names are canonical already ("usr/bin/env"): no empty, "." or ".." component and no
    # leading or trailing "/". Then normpath would return the name itself: skip it, and return
    # the very object (the caller may keep both). A name with a "." after a "/" or at the start
    # may only be a dot file: the slow way decides.
    if (name and name[0] != "/" and name[0] != "." and name[-1] != "/"
            and "//" not in name and "/." not in name):
        return name
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return "" if cleaned == "." else cleaned


def unsafe_name_reason(name: str) -> str | None:
    """Why a tar or TOC name (or hardlink target) must not be used, or None: it is absolute
    (other than "/", the root, as some writers name it) or has a ".." component.

    Cleaning alone would map such a name inside the image ("../../etc/x" to "etc/x"), so the
    mount could not escape its root anyway; but no image builder writes one, and extracting
    tools read it otherwise (GNU tar skips ".." and strips the "/", others write outside their
    target): the TOC (or tar) holding one is refused whole.
    """
    if ".." in name.split("/"):
        return "has a '..' component"
    if name.startswith("/") and clean_name(name):
        return "is absolute"
    return None


def entry_path(name: str, index: int) -> str:
    """The cleaned path of a TOC entry's name or hardlink target; FormatError for an unsafe
    one (see unsafe_name_reason)."""
    # Most names are canonical, and no canonical name is unsafe: clean_name's fast path test.
    if (name and name[0] != "/" and name[0] != "." and name[-1] != "/"
            and "//" not in name and "/." not in name):
        return name
    reason = unsafe_name_reason(name)
    if reason is not None:
        raise FormatError(f"TOC entry {index}: name {name[:200]!r} {reason}")
    return clean_name(name)


# Chunk is frozen: its generated __init__ sets each field through object.__setattr__, which
# costs more than the rest of resolving a chunk. resolve() makes chunks through the slots'
# own setters instead (same result: every field set once, before anyone sees the object).
_new_object = object.__new__
_CHUNK_SETTERS = tuple(getattr(Chunk, f.name).__set__ for f in fields(Chunk))
assert [f.name for f in fields(Chunk)] == ["file_offset", "size", "blob_offset", "blob_end",
                                           "inner_offset", "digest"]


def resolve(toc: TOC, toc_blob_offset: int) -> list[ResolvedEntry]:
    """Attach chunks to their files and fill names and sizes the JSON leaves implicit.

    `toc_blob_offset` bounds the compressed range of the last member before the TOC.
    """
    with _gc_paused():
        return _resolve(toc.entries, toc_blob_offset)


def _resolve(entries: list[TOCEntry], toc_offset: int) -> list[ResolvedEntry]:
    member_starts = sorted({e.blob_offset for e in entries
                            if e.blob_offset and (e.type == "reg" or e.type == "chunk")})
    starts_count = len(member_starts)
    resolved: list[ResolvedEntry] = []
    files: list[ResolvedEntry] = []  # the regular files: the only entries with chunks
    user_names: dict[int, str] = {}
    group_names: dict[int, str] = {}
    # One int object per distinct chunk size and inner offset (JSON makes one per occurrence,
    # and CPython shares only -5..256): they live as long as the mount.
    ints: dict[int, int] = {}
    intern = ints.setdefault
    set_file_offset, set_size, set_blob_offset, set_blob_end, set_inner_offset, set_digest = \
        _CHUNK_SETTERS
    new_resolved = ResolvedEntry
    current_file: ResolvedEntry | None = None
    for index, entry in enumerate(entries):
        entry_type = entry.type
        if entry_type == "chunk":
            if current_file is None:
                raise FormatError(f"TOC entry {index} is a chunk with no regular file before it")
            file = current_file
        else:
            # Names travel forward: only the first entry with a given uid/gid needs to carry them.
            user_name = entry.user_name
            if user_name:
                user_names[entry.uid] = user_name
            else:
                user_name = user_names.get(entry.uid, "")
            group_name = entry.group_name
            if group_name:
                group_names[entry.gid] = group_name
            else:
                group_name = group_names.get(entry.gid, "")
            if entry.uid > _ID_MAX or entry.gid > _ID_MAX:
                raise FormatError(f"TOC entry {index} ({entry.name[:200]!r}): owner "
                                  f"{entry.uid}:{entry.gid} does not fit 32 bits")
            item = new_resolved(entry, entry_path(entry.name, index), user_name, group_name, [])
            resolved.append(item)
            if entry_type != "reg":
                if entry_type == "hardlink":
                    entry_path(entry.link_name, index)  # the target must be a name inside too
                current_file = None
                continue
            current_file = file = item
            files.append(item)
            if not entry.size:
                continue
        # A chunk of `file`: the "reg" entry itself (its first chunk) or a "chunk" entry.
        blob_offset = entry.blob_offset
        file_offset = entry.file_offset
        size = entry.chunk_size
        if not size:  # "to the end of the file"
            file_size = file.entry.size
            size = file_size - file_offset if file_offset else file_size
        if size + entry.inner_offset > MAX_CHUNK_SIZE:
            raise FormatError(f"TOC entry {index} ({file.path}): a chunk of {size} bytes at "
                              f"inner offset {entry.inner_offset} exceeds the "
                              f"{MAX_CHUNK_SIZE} byte limit")
        if blob_offset >= toc_offset:
            raise FormatError(f"TOC entry {index} ({file.path}): chunk offset {blob_offset} "
                              f"is not before the TOC at {toc_offset}")
        next_start = bisect.bisect_right(member_starts, blob_offset)
        blob_end = member_starts[next_start] if next_start < starts_count else toc_offset
        # zstd:chunked entries may say where their frames end: fetch no more than that. (For the
        # first chunk of a chunked file, endOffset covers the whole file: the next start is
        # nearer.)
        end_offset = entry.end_offset
        if end_offset:
            if not blob_offset < end_offset <= toc_offset:
                raise FormatError(f"TOC entry {index} ({file.path}): endOffset {end_offset} is "
                                  f"not after offset {blob_offset} and before the TOC")
            if end_offset < blob_end:
                blob_end = end_offset
        chunk = _new_object(Chunk)
        set_file_offset(chunk, file_offset)
        set_size(chunk, intern(size, size))
        set_blob_offset(chunk, blob_offset)
        set_blob_end(chunk, blob_end)
        set_inner_offset(chunk, intern(entry.inner_offset, entry.inner_offset))
        set_digest(chunk, entry.chunk_digest)
        file.chunks.append(chunk)
    # The chunks of a file must tile it exactly. Checked once every chunk is attached; the
    # common one-chunk file is checked inline.
    for item in files:
        chunks = item.chunks
        if len(chunks) == 1:
            chunk = chunks[0]
            if not chunk.file_offset and chunk.size == item.entry.size and chunk.size > 0:
                continue
        elif not chunks and not item.entry.size:
            continue
        _check_chunks_cover_file(item)
    return resolved


def _check_chunks_cover_file(item: ResolvedEntry) -> None:
    """The chunks of a file must tile it exactly: no gap, no overlap, nothing past its end."""
    expected = 0
    for chunk in item.chunks:
        if chunk.file_offset != expected or chunk.size <= 0:
            raise FormatError(f"TOC: chunks of {item.path!r} do not tile the file "
                              f"(chunk at {chunk.file_offset}, size {chunk.size}, "
                              f"expected offset {expected})")
        expected += chunk.size
    if item.entry.type == "reg" and expected != item.entry.size:
        raise FormatError(f"TOC: chunks of {item.path!r} cover {expected} bytes, "
                          f"file size is {item.entry.size}")


# ---------------------------------------------------------------------------------------------
# Modification times: RFC 3339 in UTC with whole seconds, "" for zero (as the reference writes).


def format_modtime(mtime_seconds: float) -> str:
    seconds = round(mtime_seconds)
    if seconds == 0:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def parse_modtime(modtime: str) -> int:
    """Seconds since the epoch; 0 for "" or an unparsable value (readers treat it as unknown)."""
    if not modtime:
        return 0
    try:
        return int(datetime.datetime.fromisoformat(modtime).timestamp())
    except ValueError:
        return 0
