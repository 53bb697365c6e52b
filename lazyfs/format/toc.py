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
import json
import posixpath
import re
import time
from dataclasses import dataclass, field

from lazyfs.errors import FormatError

TOC_VERSION = 1

# Entry types. "chunk" continues the regular file named by the preceding "reg" entry.
ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})

# Digests are OCI digests; only sha256 is written or accepted.
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

# Largest value accepted for any integer field: offsets and sizes must fit a signed 64-bit int,
# as they do in the reference implementation.
_INT_MAX = (1 << 63) - 1


@dataclass
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
)


@dataclass
class TOC:
    entries: list[TOCEntry]
    version: int = TOC_VERSION


def entry_to_json(entry: TOCEntry) -> dict:
    """Wire form of one entry; zero values are omitted, as `omitempty` does in Go."""
    out: dict = {}
    for attr, wire, kind in _FIELDS:
        value = getattr(entry, attr)
        if not value:
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
    try:
        doc = json.loads(toc_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"TOC is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FormatError("TOC is not a JSON object")
    version = doc.get("version")
    if version != TOC_VERSION:
        raise FormatError(f"unsupported TOC version {version!r} (want {TOC_VERSION})")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list):
        raise FormatError("TOC has no 'entries' list")
    return TOC(entries=[_entry_from_json(i, raw) for i, raw in enumerate(raw_entries)])


def _entry_from_json(index: int, raw: object) -> TOCEntry:
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
    where = f"TOC entry {index} field {wire!r}"
    if kind == "int":
        # bool is an int subclass in Python; JSON true is not a number.
        if not isinstance(value, int) or isinstance(value, bool):
            raise FormatError(f"{where} is not an integer: {value!r}")
        if not 0 <= value <= _INT_MAX:
            raise FormatError(f"{where} is out of range: {value}")
        return value
    if kind in ("str", "digest"):
        if not isinstance(value, str):
            raise FormatError(f"{where} is not a string")
        if "\x00" in value:
            raise FormatError(f"{where} contains a NUL byte")
        if kind == "digest" and value and not _DIGEST_RE.match(value):
            raise FormatError(f"{where} is not a sha256 digest: {value[:80]!r}")
        return value
    if kind == "xattrs":
        if not isinstance(value, dict):
            raise FormatError(f"{where} is not an object")
        try:
            return {str(k): base64.b64decode(v, validate=True) for k, v in value.items()}
        except (binascii.Error, TypeError, ValueError):
            raise FormatError(f"{where} has a value that is not base64") from None
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


@dataclass
class ResolvedEntry:
    """A non-chunk TOC entry with implicit values filled and its chunks attached."""

    entry: TOCEntry
    path: str  # cleaned name: no leading "./" or "/", no trailing "/"; "" is the root
    user_name: str
    group_name: str
    chunks: list[Chunk]


def clean_name(name: str) -> str:
    """Canonical path of a tar or TOC name, as readers of both formats compute it."""
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return "" if cleaned == "." else cleaned


def resolve(toc: TOC, toc_blob_offset: int) -> list[ResolvedEntry]:
    """Attach chunks to their files and fill names and sizes the JSON leaves implicit.

    `toc_blob_offset` bounds the compressed range of the last member before the TOC.
    """
    member_starts = sorted({e.blob_offset for e in toc.entries if e.is_data and e.blob_offset})
    resolved: list[ResolvedEntry] = []
    user_names: dict[int, str] = {}
    group_names: dict[int, str] = {}
    current_file: ResolvedEntry | None = None
    for index, entry in enumerate(toc.entries):
        if entry.type == "chunk":
            if current_file is None:
                raise FormatError(f"TOC entry {index} is a chunk with no regular file before it")
            _add_chunk(current_file, entry, member_starts, toc_blob_offset, index)
            continue
        # Names travel forward: only the first entry with a given uid/gid needs to carry them.
        user_names.setdefault(entry.uid, "")
        group_names.setdefault(entry.gid, "")
        if entry.user_name:
            user_names[entry.uid] = entry.user_name
        if entry.group_name:
            group_names[entry.gid] = entry.group_name
        item = ResolvedEntry(
            entry=entry,
            path=clean_name(entry.name),
            user_name=user_names[entry.uid],
            group_name=group_names[entry.gid],
            chunks=[],
        )
        resolved.append(item)
        current_file = None
        if entry.type == "reg":
            current_file = item
            if entry.size:
                _add_chunk(item, entry, member_starts, toc_blob_offset, index)
    for item in resolved:
        _check_chunks_cover_file(item)
    return resolved


def _add_chunk(file: ResolvedEntry, entry: TOCEntry, member_starts: list[int], toc_offset: int,
               index: int) -> None:
    size = entry.chunk_size or (file.entry.size - entry.file_offset)
    if entry.blob_offset >= toc_offset:
        raise FormatError(f"TOC entry {index} ({file.path}): chunk offset {entry.blob_offset} "
                          f"is not before the TOC at {toc_offset}")
    next_start = bisect.bisect_right(member_starts, entry.blob_offset)
    blob_end = member_starts[next_start] if next_start < len(member_starts) else toc_offset
    file.chunks.append(Chunk(
        file_offset=entry.file_offset,
        size=size,
        blob_offset=entry.blob_offset,
        blob_end=blob_end,
        inner_offset=entry.inner_offset,
        digest=entry.chunk_digest,
    ))


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
