"""Conversion benchmark: `lazyfs convert` against the Go reference estargz.Build.

    python bench/convert.py [--input TAR] [--level 9] [--chunk-size 4194304]
                            [--cores N] [--runs 2] [--json PATH]

Both converters get the same tar, compression level (for the TOC too), chunk size and CPU set
(`taskset -c 0-(N-1)`; GOMAXPROCS=N for Go, whose Build splits the layer
into GOMAXPROCS parts compressed in parallel). Each is run --runs times,
alternating between the two so drift on the machine hits both, and the best
wall time is kept. Throughput is uncompressed input bytes per second
(MB = 10^6 bytes).

Without --input, a tar of this Python's standard library (minus
site-packages, __pycache__ and test/) is built once and cached in the temp
directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.interop.gobuild

from tests.interop.gobuild import build_esgzcheck  # noqa: E402

MB = 1e6


def stdlib_tar() -> Path:
    """Tar of the CPython stdlib on this machine, cached across runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cache = Path(tempfile.gettempdir()) / "lazyfs-bench"
    out = cache / f"stdlib-{sys.version_info.major}.{sys.version_info.minor}.tar"
    if out.exists():
        return out
    cache.mkdir(exist_ok=True)

    def keep(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(ti.name).parts
        if "__pycache__" in parts or (len(parts) > 1 and parts[1] in ("site-packages", "test")):
            return None
        return ti

    tmp = out.with_suffix(".tmp")  # rename at the end: an interrupted build is not cached
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(stdlib, arcname=stdlib.name, filter=keep)
    tmp.rename(out)
    return out


def timed(cmd: list, env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; fails loudly so a broken run is never
    reported as fast. CPU time (user+sys of the child) shows how much of the
    core budget a tool actually used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


GO_FORMAT = {"estargz": "gzip", "zstd:chunked": "zstd"}
DEFAULT_LEVEL = {"estargz": 9, "zstd:chunked": 3}  # each format's reference default


def measure_format(fmt: str, level: int, src: Path, args, esgzcheck: Path, env: dict,
                   pin: list) -> dict:
    """Best-of-N wall time, CPU time, throughput and output size of both tools for one format."""
    work = Path(tempfile.mkdtemp(prefix="lazyfs-bench-"))
    outs = {"lazyfs": work / "ours.blob", "go-reference": work / "go.blob"}
    cmds = {
        "lazyfs": [*pin, sys.executable, "-m", "lazyfs", "convert", src, outs["lazyfs"],
                   "--format", fmt, "--compression-level", level,
                   # The same level for the TOC too, as the reference compresses it.
                   "--startup-compression-level", level, "--chunk-size", args.chunk_size],
        "go-reference": [*pin, esgzcheck, "build", src, outs["go-reference"], "-format",
                         GO_FORMAT[fmt], "-level", level, "-chunk-size", args.chunk_size],
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    try:
        for _ in range(args.runs):
            for name, cmd in cmds.items():  # alternate the tools run by run
                times[name].append(timed(cmd, env))
        results = {}
        for name in cmds:
            best, cpu = min(times[name])
            results[name] = {"seconds": best, "cpu_seconds": cpu,
                             "all_seconds": [wall for wall, _ in times[name]],
                             "mb_per_s": src.stat().st_size / MB / best,
                             "output_bytes": outs[name].stat().st_size}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, ref = results["lazyfs"], results["go-reference"]
    return {"level": level, "results": results,
            "ratios": {"speed": ours["mb_per_s"] / ref["mb_per_s"],  # > 1: we are faster
                       "size": ours["output_bytes"] / ref["output_bytes"]}}  # < 1: smaller


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=Path, help="layer tar (default: a tar of the Python stdlib)")
    ap.add_argument("--format", choices=["estargz", "zstd:chunked", "both"], default="both",
                    help="which formats to measure (default: both, side by side)")
    ap.add_argument("--level", type=int, help="compression level (default: 9 gzip, 3 zstd)")
    ap.add_argument("--chunk-size", type=int, default=4 << 20, help="bytes (default 4194304)")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                    help="CPUs 0..N-1 for both tools (default: all available)")
    ap.add_argument("--runs", type=int, default=2, help="runs per tool; best is kept (default 2)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the raw numbers here")
    args = ap.parse_args()

    if shutil.which("taskset") is None:
        sys.exit("taskset not found (util-linux); needed to pin both tools to the same CPUs")
    if not 1 <= args.cores <= os.cpu_count():
        sys.exit(f"--cores must be between 1 and {os.cpu_count()}")
    src = args.input or stdlib_tar()
    in_bytes = src.stat().st_size
    esgzcheck = build_esgzcheck()

    pin = ["taskset", "-c", f"0-{args.cores - 1}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Go already sizes GOMAXPROCS from the affinity mask; being explicit makes
    # the number of parallel sub-blobs in estargz.Build exact.
    env["GOMAXPROCS"] = str(args.cores)
    formats = ["estargz", "zstd:chunked"] if args.format == "both" else [args.format]
    measured = {fmt: measure_format(fmt, args.level or DEFAULT_LEVEL[fmt], src, args, esgzcheck,
                                    env, pin) for fmt in formats}

    print(f"input {src} ({in_bytes / MB:.1f} MB), chunk {args.chunk_size}, {args.cores} cores, "
          f"best of {args.runs}")
    print(f"{'format':<14}{'level':>6}{'tool':>14}{'seconds':>9}{'CPU s':>8}{'MB/s':>9}"
          f"{'output bytes':>15}{'ratio':>8}")
    for fmt, m in measured.items():
        for name, r in m["results"].items():
            print(f"{fmt:<14}{m['level']:>6}{name:>14}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}"
                  f"{r['mb_per_s']:>9.1f}{r['output_bytes']:>15,}{r['output_bytes'] / in_bytes:>8.3f}")
        print(f"{fmt:<14} ours/reference: speed x{m['ratios']['speed']:.2f}, size x{m['ratios']['size']:.3f}")
    if len(measured) == 2:
        gz, zs = (measured[f]["results"]["lazyfs"] for f in formats)
        print(f"lazyfs zstd:chunked vs estargz: speed x{zs['mb_per_s'] / gz['mb_per_s']:.2f}, "
              f"size x{zs['output_bytes'] / gz['output_bytes']:.3f}")

    if args.json:
        args.json.write_text(json.dumps({
            "input": str(src), "input_bytes": in_bytes, "chunk_size": args.chunk_size,
            "cores": args.cores, "runs": args.runs, "formats": measured}, indent=2) + "\n")


if __name__ == "__main__":
    main()
