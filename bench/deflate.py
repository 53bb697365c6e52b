"""Which deflate library should eStargz chunks use? Speed and size of each, on the same chunks.

    python bench/deflate.py [--input TAR] [--mib 64] [--chunk-size 4194304]

Compresses the first MiBs of a tar (default: the CPython standard library on this machine) in
independent chunks, as the converter does, with: the stdlib zlib, zlib-ng (python-zlib-ng) and
ISA-L (python-isal), each at the levels that matter. Prints MB/s and output size relative to
stdlib zlib at level 9, the reference implementation's default level. Libraries that are not
installed are skipped (`pip install isal` to include ISA-L).
"""

from __future__ import annotations

import argparse
import importlib
import io
import sysconfig
import tarfile
import time


def _stdlib_tar(limit: int) -> bytes:
    buf = io.BytesIO()
    stdlib = sysconfig.get_paths()["stdlib"]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(stdlib, arcname=".", filter=lambda i: None if any(
            part in i.name for part in ("__pycache__", "site-packages", "/test")) else i)
    return buf.getvalue()[:limit]


CANDIDATES = [
    ("zlib", "zlib", [6, 9]),
    ("zlib-ng", "zlib_ng.zlib_ng", [6, 9]),
    ("isal", "isal.isal_zlib", [2, 3]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="tar to read (default: the CPython stdlib)")
    parser.add_argument("--mib", type=int, default=64, help="MiB of input to compress")
    parser.add_argument("--chunk-size", type=int, default=4 << 20)
    args = parser.parse_args()
    limit = args.mib << 20
    data = open(args.input, "rb").read(limit) if args.input else _stdlib_tar(limit)
    chunks = [data[i:i + args.chunk_size] for i in range(0, len(data), args.chunk_size)]

    rows = []
    for label, module_name, levels in CANDIDATES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            print(f"{label}: not installed, skipped")
            continue
        for level in levels:
            started = time.perf_counter()
            size = 0
            for chunk in chunks:
                deflater = module.compressobj(level, 8, -15)
                size += len(deflater.compress(chunk) + deflater.flush())
            rows.append((f"{label} -{level}", len(data) / (time.perf_counter() - started) / 1e6, size))

    baseline = next((r for r in rows if r[0] == "zlib -9"), rows[0])
    print(f"\n{len(data) / 1e6:.1f} MB in {len(chunks)} chunks of {args.chunk_size} bytes, one core")
    print(f"{'library':<14}{'MB/s':>8}{'speed vs zlib -9':>18}{'bytes':>14}{'size vs zlib -9':>17}")
    for name, speed, size in rows:
        print(f"{name:<14}{speed:>8.1f}{speed / baseline[1]:>17.2f}x{size:>14,}{size / baseline[2]:>16.4f}x")


if __name__ == "__main__":
    main()
