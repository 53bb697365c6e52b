"""`lazyfs record IMAGE --output LIST -- CMD ARGS...`: the files a workload reads, in order.

The command runs CMD exactly as `lazyfs run` does (image config, runtimes, network) and writes
LIST: one path per line, relative to the image's root, in the order the workload first read
them. `lazyfs convert IMAGE OUT --prioritize LIST` then puts those files first in each layer,
before `.prefetch.landmark`, so that mounts prefetch them. No other tool is needed: the mount
daemon records in the FUSE layer itself (lazyfs/fs.py calls an AccessRecorder).

What is recorded: a regular file at its FIRST READ, the moment its content is needed. read(2),
execve (the kernel reads the binary through the mount), mmap page faults of libraries and the
copy-up of a file the program changes all come through the FUSE read handler. What a
prefetcher needs is exactly the content read; so these are NOT recorded:
  - files only looked up or stat-ed, directories, listings (readdir), symlinks (readlink): their
    metadata is in the TOC, which a mount reads whole before anything else; following a
    symlink ends at the file it names, which is recorded when read ("/bin/sh" -> "busybox"
    records bin/busybox);
  - files opened but never read (open + fstat, locks) and empty files (the kernel never asks):
    nothing to prefetch.
Reads are recorded before their chunks are fetched, so a read that fails still counts: the
workload wanted that content. Only first reads reach the list; the kernel's page cache
(`keep_cache`) may answer later reads itself, which does not matter for first-access order.

Which name (a file with several hardlinks): the name the kernel reached the inode by. FUSE
read requests carry only the inode, so names are tracked as the kernel learns them: every
lookup (parent inode + name) and every readdir entry (pyfuse3 answers readdir with
readdirplus, which gives the kernel the child's inode without a later lookup). A lookup
replaces an earlier name of the same inode until the file is recorded (the name looked up last
is the one being opened); a readdir entry names an inode only when nothing else did. Either
name of a hardlink moves the same data when prioritized (prioritize.py takes the target too).

How the list reaches the command, and why a file: the daemon is a process forked by
`mount()`. Its MountOptions carry a RecordTarget (a path); the daemon appends each recorded
path to that file with one write(2) *before it answers the read*. So when the program has
exited, every line it caused is in the file, with no need to wait for the daemon to exit
(`umount` does not), and the daemon keeps no list in memory. Serving the list as a virtual
xattr of the root, as `user.lazyfs.stats` is served, was the alternative: the kernel caps an
xattr value at 64 KiB (XATTR_SIZE_MAX), which a workload's list exceeds (a few thousand paths),
and reading it would have to happen before unmount. The small summary (count, limit reached,
names skipped, a write error) does travel in that stats xattr: the command reads it before
unmounting.

And what of each file: every read that asks for bytes of a recorded file that no earlier read
asked for appends a read line, "#read OFFSET LENGTH PATH" (lazyfs/format/workload.py), before
it is answered. The reads are the kernel's, readahead included: the recording mount keeps the
start-up readahead window (MountOptions.startup_readahead_bytes, 128 KiB) all along, the window
a mount of the converted image keeps while its program starts, so that the kernel then asks
for what it asked now, and the converter can cut those files along these reads and have mounts
prefetch only what was read.

Memory, bounded: the recorder keeps the set of recorded inodes (at most `limit`, default
DEFAULT_LIMIT = 100,000 files; past it, recording stops and the summary says so) with each
one's path line and the merged ranges read of it (a few per file), and one (parent inode,
name) per directory or not-yet-recorded regular file the kernel learned a name of: at most one
per entry of the image. All of it is freed when the limit is reached. Nothing is kept for
other entries.

Lines: what `convert --prioritize` reads back as the same path (it strips each line, skips
blank lines and lines starting with "#" other than read lines, and cleans names with
toc.clean_name). A name with leading whitespace or a leading "#" gets "./" in front, one with
trailing whitespace "/." after. A name with a newline or carriage return, or not UTF-8, cannot
be a line: it is skipped (and counted). The output is written to LIST.partial-PID and renamed to LIST only when the program
ran to its end and the recording had no error.

Not filtered: every read of the mount while recording counts, including lazyfs's own (the
image's /etc/passwd when the config's User is resolved: a container runtime reads it at every
start too) and any other process on the host that reads the temporary mount.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass

from lazyfs.errors import LazyfsError
from lazyfs.format import workload

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100_000  # files recorded at most; see the module docstring


def list_line(path: bytes) -> str | None:
    """The line `convert --prioritize` reads back as `path` (relative to the root, as the
    kernel names it), or None when no line can hold it."""
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        return None  # the list is read as UTF-8
    if "\n" in text or "\r" in text:
        return None  # the list is read line by line (universal newlines)
    line = text
    if line.startswith("#") or line != line.lstrip():
        line = "./" + line  # not a comment, and stripping leaves the name whole
    if line != line.rstrip():
        line += "/."
    return line


class AccessRecorder:
    """First reads of regular files, in order, written as list lines through `write`.

    Pure and synchronous: lazyfs/fs.py calls it from its handlers, before anything is awaited,
    so calls come one at a time in the order the daemon handles requests. Never raises: a
    failure to write stops the recording and is reported by stats() (a read of the image must
    not fail because its recording did).
    """

    def __init__(self, tree, write: Callable[[bytes], None], *, limit: int = DEFAULT_LIMIT,
                 where: str = "", close: Callable[[], None] | None = None):
        if limit <= 0:
            raise ValueError(f"the recording limit must be positive, not {limit}")
        self.tree = tree
        self.limit = limit
        self.where = where  # for stats: the file written
        self._write = write
        self._close = close
        self._names: dict[int, tuple[int, bytes]] = {}  # inode -> (parent inode, name)
        self._recorded: set[int] = set()
        self._lines: dict[int, str] = {}  # recorded inode -> its path line
        self._extents: dict[int, list[tuple[int, int]]] = {}  # recorded inode -> ranges read
        self.active = True
        self.recorded = 0  # lines written
        self.skipped = 0  # files read whose name no line can hold (or with no known name)
        self.limit_reached = False
        self.error = ""

    # --- names, as the kernel learns them ------------------------------------------------------

    def looked_up(self, parent_inode: int, name: bytes, node) -> None:
        """A lookup answered with `node`: the latest lookup names a file until it is recorded."""
        if self.active and _worth_naming(node) and node.inode not in self._recorded:
            self._names[node.inode] = (parent_inode, name)

    def listed(self, parent_inode: int, name: bytes, node) -> None:
        """A readdir(plus) entry: names the inode only if nothing named it yet."""
        inode = node.inode
        if (self.active and inode not in self._names and inode not in self._recorded
                and _worth_naming(node)):
            self._names[inode] = (parent_inode, name)

    # --- reads ---------------------------------------------------------------------------------

    def read(self, node, file_offset: int = 0, length: int = 0) -> None:
        """A read of `node`'s content: a regular file's first read records its path; then every
        read that asks for bytes not asked before records a read line (lazyfs.format.workload)."""
        inode = node.inode
        if not self.active or not stat.S_ISREG(node.mode):
            return
        try:
            if inode not in self._recorded and not self._record_path(inode):
                return
            self._record_range(inode, file_offset, min(length, node.size - file_offset))
        except Exception as exc:  # noqa: BLE001 - never fail the read being recorded
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("recording to %s failed, stopped: %s", self.where or "?", self.error)
            self._stop()

    def _record_path(self, inode: int) -> bool:
        """Write the path line of a file read for the first time; whether it was written."""
        if len(self._recorded) >= self.limit:
            self.limit_reached = True
            self._stop()
            log.warning("recording: limit of %d files reached; later files not recorded",
                        self.limit)
            return False
        self._recorded.add(inode)
        path = self.path_of(inode)
        self._names.pop(inode, None)  # recorded: its name is never needed again
        line = None if path is None else list_line(path)
        if line is None:
            self.skipped += 1
            log.warning("recording: inode %d (%r) has no name a list can hold; skipped",
                        inode, path)
            return False
        self._write((line + "\n").encode())
        self._lines[inode] = line
        self.recorded += 1
        return True

    def _record_range(self, inode: int, file_offset: int, length: int) -> None:
        """A read line, unless these bytes were all asked for before (the kernel asks again
        for what it dropped from its page cache: that adds nothing to a start-up's needs)."""
        line = self._lines.get(inode)
        if line is None or length <= 0:
            return
        extents = self._extents.setdefault(inode, [])
        end = file_offset + length
        if workload.range_holding(extents, file_offset, end) is not None:
            return
        self._write((workload.read_line(file_offset, length, line) + "\n").encode())
        extents[:] = workload.merge_extents(extents + [(file_offset, end)])

    def path_of(self, inode: int) -> bytes | None:
        """The path (relative to the root) by the names the kernel used; None if unknown."""
        parts: list[bytes] = []
        # An image tree has no cycles; the bound only guards against a corrupt names table.
        for _ in range(self.tree.entry_count + 1):
            if inode == self.tree.root.inode:
                return b"/".join(reversed(parts))
            entry = self._names.get(inode) or self._name_from_tree(inode)
            if entry is None:
                return None
            inode, name = entry
            parts.append(name)
        return None

    def _name_from_tree(self, inode: int) -> tuple[int, bytes] | None:
        """A name for an inode the kernel never named to us (should not happen: the kernel
        learns every inode by lookup or readdirplus): its first name's directory, searched."""
        try:
            node = self.tree.node(inode)
            parent = self.tree.node(node.parent)
        except KeyError:
            return None
        for name, child in (parent.children or {}).items():
            if child is node:
                if node.children is not None:
                    self._names[inode] = (parent.inode, name)  # directories: remembered
                return parent.inode, name
        return None

    def _stop(self) -> None:
        self.active = False
        for table in (self._names, self._lines, self._extents):
            table.clear()  # the memory goes with the recording

    def close(self) -> None:
        self._stop()
        if self._close is not None:
            close, self._close = self._close, None
            close()

    def stats(self) -> dict:
        return {"file": self.where, "recorded": self.recorded, "limit": self.limit,
                "limit_reached": self.limit_reached, "skipped": self.skipped,
                "error": self.error}


def _worth_naming(node) -> bool:
    # Directories (to build paths) and regular files (what is recorded); nothing else is ever.
    return node.children is not None or stat.S_ISREG(node.mode)


@dataclass(frozen=True)
class RecordTarget:
    """What MountOptions.record carries into the daemon: the file to append paths to."""

    path: str
    limit: int = DEFAULT_LIMIT

    def open(self, tree) -> AccessRecorder:
        """In the daemon, once the tree is built. The file is created if needed."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LazyfsError(f"cannot record to {self.path}: {exc.strerror}") from None

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        return AccessRecorder(tree, write, limit=self.limit, where=self.path,
                              close=lambda: os.close(fd))


# --- the command ---------------------------------------------------------------------------------

def record(image: str, command: list[str], output: str, options, *, runtime: str = "chroot",
           network: str = "host", limit: int = DEFAULT_LIMIT, env: dict | None = None,
           stderr=None) -> int:
    """Run `command` from `image` as `lazyfs run` does, write what it read to `output`; the
    program's exit status. `options` are the MountOptions (not changed)."""
    from lazyfs import stats as mount_stats
    from lazyfs.run import run

    if limit <= 0:
        raise LazyfsError(f"--max-files must be positive, not {limit}")
    output = os.path.abspath(output)
    if os.path.isdir(output):
        raise LazyfsError(f"--output {output} is a directory")
    partial = f"{output}.partial-{os.getpid()}"
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        raise LazyfsError(f"cannot write {output}: {exc.strerror}") from None
    summary: dict = {}

    def after_exit(mountpoint: str) -> None:
        # Still mounted: the daemon's own account of the recording.
        summary.update(mount_stats.read_stats(mountpoint).get("recording") or {"missing": True})

    published = False
    try:
        mount_options = dataclasses.replace(options, record=RecordTarget(partial, limit))
        code = run(image, command, mount_options, env=env, runtime=runtime, network=network,
                   after_exit=after_exit)
        if not summary:
            return code  # not mounted: run() printed why; no list
        if summary.get("missing"):
            raise LazyfsError(f"the mount did not record (the program exited with status "
                              f"{code}); {output} not written")
        if summary.get("error"):
            raise LazyfsError(f"recording failed: {summary['error']} (the program exited with "
                              f"status {code}); {output} not written")
        os.replace(partial, output)
        published = True
        _print_summary(summary, output, stderr or sys.stderr)
        return code
    finally:
        if not published:
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass


def _print_summary(summary: dict, output: str, out) -> None:
    count = summary.get("recorded", 0)
    notes = []
    if summary.get("limit_reached"):
        notes.append(f"stopped at the limit of {summary.get('limit')} files (--max-files)")
    if summary.get("skipped"):
        notes.append(f"{summary['skipped']} names no list line can hold were left out")
    print(f"lazyfs record: {count} file{'s' if count != 1 else ''} in first-read order written "
          f"to {output}" + "".join(f"; {n}" for n in notes), file=out)
