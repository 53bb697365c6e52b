"""One seekable layer opened for mounting: its TOC fetched, checked against its pin, resolved.

Opening costs at most two ranged reads: the blob's tail (which usually holds the whole TOC, so
one read is enough) and, for a large TOC, the rest of it. With a TOC cache hit it costs none:
the cached record is checked against the pinned TOC digest like a fetched one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from lazyfs.errors import FormatError, VerificationError
from lazyfs.format.codec import GzipCodec
from lazyfs.format.estargz import FOOTER_SIZE, parse_footer, read_toc_member
from lazyfs.format.toc import ResolvedEntry, resolve

log = logging.getLogger(__name__)

# How much of the blob's end to read first. Most TOCs compress to well under this, so the
# footer and the TOC arrive in one request; a bigger one costs a second request.
TAIL_READ_BYTES = 512 << 10


@dataclass
class LayerSpec:
    """Where a layer is and what pins it, as the image (or the command line) says."""

    source: object  # a lazyfs.source.BlobSource
    toc_digest: str | None  # None only with --insecure-skip-verify
    label: str  # for messages and stats: the blob digest or the blob's location
    blob_size: int | None = None  # from the manifest descriptor: saves a request


@dataclass
class Layer:
    index: int
    spec: LayerSpec
    blob_size: int
    toc_digest: str
    toc_blob_offset: int
    entries: list[ResolvedEntry]
    codec: GzipCodec = field(default_factory=GzipCodec)
    verified: bool = True  # False: mounted with --insecure-skip-verify and no pin

    @property
    def source(self):
        return self.spec.source


def open_layer(index: int, spec: LayerSpec, cache) -> Layer:
    """Fetch (or load from the TOC cache), verify and resolve one layer's TOC. Blocking."""
    if spec.toc_digest:
        record = cache.get_toc(spec.toc_digest) if cache is not None else None
        if record is not None:
            layer = _from_toc_record(index, spec, record)
            if layer is not None:
                return layer
    blob_size = spec.blob_size if spec.blob_size is not None else spec.source.size()
    if blob_size < FOOTER_SIZE:
        raise FormatError(f"{spec.label}: {blob_size} bytes is too small for an eStargz blob")
    tail_offset = max(0, blob_size - TAIL_READ_BYTES)
    tail = spec.source.read(tail_offset, blob_size - tail_offset)
    footer = parse_footer(tail)
    toc_end = blob_size - footer.size
    if not 0 <= footer.toc_blob_offset < toc_end:
        raise FormatError(f"{spec.label}: footer points at TOC offset {footer.toc_blob_offset}, "
                          f"outside the blob's {toc_end} payload bytes")
    if footer.toc_blob_offset >= tail_offset:
        member = tail[footer.toc_blob_offset - tail_offset:toc_end - tail_offset]
    else:  # a big TOC: fetch just the part the tail read missed
        head = spec.source.read(footer.toc_blob_offset, tail_offset - footer.toc_blob_offset)
        member = head + tail[:toc_end - tail_offset]
    toc, toc_digest = read_toc_member(member)
    if spec.toc_digest and toc_digest != spec.toc_digest:
        raise VerificationError(f"{spec.label}: TOC digest is {toc_digest}, but "
                                f"{spec.toc_digest} is pinned")
    entries = resolve(toc, footer.toc_blob_offset)
    if spec.toc_digest and cache is not None:
        cache.put_toc(spec.toc_digest, _toc_record(blob_size, footer.toc_blob_offset, member))
    return Layer(index, spec, blob_size, toc_digest, footer.toc_blob_offset, entries,
                 verified=bool(spec.toc_digest))


# TOC cache record layout: one line of JSON metadata, a newline, then the compressed TOC member
# exactly as it sits in the blob (so reading it back runs the same parser as a fetch).
def _toc_record(blob_size: int, toc_blob_offset: int, member: bytes) -> bytes:
    meta = json.dumps({"version": 1, "blob_size": blob_size, "toc_blob_offset": toc_blob_offset})
    return meta.encode() + b"\n" + member


def _from_toc_record(index: int, spec: LayerSpec, record: bytes) -> Layer | None:
    """A layer from a cached TOC record, or None if the record is unusable (then refetch)."""
    try:
        meta_line, member = record.split(b"\n", 1)
        meta = json.loads(meta_line)
        toc, toc_digest = read_toc_member(member)
        if toc_digest != spec.toc_digest or meta.get("version") != 1:
            raise FormatError("stale record")
        entries = resolve(toc, int(meta["toc_blob_offset"]))
        return Layer(index, spec, int(meta["blob_size"]), toc_digest, int(meta["toc_blob_offset"]),
                     entries)
    except (ValueError, KeyError, TypeError, FormatError) as exc:
        log.warning("ignoring a bad cached TOC for %s: %s", spec.label, exc)
        return None

