"""Byte-range sources: where the bytes of one blob come from.

The fetcher above only needs "something that knows its size and reads exactly N bytes at an
offset", so that is the whole required interface. A source may also offer `read_ranges`
(several ranges in one round trip, streamed); `iter_ranges` below falls back to one `read` per
range for sources that do not. Every method blocks and may be called from several
worker threads at once (the trio fetcher runs them via `trio.to_thread.run_sync`). Sources do not
retry: the fetcher owns retries, and a source only says whether retrying could help
(`FetchError.retriable`).

Errors a source raises: NotFound (the blob is not there), FetchError (could not deliver, with
`.retriable`), RangeNotSupported (the server cannot serve byte ranges, so lazy reads are
impossible from it). Programming errors (negative offsets) are ValueError.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Protocol
from urllib.parse import unquote, urlsplit

from lazyfs.errors import FetchError, RangeNotSupported


class BlobSource(Protocol):
    # Number of requests (HTTP) or preads (file) made so far; tests and `lazyfs stats` read it.
    requests: int

    def size(self) -> int:
        """Total blob size in bytes; the first call may ask the server, later calls do not."""
        ...

    def read(self, blob_offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `blob_offset`, or an error. Zero-length reads cost nothing."""
        ...

    def describe(self) -> str:
        """Where the blob is, for messages; never contains credentials."""
        ...

    def close(self) -> None:
        """Release file descriptors and pooled connections."""
        ...


def iter_ranges(source, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """`(index, piece)` for each `(blob_offset, length)` range, in order; the pieces of one index
    concatenate to its bytes. Ranges do not overlap; they may come in any order.

    Uses the source's own `read_ranges` when it has one (HTTP: one multi-range request,
    streamed), else one `read` per range (a local file: a pread costs no round trip).
    """
    read_ranges = getattr(source, "read_ranges", None)
    if read_ranges is not None:
        yield from read_ranges(ranges)
        return
    for index, (blob_offset, length) in enumerate(ranges):
        if length:
            yield index, source.read(blob_offset, length)


# Blobs copied out whole (verify, inspect, convert and push of remote images) move in pieces
# this big: few requests, flat memory.
COPY_PIECE_BYTES = 8 << 20


def copy_to_file(source, path: str, size: int | None = None) -> str:
    """Write the whole blob (or its first `size` bytes) to `path`; its "sha256:..." digest."""
    import hashlib

    size = source.size() if size is None else size
    hasher = hashlib.sha256()
    with open(path, "wb") as out:
        for blob_offset in range(0, size, COPY_PIECE_BYTES):
            piece = source.read(blob_offset, min(COPY_PIECE_BYTES, size - blob_offset))
            hasher.update(piece)
            out.write(piece)
    return "sha256:" + hasher.hexdigest()


# "bytes FIRST-LAST/TOTAL" (RFC 9110), TOTAL "*" when the server does not say.
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def check_content_range(header: str, blob_offset: int, blob_end: int, *, where: str,
                        wanted: str, known_size: int | None) -> int | None:
    """The blob's total size (None: "*") from a Content-Range that must name exactly the bytes
    [blob_offset, blob_end] asked for. A range clipped at the blob's end is the caller reading
    past it (FetchError); other ranges, or a malformed header, mean the server cannot be
    trusted with byte ranges (RangeNotSupported); a total that differs from `known_size` means
    the blob changed under us."""
    match = CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        raise RangeNotSupported(f"{where}: malformed Content-Range {header!r} for {wanted}")
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if total is not None:
        if known_size is not None and total != known_size:
            raise FetchError(f"{where}: blob changed size under us: {known_size} bytes before, "
                             f"{total} now")
        if first == blob_offset and last == total - 1 < blob_end:
            # A correct server clipping our range at the end: the caller read past the end.
            raise FetchError(f"{where}: {blob_end + 1 - blob_offset} bytes at {blob_offset} "
                             f"are past the end of the blob ({total} bytes)")
    if (first, last) != (blob_offset, blob_end):
        raise RangeNotSupported(f"{where}: asked for {wanted}, server answered "
                                f"Content-Range {header!r}")
    return total


def check_range(blob_offset: int, length: int) -> None:
    """Negative offsets or lengths are the caller's bug, not a fetch failure."""
    if blob_offset < 0 or length < 0:
        raise ValueError(f"bad range: {length} bytes at {blob_offset}")


def file_url_path(url: str) -> str:
    """The local path of a file:// URL (file:///abs/path or file://localhost/abs/path)."""
    parts = urlsplit(url)
    # A remote host cannot be opened locally.
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"file URL with a remote host is not supported: {parts.netloc}")
    return unquote(parts.path)


def open_source(location: str, *, headers: dict[str, str] | None = None,
                ca_cert: str | None = None,
                timeout: float | tuple[float, float] = 30,
                s3_endpoint: str | None = None) -> BlobSource:
    """A source for a plain path, a file:// URL, an http(s):// URL or an s3:// URL.

    Only strings with "://" are URLs, so a path that happens to contain a colon stays a path.
    `headers`, `ca_cert` and `timeout` (seconds, or (connect, read) seconds) apply to HTTP
    only; `s3_endpoint` to S3 only.
    """
    if "://" not in location:
        from lazyfs.source.file import FileSource
        return FileSource(location)
    scheme = urlsplit(location).scheme.lower()
    if scheme == "file":
        from lazyfs.source.file import FileSource
        return FileSource(file_url_path(location))
    if scheme in ("http", "https"):
        # Imported here so that file-only users (inspect, verify) never import requests.
        from lazyfs.source.http import HttpSource
        return HttpSource(location, headers=headers, ca_cert=ca_cert, timeout=timeout)
    if scheme == "s3":
        from lazyfs.source.s3 import S3Source
        return S3Source(location, endpoint_url=s3_endpoint, timeout=timeout)
    raise FetchError(f"unsupported source scheme {scheme!r} (expected a path, file://, "
                     "http://, https:// or s3://)")
