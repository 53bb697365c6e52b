"""A seekable layer read synchronously from a local blob: footer, TOC and verified chunks.

This is what `inspect` and `verify` use. The mount reads through the async fetcher instead, but
uses the same format functions, so both agree on what a blob means.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from lazyfs.errors import FormatError, NotFound, VerificationError
from lazyfs.format.codec import GzipCodec
from lazyfs.format.estargz import FOOTER_SIZE, parse_footer, read_toc_member
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


@dataclass
class SeekableLayer:
    blob: LocalBlob
    format: str  # "estargz"
    toc: TOC
    toc_digest: str  # sha256 of the TOC JSON as stored
    toc_blob_offset: int
    footer_size: int
    entries: list[ResolvedEntry]
    codec: GzipCodec

    @classmethod
    def open(cls, blob: LocalBlob) -> "SeekableLayer":
        tail = blob.read_at(max(0, blob.size - FOOTER_SIZE), min(blob.size, FOOTER_SIZE))
        footer = parse_footer(tail)
        toc_end = blob.size - footer.size
        if not 0 <= footer.toc_blob_offset < toc_end:
            raise FormatError(f"footer points at TOC offset {footer.toc_blob_offset}, outside "
                              f"the blob's {toc_end} payload bytes")
        toc, toc_digest = read_toc_member(blob.read_at(footer.toc_blob_offset,
                                                       toc_end - footer.toc_blob_offset))
        entries = resolve(toc, footer.toc_blob_offset)
        return cls(blob, "estargz", toc, toc_digest, footer.toc_blob_offset, footer.size,
                   entries, GzipCodec())

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
