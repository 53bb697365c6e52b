"""eStargz blob framing: the footer that locates the TOC, and the TOC member itself.

An eStargz blob is a gzip stream made of many members:

    [member: tar headers ... ][member: file payload / chunk][member ...] ...
    [member: tar header "stargz.index.json" + TOC JSON + tar end-of-archive]
    [footer: an empty gzip member whose header's Extra field holds the TOC's blob offset]

Every non-empty regular file's payload and every chunk of it starts a new member, so any chunk
can be inflated without reading what comes before it. Concatenated, the members are still one
valid tar.gz.

Footer, 51 bytes (eStargz):

    offset  size  value
    0       10    1f 8b 08 04 00000000 00 ff   gzip header, FLG = FEXTRA, MTIME 0, XFL 0, OS 255
    10      2     1a 00                        XLEN = 26, little-endian
    12      2     'S' 'G'                      subfield id
    14      2     16 00                        subfield length = 22, little-endian
    16      16    "%016x" % toc_blob_offset    TOC offset, lowercase hex, zero-padded
    32      6     "STARGZ"                     magic
    38      5     01 00 00 ff ff               final stored deflate block of length 0
    43      4     00000000                     CRC-32 of nothing
    47      4     00000000                     ISIZE = 0

Legacy stargz (CRFS) footer, 47 bytes: the same without the subfield id and length, so
XLEN = 22 and the Extra field is just "%016xSTARGZ":

    0 10 header (FLG = FEXTRA) | 10 2 XLEN = 16 00 | 12 16 hex offset | 28 6 "STARGZ"
    34 5 empty stored block    | 39 4 CRC-32 = 0   | 43 4 ISIZE = 0
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass

from lazyfs.errors import FormatError
from lazyfs.format.codec import GzipCodec
from lazyfs.format.toc import MAX_TOC_JSON_SIZE, TOC, dump_toc, parse_toc

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"  # one byte, as the reference writes

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47

_MAGIC = b"STARGZ"
_GZIP_EXTRA_HEADER = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"  # FLG = FEXTRA, OS = 255
_EMPTY_STORED_BLOCK_AND_TRAILER = b"\x01\x00\x00\xff\xff" + b"\x00" * 8

# The compressed TOC (member or frame) is refused past this size before it is fetched: a TOC
# within MAX_TOC_JSON_SIZE compresses to less, even stored uncompressed (gzip and zstd add a
# few bytes per 64 KiB block; the tar header, padding and end-of-archive take 2 KiB).
MAX_TOC_COMPRESSED_SIZE = MAX_TOC_JSON_SIZE + (1 << 20)


def build_footer(toc_blob_offset: int) -> bytes:
    subfield = b"%016x" % toc_blob_offset + _MAGIC
    extra = b"SG" + len(subfield).to_bytes(2, "little") + subfield
    footer = _GZIP_EXTRA_HEADER + len(extra).to_bytes(2, "little") + extra
    footer += _EMPTY_STORED_BLOCK_AND_TRAILER
    assert len(footer) == FOOTER_SIZE, len(footer)
    return footer


@dataclass(frozen=True)
class Footer:
    toc_blob_offset: int
    size: int  # FOOTER_SIZE or LEGACY_FOOTER_SIZE: where the blob's payload ends


def parse_footer(tail: bytes) -> Footer:
    """Find the TOC offset in the last bytes of a blob (pass at least FOOTER_SIZE if available).

    Tries the 51-byte eStargz footer first, then the 47-byte legacy one.
    """
    if len(tail) >= FOOTER_SIZE:
        footer = tail[-FOOTER_SIZE:]
        if footer[:10] == _GZIP_EXTRA_HEADER and footer[10:16] == b"\x1a\x00SG\x16\x00":
            return Footer(_parse_offset(footer[16:38]), FOOTER_SIZE)
    if len(tail) >= LEGACY_FOOTER_SIZE:
        footer = tail[-LEGACY_FOOTER_SIZE:]
        if footer[:10] == _GZIP_EXTRA_HEADER and footer[10:12] == b"\x16\x00":
            return Footer(_parse_offset(footer[12:34]), LEGACY_FOOTER_SIZE)
    raise FormatError("no eStargz footer at the end of the blob (not an eStargz layer?)")


def _parse_offset(subfield: bytes) -> int:
    hex_offset, magic = subfield[:16], subfield[16:]
    if magic != _MAGIC:
        raise FormatError("eStargz footer lacks the STARGZ magic")
    try:
        return int(hex_offset.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        raise FormatError(f"eStargz footer has a bad TOC offset {hex_offset!r}") from None


def toc_tar_bytes(toc_json: bytes) -> bytes:
    """The uncompressed TOC member: a tar entry holding the JSON, then the end-of-archive.

    The end-of-archive blocks go here because this is the last entry of the layer's tar.
    """
    info = tarfile.TarInfo(TOC_TAR_NAME)
    info.size = len(toc_json)
    info.mode = 0o644
    info.mtime = 0
    padding = -len(toc_json) % tarfile.BLOCKSIZE
    out = info.tobuf(tarfile.USTAR_FORMAT) + toc_json + b"\0" * padding + b"\0" * 1024
    assert len(out) % tarfile.BLOCKSIZE == 0
    return out


@dataclass(frozen=True)
class TOCBlob:
    """The tail of an eStargz blob: the TOC member plus the footer."""

    toc_json: bytes
    toc_digest: str
    tail: bytes  # compressed TOC member + footer, to append at `toc_blob_offset`
    uncompressed: bytes  # what `tail` inflates to (for the layer's diff id and size)


def build_toc_blob(toc: TOC, toc_blob_offset: int, codec: GzipCodec) -> TOCBlob:
    toc_json = dump_toc(toc)
    uncompressed = toc_tar_bytes(toc_json)
    tail = codec.compress(uncompressed) + build_footer(toc_blob_offset)
    return TOCBlob(toc_json, sha256_digest(toc_json), tail, uncompressed)


def read_toc_member(member: bytes) -> tuple[TOC, str]:
    """Parse the TOC member (the bytes from the TOC offset to the footer).

    Returns the TOC and the digest of its JSON, the value a manifest annotation pins.
    Only the tar header is inflated before the size limit is checked: a member claiming a TOC
    over MAX_TOC_JSON_SIZE costs 512 inflated bytes, and no member inflates past the size its
    header declares (a gzip bomb behind a small header is cut there).
    """
    import zlib  # stdlib inflate is enough here: one member, once per mount

    inflater = zlib.decompressobj(31)
    try:
        header = inflater.decompress(member, tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            raise FormatError("TOC member is truncated before its tar header ends")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise FormatError(f"TOC member is not a tar: {exc}") from None
        if info.name != TOC_TAR_NAME or not info.isreg():
            raise FormatError(f"TOC member holds {info.name!r}, not {TOC_TAR_NAME!r}")
        if info.size > MAX_TOC_JSON_SIZE:
            raise FormatError(f"TOC of {info.size} bytes is larger than the "
                              f"{MAX_TOC_JSON_SIZE} byte limit")
        toc_json = inflater.decompress(inflater.unconsumed_tail, info.size)
    except zlib.error as exc:
        raise FormatError(f"TOC member is not valid gzip: {exc}") from None
    if len(toc_json) != info.size:
        raise FormatError("TOC member is truncated")
    return parse_toc(toc_json), sha256_digest(toc_json)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
