"""`lazyfs verify`: prove a seekable layer is intact and means what its TOC says.

Checks, in order, stopping at the first failure with a message that names it:
  1. the footer parses and points inside the blob; the TOC parses and is consistent;
  2. the TOC digest equals the one pinned (manifest annotation or --toc-digest);
  3. every chunk inflates on its own and matches its chunk digest, and every regular file
     matches its file digest;
  4. the whole blob still inflates, as one stream, to a tar whose entries are those of the TOC
     (names, types, sizes, modes, owners, links, devices, xattrs, content);
  5. for image layers: blob digest, diff id and uncompressed size equal the manifest's values.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
import zlib

import zstandard
from dataclasses import dataclass

from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.errors import FormatError, VerificationError
from lazyfs.format.estargz import TOC_TAR_NAME
from lazyfs.format.tarmeta import TOC_TYPE_OF_TAR_TYPE, tar_xattrs
from lazyfs.format.toc import ResolvedEntry, format_modtime

_READ_BUFFER = 1 << 20


@dataclass
class LayerCheck:
    """What a verified layer's manifest descriptor and config say it must be (all optional)."""

    toc_digest: str | None = None
    blob_digest: str | None = None
    diff_id: str | None = None
    uncompressed_size: int | None = None


@dataclass
class VerifyReport:
    entries: int
    chunks: int
    uncompressed_size: int
    toc_digest: str


def verify_layer(path: str, check: LayerCheck) -> VerifyReport:
    with LocalBlob(path) as blob:
        layer = SeekableLayer.open(blob)
        if check.toc_digest:
            layer.check_toc_digest(check.toc_digest)
        chunks = _verify_chunks(layer)
        diff_id, uncompressed_size, blob_digest = _verify_stream(layer)
    _expect("blob digest", blob_digest, check.blob_digest)
    _expect("diff id (digest of the uncompressed layer)", diff_id, check.diff_id)
    _expect("uncompressed size", uncompressed_size, check.uncompressed_size)
    return VerifyReport(len(layer.entries), chunks, uncompressed_size, layer.toc_digest)


def _expect(what: str, actual, expected) -> None:
    if expected is not None and actual != expected:
        raise VerificationError(f"{what} is {actual}, the manifest says {expected}")


def _verify_chunks(layer: SeekableLayer) -> int:
    count = 0
    for item in layer.entries:
        entry = item.entry
        if entry.type != "reg" or entry.size == 0:
            continue
        if not entry.digest and not all(c.digest for c in item.chunks):
            raise VerificationError(f"{item.path!r} has no digest in the TOC: it cannot be verified")
        file_hash = hashlib.sha256()
        for chunk in item.chunks:
            try:
                data = layer.read_chunk(chunk)
            except FormatError as exc:
                raise type(exc)(f"{item.path!r}, chunk at file offset {chunk.file_offset}: {exc}") from None
            file_hash.update(data)
            count += 1
        if entry.digest and "sha256:" + file_hash.hexdigest() != entry.digest:
            raise VerificationError(f"{item.path!r} has digest sha256:{file_hash.hexdigest()}, "
                                    f"the TOC says {entry.digest}")
    return count


class _HashingReader:
    """Reads the blob front to back, hashing the compressed bytes on the way."""

    def __init__(self, blob: LocalBlob):
        self.blob = blob
        self.position = 0
        self.hash = hashlib.sha256()

    def read(self, length: int = -1) -> bytes:
        if length < 0:
            length = self.blob.size - self.position
        length = min(length, self.blob.size - self.position)
        data = self.blob.read_at(self.position, length) if length else b""
        self.position += len(data)
        self.hash.update(data)
        return data


class _CountingReader:
    """Counts and hashes the uncompressed stream the tar reader consumes."""

    def __init__(self, inner):
        self.inner = inner
        self.size = 0
        self.hash = hashlib.sha256()

    def read(self, length: int = -1) -> bytes:
        data = self.inner.read(length)
        self.size += len(data)
        self.hash.update(data)
        return data


def _stream_decompressor(fmt: str, compressed):
    if fmt == "zstd:chunked":
        # Skippable frames (the TOC, the footer) are skipped, as any zstd decoder does.
        return zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True)
    return gzip.GzipFile(fileobj=compressed, mode="rb")


def _verify_stream(layer: SeekableLayer) -> tuple[str, int, str]:
    """Inflate the whole blob as one stream, as a tool unaware of the format would, and compare
    its tar with the TOC."""
    compressed = _HashingReader(layer.blob)
    uncompressed = _CountingReader(_stream_decompressor(layer.format, compressed))
    expected = [item for item in layer.entries]
    try:
        with tarfile.open(fileobj=uncompressed, mode="r|") as tar:
            index = 0
            for info in tar:
                if info.name == TOC_TAR_NAME and index == len(expected) and layer.format == "estargz":
                    continue
                if index >= len(expected):
                    raise VerificationError(f"tar entry {info.name!r} is not in the TOC")
                _compare(expected[index], info, tar)
                index += 1
            if index != len(expected):
                raise VerificationError(f"TOC entry {expected[index].path!r} is missing from the tar")
        # Drain what follows the end-of-archive (the footer member) so every byte is counted.
        while uncompressed.read(_READ_BUFFER):
            pass
    except (tarfile.TarError, EOFError, OSError, zlib.error, zstandard.ZstdError) as exc:
        raise FormatError(f"blob does not inflate to a valid tar: {exc}") from None
    while compressed.read(_READ_BUFFER):
        pass
    return ("sha256:" + uncompressed.hash.hexdigest(), uncompressed.size,
            "sha256:" + compressed.hash.hexdigest())


def _compare(item: ResolvedEntry, info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
    entry = item.entry
    actual = {
        "name": info.name,
        "type": TOC_TYPE_OF_TAR_TYPE.get(info.type, info.type),
        "mode": info.mode,
        "uid": info.uid,
        "gid": info.gid,
        "user name": info.uname,
        "group name": info.gname,
        "modtime": format_modtime(info.mtime),
    }
    wanted = {
        "name": entry.name.rstrip("/") if entry.type == "dir" else entry.name,
        "type": entry.type,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "user name": item.user_name,
        "group name": item.group_name,
        "modtime": entry.modtime,
    }
    if entry.type == "reg":
        actual["size"], wanted["size"] = info.size, entry.size
    if entry.type in ("symlink", "hardlink"):
        actual["link"], wanted["link"] = info.linkname, entry.link_name
    if entry.type in ("char", "block"):
        actual["device"], wanted["device"] = (info.devmajor, info.devminor), (entry.dev_major, entry.dev_minor)
    # The TOC carries a user or group name forward to later entries with the same id, so it
    # cannot say "no name" after a named entry: an empty name in the tar is not a mismatch.
    for key in ("user name", "group name"):
        if not actual[key]:
            del actual[key], wanted[key]
    for key, value in wanted.items():
        if actual[key] != value:
            raise VerificationError(f"tar entry {info.name!r}: {key} is {actual[key]!r} in the tar, "
                                    f"{value!r} in the TOC")
    if tar_xattrs(info) != entry.xattrs:
        raise VerificationError(f"tar entry {info.name!r}: xattrs differ between tar and TOC")
    if entry.type == "reg" and entry.digest:
        digest = hashlib.sha256()
        reader = tar.extractfile(info)
        while block := reader.read(_READ_BUFFER):
            digest.update(block)
        if "sha256:" + digest.hexdigest() != entry.digest:
            raise VerificationError(f"tar entry {info.name!r}: content differs from the TOC digest")
