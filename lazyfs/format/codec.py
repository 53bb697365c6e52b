"""Chunk codecs: one compressed member (gzip member, zstd frame) per chunk, decodable alone.

A seekable layer is a concatenation of independent members. Reading a chunk means fetching the
member that holds it, decompressing just enough of it, and skipping `inner_offset` bytes. Writing
means compressing each segment of the tar stream into its own member. The codec is all that differs
between eStargz (gzip members) and zstd:chunked (zstd frames).

gzip member layout (RFC 1952), as we write it:

    offset  size  value
    0       2     1f 8b      magic
    2       1     08         CM = deflate
    3       1     00         FLG: no name, comment, extra or header CRC
    4       4     00000000   MTIME = 0, so output is reproducible
    8       1     XFL        2 = slowest/best (level 9), 4 = fastest (level 1), else 0
    9       1     ff         OS = unknown (what Go's compress/gzip writes)
    10      n     raw deflate stream
    10+n    4     CRC-32 of the uncompressed bytes, little-endian
    14+n    4     ISIZE = uncompressed length mod 2**32, little-endian
"""

from __future__ import annotations

import io
import struct
import threading

import zstandard
# zlib-ng produces deflate streams any inflater reads; at level 9 it is ~2.8x faster than the
# stdlib zlib with output no larger (measured; see docs/formats.md).
from zlib_ng import zlib_ng

from lazyfs.errors import FormatError

GZIP_MAGIC = b"\x1f\x8b\x08"
_DEFLATE_RAW_WBITS = -15  # raw deflate, 32 KiB window: we write the gzip framing ourselves
_GZIP_WBITS = 31  # 16 + 15: inflate with gzip framing, checking the CRC and ISIZE
_ZSTD_READ_PIECE = 8 << 20  # a default 4 MiB chunk still inflates in one read


def _xfl_for_level(level: int) -> int:
    if level == 9:
        return 2
    if level == 1:
        return 4
    return 0


def gzip_header(level: int) -> bytes:
    header = GZIP_MAGIC + bytes([0]) + b"\x00\x00\x00\x00" + bytes([_xfl_for_level(level), 0xFF])
    assert len(header) == 10
    return header


class GzipCodec:
    """gzip members, as eStargz uses them."""

    name = "gzip"

    def __init__(self, level: int = 9):
        if not 0 <= level <= 9:
            raise ValueError(f"gzip compression level must be 0..9, not {level}")
        self.level = level

    def compress(self, data: bytes) -> bytes:
        """One complete gzip member holding `data`."""
        deflater = zlib_ng.compressobj(self.level, zlib_ng.DEFLATED, _DEFLATE_RAW_WBITS)
        body = deflater.compress(data) + deflater.flush()
        trailer = struct.pack("<II", zlib_ng.crc32(data), len(data) & 0xFFFFFFFF)
        return gzip_header(self.level) + body + trailer

    def decompress_prefix(self, member: bytes, length: int) -> bytes:
        """The first `length` uncompressed bytes of the gzip member at the start of `member`.

        Never produces more than `length` bytes, whatever the member claims, so a hostile member
        cannot make us allocate more than the TOC declared. Raises FormatError if the member is
        corrupt or ends before `length` bytes.
        """
        if length == 0:
            return b""
        inflater = zlib_ng.decompressobj(_GZIP_WBITS)
        try:
            out = inflater.decompress(member, length)
        except zlib_ng.error as exc:
            raise FormatError(f"corrupt gzip member: {exc}") from None
        if len(out) < length:
            raise FormatError(f"gzip member ends after {len(out)} bytes, {length} expected")
        return out


class ZstdCodec:
    """zstd frames, as zstd:chunked uses them. Each frame carries its content size and an
    XXH64 checksum (what the reference writer emits), so a frame is checked on its own too."""

    name = "zstd"

    def __init__(self, level: int = 3):
        if not 1 <= level <= 22:
            raise ValueError(f"zstd compression level must be 1..22, not {level}")
        self.level = level
        # ZstdCompressor objects must not be shared between threads running at once.
        self._local = threading.local()

    def compress(self, data: bytes) -> bytes:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(
                level=self.level, write_checksum=True, write_content_size=True)
        return compressor.compress(data)

    def decompress_prefix(self, member: bytes, length: int) -> bytes:
        """The first `length` uncompressed bytes of the zstd frame(s) at the start of `member`;
        never more, whatever the frames claim."""
        if length == 0:
            return b""
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        try:
            declared = zstandard.frame_content_size(member)
        except zstandard.ZstdError as exc:
            raise FormatError(f"corrupt zstd frame: {exc}") from None
        if declared == length <= _ZSTD_READ_PIECE:
            # The usual member: one frame holding exactly the chunk (what writers emit). One
            # call, no copies. It allocates the declared size up front, hence only up to one
            # read piece, as the loop below would; zstd checks the frame against that size
            # (and its checksum).
            try:
                out = decompressor.decompress(member)
            except zstandard.ZstdError as exc:
                raise FormatError(f"corrupt zstd frame: {exc}") from None
            if len(out) != length:
                raise FormatError(f"zstd frame holds {len(out)} bytes, {length} expected")
            return out
        reader = decompressor.stream_reader(io.BytesIO(member), read_across_frames=True)
        parts, have = [], 0
        try:
            while have < length:
                # read(n) allocates n bytes up front: in pieces, memory follows what the frames
                # really hold, not what the TOC declares.
                block = reader.read(min(length - have, _ZSTD_READ_PIECE))
                if not block:
                    break
                parts.append(block)
                have += len(block)
        except zstandard.ZstdError as exc:
            raise FormatError(f"corrupt zstd frame: {exc}") from None
        if have < length:
            raise FormatError(f"zstd frame ends after {have} bytes, {length} expected")
        return b"".join(parts)


# Default levels by codec name. The startup level compresses what a cold mount waits for (the
# TOC and the prioritized files), where each byte saved is time saved and the strongest level
# that still decodes fast pays. zstd 19 makes the python benchmark image's prioritized files
# 17% smaller than level 3 (3.62 against 4.38 MB; gzip 9: 4.27 MB) and decodes as fast, for
# ~0.25 s of one core per MB at conversion. Levels 20-22 ("ultra") gain nothing more there, and
# on larger inputs they need a larger window at decode.
DEFAULT_LEVELS = {"gzip": 9, "zstd": 3}
DEFAULT_STARTUP_LEVELS = {"gzip": 9, "zstd": 19}


def codec_for(name: str, level: int | None = None):
    """The codec of a format by its name ("gzip" or "zstd"), at `level` or the format's default."""
    return _codec(name, DEFAULT_LEVELS, level)


def startup_codec_for(name: str, level: int | None = None):
    """The codec for what a cold mount waits for, at `level` or the startup default."""
    return _codec(name, DEFAULT_STARTUP_LEVELS, level)


def _codec(name: str, defaults: dict[str, int], level: int | None):
    if name not in defaults:
        raise ValueError(f"unknown codec {name!r}")
    level = defaults[name] if level is None else level
    return GzipCodec(level) if name == "gzip" else ZstdCodec(level)
