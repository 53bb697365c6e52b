"""Read an input layer: a plain, gzip or zstd tar, as a list of members with their raw headers.

The converter copies each member's header bytes verbatim (PAX records, GNU long names, xattrs,
everything a tool put there) and re-serializes only what it must (sparse files, whose stored
data is not the file's content). So the output extracts to exactly the tree the input does.

Compressed input is first inflated into a temporary file: prioritization reorders members and
the chunker reads payloads at their offsets, both of which need random access.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from lazyfs.errors import FormatError
from lazyfs.format.tarmeta import XATTR_PAX_PREFIX
from lazyfs.format.toc import clean_name, unsafe_name_reason

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COPY_BUFFER = 1 << 20

# tar type flags that carry file data in the archive.
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
SUPPORTED_TYPES = frozenset(_REGULAR_TYPES + (
    tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
    tarfile.FIFOTYPE, tarfile.GNUTYPE_SPARSE,
))


@dataclass
class Member:
    info: tarfile.TarInfo
    header_start: int  # where this member's header blocks (extended headers included) begin
    synthetic_header: bytes | None = None  # set when the header is re-serialized, not copied

    @property
    def is_regular(self) -> bool:
        return self.info.type in _REGULAR_TYPES or self.info.type == tarfile.GNUTYPE_SPARSE

    @property
    def is_sparse(self) -> bool:
        return self.info.sparse is not None


def compression_of(path: str) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(GZIP_MAGIC):
        return "gzip"
    if magic == ZSTD_MAGIC:
        return "zstd"
    return "none"


@contextlib.contextmanager
def plain_tar(path: str, temp_dir: str | None = None) -> Iterator[str]:
    """Yield the path of an uncompressed copy of the layer tar at `path` (itself if plain)."""
    kind = compression_of(path)
    if kind == "none":
        yield path
        return
    fd, temp_path = tempfile.mkstemp(prefix="lazyfs-layer-", suffix=".tar", dir=temp_dir)
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            inflate(kind, src, dst)
        yield temp_path
    finally:
        os.unlink(temp_path)


def inflate(kind: str, src: BinaryIO, dst: BinaryIO) -> None:
    try:
        if kind == "gzip":
            # gzip.GzipFile reads every member of a multi-member stream (eStargz input included).
            with gzip.GzipFile(fileobj=src) as reader:
                shutil.copyfileobj(reader, dst, _COPY_BUFFER)
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
            with reader:
                shutil.copyfileobj(reader, dst, _COPY_BUFFER)
    except EOFError:
        raise FormatError(f"{kind} input is truncated") from None
    except (OSError, zlib.error, zstandard.ZstdError) as exc:
        raise FormatError(f"{kind} input is corrupt: {exc}") from None


def scan_members(tar_path: str) -> list[Member]:
    """Every member of the tar, in order, with the offset of its raw header bytes.

    Refuses unsupported entry types and archives that are cut short: tarfile silently ends an
    archive at a truncated or garbage header, so the end-of-archive block is checked here.
    """
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            infos = tar.getmembers()
            end_of_members = tar.offset
    except tarfile.TarError as exc:
        if "unexpected end" in str(exc):
            raise FormatError("tar is truncated: a member's data runs past the end") from None
        raise FormatError(f"not a valid tar: {exc}") from None
    except OSError as exc:
        # tarfile seeks past a member's data using the size in its header; a size beyond any
        # file (base-256 fields reach 2**95, or are negative) makes that seek fail.
        if exc.errno not in (errno.EINVAL, errno.EOVERFLOW):
            raise
        raise FormatError("not a valid tar: a member's size is impossible "
                          f"({exc.strerror})") from None
    _check_end_of_archive(tar_path, end_of_members)
    check_names(infos)
    members = []
    for index, info in enumerate(infos):
        if info.type not in SUPPORTED_TYPES:
            raise FormatError(f"unsupported tar entry type {info.type!r} for {info.name!r}")
        # info.offset is where the member's first extended header (pax, GNU long name) starts,
        # so copying from there keeps them. The first member also takes any pax global header
        # before it (as `git archive` writes), which tarfile does not count as a member.
        members.append(Member(info=info, header_start=0 if index == 0 else info.offset))
    return members


# Owners must fit uid_t/gid_t: the mount refuses a TOC with larger ones.
_ID_MAX = (1 << 32) - 1


def check_names(infos: list[tarfile.TarInfo]) -> None:
    """Refuse a tar that would extract outside its target or ambiguously (FormatError).

    What is refused, and why, given that a layer tar says what extracting it makes:
    - a name (or hardlink target) that is absolute or has a ".." component: GNU tar strips or
      skips those, other tools write outside the rootfs; no image builder writes them;
    - a NUL byte in a name or link target (possible in PAX records), or a name, link target or
      owner name that is not UTF-8, or a negative size (a PAX record): the TOC cannot carry
      them;
    - an entry under a symlink made earlier in this tar ("x" -> "/etc", then "x/passwd"):
      extraction writes through the link, the mount shows a directory;
    - a hardlink to itself, to a directory of this tar, or to a name that only comes later in
      this tar (a cycle needs one of these): there is nothing to link to yet. A hardlink to a
      name absent from this tar is kept: it may name a file of a lower layer;
    - an owner id that does not fit 32 bits, an empty xattr name or one with a NUL byte.
    Duplicate names are kept (the last one wins, as in extraction and in the mount).
    """
    all_paths = {clean_name(info.name) for info in infos}
    kinds: dict[str, bytes] = {}  # path -> type of the latest entry of this tar at that path
    for info in infos:
        path = _checked_name(info.name, "name", info.name)
        if "\x00" in info.linkname:
            raise FormatError(f"tar entry {info.name!r} has a NUL byte in its link target")
        if info.size < 0:  # a PAX "size" record may say anything
            raise FormatError(f"tar entry {info.name!r} has a negative size {info.size}")
        for what, text in (("name", info.name), ("link target", info.linkname),
                           ("owner name", info.uname), ("group name", info.gname)):
            if not _is_utf8(text):
                raise FormatError(f"tar entry {info.name!r} has a {what} that is not UTF-8 "
                                  f"(the TOC is JSON, which cannot hold it)")
        if info.uid > _ID_MAX or info.gid > _ID_MAX or info.uid < 0 or info.gid < 0:
            raise FormatError(f"tar entry {info.name!r} has an owner {info.uid}:{info.gid} "
                              f"outside 0..{_ID_MAX}")
        for key in info.pax_headers:
            if key.startswith(XATTR_PAX_PREFIX) and (key == XATTR_PAX_PREFIX or "\x00" in key):
                raise FormatError(f"tar entry {info.name!r} has an empty extended attribute "
                                  f"name or one with a NUL byte")
        parent = path
        while "/" in parent:
            parent = parent.rpartition("/")[0]
            if kinds.get(parent) == tarfile.SYMTYPE:
                raise FormatError(f"tar entry {info.name!r} lies under {parent!r}, a symlink "
                                  f"earlier in the same tar")
        kind = info.type
        if info.type == tarfile.LNKTYPE:
            target = _checked_name(info.linkname, "hardlink target", info.name)
            if target == path:
                raise FormatError(f"tar entry {info.name!r} is a hardlink to itself")
            kind = kinds.get(target)
            if kind is None and target in all_paths:
                raise FormatError(f"tar entry {info.name!r} is a hardlink to {info.linkname!r}, "
                                  f"which comes later in the tar")
            if kind == tarfile.DIRTYPE:
                raise FormatError(f"tar entry {info.name!r} is a hardlink to the directory "
                                  f"{info.linkname!r}")
            if kind is None and kinds.get(path) == tarfile.SYMTYPE:
                # A target in no lower layer leaves the name as it was (the mount skips such a
                # link): still this tar's symlink, for the entries that follow.
                kind = tarfile.SYMTYPE
        kinds[path] = kind


def _is_utf8(text: str) -> bool:
    """tarfile decodes bytes that are not UTF-8 as lone surrogates (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _checked_name(name: str, what: str, entry_name: str) -> str:
    if "\x00" in name:
        raise FormatError(f"tar entry {entry_name!r} has a NUL byte in its {what}")
    reason = unsafe_name_reason(name)
    if reason is not None:
        raise FormatError(f"tar entry {entry_name!r}: its {what} {name!r} {reason} "
                          f"(a layer tar names paths under its root)")
    return clean_name(name)


def _check_end_of_archive(tar_path: str, end_of_members: int) -> None:
    with open(tar_path, "rb") as f:
        f.seek(end_of_members)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        raise FormatError(f"tar is truncated: no end-of-archive marker after offset {end_of_members}")
    if block.strip(b"\0"):
        raise FormatError(f"tar has an invalid header at offset {end_of_members}")


def raw_header(tar_file: BinaryIO, member: Member) -> bytes:
    """The member's header bytes as they appear in the archive (or re-serialized)."""
    if member.synthetic_header is not None:
        return member.synthetic_header
    if member.is_sparse:
        member.synthetic_header = _dense_header(member.info)
        return member.synthetic_header
    tar_file.seek(member.header_start)
    length = member.info.offset_data - member.header_start
    data = tar_file.read(length)
    if len(data) != length:
        raise FormatError(f"tar is truncated in the header of {member.info.name!r}")
    return data


def _dense_header(info: tarfile.TarInfo) -> bytes:
    """A plain regular-file header for a sparse member, whose payload we write expanded."""
    dense = tarfile.TarInfo(info.name)
    for attr in ("mode", "uid", "gid", "uname", "gname", "mtime"):
        setattr(dense, attr, getattr(info, attr))
    dense.size = info.size
    dense.type = tarfile.REGTYPE
    dense.pax_headers = {k: v for k, v in info.pax_headers.items() if not k.startswith("GNU.sparse")}
    return dense.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def payload_reader(tar: tarfile.TarFile, member: Member) -> BinaryIO:
    """A reader of the member's file content (sparse holes expanded)."""
    reader = tar.extractfile(member.info)
    assert reader is not None
    return reader


def read_exactly(reader: BinaryIO, length: int, name: str) -> bytes:
    data = reader.read(length)
    if len(data) != length:
        raise FormatError(f"tar is truncated in the data of {name!r}")
    return data


def synthetic_member(name: str, data: bytes) -> tuple[Member, bytes]:
    """A regular-file member that is not in the input (the eStargz landmarks)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    header = info.tobuf(tarfile.USTAR_FORMAT)
    return Member(info=info, header_start=-1, synthetic_header=header), data
