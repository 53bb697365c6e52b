"""`lazyfs record`: the files a workload reads, in first-read order, for `convert --prioritize`.

Unit tests drive the AccessRecorder (and the FUSE handlers that feed it) as the kernel would:
lookups and readdirplus entries name inodes, reads record them. End-to-end tests record real
programs from a busybox image (Debian's static binary, applets as symlinks to it), with both
runtimes, then convert the image with the list and check the new layer order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.cli import _build_parser, _read_prioritized, _record_command
from lazyfs.format import oci, workload
from lazyfs.format.toc import clean_name
from lazyfs.oci_layout import open_image
from lazyfs.record import DEFAULT_LIMIT, AccessRecorder, RecordTarget, list_line
from lazyfs.tree import ROOT_INODE
from tests import tarbuild
from tests.imagebuild import write_layout
from tests.mounting import lazyfs_cmd, require_fuse
from tests.test_tree import build, dir_, file_, hardlink, layer, symlink


# --- list lines ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["etc/a", "#hash", "a/#b", " lead", "trail ", "d/ ", "d/ x ",
                                  "\u00e9t\u00e9/caf\u00e9", "tab\tinside", "x\x1cy"])
def test_a_line_reads_back_as_the_same_path(name, tmp_path):
    line = list_line(name.encode())
    assert line is not None and "\n" not in line
    listed = tmp_path / "list"
    listed.write_text(f"{line}\n", encoding="utf-8")
    (read_back,) = _read_prioritized(str(listed)).paths  # what convert --prioritize reads
    assert clean_name(read_back) == name
    if name == "etc/a":
        assert line == "etc/a"  # plain names are written as they are


@pytest.mark.parametrize("name", [b"new\nline", b"carriage\rreturn", b"latin1-\xe9"])
def test_names_no_line_can_hold(name):
    assert list_line(name) is None


# --- the recorder, as the kernel drives it -------------------------------------------------------

@pytest.fixture
def tree():
    return build(layer(dir_("bin"), file_("bin/busybox", 10), symlink("bin/sh", "busybox"),
                       dir_("etc"), file_("etc/a", 3), file_("etc/b", 3), file_("etc/empty"),
                       hardlink("etc/hl", "etc/a"), dir_("lib"), dir_("lib/deep"),
                       file_("lib/deep/x", 5), file_("lib/deep/y", 5)))


class Kernel:
    """Lookups component by component from the root, as a path walk does; reads by inode."""

    def __init__(self, tree, recorder):
        self.tree, self.recorder = tree, recorder

    def walk(self, path: str):
        node = self.tree.root
        for part in path.split("/"):
            child = self.tree.lookup(node.inode, part.encode())
            self.recorder.looked_up(node.inode, part.encode(), child)
            node = child
        return node

    def list(self, path: str):
        directory = self.walk(path) if path else self.tree.root
        for name, child, _ in self.tree.children_from(directory.inode, 0):
            self.recorder.listed(directory.inode, name, child)

    def cat(self, path: str):
        self.recorder.read(self.walk(path))


def recorder_for(tree, **kwargs):
    lines: list[str] = []
    recorder = AccessRecorder(tree, lambda data: lines.append(data.decode()), **kwargs)
    return recorder, lines


def test_first_reads_in_order_each_file_once(tree):
    recorder, lines = recorder_for(tree)
    kernel = Kernel(tree, recorder)
    for path in ("bin/busybox", "etc/b", "bin/busybox", "etc/a", "etc/b", "lib/deep/x"):
        kernel.cat(path)
    assert lines == ["bin/busybox\n", "etc/b\n", "etc/a\n", "lib/deep/x\n"]
    assert recorder.stats() == {"file": "", "recorded": 4, "limit": DEFAULT_LIMIT,
                                "limit_reached": False, "skipped": 0, "error": ""}


def test_only_regular_files_that_are_read(tree):
    recorder, lines = recorder_for(tree)
    kernel = Kernel(tree, recorder)
    kernel.walk("etc/a")               # stat: a lookup only
    kernel.list("etc")                 # ls
    recorder.read(kernel.walk("etc"))  # a directory
    recorder.read(kernel.walk("bin/sh"))  # a symlink: the kernel reads its target instead
    assert lines == []
    kernel.cat("etc/empty")
    assert lines == ["etc/empty\n"]


def test_a_hardlink_is_recorded_by_the_name_used_and_once(tree):
    recorder, lines = recorder_for(tree)
    kernel = Kernel(tree, recorder)
    kernel.walk("etc/a")       # stat under one name...
    kernel.cat("etc/hl")       # ...read under the other: the name looked up last is the one
    kernel.cat("etc/a")        # the same inode: already recorded
    assert lines == ["etc/hl\n"]
    # A later readdir does not rename a looked-up inode.
    recorder2, lines2 = recorder_for(tree)
    kernel2 = Kernel(tree, recorder2)
    kernel2.walk("etc/hl")
    kernel2.list("etc")        # lists "a" (the same inode) first
    recorder2.read(tree.lookup_path("etc/a"))
    assert lines2 == ["etc/hl\n"]


def test_names_learned_from_readdirplus(tree, monkeypatch):
    # After a readdirplus the kernel opens a listed name with no lookup: the listing named it.
    recorder, lines = recorder_for(tree)
    monkeypatch.setattr(recorder, "_name_from_tree", lambda inode: None)  # no fallback
    kernel = Kernel(tree, recorder)
    kernel.list("lib/deep")
    recorder.read(tree.lookup_path("lib/deep/y"))
    assert lines == ["lib/deep/y\n"]


def test_an_inode_the_kernel_never_named_is_found_in_the_tree(tree):
    recorder, lines = recorder_for(tree)
    recorder.read(tree.lookup_path("lib/deep/x"))
    assert lines == ["lib/deep/x\n"]


def test_the_limit_stops_the_recording_and_frees_its_names(tree):
    recorder, lines = recorder_for(tree, limit=2)
    kernel = Kernel(tree, recorder)
    for path in ("etc/a", "etc/b", "bin/busybox", "lib/deep/x"):
        kernel.cat(path)
    assert lines == ["etc/a\n", "etc/b\n"]
    assert recorder.stats()["limit_reached"] and recorder.stats()["recorded"] == 2
    assert recorder._names == {} and not recorder.active
    kernel.walk("lib/deep/y")  # nothing is tracked any more
    assert recorder._names == {}


def test_names_are_tracked_only_for_directories_and_unrecorded_files(tree):
    recorder, _ = recorder_for(tree)
    kernel = Kernel(tree, recorder)
    kernel.walk("bin/sh")
    kernel.cat("etc/a")
    named = {tree.node(inode) for inode in recorder._names}
    assert named == {tree.lookup_path(p) for p in ("bin", "etc")}  # not the symlink, nor etc/a


def test_a_failing_write_stops_the_recording_not_the_read(tree):
    def full(data):
        raise OSError(28, "No space left on device")

    recorder = AccessRecorder(tree, full, where="/full/list")
    Kernel(tree, recorder).cat("etc/a")  # does not raise
    assert "No space left" in recorder.stats()["error"] and not recorder.active


def test_unrepresentable_names_are_skipped_and_counted():
    tree = build(layer(file_("bad\nname", 1), file_("good", 1)))
    recorder, lines = recorder_for(tree)
    kernel = Kernel(tree, recorder)
    kernel.cat("bad\nname")
    kernel.cat("good")
    assert lines == ["good\n"] and recorder.stats()["skipped"] == 1


def test_record_target_appends_to_its_file(tree, tmp_path):
    path = tmp_path / "list.partial"
    path.write_text("")
    recorder = RecordTarget(str(path), limit=5).open(tree)
    kernel = Kernel(tree, recorder)
    kernel.cat("etc/b")
    kernel.cat("etc/a")
    recorder.close()
    assert path.read_text() == "etc/b\netc/a\n"
    assert recorder.limit == 5 and recorder.where == str(path)


# --- the FUSE handlers feed the recorder ---------------------------------------------------------

class ZeroFetcher:
    async def read(self, layer, chunks, offset, size):
        return bytes(size)

    def stats_json(self):
        return []

    def threads_busy(self):
        return False


def test_fuse_handlers_record_through_lookup_readdir_and_read(tree, monkeypatch):
    import pyfuse3

    from lazyfs.fs import LazyFS

    recorder, lines = recorder_for(tree)
    fake_layer = type("FakeLayer", (), {"blob_size": 0})()
    fs = LazyFS(tree, [fake_layer], ZeroFetcher(), description={}, recorder=recorder)
    replies = []
    monkeypatch.setattr(pyfuse3, "readdir_reply",
                        lambda token, name, attrs, next_id: replies.append(name) or True)

    async def main():
        etc = await fs.lookup(ROOT_INODE, b"etc")
        hl = await fs.lookup(etc.st_ino, b"hl")
        await fs.read(hl.st_ino, 0, 3)
        await fs.read(hl.st_ino, 1, 2)  # nothing new: no read line
        lib = await fs.lookup(ROOT_INODE, b"lib")
        deep = await fs.lookup(lib.st_ino, b"deep")
        await fs.readdir(deep.st_ino, 0, None)
        y = tree.lookup_path("lib/deep/y")
        await fs.read(y.inode, 2, 4096)  # the kernel asks for more than the file holds
        await fs.getattr(tree.lookup_path("bin/busybox").inode)  # stat only: not recorded
        return fs.stats()

    stats = trio.run(main)
    assert replies == [b"x", b"y"]
    # Each file's path at its first read, then the bytes each read asked of it (as far as
    # the file goes), once.
    assert lines == ["etc/hl\n", "#read 0 3 etc/hl\n", "lib/deep/y\n", "#read 2 3 lib/deep/y\n"]
    assert stats["recording"]["recorded"] == 2


def test_without_a_recorder_stats_have_no_recording(tree):
    from lazyfs.fs import LazyFS

    fs = LazyFS(tree, [], ZeroFetcher(), description={})
    assert "recording" not in fs.stats()


# --- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, command, output, network", [
    (["record", "-o", "L", "--network", "none", "IMG", "--", "sh", "-c", "x"],
     ["sh", "-c", "x"], "L", "none"),
    # The usage the issue gives: options after IMAGE, up to "--".
    (["record", "IMG", "--output", "L", "--network", "none", "--", "sh", "--network", "x"],
     ["sh", "--network", "x"], "L", "none"),
    (["record", "IMG", "--output", "L"], [], "L", "host"),     # the image's Entrypoint + Cmd
    (["record", "--output", "L", "IMG", "sh", "-c", "x", "--", "y"],
     ["sh", "-c", "x", "--", "y"], "L", "host"),
])
def test_record_arguments(argv, command, output, network):
    args = _build_parser().parse_args(argv)
    assert _record_command(args) == command
    assert (args.image, args.output, args.network, args.max_files) == \
        ("IMG", output, network, DEFAULT_LIMIT)


# --- end to end ----------------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "ls", "echo", "stat")
TAG = "bb"


def base_layer():
    return [tarbuild.dir_("bin/"), tarbuild.file_("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
            *(tarbuild.symlink(f"bin/{applet}", "busybox") for applet in APPLETS),
            tarbuild.dir_("etc/"), tarbuild.file_("etc/a", b"A\n"), tarbuild.file_("etc/b", b"B\n"),
            tarbuild.file_("etc/unread", b"never read\n"),
            tarbuild.dir_("data/"), tarbuild.file_("data/target", b"T\n"),
            tarbuild.hardlink("data/alias", "data/target"), tarbuild.file_("data/listed", b"L\n")]


def upper_layer():
    return [tarbuild.dir_("etc/"), tarbuild.file_("etc/c", b"C\n")]


@pytest.fixture(scope="module")
def bb_image(tmp_path_factory):
    """(source layout with gzip layers, the converted eStargz image)"""
    from converter.image import convert_image
    from converter.layer import LayerOptions

    require_fuse()
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is missing (apt-get install busybox-static)")
    root = tmp_path_factory.mktemp("record")
    source = write_layout(root / "source", [base_layer(), upper_layer()], TAG)
    converted = root / "converted"
    convert_image(f"{source}:{TAG}", str(converted), archive=False, options=LayerOptions())
    return f"{source}:{TAG}", f"{converted}:{TAG}"


@pytest.fixture(params=["chroot", "crun"])
def runtime(request):
    if request.param == "crun" and shutil.which("crun") is None:
        pytest.skip("crun is not installed (apt-get install crun): --runtime crun untested")
    return request.param


def lazyfs(*args, scratch: Path, timeout: int = 120):
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "LAZYFS_RUN_DIR": str(scratch)}
    return subprocess.run(lazyfs_cmd(*args), capture_output=True, text=True, env=env,
                          timeout=timeout)


def record(image, *command, output: Path, tmp_path: Path, options=()):
    args = ["record", image, "--output", output, "--cache-dir", tmp_path / "cache", *options]
    return lazyfs(*args, "--", *command, scratch=tmp_path / "scratch")


def listed(path: Path) -> list[str]:
    """The path lines of a list (its read lines are checked on their own)."""
    return workload.parse(path.read_text()).paths


def prefetched(layer: dict) -> list[str]:
    """The names of a layer's entries before its `.prefetch.landmark` (None: no landmark)."""
    names = [entry["name"] for entry in layer["entries"]]
    assert ".prefetch.landmark" in names, names
    return names[:names.index(".prefetch.landmark")]


def test_record_then_prioritize(bb_image, runtime, tmp_path):
    source, converted = bb_image
    output = tmp_path / "startup.list"
    result = record(converted, "/bin/sh", "-c", "cat /etc/b; cat /etc/a; ls /etc",
                    output=output, tmp_path=tmp_path, options=["--runtime", runtime])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "B\nA\na\nb\nc\nunread\n"
    # /bin/sh is a symlink: the kernel reads its target, the one binary. Files only listed
    # (etc/c, etc/unread) are not there, nor directories or the symlinks.
    assert listed(output) == ["bin/busybox", "etc/b", "etc/a"]
    # And what was read of them: the two small files whole, a part of the binary at least.
    reads = workload.parse(output.read_text()).reads
    assert reads["etc/b"] == [(0, 2)] and reads["etc/a"] == [(0, 2)] and set(reads) == {
        "bin/busybox", "etc/b", "etc/a"}
    assert reads["bin/busybox"][0][0] == 0
    assert "3 files" in result.stderr and str(output) in result.stderr
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []
    assert list((tmp_path / "scratch").iterdir()) == []                 # run's cleanup

    # The list reorders the image: those files first, in order, then the landmark.
    reordered = tmp_path / "reordered"
    result = lazyfs("convert", source, reordered, "--prioritize", output, scratch=tmp_path)
    assert result.returncode == 0, result.stderr
    result = lazyfs("inspect", "--json", f"{reordered}:{TAG}", scratch=tmp_path)
    assert result.returncode == 0, result.stderr
    lower, upper = json.loads(result.stdout)["layers"]
    assert prefetched(lower) == ["bin", "bin/busybox", "etc", "etc/b", "etc/a"]
    # Nothing of the upper layer was read: it says "do not prefetch".
    assert ".no.prefetch.landmark" in [entry["name"] for entry in upper["entries"]]
    # The lower one says which of its blob ranges hold what was read: the mount prefetches
    # those (the files small enough to be read whole: their chunks are all in).
    with open_image(f"{reordered}:{TAG}") as image:
        lower_desc, upper_desc = image.layers
        ranges = oci.parse_ranges(lower_desc.annotations[oci.ANNOTATION_PREFETCH_RANGES])
        assert oci.ANNOTATION_PREFETCH_RANGES not in (upper_desc.annotations or {})
        with LocalBlob(image.blob_path(lower_desc)) as blob:
            entries = {item.path: item for item in SeekableLayer.open(blob).entries}
    for path in ("etc/b", "etc/a"):
        [chunk] = entries[path].chunks
        assert any(start <= chunk.blob_offset and chunk.blob_end <= end for start, end in ranges)
    result = lazyfs("verify", f"{reordered}:{TAG}", scratch=tmp_path)
    assert result.returncode == 0, result.stderr


def test_names_used_hardlinks_listings_and_upper_layers(bb_image, tmp_path):
    source, converted = bb_image
    output = tmp_path / "list"
    script = ("ls /data > /dev/null; cat /data/listed; stat /data/target > /dev/null; "
              "cat /data/alias; cat /data/target; cat /etc/c")
    result = record(converted, "/bin/sh", "-c", script, output=output, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "L\nT\nT\nC\n"
    # data/listed was named to the kernel by the listing (readdirplus: no lookup follows);
    # data/alias is the name the file was read by, and data/target the same inode.
    assert listed(output) == ["bin/busybox", "data/listed", "data/alias", "etc/c"]

    reordered = tmp_path / "reordered"
    assert lazyfs("convert", source, reordered, "--prioritize", output,
                  scratch=tmp_path).returncode == 0
    lower, upper = json.loads(lazyfs("inspect", "--json", f"{reordered}:{TAG}",
                                     scratch=tmp_path).stdout)["layers"]
    # A hardlink brings its target (which holds the data) before it.
    assert prefetched(lower) == ["bin", "bin/busybox", "data", "data/listed", "data/target",
                                 "data/alias"]
    assert prefetched(upper) == ["etc", "etc/c"]


def test_exit_status_and_output_are_the_programs(bb_image, runtime, tmp_path):
    _, converted = bb_image
    output = tmp_path / "list"
    output.write_text("an older list\n")
    result = record(converted, "/bin/sh", "-c", "echo out; echo err >&2; cat /etc/a; exit 7",
                    output=output, tmp_path=tmp_path, options=["--runtime", runtime])
    assert result.returncode == 7
    assert result.stdout == "out\nA\n"
    assert result.stderr.startswith("err\n")
    assert result.stderr.splitlines()[-1].startswith("lazyfs record: 2 files")
    assert listed(output) == ["bin/busybox", "etc/a"]       # replaced
    if runtime == "crun":
        return  # the shell is the container's init there, which SIGKILL from inside spares
    # A program killed by a signal: 128 + N, as `run` returns.
    result = record(converted, "/bin/sh", "-c", "kill -9 $$", output=output, tmp_path=tmp_path,
                    options=["--runtime", runtime])
    assert result.returncode == 137, result.stderr
    assert listed(output) == ["bin/busybox"]


def test_the_max_files_limit(bb_image, tmp_path):
    _, converted = bb_image
    output = tmp_path / "list"
    result = record(converted, "/bin/sh", "-c", "cat /etc/a /etc/b /etc/c",
                    output=output, tmp_path=tmp_path, options=["--max-files", "2"])
    assert result.returncode == 0, result.stderr
    assert listed(output) == ["bin/busybox", "etc/a"]
    assert "limit of 2 files" in result.stderr


def test_failures_leave_no_list(bb_image, tmp_path):
    _, converted = bb_image
    output = tmp_path / "list"
    missing = record(str(tmp_path / "no-such-image"), "/bin/sh", output=output, tmp_path=tmp_path)
    assert missing.returncode == 4 and "Traceback" not in missing.stderr
    no_output = lazyfs("record", converted, "--", "/bin/true", scratch=tmp_path / "scratch")
    assert no_output.returncode == 1 and "--output" in no_output.stderr
    not_there = record(converted, "/bin/not-there", output=output, tmp_path=tmp_path)
    assert not_there.returncode != 0 and "not-there" in not_there.stderr
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []
    assert list((tmp_path / "scratch").iterdir()) == []


def test_a_list_that_is_not_utf8_or_has_a_bad_read_line_is_a_clear_error(tmp_path):
    from lazyfs.errors import FormatError

    bad = tmp_path / "latin1.list"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(FormatError, match="is not UTF-8"):
        _read_prioritized(str(bad))
    bad.write_text("etc/a\n#read 0 ten etc/a\n")
    with pytest.raises(FormatError, match="latin1.list, line 2: a read line is"):
        _read_prioritized(str(bad))
