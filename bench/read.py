"""Read benchmark: file reads through a lazyfs mount against the same files on local disk.

    python bench/read.py [--chunk-size 4194304] [--big-files 4] [--big-mib 64]
                         [--small-files 2000] [--random-count 20000] [--block-size 1048576]
                         [--time-limit 10] [--runs 2] [--workdir DIR] [--json PATH]

Needs root (drop_caches, allow_other mounts), /dev/fuse and fusermount3.

The image: one layer holding --big-files files of --big-mib MiB (alternating 4 MiB regions of
random bytes and of compressible text: half and half, every region unique so no two chunks share
a digest and the chunk cache cannot deduplicate them) and --small-files files of 1-64 KiB
(half text, half random) in directories of 100. It is written as a gzip tar, put in an OCI
layout, converted with converter.image.convert_image (so the manifest pins the TOC, as for any
real image) and extracted with `tar -xzf` for the local-disk baseline.

Workloads, run with the same code on the extracted tree and on the mount:

    seq     every big file read start to end, --block-size reads (os.readv into one buffer)
    small   every small file read whole, in path order (same code as seq)
    random  --random-count 4 KiB O_RDONLY preads at random 4 KiB-aligned offsets of the big
            files (seeded: the same offsets in every run)

States ("sync; echo 3 > /proc/sys/vm/drop_caches" is written `drop` below):

    local cold     drop, then read the extracted tree
    local cached   read it again without dropping (the kernel page cache)
    lazyfs cold    a new daemon with a new, empty --cache-dir; once it is mounted, drop (so the
                   mount's page cache is empty AND the blob's pages are gone: every chunk is read
                   from the blob file on disk, inflated and verified); then read
    lazyfs warm    drop again, read again through the same daemon: the kernel page cache is
                   empty, so this measures our chunk caches (in-memory LRU, then on-disk cache)
    lazyfs cached  read again without dropping: the kernel page cache of the mount (keep_cache)

Each workload gets its own daemon and cache dir, so one workload's cold run never warms the next.

Every byte read is checked: each file's (and each random read's) crc32 is computed during the
timed read and compared with the crc32 of the extracted file, computed before any timing. crc32
(zlib-ng's, over 20 GB/s) rather than sha256 because sha256 (1-2 GB/s here) would cap and flatten
the figures we compare (local reads from the page cache run at several GB/s); a wrong byte still
changes the crc32.

Other processes using the CPUs skew every figure (the daemon is CPU-bound): the CPU use of the
rest of the machine is sampled for a second before measuring, printed, and warned about.

A pass that reaches --time-limit stops there and its figure covers what it read (marked `*`).
Every pass runs --runs times (each lazyfs run on a new daemon and cache dir) and the best run is
shown; every run's figure is in the --json output.
Throughput in MB/s (MB = 10^6 bytes). Goals (from the issue): warm within 1.5x of local disk
(warm MB/s >= local cold MB/s / 1.5; local cold because both then read from disk: the extracted
file, or our chunk cache files) and cold sequential reads from a local blob >= 200 MB/s.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a lazyfs dependency
    from zlib import crc32

try:
    from zlib_ng import gzip_ng as _gzip
except ImportError:  # pragma: no cover
    _gzip = gzip

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converter.image import convert_image  # noqa: E402
from converter.layer import LayerOptions  # noqa: E402
from lazyfs.format import oci  # noqa: E402
from bench.benchlib import (Mount, check_system, drop_caches,  # noqa: E402
                            report_machine_load, write_one_layer_layout)

MB = 1e6
MIB = 1 << 20
PAGE = 4096
REGION = 4 * MIB  # big files alternate random / text regions of this size
TAG = "bench"
RANDOM_SEED = 20240601
WORKLOADS = ("seq", "small", "random")
# How the goals read: warm within 1.5x of local disk; cold sequential >= 200 MB/s.
WARM_FACTOR = 1.5
COLD_SEQ_MB_S = 200.0


# --- the image -------------------------------------------------------------------------------

def _text_base(rng: random.Random, size: int) -> bytes:
    """`size` bytes of word-salad text (compresses about 3:1 with deflate)."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(5000)]
    weights = [1 / (i + 1) for i in range(len(words))]  # Zipf-like, as in prose
    out, length = [], 0
    while length < size:
        line = " ".join(rng.choices(words, weights, k=12)) + "\n"
        out.append(line)
        length += len(line)
    return "".join(out).encode()[:size]


class _HashingWriter(io.RawIOBase):
    """Forwards writes to `out` and hashes them: the tar's diff_id while it is gzipped."""

    def __init__(self, out):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.out.write(data)
        self.size += len(data)
        return len(data)


def build_layer(path: Path, args) -> tuple[list[str], list[str], str]:
    """Write the gzip layer tar; return (big file names, small file names, diff_id)."""
    rng = random.Random(RANDOM_SEED)
    text = _text_base(rng, REGION)
    big, small = [], []

    def region(index: int) -> bytes:
        if index % 2 == 0:
            return rng.randbytes(REGION)
        cut = rng.randrange(1, REGION)  # a rotation: unique content, same compressibility
        return text[cut:] + text[:cut]

    def add(tar, name: str, data: bytes | None, *, directory: bool = False) -> None:
        info = tarfile.TarInfo(name)
        info.mtime = 1_700_000_000
        if directory:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        else:
            info.mode, info.size = 0o644, len(data)
            tar.addfile(info, io.BytesIO(data))

    with _gzip.open(path, "wb", compresslevel=1) as gz:
        hashing = _HashingWriter(gz)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            add(tar, "big", None, directory=True)
            regions = -(-args.big_mib * MIB // REGION)
            for n in range(args.big_files):
                data = b"".join(region(i) for i in range(regions))[:args.big_mib * MIB]
                big.append(f"big/file{n}.bin")
                add(tar, big[-1], data)
            add(tar, "small", None, directory=True)
            for n in range(args.small_files):
                if n % 100 == 0:
                    add(tar, f"small/{n // 100:03d}", None, directory=True)
                size = rng.randint(1024, 64 * 1024)
                if n % 2:
                    data = rng.randbytes(size)
                else:
                    start = rng.randrange(REGION - size)
                    data = text[start:start + size]
                small.append(f"small/{n // 100:03d}/f{n:05d}")
                add(tar, small[-1], data)
    return big, small, "sha256:" + hashing.sha.hexdigest()


FORMATS = ("estargz", "zstd:chunked")
LEVELS = {"estargz": 9, "zstd:chunked": 3}  # each format's default level
ZSTD_COLD_SEQ_FACTOR = 2.0  # goal: zstd cold sequential reads at least 2x gzip's


def _converted_name(fmt: str) -> str:
    return "converted-" + fmt.replace(":", "-")


def prepare(work: Path, args) -> dict:
    """Build, convert and extract the image in `work` (reused if built with the same options)."""
    params = {"version": 2, "levels": LEVELS, "chunk_size": args.chunk_size,
              "big_files": args.big_files, "big_mib": args.big_mib,
              "small_files": args.small_files}
    stamp = work / "image.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info["params"] == params:
            print(f"reusing the image in {work}", file=sys.stderr)
            return info
    for name in ("source", *(_converted_name(f) for f in FORMATS), "local", "layer.tar.gz",
                 "image.json"):
        target = work / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    work.mkdir(parents=True, exist_ok=True)
    layer_gz = work / "layer.tar.gz"
    start = time.perf_counter()
    big, small, diff_id = build_layer(layer_gz, args)
    write_one_layer_layout(work / "source", layer_gz, oci.OCI_LAYER_GZIP, diff_id, TAG)
    built = time.perf_counter()
    print(f"built the layer in {built - start:.1f} s; converting to {', '.join(FORMATS)}...",
          file=sys.stderr)
    converted_bytes, convert_seconds = {}, {}
    for fmt in FORMATS:
        began = time.perf_counter()
        convert_image(f"{work / 'source'}:{TAG}", str(work / _converted_name(fmt)), archive=False,
                      options=LayerOptions(chunk_size=args.chunk_size, format=fmt,
                                           compression_level=LEVELS[fmt]), progress=False)
        convert_seconds[fmt] = time.perf_counter() - began
        converted_bytes[fmt] = sum(p.stat().st_size
                                   for p in (work / _converted_name(fmt) / "blobs").rglob("*"))
    converted = time.perf_counter()
    (work / "local").mkdir()
    subprocess.run(["tar", "-xzf", str(layer_gz), "-C", str(work / "local")], check=True)
    info = {"params": params, "big": big, "small": small,
            "tar_gz_bytes": layer_gz.stat().st_size, "converted_bytes": converted_bytes,
            "build_seconds": built - start, "convert_seconds": convert_seconds}
    stamp.write_text(json.dumps(info))
    print(f"converted in {converted - built:.1f} s; extracted with tar -xzf", file=sys.stderr)
    return info


# --- reading: the same code for the local tree and the mount ----------------------------------

class Deadline:
    def __init__(self, seconds: float):
        self.at = time.perf_counter() + seconds
        self.hit = False

    def passed(self) -> bool:
        if time.perf_counter() > self.at:
            self.hit = True
        return self.hit


def read_files(root: Path, names: list[str], block_size: int, deadline: Deadline) -> tuple[int, list[int]]:
    """Read each file whole; (bytes read, crc32 per file read completely)."""
    buf = bytearray(block_size)
    view = memoryview(buf)
    total, crcs = 0, []
    for name in names:
        fd = os.open(root / name, os.O_RDONLY)
        try:
            crc = 0
            while n := os.readv(fd, [buf]):
                crc = crc32(view[:n], crc)
                total += n
                if deadline.passed():
                    return total, crcs
        finally:
            os.close(fd)
        crcs.append(crc)
    return total, crcs


def read_random(root: Path, names: list[str], plan: list[tuple[int, int]],
                deadline: Deadline) -> tuple[int, list[int]]:
    """4 KiB preads at the planned (file index, offset); (bytes read, crc32 per read)."""
    fds = [os.open(root / name, os.O_RDONLY) for name in names]
    total, crcs = 0, []
    try:
        for i, (index, offset) in enumerate(plan):
            data = os.pread(fds[index], PAGE, offset)
            crcs.append(crc32(data))
            total += len(data)
            if i % 64 == 63 and deadline.passed():
                break
    finally:
        for fd in fds:
            os.close(fd)
    return total, crcs


def run_workload(workload: str, root: Path, info: dict, plan, args) -> dict:
    deadline = Deadline(args.time_limit)
    start = time.perf_counter()
    if workload == "random":
        nbytes, crcs = read_random(root, info["big"], plan, deadline)
        ops = len(crcs)
    else:
        names = info["big"] if workload == "seq" else info["small"]
        nbytes, crcs = read_files(root, names, args.block_size, deadline)
        ops = len(crcs)
    seconds = time.perf_counter() - start
    expected = info["expected"][workload][:len(crcs)]
    return {"bytes": nbytes, "seconds": seconds, "mb_per_s": nbytes / MB / seconds,
            "ops": ops, "ops_per_s": ops / seconds, "time_bound": deadline.hit,
            "verified": crcs == expected, "wrong": sum(a != b for a, b in zip(crcs, expected))}


def expected_checksums(local: Path, info: dict, plan) -> dict:
    """crc32 of what every pass must read, from the extracted files (before any timing)."""
    never = Deadline(1e9)
    return {"seq": read_files(local, info["big"], MIB, never)[1],
            "small": read_files(local, info["small"], MIB, never)[1],
            "random": read_random(local, info["big"], plan, never)[1]}


def random_plan(info: dict, args) -> list[tuple[int, int]]:
    rng = random.Random(RANDOM_SEED + 1)
    pages = args.big_mib * MIB // PAGE
    return [(rng.randrange(len(info["big"])), rng.randrange(pages) * PAGE)
            for _ in range(args.random_count)]


# --- system helpers ----------------------------------------------------------------------------

# --- the run -------------------------------------------------------------------------------------

def measure(work: Path, info: dict, plan, args) -> dict:
    """{workload: {state: result}}: the best of --runs runs (highest MB/s), every run's MB/s
    kept in the result's "runs". Runs alternate local and lazyfs so drift hits both."""
    local = work / "local"
    runs: dict[str, dict[str, list[dict]]] = {w: {} for w in WORKLOADS}
    for _ in range(args.runs):
        for workload in WORKLOADS:
            drop_caches()
            for state in ("local cold", "local cached"):
                runs[workload].setdefault(state, []).append(
                    run_workload(workload, local, info, plan, args))
        for fmt, workload in itertools.product(FORMATS, WORKLOADS):
            image = f"{work / _converted_name(fmt)}:{TAG}"
            cache_dir = work / f"cache-{workload}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            with Mount(image, work / "mnt", cache_dir, work / "daemon.log") as mount:
                for state in ("cold", "warm", "cached"):
                    if state != "cached":
                        drop_caches()
                    before = mount.stats()
                    result = run_workload(workload, work / "mnt", info, plan, args)
                    after = mount.stats()
                    result["daemon"] = {k: after[k] - before[k] for k in after}
                    runs[workload].setdefault(f"{fmt} {state}", []).append(result)
            shutil.rmtree(cache_dir, ignore_errors=True)
    results: dict[str, dict[str, dict]] = {w: {} for w in WORKLOADS}
    for workload, states in runs.items():
        for state, done in states.items():
            best = dict(max(done, key=lambda r: r["mb_per_s"]))
            best["runs"] = [r["mb_per_s"] for r in done]
            best["verified"] = all(r["verified"] for r in done)
            best["wrong"] = sum(r["wrong"] for r in done)
            results[workload][state] = best
    return results


def print_report(results: dict, info: dict, args) -> dict:
    params = info["params"]
    sizes = ", ".join(f"{fmt} (level {LEVELS[fmt]}) {info['converted_bytes'][fmt] / MB:.0f} MB"
                      for fmt in FORMATS)
    print(f"image: {params['big_files']} x {params['big_mib']} MiB (half random, half text) + "
          f"{params['small_files']} files of 1-64 KiB; chunk {params['chunk_size']}; tar.gz "
          f"{info['tar_gz_bytes'] / MB:.0f} MB, {sizes}; {len(os.sched_getaffinity(0))} cores")
    print(f"seq: {args.block_size}-byte reads; random: {args.random_count} x 4 KiB preads; "
          f"time limit {args.time_limit:g} s per pass (* = stopped there); best of {args.runs} runs")
    print(f"{'workload':<9}{'state':<22}{'MB/s':>9}{'ops/s':>10}{'seconds':>9}{'MB read':>9}"
          f"{'verified':>10}{'blob fetches':>14}{'cache hits':>12}")
    for workload, states in results.items():
        for state, r in states.items():
            daemon = r.get("daemon")
            fetches = f"{daemon['chunks_fetched']:,}" if daemon else ""
            hits = f"{daemon['cache_hits']:,}" if daemon else ""
            ok = "ok" if r["verified"] else f"WRONG {r['wrong']}"
            print(f"{workload:<9}{state:<22}{r['mb_per_s']:>9.1f}{r['ops_per_s']:>10,.0f}"
                  f"{r['seconds']:>8.2f}{'*' if r['time_bound'] else ' '}{r['bytes'] / MB:>9.1f}"
                  f"{ok:>10}{fetches:>14}{hits:>12}")
    ratios, goals = {}, []
    print("\nratios (lazyfs / local):")
    for fmt, (workload, s) in itertools.product(FORMATS, results.items()):
        local_cold, local_cached = s["local cold"]["mb_per_s"], s["local cached"]["mb_per_s"]
        key = f"{fmt} {workload}"
        ratios[key] = {"warm/local": s[f"{fmt} warm"]["mb_per_s"] / local_cold,
                       "cold/local": s[f"{fmt} cold"]["mb_per_s"] / local_cold,
                       "cached/local cached": s[f"{fmt} cached"]["mb_per_s"] / local_cached}
        print(f"  {key:<20}" + "   ".join(f"{k} x{v:.2f}" for k, v in ratios[key].items()))
        warm = s[f"{fmt} warm"]["mb_per_s"]
        goals.append((f"{key}: warm >= local/{WARM_FACTOR:g} ({warm:.1f} vs "
                      f"{local_cold / WARM_FACTOR:.1f} MB/s)", warm >= local_cold / WARM_FACTOR))
    for fmt in FORMATS:
        cold_seq = results["seq"][f"{fmt} cold"]["mb_per_s"]
        goals.append((f"{fmt} seq: cold from a local blob >= {COLD_SEQ_MB_S:g} MB/s "
                      f"({cold_seq:.1f} MB/s)", cold_seq >= COLD_SEQ_MB_S))
    gzip_cold, zstd_cold = (results["seq"][f"{fmt} cold"]["mb_per_s"] for fmt in FORMATS)
    goals.append((f"zstd:chunked cold seq >= {ZSTD_COLD_SEQ_FACTOR:g}x estargz's "
                  f"(x{zstd_cold / gzip_cold:.2f})", zstd_cold >= ZSTD_COLD_SEQ_FACTOR * gzip_cold))
    all_verified = all(r["verified"] for s in results.values() for r in s.values())
    goals.append(("every byte read matched the extracted files", all_verified))
    print("\ngoals:")
    for text, ok in goals:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return {"ratios": ratios, "goals": [{"goal": t, "pass": ok} for t, ok in goals]}


def decode_ceiling(work: Path, info: dict) -> dict:
    """How fast each format's chunks of the big files inflate, and inflate + sha256 (the check
    every fetched chunk must pass), in memory on one thread: what a cold read could reach with
    no I/O, no cache and no FUSE at all. For gzip also with CPython's own zlib, the inflate
    most gzip readers use (lazyfs uses zlib-ng's). MB/s of uncompressed bytes, best of 3."""
    import zlib

    from lazyfs.image import resolve_mount_image
    from lazyfs.layer import open_layer

    out = {}
    for fmt in FORMATS:
        image = resolve_mount_image(str(work / _converted_name(fmt)) + ":" + TAG)
        try:
            layer = open_layer(0, image.layers[0], None)
            chunks = [chunk for item in layer.entries if item.path.startswith("big/")
                      for chunk in item.chunks]
            members = [layer.spec.source.read(c.blob_offset, c.blob_end - c.blob_offset)
                       for c in chunks]
        finally:
            image.close()
        total = sum(chunk.size for chunk in chunks)

        def best_mb_s(step) -> float:
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                for chunk, member in zip(chunks, members):
                    step(chunk, member)
                best = min(best, time.perf_counter() - started)
            return round(total / best / MB, 1)

        def decode(chunk, member):
            return layer.codec.decompress_prefix(member, chunk.inner_offset + chunk.size)

        out[fmt] = {"decode": best_mb_s(decode),
                    "decode_and_sha256": best_mb_s(
                        lambda c, m: hashlib.sha256(decode(c, m)[c.inner_offset:]).digest())}
        if fmt == "estargz":
            out[fmt]["decode_stdlib_zlib"] = best_mb_s(
                lambda c, m: zlib.decompressobj(31).decompress(m))
    print("\ndecode ceiling (the big files' chunks in memory, one thread, no I/O, no FUSE):")
    for fmt, figures in out.items():
        print(f"  {fmt:13s} " + "   ".join(f"{k.replace('_', ' ')} {v:.0f} MB/s"
                                          for k, v in figures.items()))
    gzip, zstd = out["estargz"], out["zstd:chunked"]
    print(f"  zstd/gzip: decode x{zstd['decode'] / gzip['decode']:.2f}, decode + sha256 "
          f"x{zstd['decode_and_sha256'] / gzip['decode_and_sha256']:.2f} "
          f"(against CPython's zlib: x{zstd['decode'] / gzip['decode_stdlib_zlib']:.2f})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk-size", type=int, default=4 << 20, help="bytes (default 4194304)")
    ap.add_argument("--big-files", type=int, default=4, help="number of big files (default 4)")
    ap.add_argument("--big-mib", type=int, default=64, help="size of each big file (default 64)")
    ap.add_argument("--small-files", type=int, default=2000, help="number of 1-64 KiB files (default 2000)")
    ap.add_argument("--random-count", type=int, default=20000, help="4 KiB preads per pass (default 20000)")
    ap.add_argument("--block-size", type=int, default=1 << 20, help="sequential read size (default 1048576)")
    ap.add_argument("--time-limit", type=float, default=10.0,
                    help="seconds after which a pass stops (default 10)")
    ap.add_argument("--runs", type=int, default=2,
                    help="runs of every pass, each lazyfs run on a new mount; best kept (default 2)")
    ap.add_argument("--workdir", type=Path,
                    help="keep the image here and reuse it on the next run (default: a temp dir, "
                         "removed at the end)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the raw numbers here")
    args = ap.parse_args()
    check_system()
    if args.big_mib * MIB < PAGE or args.big_files < 1 or args.small_files < 1 or args.runs < 1:
        sys.exit("--big-files, --big-mib, --small-files and --runs must be at least 1")

    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="lazyfs-bench-read-"))
    started = time.perf_counter()
    try:
        info = prepare(work, args)
        plan = random_plan(info, args)
        info["expected"] = expected_checksums(work / "local", info, plan)
        busy = report_machine_load()
        results = measure(work, info, plan, args)
        summary = print_report(results, info, args)
        summary["decode_ceiling"] = decode_ceiling(work, info)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "params": info["params"], "tar_gz_bytes": info["tar_gz_bytes"],
            "converted_bytes": info["converted_bytes"], "block_size": args.block_size,
            "random_count": args.random_count, "time_limit": args.time_limit, "runs": args.runs,
            "cores": len(os.sched_getaffinity(0)), "other_cpu_use": busy, "results": results,
            **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
