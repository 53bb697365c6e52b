"""Tiny builders for test tars and a tree comparison over real extractions.

    tar_of(tmp_path, dir_("a/"), file_("a/b", b"data"), symlink("c", "a/b"))

writes a real tar with Python's tarfile. `extract()` uses GNU tar, the tool users extract
layers with, and `tree_of()` reads back every attribute with plain os calls.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

MTIME = 1_700_000_000


def _info(name: str, type_: bytes, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mtime = attrs.pop("mtime", MTIME)
    info.mode = attrs.pop("mode", 0o755 if type_ == tarfile.DIRTYPE else 0o644)
    info.uname = attrs.pop("uname", "root")
    info.gname = attrs.pop("gname", "root")
    xattrs = attrs.pop("xattrs", {})
    for key, value in xattrs.items():
        info.pax_headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def dir_(name: str, **attrs):
    return _info(name, tarfile.DIRTYPE, **attrs), None


def file_(name: str, data: bytes = b"", **attrs):
    info = _info(name, tarfile.REGTYPE, **attrs)
    info.size = len(data)
    return info, data


def symlink(name: str, target: str, **attrs):
    return _info(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **attrs), None


def hardlink(name: str, target: str, **attrs):
    return _info(name, tarfile.LNKTYPE, linkname=target, **attrs), None


def chardev(name: str, major: int, minor: int, **attrs):
    return _info(name, tarfile.CHRTYPE, devmajor=major, devminor=minor, **attrs), None


def blockdev(name: str, major: int, minor: int, **attrs):
    return _info(name, tarfile.BLKTYPE, devmajor=major, devminor=minor, **attrs), None


def fifo(name: str, **attrs):
    return _info(name, tarfile.FIFOTYPE, **attrs), None


def tar_bytes(*members, format=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_of(directory: Path, *members, name: str = "layer.tar", format=tarfile.PAX_FORMAT) -> Path:
    path = Path(directory) / name
    path.write_bytes(tar_bytes(*members, format=format))
    return path


# How GNU tar reads each layer format: both are plain compressed tars to a tool unaware of them.
_TAR_DECOMPRESS = {None: [], "estargz": ["--gzip"], "gzip": ["--gzip"], "zstd:chunked": ["--zstd"]}


def extract(archive: Path, dest: Path, *, compression: str | None = None) -> Path:
    """Extract with GNU tar as root would: owners, modes, xattrs and devices kept."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", *_TAR_DECOMPRESS[compression], "-xf", str(archive), "-C", str(dest), "--same-owner",
                    "--same-permissions", "--xattrs", "--xattrs-include=*", "--numeric-owner"],
                   check=True, capture_output=True)
    return dest


ESTARGZ_EXTRAS = {".no.prefetch.landmark", ".prefetch.landmark", "stargz.index.json"}


def tree_of(root: Path, ignore: set[str] = frozenset()) -> dict[str, dict]:
    """path -> every attribute a layer carries (hardlinks as shared inode groups)."""
    tree: dict[str, dict] = {}
    inode_names: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel in ignore:
                continue
            st = os.lstat(full)
            item = {
                "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                "mtime": int(st.st_mtime) if not stat.S_ISDIR(st.st_mode) else None,
                "nlink": st.st_nlink if not stat.S_ISDIR(st.st_mode) else None,
                "xattrs": {k: os.getxattr(full, k, follow_symlinks=False)
                           for k in sorted(os.listxattr(full, follow_symlinks=False))},
            }
            if stat.S_ISREG(st.st_mode):
                item["sha256"] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
                item["size"] = st.st_size
                inode_names.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                item["rdev"] = st.st_rdev
            tree[rel] = item
    for names in inode_names.values():
        for name in names:
            tree[name]["links"] = sorted(names)
    return tree
