"""The merged tree of a multi-layer image: whiteouts, opaque dirs, replacement, hardlinks, inodes.

Layers are built as TOCs of tiny entry builders and go through the real `toc.resolve()`:

    tree = build(layer(dir_("a"), file_("a/b", 3)), layer(whiteout("a/b")))
    assert shape(tree) == {"": "dir", "a": "dir"}

`shape()` describes every name of the tree in one short string, so a case is one line of input
and one line of expected output. The last test checks the same against `umoci unpack` of a real
converted image.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import stat
import subprocess
import tracemalloc

import pytest

from lazyfs.format.toc import TOC, Chunk, ResolvedEntry, TOCEntry, dump_toc, parse_toc, resolve
from lazyfs.tree import (DIR_SIZE, MAX_WARNINGS, NO_XATTRS, ROOT_INODE, Node, Tree, build_tree)

MTIME = "2023-11-14T22:13:20Z"
MTIME_NS = 1_700_000_000 * 10**9


# --- builders: each returns the TOC entries of one tar entry ------------------------------------

def dir_(name: str, mode: int = 0o755, **attrs) -> list[TOCEntry]:
    return [TOCEntry(name=name + "/", type="dir", mode=mode, modtime=MTIME, **attrs)]


def file_(name: str, size: int = 0, mode: int = 0o644, chunk_size: int = 0,
          **attrs) -> list[TOCEntry]:
    """A regular file; with `chunk_size`, cut into chunks as the converter does."""
    head = TOCEntry(name=name, type="reg", size=size, mode=mode, modtime=MTIME,
                    digest=_digest(name, size), **attrs)
    if not chunk_size or chunk_size >= size:
        head.chunk_digest = _digest(name, size, 0) if size else ""
        return [head]
    head.chunk_size = chunk_size
    head.chunk_digest = _digest(name, size, 0)
    rest = [TOCEntry(name=name, type="chunk", file_offset=offset,
                     chunk_size=min(chunk_size, size - offset), chunk_digest=_digest(name, size, offset))
            for offset in range(chunk_size, size, chunk_size)]
    rest[-1].chunk_size = 0  # the last chunk: "to the end of the file"
    return [head, *rest]


def symlink(name: str, target: str, **attrs) -> list[TOCEntry]:
    return [TOCEntry(name=name, type="symlink", link_name=target, mode=0o777, modtime=MTIME,
                     **attrs)]


def hardlink(name: str, target: str, mode: int = 0o644, **attrs) -> list[TOCEntry]:
    return [TOCEntry(name=name, type="hardlink", link_name=target, mode=mode, modtime=MTIME,
                     **attrs)]


def chardev(name: str, major: int, minor: int) -> list[TOCEntry]:
    return [TOCEntry(name=name, type="char", dev_major=major, dev_minor=minor, mode=0o666)]


def blockdev(name: str, major: int, minor: int) -> list[TOCEntry]:
    return [TOCEntry(name=name, type="block", dev_major=major, dev_minor=minor, mode=0o660)]


def fifo(name: str) -> list[TOCEntry]:
    return [TOCEntry(name=name, type="fifo", mode=0o600)]


def whiteout(path: str) -> list[TOCEntry]:
    parent, _, base = path.rpartition("/")
    return file_(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(directory: str) -> list[TOCEntry]:
    return file_(f"{directory}/.wh..wh..opq" if directory else ".wh..wh..opq")


def _digest(*parts) -> str:
    return "sha256:" + hashlib.sha256(repr(parts).encode()).hexdigest()


def layer(*builders: list[TOCEntry]) -> list[ResolvedEntry]:
    """One layer's entries as `toc.resolve()` returns them, with made-up member offsets."""
    entries = [entry for built in builders for entry in built]
    blob_offset = 0
    for entry in entries:
        if entry.type == "chunk" or (entry.type == "reg" and entry.size):
            blob_offset += 1000
            entry.blob_offset = blob_offset
    return resolve(TOC(entries), toc_blob_offset=blob_offset + 1000)


def build(*layers: list[ResolvedEntry]) -> Tree:
    return build_tree(list(layers))


# --- checks ------------------------------------------------------------------------------------

def describe(node: Node) -> str:
    kind = stat.S_IFMT(node.mode)
    if kind == stat.S_IFDIR:
        return "dir"
    if kind == stat.S_IFREG:
        return f"reg {node.size} @{node.layer_index}"  # size and the layer holding the data
    if kind == stat.S_IFLNK:
        return "-> " + node.link_target.decode()
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        letter = "c" if kind == stat.S_IFCHR else "b"
        return f"{letter} {os.major(node.rdev)}:{os.minor(node.rdev)}"
    assert kind == stat.S_IFIFO
    return "fifo"


def shape(tree: Tree) -> dict[str, str]:
    return {path.decode(): describe(node) for path, node in tree.walk()}


def check_invariants(tree: Tree) -> None:
    """nlink, parent links and the inode table agree with the names in the tree."""
    names: dict[int, int] = {}
    seen: dict[int, Node] = {}
    for path, node in tree.walk():
        assert tree.node(node.inode) is node, path
        assert seen.setdefault(node.inode, node) is node, f"two nodes share inode {node.inode}"
        names[node.inode] = names.get(node.inode, 0) + 1
        if node.children is not None:
            subdirs = sum(child.children is not None for child in node.children.values())
            assert node.nlink == 2 + subdirs, path
            assert list(node.children) == sorted(node.children), path
            for child in node.children.values():
                if child.children is not None:
                    assert child.parent == node.inode, path
    for inode, count in names.items():
        node = tree.node(inode)
        if node.children is None:
            assert node.nlink == count, f"inode {inode}: nlink {node.nlink}, {count} names"
        else:
            assert count == 1
    assert tree.entry_count == len(seen)


# --- one layer ---------------------------------------------------------------------------------

def test_a_single_layer_keeps_every_type_and_attribute():
    tree = build(layer(
        dir_("", mode=0o755),
        dir_("bin", mode=0o755, uid=0, gid=0),
        file_("bin/su", 30_000, mode=0o4755, chunk_size=10_000),
        dir_("tmp", mode=0o1777),
        file_("home/me/notes", 3, mode=0o640, uid=1000, gid=100,
              xattrs={"user.tag": b"\x00\xffv", "security.capability": b"cap"}),
        symlink("bin/sh", "busybox"),
        chardev("dev/null", 1, 3),
        blockdev("dev/sda", 8, 0),
        fifo("run/fifo"),
        file_("empty"),
    ))
    check_invariants(tree)
    assert shape(tree) == {
        "": "dir", "bin": "dir", "bin/sh": "-> busybox", "bin/su": "reg 30000 @0",
        "dev": "dir", "dev/null": "c 1:3", "dev/sda": "b 8:0", "empty": "reg 0 @0",
        "home": "dir", "home/me": "dir", "home/me/notes": "reg 3 @0",
        "run": "dir", "run/fifo": "fifo", "tmp": "dir",
    }
    su = tree.lookup_path("/bin/su")
    assert su.mode == stat.S_IFREG | 0o4755 and stat.S_IMODE(su.mode) & stat.S_ISUID
    assert su.mtime_ns == MTIME_NS and su.nlink == 1 and su.children is None
    assert [(c.file_offset, c.size) for c in su.chunks] == [(0, 10_000), (10_000, 10_000),
                                                          (20_000, 10_000)]
    assert all(isinstance(c, Chunk) and c.digest.startswith("sha256:") for c in su.chunks)
    assert [c.blob_end for c in su.chunks] == [c.blob_offset + 1000 for c in su.chunks]
    assert tree.lookup_path("tmp").mode == stat.S_IFDIR | 0o1777
    notes = tree.lookup_path("home/me/notes")
    assert (notes.uid, notes.gid, notes.mode) == (1000, 100, stat.S_IFREG | 0o640)
    assert dict(notes.xattrs) == {b"user.tag": b"\x00\xffv", b"security.capability": b"cap"}
    sh = tree.lookup_path("bin/sh")
    assert (sh.mode, sh.size, sh.link_target, sh.chunks) == (stat.S_IFLNK | 0o777, 7, b"busybox", ())
    assert tree.lookup_path("dev/null").rdev == os.makedev(1, 3)
    assert tree.lookup_path("dev/sda").mode == stat.S_IFBLK | 0o660
    assert tree.lookup_path("run/fifo").mode == stat.S_IFIFO | 0o600
    assert tree.lookup_path("empty").chunks == () and tree.lookup_path("empty").size == 0
    assert tree.root.size == DIR_SIZE and tree.root.inode == ROOT_INODE == tree.root.parent
    assert tree.lookup_path("bin").xattrs is NO_XATTRS  # one shared empty mapping
    assert tree.warnings == []


def test_symlink_size_counts_bytes_not_characters():
    tree = build(layer(symlink("l", "caf\u00e9")))
    assert tree.lookup_path("l").size == len("caf\u00e9".encode()) == 5


def test_bookkeeping_entries_are_not_part_of_the_image():
    tree = build(layer(file_(".no.prefetch.landmark", 1), file_(".prefetch.landmark", 1),
                       file_("stargz.index.json", 10), file_("a/.prefetch.landmark", 1)))
    assert shape(tree) == {"": "dir", "a": "dir", "a/.prefetch.landmark": "reg 1 @0"}


def test_missing_parents_are_implicit_until_an_entry_sets_them():
    tree = build(layer(file_("a/b/c", 1)))
    a = tree.lookup_path("a")
    assert (a.mode, a.uid, a.gid, a.mtime_ns) == (stat.S_IFDIR | 0o755, 0, 0, 0)
    later = build(layer(file_("a/b/c", 1), dir_("a", mode=0o700, uid=5, gid=6)))
    a2 = later.lookup_path("a")
    assert (a2.mode, a2.uid, a2.gid, a2.mtime_ns) == (stat.S_IFDIR | 0o700, 5, 6, MTIME_NS)
    assert a2.inode == a.inode and "a/b/c" in shape(later)  # the same directory, children kept


def test_the_root_entry_sets_the_root_attributes():
    tree = build(layer(dir_("./", mode=0o700, uid=3)))
    assert (tree.root.mode, tree.root.uid, tree.root.inode) == (stat.S_IFDIR | 0o700, 3, 1)


# --- layers merged: one line of layers, one line of expected tree ------------------------------

MERGE_CASES = {
    "whiteout of a file": (
        [layer(dir_("a"), file_("a/x", 1), file_("a/y", 2)), layer(whiteout("a/x"))],
        {"": "dir", "a": "dir", "a/y": "reg 2 @0"}),
    "whiteout of a directory removes its subtree": (
        [layer(dir_("a"), file_("a/b/c/d", 1), file_("keep", 1)), layer(whiteout("a"))],
        {"": "dir", "keep": "reg 1 @0"}),
    "whiteout of something that does not exist is a no-op": (
        [layer(file_("a", 1)), layer(whiteout("nope"), whiteout("no/such/dir"), whiteout("a/x"))],
        {"": "dir", "a": "reg 1 @0"}),
    "whiteout files never appear, even in the lowest layer": (
        [layer(whiteout("x"), opaque("d"), dir_("d"))],
        {"": "dir", "d": "dir"}),
    "a whiteout keeps the same layer's entry, before or after it": (
        [layer(file_("x", 1), file_("y", 1)),
         layer(file_("x", 2), whiteout("x"), whiteout("y"), file_("y", 2))],
        {"": "dir", "x": "reg 2 @1", "y": "reg 2 @1"}),
    "re-creation after a whiteout in a later layer": (
        [layer(file_("d/old", 1)), layer(whiteout("d")), layer(dir_("d"), file_("d/new", 3))],
        {"": "dir", "d": "dir", "d/new": "reg 3 @2"}),
    "a directory whited out and re-created in the same layer loses its lower children": (
        [layer(file_("d/old", 1)), layer(dir_("d"), file_("d/new", 3), whiteout("d"))],
        {"": "dir", "d": "dir", "d/new": "reg 3 @1"}),
    "opaque dir hides lower children, keeps the same layer's, whatever the order": (
        [layer(dir_("d"), file_("d/a", 1), file_("d/sub/x", 1), file_("e/f", 1)),
         layer(dir_("d"), file_("d/b", 2), opaque("d"), file_("d/c", 2))],
        {"": "dir", "d": "dir", "d/b": "reg 2 @1", "d/c": "reg 2 @1", "e": "dir", "e/f": "reg 1 @0"}),
    "opaque dir hides only below: a later layer's children stay": (
        [layer(file_("d/a", 1)), layer(opaque("d"), file_("d/b", 2)), layer(file_("d/c", 3))],
        {"": "dir", "d": "dir", "d/b": "reg 2 @1", "d/c": "reg 3 @2"}),
    "opaque root": (
        [layer(file_("a", 1), file_("b/c", 1)), layer(opaque(""), file_("z", 2))],
        {"": "dir", "z": "reg 2 @1"}),
    "opaque marker of a missing directory is a no-op": (
        [layer(file_("a", 1)), layer(opaque("nope"))],
        {"": "dir", "a": "reg 1 @0"}),
    "directory over directory: children merge": (
        [layer(dir_("d"), file_("d/a", 1)), layer(dir_("d", mode=0o700), file_("d/b", 2))],
        {"": "dir", "d": "dir", "d/a": "reg 1 @0", "d/b": "reg 2 @1"}),
    "directory over file": (
        [layer(file_("x", 1)), layer(dir_("x"), file_("x/y", 2))],
        {"": "dir", "x": "dir", "x/y": "reg 2 @1"}),
    "file over directory replaces the subtree": (
        [layer(file_("x/y/z", 1)), layer(file_("x", 2))],
        {"": "dir", "x": "reg 2 @1"}),
    "symlink over directory, directory over symlink": (
        [layer(file_("a/f", 1), symlink("b", "a")), layer(symlink("a", "b"), dir_("b"))],
        {"": "dir", "a": "-> b", "b": "dir"}),
    "file over file keeps the name, new data layer": (
        [layer(file_("x", 1)), layer(file_("x", 5))],
        {"": "dir", "x": "reg 5 @1"}),
    "duplicate names in one layer: the last wins": (
        [layer(file_("x", 1), file_("x", 2), dir_("y"), file_("y/a", 1), file_("y", 3))],
        {"": "dir", "x": "reg 2 @0", "y": "reg 3 @0"}),
    "duplicate directory in one layer: attributes change, children stay": (
        [layer(dir_("d"), file_("d/a", 1), dir_("d", mode=0o700))],
        {"": "dir", "d": "dir", "d/a": "reg 1 @0"}),
    "entries under a lower symlink replace it with a directory (overlayfs view)": (
        [layer(file_("usr/lib/x", 1), symlink("lib", "usr/lib")), layer(file_("lib/y", 2))],
        {"": "dir", "lib": "dir", "lib/y": "reg 2 @1", "usr": "dir", "usr/lib": "dir",
         "usr/lib/x": "reg 1 @0"}),
    "a file then an entry under it: the file becomes a directory": (
        [layer(file_("a", 1), file_("a/b", 2))],
        {"": "dir", "a": "dir", "a/b": "reg 2 @0"}),
    "aufs metadata and entries under whiteout names are not content": (
        [layer(file_("x", 1)), layer(dir_(".wh..wh.plnk"), file_(".wh..wh.plnk/123.456", 1),
                                     file_(".wh.x/y", 1), file_(".wh..wh.aufs"))],
        {"": "dir", "x": "reg 1 @0"}),
    "names are cleaned: ./, //, trailing /": (
        [layer(dir_("./a"), file_("./a//b", 1)), layer(whiteout("./a/b"))],
        {"": "dir", "a": "dir"}),
}


@pytest.mark.parametrize("layers, expected", MERGE_CASES.values(), ids=MERGE_CASES.keys())
def test_layers_merge_as_extraction_with_whiteouts(layers, expected):
    tree = build_tree(layers)
    assert shape(tree) == expected
    check_invariants(tree)


def test_directory_over_directory_takes_the_upper_attributes():
    tree = build(layer(dir_("d", mode=0o755, xattrs={"user.a": b"1"}), file_("d/a", 1)),
                 layer(dir_("d", mode=0o2750, uid=7)))
    d = tree.lookup_path("d")
    assert (d.mode, d.uid, d.xattrs, d.layer_index) == (stat.S_IFDIR | 0o2750, 7, NO_XATTRS, 1)


def test_replaced_and_whited_out_nodes_are_gone_from_the_inode_table():
    lower = layer(file_("a", 1), file_("d/b", 1))
    first = build(lower)
    gone = [first.lookup_path(p).inode for p in ("a", "d", "d/b")]
    tree = build(layer(file_("a", 1), file_("d/b", 1)), layer(file_("a", 2), whiteout("d")))
    for inode in gone:
        if inode != tree.lookup_path("a").inode:
            with pytest.raises(KeyError):
                tree.node(inode)
    assert tree.entry_count == 2  # root and the new "a"


# --- directory link counts ---------------------------------------------------------------------

def test_a_directory_replaced_within_a_layer_gets_no_more_entries():
    # When "d" is replaced by a file, a later "d/b" must not go into the removed directory
    # (the builder remembers the last directory it looked up; see _Builder._unlink).
    tree = build(layer(file_("d/a", 1), file_("d", 2), file_("d/b", 3), file_("d/c", 4)))
    assert shape(tree) == {"": "dir", "d": "dir", "d/b": "reg 3 @0", "d/c": "reg 4 @0"}
    assert tree.warning_count == 1  # the file "d" replaced by a directory
    check_invariants(tree)
    tree = build(layer(dir_("x"), file_("x/a", 1)), layer(whiteout("x"), file_("x/b", 2)))
    assert shape(tree) == {"": "dir", "x": "dir", "x/b": "reg 2 @1"}
    check_invariants(tree)


def test_directory_nlink_is_two_plus_subdirectories():
    tree = build(layer(dir_("a"), dir_("a/b"), dir_("a/c"), file_("a/f", 1), file_("a/d/e/f", 1)),
                 layer(whiteout("a/c"), symlink("a/l", "b")))
    assert tree.lookup_path("a").nlink == 2 + 2  # b and d (c whited out; files and links don't count)
    assert tree.root.nlink == 3
    assert tree.lookup_path("a/d/e").nlink == 2
    check_invariants(tree)


# --- hardlinks ---------------------------------------------------------------------------------

def test_hardlinks_share_one_node():
    tree = build(layer(file_("bin/busybox", 10, mode=0o755), hardlink("bin/sh", "bin/busybox"),
                       hardlink("bin/ls", "./bin/busybox", mode=0o600, uid=9)))
    busybox, sh, ls = (tree.lookup_path(p) for p in ("bin/busybox", "bin/sh", "bin/ls"))
    assert busybox is sh is ls and busybox.nlink == 3
    assert (busybox.mode, busybox.uid) == (stat.S_IFREG | 0o755, 0)  # the link header's are ignored
    assert tree.entry_count == 3  # root, bin, the one file
    check_invariants(tree)


def test_a_hardlink_to_a_lower_layer_file():
    tree = build(layer(file_("a", 4)), layer(hardlink("b", "a")))
    assert tree.lookup_path("a") is tree.lookup_path("b")
    assert tree.lookup_path("b").nlink == 2 and tree.lookup_path("b").layer_index == 0
    check_invariants(tree)


@pytest.mark.parametrize("lower, upper, remaining", [
    (layer(file_("a", 4), hardlink("b", "a")), layer(whiteout("a")), "b"),
    (layer(file_("a", 4), hardlink("b", "a")), layer(whiteout("b")), "a"),
    (layer(file_("a", 4), hardlink("b", "a")), layer(file_("a", 9)), "b"),  # b keeps the old file
    (layer(file_("a", 4), hardlink("b", "a")), layer(dir_("b")), "a"),
    (layer(file_("d/a", 4), hardlink("b", "d/a")), layer(opaque("d")), "b"),
], ids=["whiteout-first", "whiteout-second", "replace-first", "dir-over-second", "opaque-parent"])
def test_removing_one_name_of_a_hardlinked_file_keeps_the_other(lower, upper, remaining):
    tree = build(lower, upper)
    node = tree.lookup_path(remaining)
    assert node.size == 4 and node.nlink == 1 and node.layer_index == 0
    assert tree.node(node.inode) is node
    check_invariants(tree)


def test_a_hardlink_in_a_removed_subtree_keeps_its_outside_name():
    tree = build(layer(file_("d/f", 4), hardlink("g", "d/f")), layer(whiteout("d")))
    assert shape(tree) == {"": "dir", "g": "reg 4 @0"}
    assert tree.lookup_path("g").nlink == 1
    both = build(layer(file_("d/f", 4), hardlink("d/g", "d/f")), layer(whiteout("d")))
    assert both.entry_count == 1  # the file lost both names: gone
    check_invariants(tree)
    check_invariants(both)


def test_hardlinks_to_symlinks_and_devices_count_names_too():
    tree = build(layer(symlink("s", "t"), hardlink("s2", "s"), chardev("c", 1, 5), hardlink("c2", "c")))
    assert tree.lookup_path("s2").nlink == 2 and tree.lookup_path("s2").link_target == b"t"
    assert tree.lookup_path("c2") is tree.lookup_path("c")
    check_invariants(tree)


@pytest.mark.parametrize("entries, expected, warning", [
    ([hardlink("x", "nope")], {"": "dir"}, "target 'nope' does not exist"),
    ([hardlink("x", "x")], {"": "dir"}, "hardlink to itself"),
    ([file_("x", 1), hardlink("x", "x")], {"": "dir", "x": "reg 1 @0"}, "hardlink to itself"),
    ([dir_("d"), hardlink("x", "d")], {"": "dir", "d": "dir"}, "is a directory"),
    ([hardlink("x", "")], {"": "dir"}, "is a directory"),
    ([hardlink("b", "a"), file_("a", 1)], {"": "dir", "a": "reg 1 @0"}, "'a' does not exist"),
])
def test_bad_hardlinks_are_skipped_with_a_warning(entries, expected, warning):
    tree = build(layer(*entries))
    assert shape(tree) == expected
    assert len(tree.warnings) == 1 and warning in tree.warnings[0], tree.warnings
    check_invariants(tree)


def test_hardlink_chains_and_cycles_terminate():
    tree = build(layer(file_("a", 1), hardlink("b", "a"), hardlink("c", "b"), hardlink("a", "c"),
                       hardlink("b", "c")))
    assert tree.lookup_path("a") is tree.lookup_path("b") is tree.lookup_path("c")
    assert tree.lookup_path("a").nlink == 3
    check_invariants(tree)


def test_a_hardlink_under_its_own_target_keeps_the_file():
    # "a" is a file; the link "a/b" needs "a" to be a directory: the file loses its name "a"
    # to the implicit directory and lives on as "a/b".
    tree = build(layer(file_("a", 3), hardlink("a/b", "a")))
    assert shape(tree) == {"": "dir", "a": "dir", "a/b": "reg 3 @0"}
    check_invariants(tree)


# --- hostile input: nothing loops, crashes or grows without bound ------------------------------

def test_deep_paths_need_no_recursion():
    deep = "/".join(["d"] * 5000)
    tree = build(layer(file_(deep + "/f", 1)), layer(whiteout("d")))
    assert shape(tree) == {"": "dir"}
    tree = build(layer(file_(deep + "/f", 1)))
    assert len(list(tree.walk())) == 5002
    check_invariants(tree)


def test_warnings_are_capped():
    tree = build(layer(*[hardlink(f"x{i}", "nope") for i in range(MAX_WARNINGS + 50)]))
    assert len(tree.warnings) == MAX_WARNINGS and tree.warning_count == MAX_WARNINGS + 50


def test_device_numbers_out_of_range_are_a_warning():
    tree = build(layer(chardev("c", 2**40, 1)))
    assert tree.lookup_path("c").rdev == 0 and "out of range" in tree.warnings[0]


def test_the_root_as_a_file_is_skipped():
    tree = build(layer(file_(".", 0), file_("a", 1)))
    assert shape(tree) == {"": "dir", "a": "reg 1 @0"} and tree.warnings


# --- lookups and readdir -----------------------------------------------------------------------

def test_lookup():
    tree = build(layer(file_("a/b", 1), symlink("l", "a")))
    a = tree.lookup(ROOT_INODE, b"a")
    assert tree.lookup(a.inode, b"b") is tree.lookup_path("/a/b")
    assert tree.lookup(a.inode, b".") is a and tree.lookup(a.inode, b"..") is tree.root
    assert tree.lookup(ROOT_INODE, b"..") is tree.root
    assert tree.lookup(a.inode, b"nope") is None
    assert tree.lookup(tree.lookup_path("a/b").inode, b"x") is None  # not a directory
    assert tree.lookup_path("l/b") is None  # symlinks are not followed
    assert tree.lookup_path("a/b/c") is None
    assert tree.lookup_path("/") is tree.lookup_path("") is tree.lookup_path(".") is tree.root
    with pytest.raises(KeyError):
        tree.lookup(999, b"a")
    for inode in (999, 0, -1, -2, 10**30):
        with pytest.raises(KeyError):
            tree.node(inode)


def test_non_utf8_names_are_the_original_bytes():
    name = b"caf\xe9".decode("utf-8", "surrogateescape")  # as tarfile reads a Latin-1 name
    tree = build(layer(file_(name, 1)))
    assert list(tree.root.children) == [b"caf\xe9"]


def test_readdir_is_sorted_and_leaves_out_dot_entries():
    tree = build(layer(file_("d/b", 1), file_("d/a", 1), dir_("d/c"), file_("d/B", 1)))
    d = tree.lookup_path("d")
    assert [(name, offset) for name, _, offset in tree.children_from(d.inode, 0)] == \
        [(b"B", 1), (b"a", 2), (b"b", 3), (b"c", 4)]
    assert tree.children_from(d.inode, 4) == [] and tree.children_from(d.inode, 99) == []
    assert [n for n, _, _ in tree.children_from(d.inode, 1, limit=2)] == [b"a", b"b"]
    with pytest.raises(NotADirectoryError):
        tree.children_from(tree.lookup_path("d/a").inode, 0)


def test_readdir_resumes_from_any_offset_in_a_huge_directory():
    count = 20_000
    tree = build(layer(dir_("big"), *[file_(f"big/f{i:05d}", 1) for i in reversed(range(count))]))
    big = tree.lookup_path("big")
    everything = tree.children_from(big.inode, 0)
    assert [name for name, _, _ in everything] == [f"f{i:05d}".encode() for i in range(count)]
    assert [offset for _, _, offset in everything] == list(range(1, count + 1))
    for start in range(0, count + 1, 1000):
        rest = tree.children_from(big.inode, start)
        assert [name for name, _, _ in rest] == [name for name, _, _ in everything[start:]]
    # As a FUSE readdir does it: small batches, resuming from the last next_offset.
    seen, offset = [], 0
    while batch := tree.children_from(big.inode, offset, limit=97):
        seen += [name for name, _, _ in batch]
        offset = batch[-1][2]
    assert seen == [name for name, _, _ in everything]
    assert all(node is tree.lookup(big.inode, name) for name, node, _ in everything[::1000])


# --- stable inodes -----------------------------------------------------------------------------

def image_layers() -> list[list[ResolvedEntry]]:
    return [
        layer(dir_("bin"), file_("bin/a", 1), hardlink("bin/b", "bin/a"), file_("etc/x", 1),
              file_("gone/y", 1)),
        layer(whiteout("gone"), file_("etc/x", 2), opaque("bin"), file_("bin/c", 3), dir_("z")),
    ]


def test_the_build_leaves_the_garbage_collector_as_it_found_it():
    assert gc.isenabled()
    build_tree(image_layers())
    assert gc.isenabled()
    gc.disable()
    try:
        build_tree(image_layers())
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_inode_numbers_are_stable_across_builds():
    numbers = [{path: node.inode for path, node in build_tree(image_layers()).walk()}
               for _ in range(2)]
    assert numbers[0] == numbers[1]
    assert numbers[0][b""] == ROOT_INODE
    assert len(set(numbers[0].values())) == len(numbers[0])
    # Creation order while walking the layers: bin, bin/a (bin/b is bin/a's), etc, etc/x, ...
    assert numbers[0][b"bin"] == 2 and numbers[0][b"etc"] == 4


# --- memory ------------------------------------------------------------------------------------

def test_memory_per_entry(capsys):
    """The retained size of a 100,000-entry tree, chunk lists included, over its entry count.

    Entries like an image's: 1,000 directories of 99 files, each file one chunk with its digest,
    a few owners, the same mtime. The input (TOC entries, resolved entries) is freed first; the
    chunks stay, referenced by the tree.
    """
    def make_layer():
        builders = []
        for d in range(1000):
            builders.append(dir_(f"usr/share/d{d:04d}"))
            builders += [file_(f"usr/share/d{d:04d}/file-{f:03d}.txt", 1000 + f, uid=d % 3)
                         for f in range(99)]
        return layer(*builders)

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        layers = [make_layer()]
        tree = build_tree(layers)
        del layers
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_entry = (after - before) / tree.entry_count
    with capsys.disabled():
        print(f"\ntree memory: {tree.entry_count} entries, {after - before} bytes, "
              f"{per_entry:.0f} bytes per entry")
    assert tree.entry_count == 100_000 + 3  # root, usr, usr/share
    assert per_entry < 700


def test_the_tree_keeps_nothing_of_the_toc_entries():
    """After build_tree the caller may drop the TOC and resolved entries: no node refers to
    them (or to their chunk lists); the tree holds its own copies of what it needs."""
    layers = image_layers() + [layer(file_("x", 5, xattrs={"user.k": b"v"}), symlink("s", "x"),
                                     chardev("c", 1, 3), file_("big", 10, chunk_size=4))]
    tree = build_tree(layers)
    entry_ids = {id(item) for items in layers for item in items}
    entry_ids |= {id(item.entry) for items in layers for item in items}
    entry_ids |= {id(item.chunks) for items in layers for item in items}
    entry_ids |= {id(item.entry.xattrs) for items in layers for item in items}
    for _, node in tree.walk():
        referents = gc.get_referents(node)
        assert not any(id(r) in entry_ids for r in referents), node
        assert not any(isinstance(r, (TOCEntry, ResolvedEntry, list)) for r in referents), node
        assert isinstance(node.chunks, tuple)
        assert all(isinstance(c, Chunk) for c in node.chunks)


def test_memory_of_the_daemon_state_per_entry(capsys):
    """What a mount keeps: a 100,000-entry TOC parsed from JSON, resolved, built into a tree;
    then the entries are dropped (the tree is all a mount needs). Entries like bench/metadata.py's
    image: 1,000 directories of 100 entries (per ten: five empty files, four small files of one
    chunk, one symlink)."""
    entries = []
    offset = 0
    for d in range(1000):
        directory = f"dir{d:05d}"
        entries.append(TOCEntry(name=directory, type="dir", mode=0o755, modtime=MTIME,
                                user_name="root", group_name="root") if d == 0 else
                       TOCEntry(name=directory, type="dir", mode=0o755, modtime=MTIME))
        for f in range(100):
            name = f"{directory}/entry{f:05d}"
            if f % 10 == 9:
                entries.append(TOCEntry(name=name, type="symlink", mode=0o777, modtime=MTIME,
                                        link_name=f"entry{f - 1:05d}"))
            elif f % 10 < 5:
                entries.append(TOCEntry(name=name, type="reg", mode=0o644, modtime=MTIME,
                                        digest=_digest()))
            else:
                offset += 1000
                digest = _digest(d, f)
                entries.append(TOCEntry(name=name, type="reg", mode=0o644, modtime=MTIME,
                                        size=1 + (d * 100 + f) % 2000, blob_offset=offset,
                                        digest=digest, chunk_digest=digest))
    toc_json = dump_toc(TOC(entries))
    del entries

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        resolved = resolve(parse_toc(toc_json), offset + 1000)
        tree = build_tree([resolved])
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
        del resolved
        gc.collect()
        dropped = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    count = tree.entry_count
    with capsys.disabled():
        print(f"\ndaemon state: {count} entries: {(kept - before) / count:.0f} bytes per entry "
              f"with the resolved entries kept, {(dropped - before) / count:.0f} once dropped")
    assert count == 101_001
    assert (dropped - before) / count < 500
    assert (kept - before) / count < 1100


# --- against a real extraction -----------------------------------------------------------------

needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None,
                                 reason="umoci is not installed (apt-get install umoci)")


@needs_umoci
def test_the_tree_of_a_converted_image_matches_umoci_unpack(tmp_path):
    from converter.image import convert_image
    from converter.layer import LayerOptions
    from lazyfs.blobfile import LocalBlob, SeekableLayer
    from lazyfs.oci_layout import open_image
    from tests import tarbuild as t
    from tests.test_oci_layout import Layout, tagged

    layers = [
        t.tar_bytes(
            t.dir_("bin/"), t.file_("bin/busybox", b"x" * 70_000, mode=0o755),
            t.hardlink("bin/sh", "bin/busybox"), t.hardlink("bin/ls", "bin/busybox"),
            t.file_("bin/su", b"su", mode=0o4755), t.dir_("tmp/", mode=0o1777),
            t.dir_("dev/"), t.chardev("dev/null", 1, 3), t.blockdev("dev/sda", 8, 0),
            t.fifo("dev/fifo"), t.symlink("lib", "usr/lib"),
            t.file_("usr/lib/libc.so", b"libc", uid=1000, gid=1000),
            t.file_("etc/passwd", b"root\n", xattrs={"user.note": b"v1"}),
            t.dir_("var/"), t.file_("var/a", b"a"), t.file_("var/cache/b", b"b"),
            t.file_("gone/x", b"x"), t.file_("replaced", b"old"),
        ),
        t.tar_bytes(
            t.file_(".wh.gone"), t.file_("bin/.wh.ls"),
            t.dir_("var/", mode=0o700), t.file_("var/.wh..wh..opq"), t.file_("var/new", b"new"),
            t.file_("replaced", b"newer"), t.hardlink("usr/lib/libc.so.6", "usr/lib/libc.so"),
            t.dir_("etc/"), t.file_("etc/passwd", b"root\nme\n"),
        ),
        t.tar_bytes(t.dir_("gone/"), t.file_("gone/back", b"back"), t.file_("bin/.wh.busybox")),
    ]
    layout = Layout(tmp_path / "src")
    layout.index(tagged(layout.image(layers), "v1"))
    dst = tmp_path / "image"
    convert_image(f"{layout.root}:v1", str(dst), archive=False,
                  options=LayerOptions(chunk_size=64 * 1024, workers=1))

    with open_image(f"{dst}:v1") as image:
        resolved = []
        for desc in image.layers:
            with LocalBlob(image.blob_path(desc)) as blob:
                resolved.append(SeekableLayer.open(blob).entries)
    tree = build_tree(resolved)
    assert tree.warnings == []
    check_invariants(tree)

    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    subprocess.run(["umoci", "unpack", *rootless, "--image", f"{dst}:v1", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    rootfs = tmp_path / "bundle" / "rootfs"

    BOOKKEEPING = {b".no.prefetch.landmark", b"stargz.index.json"}

    def from_disk() -> dict[bytes, tuple]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(os.fsencode(rootfs)):
            for name in [*dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                if os.path.relpath(path, os.fsencode(rootfs)) in BOOKKEEPING:
                    continue  # extracted as the plain tar they are; not part of the image
                st = os.lstat(path)
                out[os.path.relpath(path, os.fsencode(rootfs))] = attributes(
                    st, os.readlink(path) if stat.S_ISLNK(st.st_mode) else b"",
                    {n.encode(): os.getxattr(path, n, follow_symlinks=False)
                     for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")})
        return out

    def from_tree() -> dict[bytes, tuple]:
        return {path: attributes(node, node.link_target,
                                 {k: v for k, v in node.xattrs.items() if k.startswith(b"user.")})
                for path, node in tree.walk() if path}

    def attributes(st, link_target, xattrs) -> tuple:
        is_dir = stat.S_ISDIR(st.mode if isinstance(st, Node) else st.st_mode)
        if isinstance(st, Node):
            mode, uid, gid, size, rdev, nlink, mtime = (st.mode, st.uid, st.gid, st.size, st.rdev,
                                                        st.nlink, st.mtime_ns)
        else:
            mode, uid, gid, size, rdev, nlink, mtime = (st.st_mode, st.st_uid, st.st_gid,
                                                        st.st_size, st.st_rdev, st.st_nlink,
                                                        st.st_mtime_ns)
        return (mode, uid, gid, None if is_dir else size, rdev, nlink,
                None if is_dir else mtime,  # umoci sets directory mtimes after their children
                link_target, xattrs)

    disk, ours = from_disk(), from_tree()
    assert sorted(ours) == sorted(disk)
    assert {p: a for p, a in ours.items() if disk[p] != a} == {}
    # Hardlinks: the same inode on disk is the same node here.
    same_disk = os.path.samefile(rootfs / "usr/lib/libc.so", rootfs / "usr/lib/libc.so.6")
    assert same_disk and tree.lookup_path("usr/lib/libc.so") is tree.lookup_path("usr/lib/libc.so.6")
