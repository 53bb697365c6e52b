"""The merged, read-only view of a multi-layer image, built from each layer's resolved TOC.

    tree = build_tree([layer0_entries, layer1_entries, ...])   # lowest layer first
    node = tree.lookup(ROOT_INODE, b"etc")                      # None: ENOENT
    for name, child, next_offset in tree.children_from(node.inode, offset, limit=100): ...

Pure and synchronous: no FUSE, no I/O. `fs.py` maps inode numbers to `Node`s with `Tree.node()`
and reads regular files through `Node.chunks` in the blob of layer `Node.layer_index`.

What the tree is: exactly what extracting the layers in order with OCI whiteout handling
produces ("Applying Changesets" in the OCI image spec), with these decisions:

- Whiteouts of layer N apply to what layers < N produced, and only to that: all of layer N's
  whiteouts are applied first, then its other entries in TOC order. So an entry of layer N is
  kept whether it comes before or after a whiteout (or opaque marker) naming it, as the spec
  requires. The alternative, applying whiteouts in TOC order and remembering which paths this
  layer created (umoci's way), gives the same tree for every layer a real tool writes (they put
  whiteouts first) but needs a set of every path of the layer and has corner cases (a whiteout of
  a directory this layer re-created after it: are its lower children gone?) that this order
  answers by construction. One consequence: a hardlink in layer N to a lower file that layer N
  also whites out has no target (a warning); no tool writes such a layer.
- Paths are never resolved through symlinks: a layer's entry `lib/x` where the lower `lib` is a
  symlink (or any non-directory) replaces it with a directory, as overlayfs (and so
  stargz-snapshotter and containerd's overlay snapshotter) shows it. Extraction tools write
  through such a symlink instead; image builders never produce that layer (their diff records the
  resolved path). Not following symlinks also means no lookup can loop. Under a symlink made by
  the *same* layer, an entry is a FormatError (the whole image is refused): that is the tar
  escape pattern ("x" -> "/etc", then "x/passwd"), never a layer diff.
- A name over a directory replaces the directory and its whole subtree, unless the new entry is a
  directory too: then only the directory's attributes change and the children merge. Within one
  layer the last entry for a name wins (tar extraction).
- Missing parents are created as implicit directories (0o755, root:root, mtime 0); a later
  directory entry for them sets their attributes.
- Hardlinks: the new name is the target's `Node` (same inode; `nlink` counts names; the link's
  own header attributes are ignored, as `link(2)` ignores them). The target is looked up in the
  tree as it stands at that entry. A missing target, a directory target, or a link to itself is
  skipped with a warning in `Tree.warnings`.
- Not part of the image: the eStargz bookkeeping entries `.prefetch.landmark`,
  `.no.prefetch.landmark` and `stargz.index.json` at the root, whiteout files, aufs metadata
  names (`.wh..wh.*` other than the opaque marker) and anything under a `.wh.*` directory.
- Directories report a nominal size of 4096 (`DIR_SIZE`), what `ls -l` shows for a small
  directory of an extracted rootfs on ext4.
- Children are sorted by name (bytes order): `readdir` is deterministic whatever the TOC order.
- Inode numbers are given in creation order while walking the layers in order (root is 1), so
  the same image always gets the same numbers. A replaced or whited-out node's number is never
  reused; `Tree.node()` raises KeyError for it.
"""

from __future__ import annotations

import errno
import gc
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from lazyfs.errors import FormatError
from lazyfs.format.toc import Chunk, ResolvedEntry, TOCEntry, clean_name, parse_modtime

ROOT_INODE = 1  # pyfuse3.ROOT_INODE, not imported: this module never imports FUSE
DIR_SIZE = 4096  # nominal st_size of a directory
IMPLICIT_DIR_MODE = stat.S_IFDIR | 0o755

# eStargz bookkeeping entries at the layer root: part of the blob, not of the image.
BOOKKEEPING_NAMES = frozenset({".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"})
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs), never content
OPAQUE_MARKER = ".wh..wh..opq"

_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}

# Shared by every node without xattrs or chunks (most nodes): read-only, so sharing is safe.
NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})
NO_CHUNKS: tuple[Chunk, ...] = ()

MAX_WARNINGS = 100  # kept in Tree.warnings; the rest are counted in Tree.warning_count


@dataclass(slots=True, eq=False, repr=False)
class Node:
    """One inode of the merged tree. Nodes compare by identity (a hardlink is the same Node)."""

    inode: int  # stable id; the root is ROOT_INODE
    mode: int  # full st_mode: file type bits | permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int  # regular files: file size; symlinks: len(link_target); dirs: DIR_SIZE; else 0
    mtime_ns: int
    rdev: int  # os.makedev(major, minor) for devices, else 0
    nlink: int  # non-directories: number of names; directories: 2 + number of subdirectories
    link_target: bytes  # symlinks, else b""
    xattrs: Mapping[bytes, bytes]  # read-only; NO_XATTRS when there are none
    layer_index: int  # the layer whose entry made this node (regular files: holds the data);
    #                   -1 for the root or an implicit directory made before any entry set it
    chunks: Sequence[Chunk]  # regular files: a tuple in file order; NO_CHUNKS otherwise
    children: dict[bytes, Node] | None  # directories only, sorted by name; None otherwise
    parent: int  # parent directory's inode (the root's is itself); for a hardlinked
    #              non-directory, the directory of the first name it got

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    def __repr__(self) -> str:  # never the children: a repr of the root would be the image
        return (f"Node(inode={self.inode}, mode=0o{self.mode:o}, size={self.size}, "
                f"nlink={self.nlink}, layer_index={self.layer_index})")


class Tree:
    """The merged image: inode → Node, lookups by name, readdir with resumable offsets."""

    def __init__(self, root: Node, nodes: list[Node | None], warnings: list[str],
                 warning_count: int):
        self.root = root
        # Indexed by inode number: None for the numbers of removed nodes and for 0. A list, not
        # a dict: 8 bytes an inode rather than about 50, and inode numbers are dense.
        self._nodes = nodes
        self._count = len(nodes) - nodes.count(None)
        self.warnings = warnings  # the first MAX_WARNINGS, in order
        self.warning_count = warning_count  # all of them
        # Directory inode → its child names in readdir order, made on the first readdir of that
        # directory (most directories of an image are never listed). The tree never changes
        # after it is built, so a listing never goes stale.
        self._listings: dict[int, list[bytes]] = {}

    @property
    def entry_count(self) -> int:
        """Number of inodes in the tree, the root included (a hardlinked file counts once)."""
        return self._count

    def node(self, inode: int) -> Node:
        """The node with this inode number; KeyError if there is none (the caller's ENOENT)."""
        try:
            node = self._nodes[inode] if inode > 0 else None
        except IndexError:
            node = None
        if node is None:
            raise KeyError(inode)
        return node

    def lookup(self, parent_inode: int, name: bytes) -> Node | None:
        """The child `name` of a directory, or None. KeyError for an unknown parent inode."""
        parent = self.node(parent_inode)
        if parent.children is None:
            return None
        if name == b".":
            return parent
        if name == b"..":
            return self.node(parent.parent)
        return parent.children.get(name)

    def children_from(self, dir_inode: int, start: int,
                      limit: int | None = None) -> list[tuple[bytes, Node, int]]:
        """Directory entries from offset `start`: (name, node, offset of the next entry).

        Offset 0 is the first child; pass an entry's next offset to resume after it. Resuming
        costs O(1) whatever the offset. `limit` caps the number returned, so that a FUSE readdir
        of a huge directory costs what its reply buffer holds, not the rest of the directory.
        "." and ".." are not included. NotADirectoryError (errno ENOTDIR) for a non-directory.
        """
        directory = self.node(dir_inode)
        children = directory.children
        if children is None:
            raise NotADirectoryError(errno.ENOTDIR, f"inode {dir_inode} is not a directory")
        if start < 0:
            raise ValueError(f"negative directory offset {start}")
        names = self._listings.get(dir_inode)
        if names is None:
            names = self._listings[dir_inode] = list(children)
        stop = len(names) if limit is None else min(len(names), start + max(limit, 0))
        return [(names[i], children[names[i]], i + 1) for i in range(start, stop)]

    def lookup_path(self, path: str) -> Node | None:
        """The node at a path ("/usr/bin/env", "usr/bin/env", "" for the root), no symlinks
        followed; None if there is none."""
        node = self.root
        cleaned = clean_name(path)
        if not cleaned:
            return node
        for part in cleaned.split("/"):
            if node.children is None:
                return None
            node = node.children.get(_name_bytes(part))
            if node is None:
                return None
        return node

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """Every name in the tree with its node, depth first in readdir order, the root as b"".

        A hardlinked file appears once per name. Iterative: depth is bounded only by the TOC.
        """
        stack: list[tuple[bytes, Node]] = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                prefix = path + b"/" if path else b""
                stack.extend((prefix + name, child)
                             for name, child in reversed(node.children.items()))


def build_tree(layers: Sequence[Sequence[ResolvedEntry]]) -> Tree:
    """Merge layers, lowest first, each as `toc.resolve()` returns it for that layer."""
    # The build makes no reference cycles (children are held by dicts, parents by number), but
    # the cyclic GC would traverse the growing tree again and again as allocations pile up:
    # pausing it halves the build time of a 100,000-entry image.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        builder = _Builder()
        for layer_index, entries in enumerate(layers):
            builder.add_layer(layer_index, entries)
        return builder.finish()
    finally:
        if gc_was_enabled:
            gc.enable()


def _name_bytes(name: str) -> bytes:
    """A TOC name (str from JSON) as the bytes the kernel sees.

    Tar names that are not UTF-8 arrive as lone surrogates (Python's tarfile decodes with
    surrogateescape); other lone surrogates can only come from a hand-written TOC.
    """
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")


class _Builder:
    """The mutable tree while layers are applied; `finish()` freezes it into a `Tree`."""

    def __init__(self) -> None:
        # Indexed by inode number (see Tree): None for 0 and for removed nodes.
        self.nodes: list[Node | None] = [None]
        self.warnings: list[str] = []
        self.warning_count = 0
        # Many nodes share a mode, owner or size; JSON parsing makes a new int object for each
        # (only -5..256 are shared by CPython). One object per distinct value saves ~28 bytes a
        # field a node. Modification times are shared through the parse cache `_modtimes`.
        self._ints: dict[int, int] = {}
        self._modtimes: dict[str, int] = {}
        # The last parent directory looked up by path: TOC entries come grouped by directory.
        # Forgotten whenever a directory is removed (`_unlink`): a directory is never
        # re-attached elsewhere (directories cannot be hardlinked), so while no directory has
        # been removed the remembered one is still live and still at the same path.
        self._last_dir_path: str | None = None
        self._last_dir: Node | None = None
        self.root = self._new_node(IMPLICIT_DIR_MODE, 0, 0, DIR_SIZE, 0, layer_index=-1,
                                   children={}, parent=None)

    # --- layers ---------------------------------------------------------------------------------

    def add_layer(self, layer_index: int, entries: Sequence[ResolvedEntry]) -> None:
        # Whiteouts first, against the lower layers only; then the layer's own entries in order.
        # See the module docstring for why.
        whiteouts: list[ResolvedEntry] = []
        others: list[ResolvedEntry] = []
        for item in entries:
            path = item.path
            if path in BOOKKEEPING_NAMES:  # only at the root: those names have no "/"
                continue
            parent_path, _, base = path.rpartition("/")
            if parent_path and (parent_path.startswith(WHITEOUT_PREFIX)
                                or "/" + WHITEOUT_PREFIX in parent_path):
                self._warn(layer_index, path, "is under a whiteout name; skipped")
            elif base.startswith(WHITEOUT_PREFIX):
                whiteouts.append(item)
            else:
                others.append(item)
        for item in whiteouts:
            self._apply_whiteout(item.path)
        add_entry = self._add_entry
        for item in others:
            add_entry(layer_index, item)

    def _apply_whiteout(self, path: str) -> None:
        parent_path, _, base = path.rpartition("/")
        directory = self._find_dir(parent_path)
        if directory is None:  # nothing below to hide
            return
        assert directory.children is not None
        if base == OPAQUE_MARKER:
            for name in list(directory.children):
                self._unlink(directory, name)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # aufs bookkeeping, no meaning in an OCI layer
        name = _name_bytes(base[len(WHITEOUT_PREFIX):])
        if name in directory.children:
            self._unlink(directory, name)

    def _add_entry(self, layer_index: int, item: ResolvedEntry) -> None:
        # Runs once per entry of the image: the common case (a new name in the directory of
        # the previous entry) is written out here rather than in small methods.
        entry = item.entry
        path = item.path
        entry_type = entry.type
        if not path:
            if entry_type == "dir":
                self._set_dir_attributes(self.root, entry, layer_index)
            else:
                self._warn(layer_index, path, f"the root as a {entry_type!r} entry; skipped")
            return
        target = None
        if entry_type == "hardlink":
            target = self._hardlink_target(layer_index, item)
            if target is None:
                return
        parent_path, _, base = path.rpartition("/")
        if parent_path == self._last_dir_path:
            parent = self._last_dir
        else:
            parent = self._make_dirs(layer_index, parent_path)
        children = parent.children
        assert children is not None
        try:
            name = base.encode()  # UTF-8; the same bytes as _name_bytes for any valid str
        except UnicodeEncodeError:
            name = _name_bytes(base)
        existing = children.get(name)
        if existing is not None:
            if entry_type == "dir" and existing.children is not None:
                self._set_dir_attributes(existing, entry, layer_index)  # children merge
                return
            if target is not None and existing is target:
                return  # already this node under this name
            self._unlink(parent, name)
        if target is not None:
            self._attach(parent, name, target)
            return
        node = self._node_from_entry(layer_index, item, parent)
        children[name] = node
        if node.children is not None:
            parent.nlink += 1
        else:
            node.nlink = 1

    def _hardlink_target(self, layer_index: int, item: ResolvedEntry) -> Node | None:
        target_path = clean_name(item.entry.link_name)
        if target_path == item.path:
            self._warn(layer_index, item.path, "is a hardlink to itself; skipped")
            return None
        target = self._find(target_path)
        if target is None:
            self._warn(layer_index, item.path,
                       f"hardlink target {target_path!r} does not exist; skipped")
            return None
        if target.children is not None:
            self._warn(layer_index, item.path,
                       f"hardlink target {target_path!r} is a directory; skipped")
            return None
        return target

    # --- nodes ----------------------------------------------------------------------------------

    def _node_from_entry(self, layer_index: int, item: ResolvedEntry, parent: Node) -> Node:
        """A new node for the entry, in the inode table but not attached to any name yet."""
        entry = item.entry
        entry_type = entry.type
        intern = self._ints.setdefault
        mode = _TYPE_BITS[entry_type] | (entry.mode & 0o7777)
        rdev = 0
        link_target = b""
        chunks: Sequence[Chunk] = NO_CHUNKS
        children: dict[bytes, Node] | None = None
        if entry_type == "reg":
            size = intern(entry.size, entry.size)
            if item.chunks:
                chunks = tuple(item.chunks)
        elif entry_type == "dir":
            size = DIR_SIZE
            children = {}
        elif entry_type == "symlink":
            link_target = _name_bytes(entry.link_name)
            size = len(link_target)
        else:
            size = 0
            if entry_type == "char" or entry_type == "block":
                try:
                    rdev = os.makedev(entry.dev_major, entry.dev_minor)
                except (OverflowError, ValueError):
                    self._warn(layer_index, item.path, f"device number {entry.dev_major}:"
                                                       f"{entry.dev_minor} out of range; made 0:0")
        mtime_ns = self._modtimes.get(entry.modtime)
        if mtime_ns is None:
            mtime_ns = self._mtime_ns(entry.modtime)
        nodes = self.nodes
        inode = len(nodes)
        # Positional, in field order. nlink: see _attach.
        node = Node(inode, intern(mode, mode), intern(entry.uid, entry.uid),
                    intern(entry.gid, entry.gid), size, mtime_ns, rdev,
                    2 if children is not None else 0, link_target,
                    _xattrs(entry) if entry.xattrs else NO_XATTRS, layer_index, chunks,
                    children, parent.inode)
        nodes.append(node)
        return node

    def _new_node(self, mode: int, uid: int, gid: int, size: int, mtime_ns: int, *,
                  layer_index: int, children: dict[bytes, Node] | None, parent: Node | None,
                  rdev: int = 0, link_target: bytes = b"",
                  chunks: Sequence[Chunk] = NO_CHUNKS) -> Node:
        inode = len(self.nodes)
        intern = self._ints.setdefault
        # Positional, in field order.
        node = Node(inode, intern(mode, mode), intern(uid, uid), intern(gid, gid), size,
                    mtime_ns, rdev,
                    2 if children is not None else 0,  # a non-directory's names: see _attach
                    link_target, NO_XATTRS, layer_index, chunks, children,
                    inode if parent is None else parent.inode)
        self.nodes.append(node)
        return node

    def _mtime_ns(self, modtime: str) -> int:
        mtime_ns = self._modtimes.get(modtime)
        if mtime_ns is None:  # images have few distinct mtimes; parsing one costs a datetime
            mtime_ns = self._modtimes[modtime] = parse_modtime(modtime) * 1_000_000_000
        return mtime_ns

    def _set_dir_attributes(self, node: Node, entry: TOCEntry, layer_index: int) -> None:
        intern = self._ints.setdefault
        mode = stat.S_IFDIR | (entry.mode & 0o7777)
        mtime_ns = self._mtime_ns(entry.modtime)
        node.mode = intern(mode, mode)
        node.uid = intern(entry.uid, entry.uid)
        node.gid = intern(entry.gid, entry.gid)
        node.mtime_ns = mtime_ns
        node.xattrs = _xattrs(entry)
        node.layer_index = layer_index

    # --- names ----------------------------------------------------------------------------------

    def _attach(self, parent: Node, name: bytes, node: Node) -> None:
        assert parent.children is not None and name not in parent.children
        parent.children[name] = node
        if node.children is not None:
            parent.nlink += 1
        else:
            node.nlink += 1
            # A hardlinked node may have lost its last name to an implicit directory just
            # before getting this one (a hardlink "a/b" to the file "a").
            self.nodes[node.inode] = node

    def _unlink(self, parent: Node, name: bytes) -> None:
        """Remove a name and, for a directory, its whole subtree (iteratively: no recursion
        limit for deep trees). A non-directory goes when its last name does."""
        assert parent.children is not None
        node = parent.children.pop(name)
        if node.children is None:
            self._drop_name(node)
            return
        parent.nlink -= 1
        self._last_dir_path = self._last_dir = None  # it may have been in this subtree
        stack = [node]
        while stack:
            directory = stack.pop()
            self.nodes[directory.inode] = None
            assert directory.children is not None
            for child in directory.children.values():
                if child.children is not None:
                    stack.append(child)
                else:
                    self._drop_name(child)

    def _drop_name(self, node: Node) -> None:
        node.nlink -= 1
        if node.nlink == 0:
            self.nodes[node.inode] = None

    # --- paths ----------------------------------------------------------------------------------

    def _find(self, path: str) -> Node | None:
        """The node at a cleaned path, or None; never creates anything."""
        parent_path, _, base = path.rpartition("/")
        if not path:
            return self.root
        directory = self._find_dir(parent_path)
        if directory is None:
            return None
        assert directory.children is not None
        return directory.children.get(_name_bytes(base))

    def _find_dir(self, path: str) -> Node | None:
        if path == self._last_dir_path:
            return self._last_dir
        node = self.root
        if path:
            for part in path.split("/"):
                assert node.children is not None
                child = node.children.get(_name_bytes(part))
                if child is None or child.children is None:
                    return None
                node = child
        self._remember_dir(path, node)
        return node

    def _make_dirs(self, layer_index: int, path: str) -> Node:
        """The directory at a cleaned path, made (implicitly) where missing. A non-directory
        in the way is replaced by a directory, as a layer on top of it would show in overlayfs."""
        if path == self._last_dir_path:
            assert self._last_dir is not None
            return self._last_dir
        node = self.root
        if path:
            done = 0
            for part in path.split("/"):
                assert node.children is not None
                name = _name_bytes(part)
                child = node.children.get(name)
                done += len(part) + 1
                if child is None or child.children is None:
                    if child is not None and child.layer_index == layer_index and \
                            stat.S_ISLNK(child.mode):
                        # The classic tar escape ("x" -> "/etc", then "x/passwd"): tools that
                        # extract write through the link, this tree would not. No builder
                        # writes it; a layer that does is refused, not guessed at.
                        raise FormatError(f"layer {layer_index}: {path!r} lies under "
                                          f"{path[:done - 1]!r}, a symlink of the same layer")
                    if child is not None:
                        self._warn(layer_index, path[:done - 1],
                                   "is not a directory but has entries under it; "
                                   "replaced by a directory")
                        self._unlink(node, name)
                    child = self._new_node(IMPLICIT_DIR_MODE, 0, 0, DIR_SIZE, 0,
                                           layer_index=layer_index, children={}, parent=node)
                    self._attach(node, name, child)
                node = child
        self._remember_dir(path, node)
        return node

    def _remember_dir(self, path: str, node: Node) -> None:
        self._last_dir_path = path
        self._last_dir = node

    # --- end ------------------------------------------------------------------------------------

    def _warn(self, layer_index: int, path: str, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"layer {layer_index}: {path!r} {message}")

    def finish(self) -> Tree:
        for node in self.nodes:
            if node is not None:
                children = node.children
                if children is not None and len(children) > 1:
                    node.children = dict(sorted(children.items()))
        return Tree(self.root, self.nodes, self.warnings, self.warning_count)


def _xattrs(entry: TOCEntry) -> Mapping[bytes, bytes]:
    if not entry.xattrs:
        return NO_XATTRS
    return MappingProxyType({_name_bytes(k): bytes(v) for k, v in entry.xattrs.items()})
