"""The ceiling of the FUSE stack lazyfs is built on: pyfuse3 + trio serving files from memory.

    python bench/fuse_ceiling.py [--workdir DIR] [--time-limit 10] [--runs 2] [--json PATH]

Needs root (drop_caches, mounts), /dev/fuse and fusermount3.

bench/read.py compares lazyfs with the local disk. This script asks how much of the gap any
daemon on the same stack must keep: it mounts a minimal pyfuse3 filesystem (the same library,
event loop, mount options, keep_cache, 1 MiB kernel readahead and busy poll as lazyfs) whose
files are bytes objects in memory, so that a read costs the FUSE round trip, the copy of the
reply and nothing else: no cache file, no digest check, no decompression. It then runs
bench/read.py's workloads on it (`seq`, `small`, `random`: the same files, the same reading
code, the page cache dropped before each pass) and, next to them, on the local disk: the
figure bench/read.py's "warm within 1.5x of local disk" goals are measured against.

The image is bench/read.py's: pass the same --workdir to reuse the one it built (else it is
built here the same way, with bench/read.py's default sizes).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyfuse3  # noqa: E402
import trio  # noqa: E402

from bench import read as readbench  # noqa: E402
from bench.benchlib import check_system, drop_caches  # noqa: E402
from lazyfs import linux  # noqa: E402
from lazyfs.awake import Activity  # noqa: E402
from lazyfs.mount import MountOptions  # noqa: E402

KERNEL_READAHEAD_BYTES = MountOptions().kernel_readahead_bytes  # what lazyfs sets
CACHE_TIMEOUT_S = 3600.0


class MemoryFS(pyfuse3.Operations):
    """A read-only tree whose files are bytes in memory; inode numbers given in walk order."""

    def __init__(self, root: Path):
        super().__init__()
        # lazyfs keeps its loop polling for 2 ms after each request (lazyfs/awake.py): so does
        # this ceiling, or lazyfs would beat it at small reads.
        self.activity = Activity()
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.children: dict[int, dict[bytes, int]] = {}
        self.data: dict[int, bytes] = {}
        self._add(pyfuse3.ROOT_INODE, root)

    def _add(self, inode: int, path: Path) -> None:
        st = path.lstat()
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino, attrs.st_mode, attrs.st_nlink = inode, st.st_mode, 1
        attrs.st_size, attrs.st_blksize = st.st_size, 4096
        attrs.st_blocks = (st.st_size + 511) // 512
        attrs.st_mtime_ns = attrs.st_ctime_ns = attrs.st_atime_ns = st.st_mtime_ns
        attrs.entry_timeout = attrs.attr_timeout = CACHE_TIMEOUT_S
        self.attrs[inode] = attrs
        if stat.S_ISDIR(st.st_mode):
            self.children[inode] = {}
            for child in sorted(path.iterdir()):
                child_inode = len(self.attrs) + 2
                self.children[inode][os.fsencode(child.name)] = child_inode
                self._add(child_inode, child)
        else:
            self.data[inode] = path.read_bytes()

    async def lookup(self, parent_inode, name, ctx=None):
        self.activity.touch()
        inode = self.children.get(parent_inode, {}).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[inode]

    async def getattr(self, inode, ctx=None):
        self.activity.touch()
        return self.attrs[inode]

    async def opendir(self, inode, ctx):
        self.activity.touch()
        return inode

    async def readdir(self, fh, start_id, token):
        self.activity.touch()
        entries = list(self.children[fh].items())
        for index, (name, inode) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self.attrs[inode], index + 1):
                return

    async def open(self, inode, flags, ctx):
        self.activity.touch()
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, offset, size):
        self.activity.touch()
        return self.data[fh][offset:offset + size]


class Mounted:
    """MemoryFS mounted at a temp dir by a process of its own (as lazyfs's daemon is: in this
    process its loop would share the interpreter lock with the reading code)."""

    def __init__(self, root: Path):
        self.root = root
        self.mountpoint = Path(tempfile.mkdtemp(prefix="lazyfs-ceiling-"))
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Path:
        self._proc = subprocess.Popen([sys.executable, __file__, "_serve", str(self.root),
                                       str(self.mountpoint)], stdout=subprocess.PIPE)
        if self._proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the ceiling filesystem did not mount")
        return self.mountpoint

    def __exit__(self, *exc) -> None:
        self._proc.send_signal(signal.SIGTERM)
        self._proc.wait(10)
        os.rmdir(self.mountpoint)


def serve(root: Path, mountpoint: str) -> None:
    """The daemon: mount, report "ready" once the mount answers, serve until SIGTERM."""
    fs = MemoryFS(root)
    pyfuse3.init(fs, mountpoint, ["fsname=ceiling", "ro", "default_permissions"])

    def when_serving() -> None:
        linux.set_readahead(os.stat(mountpoint).st_dev, KERNEL_READAHEAD_BYTES)
        print("ready", flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.activity.keep_loop_awake)
            nursery.start_soon(stop_on_sigterm)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def stop_on_sigterm() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    threading.Thread(target=when_serving, daemon=True).start()  # stat waits for FUSE INIT
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)


def measure(local: Path, info: dict, plan, args) -> dict:
    results: dict = {}
    with Mounted(local) as mountpoint:
        for workload in readbench.WORKLOADS:
            for state, root in (("local cold", local), ("pyfuse3 memory", mountpoint)):
                best = None
                for _ in range(args.runs):
                    drop_caches()
                    result = readbench.run_workload(workload, root, info, plan, args)
                    if best is None or result["mb_per_s"] > best["mb_per_s"]:
                        best = result
                results.setdefault(workload, {})[state] = best
    return results


def report(results: dict) -> dict:
    print(f"{'workload':8s} {'state':16s} {'MB/s':>9s} {'ops/s':>9s}  verified")
    ceilings = {}
    for workload, states in results.items():
        for state, r in states.items():
            print(f"{workload:8s} {state:16s} {r['mb_per_s']:9.1f} {r['ops_per_s']:9,.0f}  "
                  f"{'ok' if r['verified'] else 'WRONG'}")
        local, ceiling = states["local cold"]["mb_per_s"], states["pyfuse3 memory"]["mb_per_s"]
        goal = local / readbench.WARM_FACTOR
        ceilings[workload] = {"local_cold": local, "ceiling": ceiling, "warm_goal": goal}
    print("\nthe warm goals of bench/read.py against this stack's ceiling:")
    for workload, c in ceilings.items():
        verdict = "within reach" if c["ceiling"] >= c["warm_goal"] else "above the ceiling"
        print(f"  {workload:7s} goal >= {c['warm_goal']:.1f} MB/s; pyfuse3 from memory "
              f"{c['ceiling']:.1f} MB/s (x{c['ceiling'] / c['warm_goal']:.2f} of the goal): "
              f"{verdict}")
    return ceilings


def main() -> None:
    if sys.argv[1:2] == ["_serve"]:
        return serve(Path(sys.argv[2]), sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, help="bench/read.py's --workdir, to reuse its image")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=2, help="runs of each pass; best kept")
    ap.add_argument("--json", type=Path, metavar="PATH")
    args = ap.parse_args()
    check_system()
    defaults = dict(chunk_size=4 << 20, big_files=4, big_mib=64, small_files=2000,
                    random_count=20000, block_size=1 << 20)
    for name, value in defaults.items():
        setattr(args, name, value)
    work = (args.workdir.resolve() if args.workdir
            else Path(tempfile.mkdtemp(prefix="lazyfs-ceiling-")))
    info = readbench.prepare(work, args)
    plan = readbench.random_plan(info, args)
    info["expected"] = readbench.expected_checksums(work / "local", info, plan)
    started = time.perf_counter()
    results = measure(work / "local", info, plan, args)
    ceilings = report(results)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ceilings": ceilings},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
