"""The FUSE adapter: pyfuse3 operations over a merged image tree. Kept thin on purpose.

The only place that knows pyfuse3. Every handler goes through one error boundary: FUSEError
passes; a LazyfsError is recorded (for `lazyfs stats`) and becomes EIO; any other exception is
logged with its traceback, recorded, and becomes EIO. Cancellation always propagates. So no
error inside a handler can end the mount.

The image is immutable, so the kernel may cache everything for long: entries and attributes
get long timeouts and file contents `keep_cache`.

Recording (`lazyfs record`, lazyfs/record.py): with a `recorder`, lookups and readdir entries
tell it the names the kernel learns and every read tells it the file read; it writes each
regular file's path at its first read. It never raises, so the error boundary is unchanged;
without a recorder each of those handlers pays one `is None` test.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat

import pyfuse3

from lazyfs import stats
from lazyfs.awake import Activity
from lazyfs.fetchoptions import BUSY_POLL_S
from lazyfs.errors import LazyfsError

log = logging.getLogger(__name__)

# One hour: nothing in the image ever changes while it is mounted.
CACHE_TIMEOUT_SECONDS = 3600.0
BLOCK_SIZE = 4096
NAME_MAX = 255  # overlayfs refuses a lower layer whose statfs reports no name length
# Reading this extended attribute of the mount's root returns the live statistics as JSON;
# it is not listed by listxattr, so it does not show up in the image's own attributes.
STATS_XATTR = stats.STATS_XATTR.encode()
# Entries fetched from the tree per readdir call: the kernel's buffer holds a few dozen to a
# few hundred, so a bounded batch keeps listing a huge directory linear.
_READDIR_BATCH = 512
# uid/gid beyond 32 bits cannot be expressed to the kernel: show them as "nobody".
_NOBODY_ID = 65534
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _boundary(handler):
    @functools.wraps(handler)
    async def guarded(self, *args):
        self.activity.touch()
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except LazyfsError as exc:
            self.record_error(handler.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing may end the mount
            log.exception("unexpected error in %s", handler.__name__)
            self.record_error(handler.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return guarded


class LazyFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, tree, layers, fetcher, *, description: dict, recorder=None,
                 awake_window_s: float = BUSY_POLL_S):
        super().__init__()
        self.tree = tree
        self.layers = layers
        self.fetcher = fetcher
        self.description = description  # image, layers, verification mode: for stats
        self.handler_errors = 0
        self.last_error = ""
        self._total_bytes = sum(layer.blob_size for layer in layers)
        self.recorder = recorder  # lazyfs.record.AccessRecorder, or None: not recording
        self.activity = Activity(awake_window_s, fetcher.threads_busy)

    def record_error(self, where: str, exc: BaseException) -> None:
        self.handler_errors += 1
        self.last_error = f"{where}: {type(exc).__name__}: {exc}"
        log.warning("%s", self.last_error)

    def stats(self) -> dict:
        report = {**self.description, "handler_errors": self.handler_errors,
                  "last_error": self.last_error, "layers": self.fetcher.stats_json()}
        if self.recorder is not None:
            report["recording"] = self.recorder.stats()
        return report

    def _node(self, inode: int):
        try:
            return self.tree.node(inode)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.st_mode = node.mode
        attrs.st_nlink = node.nlink
        attrs.st_uid = node.uid if node.uid < 1 << 32 else _NOBODY_ID
        attrs.st_gid = node.gid if node.gid < 1 << 32 else _NOBODY_ID
        attrs.st_rdev = node.rdev
        attrs.st_size = node.size
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = (node.size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        attrs.generation = 0
        attrs.entry_timeout = attrs.attr_timeout = CACHE_TIMEOUT_SECONDS
        return attrs

    @_boundary
    async def getattr(self, inode, ctx=None):
        return self._attrs(self._node(inode))

    @_boundary
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        if name == b".":
            return self._attrs(parent)
        if name == b"..":
            return self._attrs(self._node(parent.parent))
        node = self.tree.lookup(parent_inode, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self.recorder is not None:
            self.recorder.looked_up(parent_inode, name, node)
        return self._attrs(node)

    @_boundary
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.link_target

    @_boundary
    async def opendir(self, inode, ctx):
        if not stat.S_ISDIR(self._node(inode).mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_boundary
    async def readdir(self, fh, start_id, token):
        for name, node, next_id in self.tree.children_from(fh, start_id, limit=_READDIR_BATCH):
            if not pyfuse3.readdir_reply(token, name, self._attrs(node), next_id):
                break
            if self.recorder is not None:  # readdirplus: the kernel knows this name now
                self.recorder.listed(fh, name, node)

    @_boundary
    async def releasedir(self, fh):
        return None

    @_boundary
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_boundary
    async def read(self, fh, offset, size):
        node = self._node(fh)
        if self.recorder is not None:
            # Before fetching: a read that fails was still wanted.
            self.recorder.read(node, offset, size)
        if offset >= node.size or not node.chunks:
            return b""
        layer = self.layers[node.layer_index]
        return await self.fetcher.read(layer, node.chunks, offset, min(size, node.size - offset))

    @_boundary
    async def release(self, fh):
        return None

    @_boundary
    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE and name == STATS_XATTR:
            return json.dumps(self.stats()).encode()
        value = (self._node(inode).xattrs or {}).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_boundary
    async def listxattr(self, inode, ctx):
        return list((self._node(inode).xattrs or {}).keys())

    @_boundary
    async def statfs(self, ctx):
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = BLOCK_SIZE
        out.f_blocks = (self._total_bytes + BLOCK_SIZE - 1) // BLOCK_SIZE
        out.f_bfree = out.f_bavail = 0
        out.f_files = self.tree.entry_count
        out.f_ffree = out.f_favail = 0
        out.f_namemax = NAME_MAX
        return out

    # Writes: the image is read-only. The kernel already refuses most of them on a "ro"
    # mount; these answer the rest precisely.
    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)
