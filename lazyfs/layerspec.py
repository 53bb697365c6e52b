"""LayerSpec: where a layer is and what pins it, as image resolution (lazyfs/image.py) hands
it to the mount. A module of its own, without the format code lazyfs/layer.py needs to read a
TOC: resolving an image is on a cold start's critical path, and imports cost time there."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerSpec:
    """Where a layer is and what pins it, as the image (or the command line) says."""

    source: object  # a lazyfs.source.BlobSource
    toc_digest: str | None  # None only with --insecure-skip-verify
    label: str  # for messages and stats: the blob digest or the blob's location
    blob_size: int | None = None  # from the manifest descriptor: saves a request
    toc_position: str | None = None  # zstd:chunked manifest-position annotation, if any
    toc_offset: int | None = None  # eStargz: where the TOC member starts (a hint, not trusted)
    prefetch_end: int | None = None  # where the prioritized files end (a hint, not trusted)
    # The blob ranges of the prioritized chunks a start-up reads, (start, end) in blob order;
    # None: prefetch everything before the landmark. A hint, not trusted either.
    prefetch_ranges: list[tuple[int, int]] | None = None
