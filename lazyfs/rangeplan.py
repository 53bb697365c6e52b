"""Range planning: which compressed byte ranges to ask a source for, and in how many requests.

Pure and synchronous: spans in, requests out. The fetcher gives one Span per compressed member
it needs (a chunk's `[blob_offset, blob_end)`, with the chunks it holds as `items`):

    spans     [a ] [b ]  [c ]                 [d ]          [e ]
    ranges    [a  b   c ]                     [d ]          [e ]     gaps <= merge_gap_bytes
    requests  ([a b c], [d], [e])                                    up to max_ranges each

1. Spans whose gap is at most `merge_gap_bytes` merge into one Range, gap bytes included (they
   are fetched and dropped): cheaper than a round trip when the gap is small (see
   FetchOptions.merge_gap_bytes for the arithmetic). A range grows to at most
   `max_range_bytes`; a single span bigger than that is still one range (a member cannot be
   split). Overlapping spans always merge: the ranges of one multi-range request must not
   overlap.
2. Ranges are grouped in order into Requests of at most `max_ranges` ranges and, when given,
   `max_request_bytes`: one HTTP request each, multi-range when it has several ranges.

Alternatives rejected: merging everything into one range (fetches every gap, however large);
one request per span (a round trip each: a 1 MiB read over 256 KiB chunks would cost four);
letting the server coalesce (RFC 9110 allows it, but we could no longer check that each part is
exactly what was asked).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Span:
    """One compressed member to fetch, and what it holds (opaque to the planner)."""

    blob_start: int
    blob_end: int  # exclusive
    items: list = field(default_factory=list)


@dataclass
class Range:
    """A contiguous byte range fetched as one piece: its spans in order, gaps between them."""

    blob_start: int
    blob_end: int  # exclusive
    spans: list[Span]

    @property
    def length(self) -> int:
        return self.blob_end - self.blob_start


@dataclass
class Request:
    ranges: list[Range]

    @property
    def length(self) -> int:
        return sum(r.length for r in self.ranges)


def group_spans(pairs: Iterable[tuple[int, int, object]]) -> list[Span]:
    """Spans from `(blob_start, blob_end, item)` triples: sorted, one Span per distinct range
    (several chunks may live in one member: they share its Span)."""
    spans: dict[tuple[int, int], Span] = {}
    for blob_start, blob_end, item in pairs:
        if blob_end <= blob_start:
            raise ValueError(f"empty or negative span [{blob_start}, {blob_end})")
        key = (blob_start, blob_end)
        if key not in spans:
            spans[key] = Span(blob_start, blob_end)
        spans[key].items.append(item)
    return [spans[key] for key in sorted(spans)]


def merge_ranges(spans: Iterable[Span], *, merge_gap_bytes: int,
                 max_range_bytes: int | None = None) -> list[Range]:
    """Spans (sorted by blob_start) merged into ranges; see the module doc."""
    ranges: list[Range] = []
    for span in spans:
        if ranges:
            current = ranges[-1]
            if span.blob_start < current.blob_start:
                raise ValueError("spans must be sorted by blob_start")
            overlaps = span.blob_start < current.blob_end
            merged_end = max(current.blob_end, span.blob_end)
            fits = max_range_bytes is None or merged_end - current.blob_start <= max_range_bytes
            if overlaps or (span.blob_start - current.blob_end <= merge_gap_bytes and fits):
                current.blob_end = merged_end
                current.spans.append(span)
                continue
        ranges.append(Range(span.blob_start, span.blob_end, [span]))
    return ranges


def group_requests(ranges: Iterable[Range], *, max_ranges: int,
                   max_request_bytes: int | None = None) -> list[Request]:
    """Ranges, in order, packed into requests of at most `max_ranges` ranges and
    `max_request_bytes` bytes (a single bigger range is a request of its own)."""
    if max_ranges < 1:
        raise ValueError(f"max_ranges must be at least 1, not {max_ranges}")
    requests: list[Request] = []
    for rng in ranges:
        if requests:
            current = requests[-1]
            fits = (max_request_bytes is None
                    or current.length + rng.length <= max_request_bytes)
            if len(current.ranges) < max_ranges and fits:
                current.ranges.append(rng)
                continue
        requests.append(Request([rng]))
    return requests


def plan_requests(spans: Iterable[Span], *, merge_gap_bytes: int, max_ranges: int,
                  max_range_bytes: int | None = None,
                  max_request_bytes: int | None = None) -> list[Request]:
    ranges = merge_ranges(spans, merge_gap_bytes=merge_gap_bytes, max_range_bytes=max_range_bytes)
    return group_requests(ranges, max_ranges=max_ranges, max_request_bytes=max_request_bytes)
