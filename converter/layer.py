"""Convert one layer tar into an eStargz blob.

The tar stream is cut into *segments*, each of which becomes one gzip member:

    segment = [payload of one chunk][its tar padding][headers of the entries that follow]

A new segment starts at every chunk of every non-empty regular file (so each chunk can be
inflated alone) and whenever the pending headers outgrow a chunk (so a directory of a million
empty files does not become one giant member). Segment boundaries depend only on the input and
the chunk size, never on the number of threads: segments are compressed in parallel and
written in order, so the output is byte-identical whatever the core count.

Compression runs in a thread pool. zlib-ng releases the GIL while deflating, so threads use
every core without the cost of copying chunks between processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import itertools
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from converter.prioritize import prioritize
from converter.tarinput import (Member, payload_reader, plain_tar, raw_header, read_exactly,
                                scan_members, synthetic_member)
from lazyfs.errors import NotFound
from lazyfs.fetchoptions import DEFAULT_MERGE_GAP_BYTES
from lazyfs.format import oci, workload, zstdchunked
from lazyfs.format.codec import codec_for, startup_codec_for
from lazyfs.format.seekable import FORMATS
from lazyfs.format.estargz import (LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
                                   TOC_TAR_NAME, build_toc_blob, sha256_digest)
from lazyfs.format.tarmeta import TOC_TYPE_OF_TAR_TYPE, tar_xattrs
from lazyfs.format.toc import (MAX_CHUNK_SIZE, TOC, TOCEntry, clean_name, format_modtime,
                               resolve)

DEFAULT_CHUNK_SIZE = 4 << 20
_RESERVED_NAMES = frozenset({TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
_EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()



@dataclass(frozen=True)
class LayerOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression_level: int | None = None  # default: 9 for estargz (gzip), 3 for zstd:chunked
    # What a cold mount waits for before its program runs, the TOC and the prioritized files
    # (before `.prefetch.landmark`), is compressed at this level: every byte of it is on the
    # link before the first output, and it is a small part of a layer, so a slow, strong level
    # costs little conversion time. Default: 9 for estargz, 19 for zstd:chunked.
    startup_compression_level: int | None = None
    format: str = "estargz"
    prioritized_files: tuple[str, ...] = ()
    # What a recorded start-up read of the prioritized files: (path, ((file_offset, file_end),
    # ...)) pairs, from the list's read lines (lazyfs.format.workload). Such a file is cut into
    # chunks along those ranges, and the layer's dev.lazyfs.prefetch.ranges annotation names
    # the read chunks: mounts prefetch those and leave the rest to on-demand reads. A
    # prioritized file with no ranges here is prefetched whole.
    prioritized_reads: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    missing_prioritized_ok: bool = False  # image mode: a listed file may be in another layer
    workers: int | None = None  # default: every core


@dataclass(frozen=True)
class LayerResult:
    blob_digest: str  # sha256 of the seekable blob
    blob_size: int
    toc_digest: str  # sha256 of the TOC JSON, what the manifest annotation pins
    diff_id: str  # sha256 of the uncompressed blob, a tar
    uncompressed_size: int
    media_type: str = oci.OCI_LAYER_GZIP
    annotations: dict = field(default_factory=dict)  # every layer annotation readers need
    missing_prioritized: tuple[str, ...] = ()


def convert_layer(src_path: str, dst_path: str, options: LayerOptions = LayerOptions()) -> LayerResult:
    """Write the eStargz form of the layer tar at `src_path` (plain, gzip or zstd) to `dst_path`.

    The output appears atomically: it is written beside `dst_path` and renamed into place, and
    removed on any error.
    """
    if not 0 < options.chunk_size <= MAX_CHUNK_SIZE:
        # A reader refuses larger chunks (they are inflated whole into memory).
        raise ValueError(f"chunk size must be 1..{MAX_CHUNK_SIZE} bytes")
    temp_path = f"{dst_path}.partial-{os.getpid()}"
    try:
        with plain_tar(src_path, temp_dir=os.path.dirname(os.path.abspath(dst_path))) as tar_path:
            members = [m for m in scan_members(tar_path) if clean_name(m.info.name) not in _RESERVED_NAMES]
            ordering = prioritize(members, list(options.prioritized_files))
            if ordering.missing and not options.missing_prioritized_ok:
                raise NotFound(f"prioritized file not in the layer: {ordering.missing[0]!r}")
            with open(tar_path, "rb") as tar_file, tarfile.open(tar_path, "r:") as tar, \
                    open(temp_path, "wb") as out:
                reads = _reads_by_member(ordering.members, options.prioritized_reads)
                result = _write_blob(_ordered_items(ordering, reads), tar_file, tar, out,
                                     options)
        os.replace(temp_path, dst_path)
    except BaseException:
        _remove_quietly(temp_path)
        raise
    return LayerResult(**result, missing_prioritized=tuple(ordering.missing))


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _ordered_items(ordering, reads: dict[str, list[tuple[int, int]]]) -> Iterator[_Item]:
    """Members in output order, each with its payload if it is synthetic (the landmark),
    whether it is prioritized (before the landmark) and, if so, its recorded reads."""
    for member in ordering.members:
        yield _Item(member, None, True, reads.get(clean_name(member.info.name)))
    yield _Item(*synthetic_member(ordering.landmark, LANDMARK_CONTENTS), False)
    for member in ordering.rest:
        yield _Item(member, None, False)


def _reads_by_member(members: list[Member], prioritized_reads) -> dict[str, list]:
    """The recorded reads of each prioritized member that holds content, by its clean name. A
    file read through a hardlink's name has its content in the link's target (the tar stores
    it once): the reads go there."""
    reads: dict[str, list[tuple[int, int]]] = {}
    for path, extents in prioritized_reads:
        reads.setdefault(clean_name(path), []).extend(extents)
    if not reads:
        return {}
    for member in members:
        name = clean_name(member.info.name)
        if member.info.islnk() and name in reads:
            reads.setdefault(clean_name(member.info.linkname), []).extend(reads.pop(name))
    return {name: workload.merge_extents(extents) for name, extents in reads.items()}


@dataclass
class _Item:
    member: Member
    synthetic_payload: bytes | None
    startup: bool  # prioritized: before the landmark
    reads: list[tuple[int, int]] | None = None  # recorded reads; None: wanted whole


# ---------------------------------------------------------------------------------------------
# Segmentation


# Two recorded reads of a file closer than this are one chunk, the bytes between included:
# fetching them costs less than another frame, TOC entry and lost compression context.
JOIN_GAP_BYTES = 64 << 10


def chunk_plan(size: int, chunk_size: int,
               reads: list[tuple[int, int]] | None) -> list[tuple[int, int, bool]]:
    """How a file of `size` bytes is cut: (file_offset, length, read) chunks of at most
    `chunk_size` bytes, in order. `reads` (merged ranges a start-up read; None: the file is
    wanted whole) adds cuts where read and unread bytes meet, and says which chunks are read."""
    if reads is None:
        spans = [(0, size, True)]
    else:
        spans = []
        position = 0
        for start, end in workload.merge_extents(
                [(max(0, start), min(size, end)) for start, end in reads], JOIN_GAP_BYTES):
            if start > position:
                spans.append((position, start, False))
            spans.append((start, end, True))
            position = end
        if position < size:
            spans.append((position, size, False))
    plan = []
    for start, end, read in spans:
        for file_offset in range(start, end, chunk_size):
            plan.append((file_offset, min(chunk_size, end - file_offset), read))
    return plan


@dataclass
class _Segment:
    data: bytes
    chunk_entries: list[TOCEntry] = field(default_factory=list)  # start at this segment's offset
    startup: bool = False  # it starts with a prioritized file's bytes or header


class _Segmenter:
    """Turns members into segments and TOC entries, in output order."""

    def __init__(self, tar_file, tar: tarfile.TarFile, chunk_size: int, isolate_payloads: bool):
        self.tar_file = tar_file
        self.tar = tar
        self.chunk_size = chunk_size
        # zstd:chunked: a chunk's frame holds the chunk alone; what follows starts a new frame.
        self.isolate_payloads = isolate_payloads
        self.entries: list[TOCEntry] = []
        self._pending = bytearray()
        self._pending_entries: list[TOCEntry] = []
        self._pending_startup = False  # the pending segment started in a prioritized member
        self._member_startup = False  # the member being cut is prioritized
        self._member_reads: list[tuple[int, int]] | None = None  # and what a start-up read
        self._last_user: dict[int, str] = {}
        self._last_group: dict[int, str] = {}
        # Prioritized chunks a start-up reads, as (file name, file offset), for the prefetch
        # ranges annotation; only when some prioritized file came with its recorded reads.
        self.read_chunks: set[tuple[str, int]] = set()
        self.sparse = False

    def segments(self, items: Iterable[_Item]) -> Iterator[_Segment]:
        for item in items:
            self._member_startup = item.startup
            self._member_reads = item.reads
            self.sparse |= item.reads is not None
            yield from self._member(item.member, item.synthetic_payload)
        if self._pending:
            yield self._cut()

    def _append(self, data: bytes) -> None:
        if not self._pending:
            self._pending_startup = self._member_startup
        self._pending += data

    def _cut(self) -> _Segment:
        segment = _Segment(bytes(self._pending), self._pending_entries, self._pending_startup)
        self._pending = bytearray()
        self._pending_entries = []
        return segment

    def _member(self, member: Member, synthetic_payload: bytes | None) -> Iterator[_Segment]:
        info = member.info
        entry = self._toc_entry(info)
        self._append(raw_header(self.tar_file, member))
        if entry.type == "reg" and info.size == 0:
            entry.digest = _EMPTY_DIGEST
        if entry.type != "reg" or info.size == 0:
            self.entries.append(entry)
            if len(self._pending) >= self.chunk_size:
                yield self._cut()
            return
        if synthetic_payload is not None:
            payload = io.BytesIO(synthetic_payload)
        else:
            payload = payload_reader(self.tar, member)
        yield from self._payload(info, entry, payload)

    def _payload(self, info: tarfile.TarInfo, file_entry: TOCEntry, payload) -> Iterator[_Segment]:
        """Cut a regular file's payload into chunks, each the start of a new segment."""
        entry = file_entry
        file_digest = hashlib.sha256()
        for file_offset, length, read in chunk_plan(info.size, self.chunk_size,
                                                    self._member_reads):
            if read and self._member_startup:
                self.read_chunks.add((clean_name(info.name), file_offset))
            data = read_exactly(payload, length, info.name)
            file_digest.update(data)
            if file_offset > 0:
                entry = TOCEntry(name=info.name, type="chunk")
            entry.file_offset = file_offset
            # chunkSize 0 means "to the end of the file": written only for non-final chunks.
            entry.chunk_size = length if file_offset + length < info.size else 0
            entry.chunk_digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if self._pending:  # the chunk starts a new member
                yield self._cut()
            self._append(data)
            self._pending_entries.append(entry)
            self.entries.append(entry)
            if self.isolate_payloads:
                yield self._cut()
        self._append(b"\0" * (-info.size % tarfile.BLOCKSIZE))
        file_entry.digest = "sha256:" + file_digest.hexdigest()

    def _toc_entry(self, info: tarfile.TarInfo) -> TOCEntry:
        toc_type = TOC_TYPE_OF_TAR_TYPE[info.type]
        entry = TOCEntry(
            name=info.name,
            type=toc_type,
            modtime=format_modtime(info.mtime),
            mode=info.mode,
            uid=info.uid,
            gid=info.gid,
            user_name=_name_if_changed(self._last_user, info.uid, info.uname),
            group_name=_name_if_changed(self._last_group, info.gid, info.gname),
            xattrs=tar_xattrs(info),
        )
        if toc_type == "reg":
            entry.size = info.size
        elif toc_type in ("symlink", "hardlink"):
            entry.link_name = info.linkname
        elif toc_type in ("char", "block"):
            entry.dev_major, entry.dev_minor = info.devmajor, info.devminor
        return entry


def _name_if_changed(last: dict[int, str], owner_id: int, name: str) -> str:
    """Write a user or group name only when it differs from the last one written for this id;
    readers carry names forward, so the TOC stays small."""
    if not name or last.get(owner_id) == name:
        return ""
    last[owner_id] = name
    return name



# ---------------------------------------------------------------------------------------------
# Parallel compression and output


class _EstargzFraming:
    """eStargz: gzip members; the TOC is a tar entry in the last member, then the footer."""

    media_type = oci.OCI_LAYER_GZIP
    isolate_payloads = False  # padding and following headers ride in the chunk's member

    def __init__(self, level: int | None, startup_level: int | None):
        self.codec = codec_for("gzip", level)
        self.startup_codec = startup_codec_for("gzip", startup_level)

    def final_segments(self) -> list[_Segment]:
        return []  # the tar end-of-archive is part of the TOC member

    def finish(self, entries: list[TOCEntry], data_end: int) -> tuple[bytes, bytes, str, dict]:
        """(tail to append, what it inflates to, TOC digest, format-specific annotations)"""
        toc_blob = build_toc_blob(TOC(entries=entries), data_end, self.startup_codec)
        # The TOC member starts where the data ends: readers fetch exactly the tail then.
        return (toc_blob.tail, toc_blob.uncompressed, toc_blob.toc_digest,
                {oci.ANNOTATION_TOC_OFFSET: str(data_end)})


class _ZstdChunkedFraming:
    """zstd:chunked: zstd frames; each chunk's frame holds exactly the chunk (so containers/
    storage, which inflates [offset, endOffset), gets the file's bytes and nothing else); the
    TOC and the footer are skippable frames, invisible to plain zstd decoders."""

    media_type = oci.OCI_LAYER_ZSTD
    isolate_payloads = True

    def __init__(self, level: int | None, startup_level: int | None):
        self.codec = codec_for("zstd", level)
        self.startup_codec = startup_codec_for("zstd", startup_level)

    def final_segments(self) -> list[_Segment]:
        # The TOC is not in the tar stream, so the tar's end-of-archive gets its own frame.
        return [_Segment(b"\0" * (2 * tarfile.BLOCKSIZE))]

    def finish(self, entries: list[TOCEntry], data_end: int) -> tuple[bytes, bytes, str, dict]:
        _extend_file_end_offsets(entries)
        frames = zstdchunked.build_toc_frames(TOC(entries=entries), data_end, self.startup_codec)
        location = frames.location
        annotations = {
            zstdchunked.ANNOTATION_MANIFEST_CHECKSUM: sha256_digest(frames.compressed_toc),
            zstdchunked.ANNOTATION_MANIFEST_POSITION:
                f"{location.offset}:{location.compressed_size}:{location.uncompressed_size}:"
                f"{zstdchunked.MANIFEST_TYPE_CRFS}",
        }
        return frames.tail, b"", frames.toc_digest, annotations


def _extend_file_end_offsets(entries: list[TOCEntry]) -> None:
    """A regular file's endOffset covers all its chunks' frames (containers/storage fetches a
    whole file with [offset, endOffset)); each chunk entry keeps its own frame's end."""
    current = None
    for entry in entries:
        if entry.type == "reg":
            current = entry
        elif entry.type == "chunk" and current is not None:
            current.end_offset = entry.end_offset
        else:
            current = None


def _framing(options: LayerOptions):
    levels = options.compression_level, options.startup_compression_level
    if options.format == "estargz":
        return _EstargzFraming(*levels)
    if options.format == "zstd:chunked":
        return _ZstdChunkedFraming(*levels)
    raise ValueError(f"unknown format {options.format!r}; choose from {', '.join(FORMATS)}")


def _prefetch_end(entries: list[TOCEntry]) -> int | None:
    """The blob offset of the `.prefetch.landmark` member: the prioritized files are before it.
    None when the layer prioritizes nothing."""
    for entry in entries:
        if entry.name == PREFETCH_LANDMARK:
            return entry.blob_offset
    return None


def _prefetch_ranges(segmenter: _Segmenter, data_end: int) -> list[tuple[int, int]]:
    """The blob ranges of the chunks a start-up reads, as a mount resolves them from the TOC,
    joined when they lie closer than the mount's merge gap: its prefetch then asks for each
    range on its own, never for one that spans two of them with the bytes between."""
    ranges = []
    for item in resolve(TOC(entries=segmenter.entries), data_end):
        for chunk in item.chunks:
            if (item.path, chunk.file_offset) in segmenter.read_chunks:
                ranges.append((chunk.blob_offset, chunk.blob_end))
    return workload.merge_extents(ranges, DEFAULT_MERGE_GAP_BYTES)


def _write_blob(items, tar_file, tar, out, options: LayerOptions) -> dict:
    framing = _framing(options)
    segmenter = _Segmenter(tar_file, tar, options.chunk_size, framing.isolate_payloads)
    # The cores this process may run on (taskset, cgroups), not every core of the machine.
    workers = options.workers or len(os.sched_getaffinity(0))
    blob_hash, diff_hash = hashlib.sha256(), hashlib.sha256()
    blob_offset = uncompressed_size = 0

    def emit(segment: _Segment, compressed: bytes) -> None:
        nonlocal blob_offset, uncompressed_size
        for entry in segment.chunk_entries:
            entry.blob_offset = blob_offset
            if framing.isolate_payloads:
                entry.end_offset = blob_offset + len(compressed)
        out.write(compressed)
        blob_hash.update(compressed)
        blob_offset += len(compressed)
        uncompressed_size += len(segment.data)

    # Bounded window of in-flight segments: memory stays at a few chunks per core.
    in_flight: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            segments = itertools.chain(segmenter.segments(items), framing.final_segments())
            for segment in segments:
                diff_hash.update(segment.data)
                codec = framing.startup_codec if segment.startup else framing.codec
                in_flight.append((segment, pool.submit(codec.compress, segment.data)))
                while len(in_flight) > 2 * workers:
                    done_segment, future = in_flight.popleft()
                    emit(done_segment, future.result())
            while in_flight:
                done_segment, future = in_flight.popleft()
                emit(done_segment, future.result())
        except BaseException:
            for _, future in in_flight:
                future.cancel()
            raise

    tail, tail_uncompressed, toc_digest, format_annotations = framing.finish(segmenter.entries, blob_offset)
    prefetch_end = _prefetch_end(segmenter.entries)
    if prefetch_end:
        format_annotations[oci.ANNOTATION_PREFETCH_END] = str(prefetch_end)
        if segmenter.sparse:
            format_annotations[oci.ANNOTATION_PREFETCH_RANGES] = oci.format_ranges(
                _prefetch_ranges(segmenter, blob_offset))
    out.write(tail)
    blob_hash.update(tail)
    diff_hash.update(tail_uncompressed)
    uncompressed_size += len(tail_uncompressed)
    return dict(
        blob_digest="sha256:" + blob_hash.hexdigest(),
        blob_size=blob_offset + len(tail),
        toc_digest=toc_digest,
        diff_id="sha256:" + diff_hash.hexdigest(),
        uncompressed_size=uncompressed_size,
        media_type=framing.media_type,
        annotations={oci.ANNOTATION_TOC_DIGEST: toc_digest,
                     oci.ANNOTATION_UNCOMPRESSED_SIZE: str(uncompressed_size), **format_annotations},
    )
