"""The workload list: what `lazyfs record` writes and `lazyfs convert --prioritize` reads.

One UTF-8 line each:

    usr/bin/python3.11                  a file, at its first read (the lines in first-read order)
    #read 0 131072 usr/bin/python3.11   a byte range the kernel read of it: offset, length, path
    # anything else starting with "#"   a comment; blank lines are skipped too

A path line is the file's name relative to the image root (`toc.clean_name` makes it the
name a layer holds). Read lines say which parts of the listed files a start-up needs, so that
the converter can cut those files into chunks along them and mark the chunks read
(converter/layer.py): a mount then prefetches what was read and leaves the rest for later.
A read line starts with "#" so that lists stay readable by lazyfs before this format (they
skip it as a comment and prioritize whole files), and so that a hand-written list of paths is
still a valid list. A path with no read line is wanted whole.

Not a security boundary: a list only orders a layer and chooses chunk boundaries; what a mount
serves is checked against the TOC's digests whatever the list said.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from lazyfs.errors import FormatError

READ_PREFIX = "#read "


@dataclass
class WorkloadList:
    paths: list[str] = field(default_factory=list)  # listed lines, in order, as written
    # Per path (as written), the ranges read: (file_offset, file_end) pairs, merged and sorted.
    reads: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


def read_line(file_offset: int, length: int, path_line: str) -> str:
    """The line (no newline) that records a read of `length` bytes at `file_offset` of the file
    whose path line is `path_line`."""
    return f"{READ_PREFIX}{file_offset} {length} {path_line}"


def parse(text: str, where: str = "the list") -> WorkloadList:
    """Path lines and read lines of a list; a malformed read line is a FormatError naming its
    line (a list is small, and a silently dropped range would cost a start-up round trips)."""
    listed = WorkloadList()
    # Lines end at "\n" only (a text-mode file has turned "\r\n" and "\r" into it): a name
    # may hold the other characters str.splitlines() breaks at, such as "\x1c".
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if line.startswith(READ_PREFIX):
            path, extent = _parse_read(line, f"{where}, line {number}")
            listed.reads.setdefault(path, []).append(extent)
        elif line and not line.startswith("#"):
            listed.paths.append(line)
    listed.reads = {path: merge_extents(extents) for path, extents in listed.reads.items()}
    return listed


def _parse_read(line: str, where: str) -> tuple[str, tuple[int, int]]:
    fields = line[len(READ_PREFIX):].split(" ", 2)
    if len(fields) != 3 or not fields[0].isdigit() or not fields[1].isdigit() or not fields[2]:
        raise FormatError(f"{where}: a read line is '{READ_PREFIX}OFFSET LENGTH PATH', "
                          f"not {line[:200]!r}")
    file_offset, length = int(fields[0]), int(fields[1])
    return fields[2], (file_offset, file_offset + length)


def merge_extents(extents, gap_bytes: int = 0) -> list[tuple[int, int]]:
    """(start, end) ranges sorted, empty ones dropped, and those that overlap, touch or lie at
    most `gap_bytes` apart joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(extent for extent in extents if extent[1] > extent[0]):
        if merged and start <= merged[-1][1] + gap_bytes:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def range_holding(ranges: list[tuple[int, int]], start: int, end: int) -> int | None:
    """The index of the range of `ranges` (sorted, apart, as merge_extents gives them) that
    holds all of [start, end), or None."""
    index = bisect.bisect_right(ranges, start, key=lambda extent: extent[0]) - 1
    if index < 0 or end > ranges[index][1]:
        return None
    return index
