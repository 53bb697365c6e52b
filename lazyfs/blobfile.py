"""A seekable layer read synchronously from a local blob: footer, TOC and verified chunks.

This is what `inspect` and `verify` use. The mount reads through the async fetcher instead, but
uses the same format functions, so both agree on what a blob means.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from lazyfs.errors import FormatError, NotFound, VerificationError
from lazyfs.format.seekable import MAX_FOOTER_SIZE, TOCRegion, locate_toc, parse_toc_region
from lazyfs.format.toc import TOC, Chunk, ResolvedEntry, resolve


class LocalBlob:
    """A blob in a local file: its size and reads at an offset."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"no such blob: {path}") from None
        except IsADirectoryError:
            raise FormatError(f"{path} is a directory, not a blob") from None
        self.size = os.fstat(self._file.fileno()).st_size

    def read_at(self, blob_offset: int, length: int) -> bytes:
        data = os.pread(self._file.fileno(), length, blob_offset)
        if len(data) != length:
            raise FormatError(f"{self.path}: {length} bytes at {blob_offset} asked for, "
                              f"{len(data)} available (truncated blob?)")
        return data

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SourceBlob:
    """LocalBlob's interface over any BlobSource (a URL, a bucket, a registry), so that
    `inspect` reads a remote layer's footer and TOC without downloading the layer."""

    def __init__(self, source):
        self.source = source
        self.path = source.describe()
        self.size = source.size()

    def read_at(self, blob_offset: int, length: int) -> bytes:
        return self.source.read(blob_offset, length)

    def close(self) -> None:
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class SeekableLayer:
    blob: LocalBlob
    region: TOCRegion  # the format, and where its TOC and data are
    toc: TOC
    toc_digest: str  # sha256 of the TOC JSON as stored
    entries: list[ResolvedEntry]
    codec: object  # GzipCodec or ZstdCodec

    @property
    def format(self) -> str:
        return self.region.format

    @property
    def toc_blob_offset(self) -> int:
        return self.region.toc_start

    @property
    def footer_size(self) -> int:
        return self.region.footer_size

    @classmethod
    def open(cls, blob: LocalBlob) -> "SeekableLayer":
        tail_size = min(blob.size, MAX_FOOTER_SIZE)
        region = locate_toc(blob.read_at(blob.size - tail_size, tail_size), blob.size)
        toc, toc_digest = parse_toc_region(
            region, blob.read_at(region.toc_start, region.toc_end - region.toc_start))
        entries = resolve(toc, region.data_end)
        return cls(blob, region, toc, toc_digest, entries, region.codec())

    def check_toc_digest(self, expected: str) -> None:
        if self.toc_digest != expected:
            raise VerificationError(f"TOC digest is {self.toc_digest}, but {expected} is pinned")

    def read_chunk(self, chunk: Chunk) -> bytes:
        """The chunk's uncompressed bytes, checked against its digest."""
        member = self.blob.read_at(chunk.blob_offset, chunk.blob_end - chunk.blob_offset)
        data = self.codec.decompress_prefix(member, chunk.inner_offset + chunk.size)
        data = data[chunk.inner_offset:]
        if chunk.digest and _sha256(data) != chunk.digest:
            raise VerificationError(f"chunk at blob offset {chunk.blob_offset} has digest "
                                    f"{_sha256(data)}, the TOC says {chunk.digest}")
        return data


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
