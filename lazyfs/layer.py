"""One seekable layer opened for mounting: its TOC fetched, checked against its pin, resolved.

Opening costs at most two ranged reads: the blob's tail (which usually holds the whole TOC, so
one read is enough) and, for a large TOC, the rest of it. With a TOC cache hit it costs none:
the cached record is checked against the pinned TOC digest like a fetched one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

from lazyfs.errors import FormatError, VerificationError
from lazyfs.format.codec import GzipCodec
from lazyfs.format.estargz import MAX_TOC_COMPRESSED_SIZE
from lazyfs.format.seekable import (MAX_FOOTER_SIZE, TOCRegion, locate_toc, parse_toc_region,
                                    region_from_position_annotation)
from lazyfs.format.toc import ResolvedEntry, resolve
from lazyfs.layerspec import LayerSpec  # noqa: F401 - what open_layer takes

log = logging.getLogger(__name__)

# How much of the blob's end to read first. Most TOCs compress to well under this, so the
# footer and the TOC arrive in one request; a bigger one costs a second request.
TAIL_READ_BYTES = 512 << 10
MIN_BLOB_SIZE = 40  # smaller than any footer
# TOCs of a many-layer image fetched at once: enough for typical images (5-15 layers) without
# opening dozens of connections to one server at mount.
MAX_PARALLEL_TOC_FETCHES = 8


@dataclass
class Layer:
    index: int
    spec: LayerSpec
    blob_size: int
    toc_digest: str
    toc_blob_offset: int
    entries: list[ResolvedEntry]
    codec: object = field(default_factory=GzipCodec)  # GzipCodec or ZstdCodec
    verified: bool = True  # False: mounted with --insecure-skip-verify and no pin

    @property
    def source(self):
        return self.spec.source


def open_layers(specs: list[LayerSpec], cache) -> list[Layer]:
    """open_layer for each layer, the TOC fetches of remote layers side by side: a mount of a
    many-layer image waits for about one TOC's round trips, not one per layer."""
    if len(specs) < 2:
        return [open_layer(index, spec, cache) for index, spec in enumerate(specs)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(specs), MAX_PARALLEL_TOC_FETCHES),
                            thread_name_prefix="lazyfs-toc") as pool:
        return list(pool.map(lambda args: open_layer(*args, cache), enumerate(specs)))


def open_layer(index: int, spec: LayerSpec, cache) -> Layer:
    """Fetch (or load from the TOC cache), verify and resolve one layer's TOC. Blocking."""
    if spec.toc_digest:
        record = cache.get_toc(spec.toc_digest) if cache is not None else None
        if record is not None:
            layer = _from_toc_record(index, spec, record)
            if layer is not None:
                return layer
    blob_size = spec.blob_size if spec.blob_size is not None else spec.source.size()
    if spec.toc_position is not None:
        # The manifest says where the TOC is: one ranged read of just the TOC.
        region = region_from_position_annotation(spec.toc_position, blob_size)
        toc_bytes = spec.source.read(region.toc_start, region.toc_end - region.toc_start)
    else:
        region, toc_bytes = _read_tail_and_toc(spec, blob_size)
    toc, toc_digest = parse_toc_region(region, toc_bytes)
    if spec.toc_digest and toc_digest != spec.toc_digest:
        raise VerificationError(f"{spec.label}: TOC digest is {toc_digest}, but "
                                f"{spec.toc_digest} is pinned")
    entries = resolve(toc, region.data_end)
    if spec.toc_digest and cache is not None:
        cache.put_toc(spec.toc_digest, _toc_record(blob_size, region, toc_bytes))
    return Layer(index, spec, blob_size, toc_digest, region.toc_start, entries,
                 codec=region.codec(), verified=bool(spec.toc_digest))


def _read_tail_and_toc(spec: LayerSpec, blob_size: int) -> tuple[TOCRegion, bytes]:
    """One read of the blob's end (footer, and usually the whole TOC), a second one only for
    the part of a big TOC the first missed."""
    if blob_size < MIN_BLOB_SIZE:
        raise FormatError(f"{spec.label}: {blob_size} bytes is too small for a seekable layer")
    tail_offset = _tail_offset(spec.toc_offset, blob_size)
    tail = spec.source.read(tail_offset, blob_size - tail_offset)
    region = locate_toc(tail, blob_size)
    if region.toc_start >= tail_offset:
        return region, tail[region.toc_start - tail_offset:region.toc_end - tail_offset]
    head = spec.source.read(region.toc_start, tail_offset - region.toc_start)
    return region, head + tail[:region.toc_end - tail_offset]


def _tail_offset(toc_offset_hint: int | None, blob_size: int) -> int:
    """Where the first read of the blob's end starts: at the TOC's start, when the image says
    where that is (ANNOTATION_TOC_OFFSET) and the footer and the TOC fit the size limit a TOC
    has anyway; else TAIL_READ_BYTES before the end. Only the footer, read either way, says
    where the TOC really is."""
    if (toc_offset_hint is not None and 0 <= toc_offset_hint < blob_size
            and blob_size - toc_offset_hint <= MAX_TOC_COMPRESSED_SIZE + MAX_FOOTER_SIZE):
        return toc_offset_hint
    return max(0, blob_size - TAIL_READ_BYTES)


# TOC cache record layout: one line of JSON metadata, a newline, then the compressed TOC member
# exactly as it sits in the blob (so reading it back runs the same parser as a fetch).
def _toc_record(blob_size: int, region: TOCRegion, toc_bytes: bytes) -> bytes:
    meta = json.dumps({"version": 2, "blob_size": blob_size, "region": dataclasses.asdict(region)})
    return meta.encode() + b"\n" + toc_bytes


def _from_toc_record(index: int, spec: LayerSpec, record: bytes) -> Layer | None:
    """A layer from a cached TOC record, or None if the record is unusable (then refetch)."""
    try:
        meta_line, toc_bytes = record.split(b"\n", 1)
        meta = json.loads(meta_line)
        if meta.get("version") != 2:
            raise FormatError("record of another version")
        region = TOCRegion(**meta["region"])
        toc, toc_digest = parse_toc_region(region, toc_bytes)
        if toc_digest != spec.toc_digest:
            raise FormatError("stale record")
        entries = resolve(toc, region.data_end)
        return Layer(index, spec, int(meta["blob_size"]), toc_digest, region.toc_start, entries,
                     codec=region.codec())
    except (ValueError, KeyError, TypeError, FormatError) as exc:  # refetch instead
        log.warning("ignoring a bad cached TOC for %s: %s", spec.label, exc)
        return None

