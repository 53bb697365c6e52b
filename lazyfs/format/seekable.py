"""Either seekable format, told apart by its footer: where the TOC is and how to read it.

Readers (`inspect`/`verify` on local blobs, the mount over any source) read the blob's tail,
call `locate_toc`, fetch the TOC region (usually already inside the tail) and call
`parse_toc_region`. Chunk ranges are bounded by `data_end`, where the compressed data stops.
"""

from __future__ import annotations

from dataclasses import dataclass

from lazyfs.errors import FormatError
from lazyfs.format import FORMATS, MEDIA_CODEC, estargz, zstdchunked  # noqa: F401 (FORMATS)
from lazyfs.format.codec import codec_for
from lazyfs.format.toc import TOC

# Enough of the tail to hold either footer.
MAX_FOOTER_SIZE = max(estargz.FOOTER_SIZE, zstdchunked.MAX_FOOTER_SIZE)



@dataclass(frozen=True)
class TOCRegion:
    format: str  # "estargz" or "zstd:chunked"
    toc_start: int  # blob offset of the TOC's compressed bytes
    toc_end: int
    data_end: int  # the compressed file data lies before this offset
    footer_size: int
    toc_uncompressed_size: int | None = None  # known for zstd:chunked

    def codec(self):
        return codec_for(MEDIA_CODEC[self.format])


def has_footer(tail: bytes) -> bool:
    """Whether the blob's last bytes are either format's footer, whatever it says: telling a
    seekable blob from another file must not depend on the footer's numbers being sane (a
    blob with hostile ones should get locate_toc's message, not be read as something else)."""
    if zstdchunked.has_footer(tail):
        return True
    try:
        estargz.parse_footer(tail)
    except FormatError:
        return False
    return True


def locate_toc(tail: bytes, blob_size: int) -> TOCRegion:
    """The TOC region from the blob's last bytes (`tail` ends at the blob's end)."""
    if zstdchunked.has_footer(tail):
        location = zstdchunked.parse_footer(tail)
        zstdchunked.check_location(location, blob_size)
        return TOCRegion("zstd:chunked", location.offset, location.end, location.offset - 8,
                         location.footer_size, location.uncompressed_size)
    try:
        footer = estargz.parse_footer(tail)
    except FormatError:
        raise FormatError("no eStargz or zstd:chunked footer at the end of the blob "
                          "(not a seekable layer?)") from None
    toc_end = blob_size - footer.size
    if not 0 <= footer.toc_blob_offset < toc_end:
        raise FormatError(f"footer points at TOC offset {footer.toc_blob_offset}, outside the "
                          f"blob's {toc_end} payload bytes")
    if toc_end - footer.toc_blob_offset > estargz.MAX_TOC_COMPRESSED_SIZE:
        # Refused before the TOC is fetched: the footer alone says how big it is.
        raise FormatError(f"TOC member of {toc_end - footer.toc_blob_offset} bytes is larger "
                          f"than the {estargz.MAX_TOC_COMPRESSED_SIZE} byte limit")
    return TOCRegion("estargz", footer.toc_blob_offset, toc_end, footer.toc_blob_offset, footer.size)


def region_from_position_annotation(value: str, blob_size: int) -> TOCRegion:
    """A zstd:chunked TOC region from the layer's manifest-position annotation: the TOC can
    then be fetched in one ranged read, without reading the footer first."""
    location = zstdchunked.parse_position_annotation(value)
    zstdchunked.check_location(location, blob_size)
    return TOCRegion("zstd:chunked", location.offset, location.end, location.offset - 8,
                     0, location.uncompressed_size)


def parse_toc_region(region: TOCRegion, toc_bytes: bytes) -> tuple[TOC, str]:
    """The TOC and the digest of its JSON, from the bytes [toc_start, toc_end)."""
    if region.format == "zstd:chunked":
        return zstdchunked.read_toc_frame(toc_bytes, region.toc_uncompressed_size)
    return estargz.read_toc_member(toc_bytes)
