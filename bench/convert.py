"""Conversion benchmark: `lazyfs convert` against the Go reference estargz.Build.

    python bench/convert.py [--input TAR] [--level 9] [--chunk-size 4194304]
                            [--cores N] [--runs 2] [--json PATH]

Both converters get the same tar, compression level, chunk size and CPU set
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=Path, help="layer tar (default: a tar of the Python stdlib)")
    ap.add_argument("--level", type=int, default=9, help="gzip compression level (default 9)")
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
    work = Path(tempfile.mkdtemp(prefix="lazyfs-bench-"))
    outs = {"lazyfs": work / "ours.esgz", "go-estargz": work / "go.esgz"}
    cmds = {
        "lazyfs": [*pin, sys.executable, "-m", "lazyfs", "convert", src, outs["lazyfs"],
                   "--compression-level", args.level, "--chunk-size", args.chunk_size],
        "go-estargz": [*pin, esgzcheck, "build", src, outs["go-estargz"],
                       "-level", args.level, "-chunk-size", args.chunk_size],
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
                             "mb_per_s": in_bytes / MB / best,
                             "output_bytes": outs[name].stat().st_size}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ours, ref = results["lazyfs"], results["go-estargz"]
    ratios = {"speed": ours["mb_per_s"] / ref["mb_per_s"],  # > 1: we are faster
              "size": ours["output_bytes"] / ref["output_bytes"]}  # < 1: we are smaller
    print(f"input {src} ({in_bytes / MB:.1f} MB), level {args.level}, "
          f"chunk {args.chunk_size}, {args.cores} cores, best of {args.runs}")
    print(f"{'tool':<12}{'input MB':>10}{'seconds':>10}{'CPU s':>8}{'MB/s':>10}"
          f"{'output bytes':>16}")
    for name, r in results.items():
        print(f"{name:<12}{in_bytes / MB:>10.1f}{r['seconds']:>10.2f}{r['cpu_seconds']:>8.2f}"
              f"{r['mb_per_s']:>10.1f}{r['output_bytes']:>16,}")
    print(f"ours/reference: speed x{ratios['speed']:.2f}, size x{ratios['size']:.3f}")

    if args.json:
        args.json.write_text(json.dumps({
            "input": str(src), "input_bytes": in_bytes, "level": args.level,
            "chunk_size": args.chunk_size, "cores": args.cores, "runs": args.runs,
            "results": results, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
