"""Metadata benchmark: mount time, tree walks and daemon memory for an image of ~100,000 entries.

    python bench/metadata.py [--dirs 1000] [--files-per-dir 100] [--level 9] [--runs 3]
                             [--rebuild] [--json PATH]

Needs root (drop_caches, allow_other mounts), /dev/fuse and fusermount3.

The image: one layer of --dirs directories of --files-per-dir entries each (per ten entries:
five empty files, four small files of 1-2,000 bytes, one symlink to a sibling), as a plain tar
built with tarfile, put in an OCI layout and converted once with converter.image.convert_image.
The converted image, the tree extracted with `tar -xf` (the local-disk baseline) and a tiny
image (one directory, one file: the memory baseline) are kept in
$TMPDIR/lazyfs-bench/metadata-KEY, KEY covering the options and the converter's source, so a
rerun starts measuring at once (--rebuild forces a new build).

What is measured ("drop" = `sync; echo 3 > /proc/sys/vm/drop_caches`):

    mount, empty TOC cache   time from starting `lazyfs mount --foreground` with a new, empty
                             --cache-dir until os.path.ismount(MNT) is true and os.stat(MNT)
                             succeeds: the TOC is read from the blob, parsed, verified, stored
    mount, warm TOC cache    the same, with a cache dir that already holds the TOC record
    mount, tiny image        the same for the 2-entry image (warm TOC cache): the fixed cost
    python + imports         `python -c "import pyfuse3, trio, lazyfs.mount, ..."`: part of
                             every mount time above
    find | wc -l             `find DIR | wc -l` on the mount and on the extracted tree: after a
                             drop (cold: every entry is looked up again) and then again (cached)
    os.walk + os.lstat       the same in Python: os.walk, and an os.lstat of every entry
    daemon memory            VmRSS of the daemon (/proc/PID/status) after the walks, minus the
                             VmRSS of a daemon serving the tiny image after the same walks,
                             divided by the number of entries: bytes per entry

Mount times are the median of --runs (the minimum is shown too). Other processes using the CPUs
skew every figure: their CPU use is sampled for a second before measuring and warned about. Goals (from the issue): a
mount in under 1 s once the TOC is local (the warm-TOC median) and under 1 KiB of daemon memory
per entry.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converter.image import convert_image  # noqa: E402
from converter.layer import LayerOptions  # noqa: E402
from lazyfs.format import oci  # noqa: E402
from bench.benchlib import (Mount, check_system, drop_caches, other_cpu_use,  # noqa: E402
                            sha256_file, write_one_layer_layout)

TAG = "bench"
MOUNT_GOAL_SECONDS = 1.0
MEMORY_GOAL_BYTES_PER_ENTRY = 1024
IMPORTS = "import pyfuse3, trio, lazyfs.cli, lazyfs.mount, lazyfs.image, lazyfs.layer, " \
          "lazyfs.tree, lazyfs.fs, lazyfs.fetch, lazyfs.cache"
# The build's inputs: a change to any of these makes a new cache key.
KEY_SOURCES = ("converter", "lazyfs/format", "bench/metadata.py")


# --- the images ----------------------------------------------------------------------------------

def _members(dirs: int, files_per_dir: int):
    """(TarInfo, data) of the big layer, deterministic."""
    rng = random.Random(1234)
    text = b"the quick brown fox jumps over the lazy dog 0123456789\n" * 40
    for d in range(dirs):
        directory = f"dir{d:05d}"
        yield _info(directory, tarfile.DIRTYPE, 0o755), None
        for f in range(files_per_dir):
            name = f"{directory}/entry{f:05d}"
            kind = f % 10
            if kind == 9 and f > 0:
                yield _info(name, tarfile.SYMTYPE, 0o777, linkname=f"entry{f - 1:05d}"), None
            elif kind < 5:
                yield _info(name, tarfile.REGTYPE, 0o644), b""
            else:
                size = rng.randint(1, 2000)
                start = rng.randrange(len(text) - size)
                yield _info(name, tarfile.REGTYPE, 0o644), text[start:start + size]


def _info(name: str, kind: bytes, mode: int, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, 1_700_000_000, linkname
    info.uname = info.gname = "root"
    return info


def write_tar(path: Path, members) -> int:
    count = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
            count += 1
    return count


def build_key(args) -> str:
    sha = hashlib.sha256(json.dumps([args.dirs, args.files_per_dir, args.level,
                                     args.chunk_size]).encode())
    for top in KEY_SOURCES:
        for path in sorted((REPO / top).rglob("*.py")) if (REPO / top).is_dir() else [REPO / top]:
            sha.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()[:16]


def convert(work: Path, name: str, members, args) -> tuple[int, int]:
    """Tar, layout and eStargz image `work/name`; (entries in the tar, eStargz blob bytes)."""
    tar_path = work / f"{name}.tar"
    count = write_tar(tar_path, members)
    write_one_layer_layout(work / f"{name}-source", tar_path, oci.OCI_LAYER_TAR,
                           sha256_file(tar_path), TAG)
    convert_image(f"{work / f'{name}-source'}:{TAG}", str(work / name), archive=False,
                  options=LayerOptions(chunk_size=args.chunk_size, compression_level=args.level),
                  progress=False)
    shutil.rmtree(work / f"{name}-source")
    blob_bytes = max(p.stat().st_size for p in (work / name / "blobs").rglob("*") if p.is_file())
    return count, blob_bytes


def prepare(args) -> tuple[Path, dict]:
    base = Path(tempfile.gettempdir()) / "lazyfs-bench"
    work = base / f"metadata-{build_key(args)}"
    stamp = work / "image.json"
    if stamp.exists() and not args.rebuild:
        print(f"reusing the images in {work}", file=sys.stderr)
        return work, json.loads(stamp.read_text())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    members, blob_bytes = convert(work, "image", _members(args.dirs, args.files_per_dir), args)
    converted = time.perf_counter()
    (work / "local").mkdir()
    subprocess.run(["tar", "-xf", str(work / "image.tar"), "-C", str(work / "local")], check=True)
    (work / "image.tar").unlink()
    tiny_members = [(_info("etc", tarfile.DIRTYPE, 0o755), None),
                    (_info("etc/hostname", tarfile.REGTYPE, 0o644), b"tiny\n")]
    convert(work, "tiny", tiny_members, args)
    (work / "tiny.tar").unlink()
    info = {"tar_members": members, "blob_bytes": blob_bytes,
            "build_and_convert_seconds": converted - start}
    stamp.write_text(json.dumps(info))
    print(f"built and converted {members:,} tar members in {converted - start:.1f} s "
          f"(cached in {work})", file=sys.stderr)
    return work, info


# --- system helpers ------------------------------------------------------------------------------

def vm_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


# --- walks ---------------------------------------------------------------------------------------

def find_count(root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    out = subprocess.run(f"find '{root}' | wc -l", shell=True, check=True, capture_output=True,
                         text=True).stdout
    return time.perf_counter() - start, int(out)


def walk_count(root: Path) -> tuple[float, int]:
    """os.walk plus an os.lstat of every entry; the root counts, as in find's output."""
    start = time.perf_counter()
    count = 1
    os.lstat(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return time.perf_counter() - start, count


def walks(root: Path) -> dict[str, dict]:
    """Each walk after a drop (cold), then again (cached)."""
    out = {}
    for name, walk in (("find | wc -l", find_count), ("os.walk + lstat", walk_count)):
        drop_caches()
        cold_seconds, cold_count = walk(root)
        cached_seconds, cached_count = walk(root)
        out[name] = {"cold_seconds": cold_seconds, "cached_seconds": cached_seconds,
                     "count": cold_count, "counts_agree": cold_count == cached_count}
    return out


# --- the run -------------------------------------------------------------------------------------

def time_imports(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], check=True)
        times.append(time.perf_counter() - start)
    return times


def measure(work: Path, args) -> dict:
    image, tiny = f"{work / 'image'}:{TAG}", f"{work / 'tiny'}:{TAG}"
    mnt, log = work / "mnt", work / "daemon.log"
    scratch = Path(tempfile.mkdtemp(prefix="lazyfs-bench-metadata-"))
    results: dict = {"mount_seconds": {}}
    try:
        times = results["mount_seconds"]
        times["python + imports"] = time_imports(args.runs)
        times["empty TOC cache"] = []
        for run in range(args.runs):
            with Mount(image, mnt, scratch / f"cold-{run}", log) as mount:
                times["empty TOC cache"].append(mount.seconds)
        warm_cache = scratch / "cold-0"  # holds the TOC record now
        times["warm TOC cache"] = []
        for _ in range(args.runs):
            with Mount(image, mnt, warm_cache, log) as mount:
                times["warm TOC cache"].append(mount.seconds)
        times["tiny image"] = []
        for _ in range(args.runs):
            with Mount(tiny, mnt, warm_cache, log) as mount:
                times["tiny image"].append(mount.seconds)

        with Mount(tiny, mnt, warm_cache, log) as mount:
            tiny_mounted = vm_status(mount.daemon.pid)
            walks(mnt)
            results["tiny_memory"] = {"mounted": tiny_mounted, "walked": vm_status(mount.daemon.pid)}
        with Mount(image, mnt, warm_cache, log) as mount:
            mounted = vm_status(mount.daemon.pid)
            results["lazyfs"] = walks(mnt)
            results["memory"] = {"mounted": mounted, "walked": vm_status(mount.daemon.pid)}
        results["local"] = walks(work / "local")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def report(results: dict, info: dict, args) -> dict:
    entries = results["local"]["find | wc -l"]["count"]  # the root included
    print(f"image: {args.dirs:,} dirs x {args.files_per_dir:,} entries = {entries:,} entries "
          f"with the root (half empty files, 40% small, 10% symlinks); eStargz "
          f"{info['blob_bytes'] / 1e6:.1f} MB at level {args.level}; "
          f"{len(os.sched_getaffinity(0))} cores; {args.runs} runs")
    print(f"\n{'mount time':<28}{'median s':>10}{'min s':>10}")
    for name, values in results["mount_seconds"].items():
        print(f"{name:<28}{statistics.median(values):>10.3f}{min(values):>10.3f}")

    print(f"\n{'walk':<18}{'where':<8}{'cold s':>9}{'cached s':>10}{'entries':>10}"
          f"{'cold x':>9}{'cached x':>10}")
    all_counts_ok = True
    for walk in ("find | wc -l", "os.walk + lstat"):
        local = results["local"][walk]
        for where in ("local", "lazyfs"):
            r = results[where][walk]
            ok = r["count"] == entries and r["counts_agree"]
            all_counts_ok &= ok
            ratio_cold = r["cold_seconds"] / local["cold_seconds"]
            ratio_cached = r["cached_seconds"] / local["cached_seconds"]
            print(f"{walk:<18}{where:<8}{r['cold_seconds']:>9.3f}{r['cached_seconds']:>10.3f}"
                  f"{r['count']:>10,}{ratio_cold:>8.2f}x{ratio_cached:>9.2f}x"
                  + ("" if ok else "  COUNT MISMATCH"))
    print("(x: time relative to local disk; > 1 is slower)")

    memory, tiny = results["memory"], results["tiny_memory"]
    per_entry = (memory["walked"]["VmRSS"] - tiny["walked"]["VmRSS"]) / entries
    per_entry_mounted = (memory["mounted"]["VmRSS"] - tiny["mounted"]["VmRSS"]) / entries
    print(f"\n{'daemon memory':<28}{'VmRSS MB':>10}{'VmHWM MB':>10}")
    for label, status in (("tiny image, mounted", tiny["mounted"]), ("tiny image, walked", tiny["walked"]),
                          ("image, mounted", memory["mounted"]), ("image, walked", memory["walked"])):
        print(f"{label:<28}{status['VmRSS'] / 1e6:>10.1f}{status['VmHWM'] / 1e6:>10.1f}")
    print(f"bytes per entry: {per_entry:,.0f} after the walks ({per_entry_mounted:,.0f} right "
          f"after mounting); peak (VmHWM) {(memory['walked']['VmHWM'] - tiny['walked']['VmHWM']) / entries:,.0f}")

    warm = statistics.median(results["mount_seconds"]["warm TOC cache"])
    goals = [(f"mount with the TOC local < {MOUNT_GOAL_SECONDS:g} s (median {warm:.3f} s)",
              warm < MOUNT_GOAL_SECONDS),
             (f"daemon memory < {MEMORY_GOAL_BYTES_PER_ENTRY} B per entry ({per_entry:,.0f} B)",
              per_entry < MEMORY_GOAL_BYTES_PER_ENTRY),
             ("every walk saw every entry", all_counts_ok)]
    print("\ngoals:")
    for text, ok in goals:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return {"entries": entries, "bytes_per_entry": per_entry,
            "bytes_per_entry_mounted": per_entry_mounted,
            "goals": [{"goal": t, "pass": ok} for t, ok in goals]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dirs", type=int, default=1000, help="directories (default 1000)")
    ap.add_argument("--files-per-dir", type=int, default=100, help="entries per directory (default 100)")
    ap.add_argument("--level", "--compression-level", type=int, default=9,
                    help="gzip level of the conversion (default 9)")
    ap.add_argument("--chunk-size", type=int, default=4 << 20, help="bytes (default 4194304)")
    ap.add_argument("--runs", type=int, default=3, help="mounts timed per case (default 3)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached images")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the raw numbers here")
    args = ap.parse_args()
    check_system()
    if args.dirs < 1 or args.files_per_dir < 1 or args.runs < 1:
        sys.exit("--dirs, --files-per-dir and --runs must be at least 1")
    started = time.perf_counter()
    work, info = prepare(args)
    busy = other_cpu_use()
    print(f"other CPU use before measuring: {busy:.0%} of {os.cpu_count()} CPUs"
          + ("  WARNING: the machine is busy; figures will be low and noisy" if busy > 0.2 else ""))
    results = measure(work, args)
    results["other_cpu_use"] = busy
    summary = report(results, info, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "dirs": args.dirs, "files_per_dir": args.files_per_dir, "level": args.level,
            "chunk_size": args.chunk_size, "runs": args.runs, "image": info,
            "cores": len(os.sched_getaffinity(0)), "results": results, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
