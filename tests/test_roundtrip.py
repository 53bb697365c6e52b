"""Convert, extract with GNU tar, compare every attribute: on real data and on generated trees."""

from __future__ import annotations

import subprocess
import sysconfig
import tarfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converter.layer import LayerOptions, convert_layer
from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.verify import LayerCheck, verify_layer
from tests.tarbuild import (ESTARGZ_EXTRAS, blockdev, chardev, dir_, extract, fifo, file_, hardlink,
                            symlink, tar_of, tree_of)


def test_python_standard_library_round_trip(tmp_path, layer_format):
    """A real tree: a good slice of the CPython stdlib as GNU tar archives it (with xattrs)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    src = tmp_path / "stdlib.tar"
    subprocess.run(["tar", "-cf", str(src), "--xattrs", "--exclude=__pycache__", "--exclude=site-packages",
                    "--exclude=test", "-C", stdlib, "."], check=True)
    out = tmp_path / "stdlib.blob"
    result = convert_layer(str(src), str(out), LayerOptions(chunk_size=256 * 1024, format=layer_format))
    assert tree_of(extract(out, tmp_path / "b", compression=layer_format), ESTARGZ_EXTRAS) == \
        tree_of(extract(src, tmp_path / "a"))
    report = verify_layer(str(out), LayerCheck(toc_digest=result.toc_digest, diff_id=result.diff_id,
                                               blob_digest=result.blob_digest,
                                               uncompressed_size=result.uncompressed_size))
    with tarfile.open(src) as tar:
        assert report.entries == len(tar.getmembers()) + 1  # + the landmark
    # Reading every file chunk by chunk through the TOC gives the file's bytes.
    with LocalBlob(str(out)) as blob, tarfile.open(src) as tar:
        layer = SeekableLayer.open(blob)
        for item in layer.entries:
            if item.entry.type == "reg" and item.entry.size and not item.path.startswith("."):
                data = b"".join(layer.read_chunk(c) for c in item.chunks)
                assert data == tar.extractfile("./" + item.path).read()


# Generated trees: names from a small alphabet so that collisions (duplicates, a name that is
# both a file and a directory in the tree) come up often.
segment = st.text(alphabet="abc.-_\u00e9", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
paths = st.lists(segment, min_size=1, max_size=3).map("/".join)
owners = st.sampled_from([(0, 0, "root", "root"), (1000, 1000, "alice", "alice"), (33, 33, "", "")])
modes = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2711, 0o1777, 0o400])


@st.composite
def trees(draw):
    members, files, seen, leaves = [], [], set(), set()
    for path in draw(st.lists(paths, min_size=1, max_size=14, unique=True)):
        parts = path.split("/")
        if any("/".join(parts[:i]) in leaves for i in range(1, len(parts))):
            continue  # a file, link or device cannot also be a parent directory
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                members.append(dir_(parent + "/", mode=draw(st.sampled_from([0o755, 0o700, 0o1777]))))
        if path in seen:
            continue
        seen.add(path)
        leaves.add(path)
        uid, gid, uname, gname = draw(owners)
        common = dict(uid=uid, gid=gid, uname=uname, gname=gname, mtime=draw(st.integers(1, 2**33)))
        kind = draw(st.sampled_from(["file", "file", "file", "empty", "symlink", "hardlink", "char", "block", "fifo"]))
        if kind == "hardlink" and files:
            members.append(hardlink(path, draw(st.sampled_from(files)), **common))
            continue
        if kind in ("file", "hardlink"):
            size = draw(st.sampled_from([1, 100, 4095, 4096, 4097, 3 * 4096 + 5, 20000]))
            data = draw(st.binary(min_size=size, max_size=size)) if size < 200 else bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            xattrs = draw(st.dictionaries(st.sampled_from(["user.a", "user.b", "trusted.c"]), st.binary(min_size=1, max_size=8), max_size=2))
            members.append(file_(path, data, mode=draw(modes), xattrs=xattrs, **common))
            files.append(path)
        elif kind == "empty":
            members.append(file_(path, b"", mode=draw(modes), **common))
            files.append(path)
        elif kind == "symlink":
            members.append(symlink(path, draw(st.sampled_from(["target", "../x", "/abs/y"])), **common))
        elif kind in ("char", "block"):
            make = chardev if kind == "char" else blockdev
            members.append(make(path, draw(st.integers(0, 255)), draw(st.integers(0, 255)), **common))
        else:
            members.append(fifo(path, **common))
    return members


@given(members=trees(), chunk_size=st.sampled_from([4096, 10000, 1 << 20]),
       prioritize_first=st.booleans())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_generated_trees_round_trip(tmp_path_factory, layer_format, members, chunk_size, prioritize_first):
    tmp_path = tmp_path_factory.mktemp("tree")
    src = tar_of(tmp_path, *members)
    listed = (members[-1][0].name,) if prioritize_first else ()
    out = tmp_path / "out.blob"
    result = convert_layer(str(src), str(out), LayerOptions(chunk_size=chunk_size, prioritized_files=listed,
                                                            format=layer_format))
    assert tree_of(extract(out, tmp_path / "b", compression=layer_format), ESTARGZ_EXTRAS) == \
        tree_of(extract(src, tmp_path / "a"))
    verify_layer(str(out), LayerCheck(toc_digest=result.toc_digest, diff_id=result.diff_id,
                                      blob_digest=result.blob_digest))
