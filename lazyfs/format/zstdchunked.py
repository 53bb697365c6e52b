"""zstd:chunked blob framing: the TOC in a skippable frame and the footer that locates it.

A zstd:chunked blob is a sequence of zstd frames that inflates to the layer's tar. Every
payload and every chunk of a regular file is its own frame, holding exactly the chunk's bytes
(the tar padding and the following headers go in the next frame), so any chunk inflates alone
and `[offset, endOffset)` of an entry is exactly its compressed data. zstd decoders skip
*skippable frames*, which is where the metadata lives:

    [frames: tar headers][frame: chunk][frame: padding + headers] ... [frame: end-of-archive]
    [skippable frame: zstd-compressed TOC JSON]
    [skippable frame: footer]

Skippable frame (RFC 8878 3.1.2):

    offset  size  value
    0       4     50 2a 4d 18   magic 0x184D2A50, little-endian (any of 0x184D2A5?)
    4       4     N             size of the user data, little-endian
    8       N     user data

Footer written by lazyfs (and the stargz-snapshotter `zstdchunked` package): user data of
40 bytes, so 48 bytes on disk:

    offset  size  value (all integers little-endian uint64)
    0       8     TOC offset: where the compressed TOC (the zstd frame inside the skippable
                  frame, after its 8-byte header) starts
    8       8     compressed TOC length
    16      8     uncompressed TOC length
    24      8     manifest type: 1 (the CRFS/eStargz TOC JSON)
    32      8     magic "GnUlInUx" (47 6e 55 6c 49 6e 55 78)

Footer of containers/storage (podman, CRI-O), read too: user data of 64 bytes (72 on disk),
which adds the tar-split metadata's location before the magic:

    0  8 TOC offset | 8  8 compressed length | 16 8 uncompressed length | 24 8 type = 1
    32 8 tar-split offset | 40 8 its compressed length | 48 8 its uncompressed length
    56 8 magic "GNUlInUx" (47 4e 55 6c 49 6e 55 78: containers/storage capitalizes the N)

Both magics are accepted with both layouts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zstandard

from lazyfs.errors import FormatError
from lazyfs.format import oci
from lazyfs.format.codec import ZstdCodec
from lazyfs.format.estargz import MAX_TOC_COMPRESSED_SIZE, MAX_TOC_JSON_SIZE, sha256_digest
from lazyfs.format.toc import TOC, dump_toc, parse_toc

SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
FOOTER_MAGIC = b"GnUlInUx"  # what we write: the stargz-snapshotter reader insists on it
STORAGE_FOOTER_MAGIC = b"GNUlInUx"
_MAGICS = (FOOTER_MAGIC, STORAGE_FOOTER_MAGIC)
MANIFEST_TYPE_CRFS = 1

FOOTER_DATA_SIZE = 40  # ours and stargz-snapshotter's
FOOTER_SIZE = 8 + FOOTER_DATA_SIZE
STORAGE_FOOTER_DATA_SIZE = 64  # containers/storage's, with the tar-split location
STORAGE_FOOTER_SIZE = 8 + STORAGE_FOOTER_DATA_SIZE
MAX_FOOTER_SIZE = STORAGE_FOOTER_SIZE
_READ_PIECE = 8 << 20  # the TOC is inflated in pieces of this size (see read_toc_frame)

# The layer annotations (named in oci.py, where image resolution reads them).
ANNOTATION_MANIFEST_CHECKSUM = oci.ANNOTATION_ZSTD_MANIFEST_CHECKSUM
ANNOTATION_MANIFEST_POSITION = oci.ANNOTATION_ZSTD_MANIFEST_POSITION
STORAGE_ANNOTATION_MANIFEST_CHECKSUM = oci.STORAGE_ANNOTATION_ZSTD_MANIFEST_CHECKSUM
STORAGE_ANNOTATION_MANIFEST_POSITION = oci.STORAGE_ANNOTATION_ZSTD_MANIFEST_POSITION


def skippable_frame(data: bytes) -> bytes:
    return SKIPPABLE_MAGIC + struct.pack("<I", len(data)) + data


@dataclass(frozen=True)
class TOCLocation:
    """Where the compressed TOC is, from a footer or a manifest-position annotation."""

    offset: int  # blob offset of the zstd frame holding the TOC JSON
    compressed_size: int
    uncompressed_size: int
    footer_size: int  # bytes of footer at the blob's end (0 when from an annotation)

    @property
    def end(self) -> int:
        return self.offset + self.compressed_size


def build_footer(location: TOCLocation) -> bytes:
    data = struct.pack("<QQQQ", location.offset, location.compressed_size,
                       location.uncompressed_size, MANIFEST_TYPE_CRFS) + FOOTER_MAGIC
    footer = skippable_frame(data)
    assert len(footer) == FOOTER_SIZE
    return footer


def has_footer(tail: bytes) -> bool:
    return len(tail) >= FOOTER_SIZE and tail.endswith(_MAGICS)


def parse_footer(tail: bytes) -> TOCLocation:
    """Locate the TOC from the blob's last bytes (pass at least MAX_FOOTER_SIZE if available)."""
    if not has_footer(tail):
        raise FormatError("no zstd:chunked footer at the end of the blob")
    if len(tail) >= STORAGE_FOOTER_SIZE and tail[-STORAGE_FOOTER_SIZE:-STORAGE_FOOTER_DATA_SIZE] == \
            SKIPPABLE_MAGIC + struct.pack("<I", STORAGE_FOOTER_DATA_SIZE):
        offset, compressed, uncompressed, kind = struct.unpack_from("<QQQQ", tail, len(tail) - 64)
        size = STORAGE_FOOTER_SIZE
    elif tail[-FOOTER_SIZE:-FOOTER_DATA_SIZE] == SKIPPABLE_MAGIC + struct.pack("<I", FOOTER_DATA_SIZE):
        offset, compressed, uncompressed, kind = struct.unpack_from("<QQQQ", tail, len(tail) - 40)
        size = FOOTER_SIZE
    else:
        raise FormatError("zstd:chunked footer is not in a skippable frame of 40 or 64 bytes")
    if kind != MANIFEST_TYPE_CRFS:
        raise FormatError(f"zstd:chunked manifest type {kind} is not supported (want 1)")
    return TOCLocation(offset, compressed, uncompressed, size)


def parse_position_annotation(value: str) -> TOCLocation:
    """`offset:compressed:uncompressed:type`, the manifest-position layer annotation."""
    parts = value.split(":")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
        raise FormatError(f"bad zstd:chunked manifest-position annotation {value[:80]!r}")
    offset, compressed, uncompressed, kind = map(int, parts)
    if kind != MANIFEST_TYPE_CRFS:
        raise FormatError(f"zstd:chunked manifest type {kind} is not supported (want 1)")
    return TOCLocation(offset, compressed, uncompressed, 0)


def check_location(location: TOCLocation, blob_size: int) -> None:
    # The TOC frame sits inside a skippable frame, whose 8-byte header comes first.
    if location.offset < 8 or location.compressed_size <= 0 or \
            location.end > blob_size - location.footer_size:
        raise FormatError(f"zstd:chunked TOC at {location.offset}+{location.compressed_size} lies "
                          f"outside the blob's {blob_size} bytes")
    if (location.uncompressed_size > MAX_TOC_JSON_SIZE
            or location.compressed_size > MAX_TOC_COMPRESSED_SIZE):
        raise FormatError(f"TOC is larger than the {MAX_TOC_JSON_SIZE} byte limit")


@dataclass(frozen=True)
class TOCFrames:
    toc_json: bytes
    toc_digest: str
    compressed_toc: bytes  # the zstd frame inside the TOC's skippable frame
    tail: bytes  # skippable TOC frame + footer, to append at the end of the data frames
    location: TOCLocation


def build_toc_frames(toc: TOC, data_end_offset: int, codec: ZstdCodec) -> TOCFrames:
    toc_json = dump_toc(toc)
    compressed = codec.compress(toc_json)
    location = TOCLocation(data_end_offset + 8, len(compressed), len(toc_json), FOOTER_SIZE)
    tail = skippable_frame(compressed) + build_footer(location)
    return TOCFrames(toc_json, sha256_digest(toc_json), compressed, tail, location)


def read_toc_frame(compressed: bytes, uncompressed_size: int | None = None) -> tuple[TOC, str]:
    """Parse the compressed TOC; returns it and the digest of its JSON (what the TOC digest
    annotation pins)."""
    limit = MAX_TOC_JSON_SIZE if uncompressed_size is None else min(uncompressed_size, MAX_TOC_JSON_SIZE)
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=False)
        # In pieces: read(n) allocates n bytes at once, and n comes from the footer.
        parts, have = [], 0
        while have <= limit:
            part = reader.read(min(limit + 1 - have, _READ_PIECE))
            if not part:
                break
            parts.append(part)
            have += len(part)
        toc_json = b"".join(parts)
    except zstandard.ZstdError as exc:
        raise FormatError(f"zstd:chunked TOC is not a valid zstd frame: {exc}") from None
    if len(toc_json) > limit:
        raise FormatError(f"zstd:chunked TOC inflates past its declared {limit} bytes")
    if uncompressed_size is not None and len(toc_json) != uncompressed_size:
        raise FormatError(f"zstd:chunked TOC inflates to {len(toc_json)} bytes, the footer says "
                          f"{uncompressed_size}")
    return parse_toc(toc_json), sha256_digest(toc_json)
