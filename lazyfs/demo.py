"""`lazyfs demo`: the main job end to end on a built-in sample, with no input from the user.

Until the lazy mount exists, the main job is the conversion: build a two-layer OCI image from
real files on this machine (part of the Python standard library, a large generated file, and
an upper layer with a whiteout and an opaque directory), convert it to eStargz, verify the
result, and print what was done and how fast.

This module is CLI glue, so it may import `converter`; the library modules of `lazyfs` never do.
"""

from __future__ import annotations

import gzip
import io
import os
import platform
import random
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from lazyfs.format import oci

DEMO_TAG = "demo"
_STDLIB_PACKAGES = ("json", "email", "http", "urllib", "xml", "asyncio", "logging", "importlib")
_BIG_FILE_BYTES = 12 << 20


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
    tar.addfile(info)


def _base_layer() -> bytes:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("usr", "usr/lib", "usr/lib/python3", "opt", "opt/data"):
            _add_dir(tar, directory)
        for package in _STDLIB_PACKAGES:
            source = stdlib / package
            if source.is_dir():
                tar.add(source, arcname=f"usr/lib/python3/{package}",
                        filter=lambda info: None if "__pycache__" in info.name else info)
        # Half random, half repetitive: a realistic mix for the compressor, and big enough to
        # be cut into several 4 MiB chunks.
        rng = random.Random(42)
        big = rng.randbytes(_BIG_FILE_BYTES // 2) + b"lazyfs " * (_BIG_FILE_BYTES // 14)
        _add_bytes(tar, "opt/data/model.bin", big)
        _add_bytes(tar, "opt/data/obsolete.txt", b"removed by the upper layer\n")
    return buf.getvalue()


def _app_layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add_dir(tar, "app")
        _add_bytes(tar, "app/hello.py", b'print("hello from a lazily loaded image")\n', 0o755)
        _add_bytes(tar, "opt/data/.wh.obsolete.txt", b"")
        _add_dir(tar, "usr/lib/python3/xml")
        _add_bytes(tar, "usr/lib/python3/xml/.wh..wh..opq", b"")
    return buf.getvalue()


def write_sample_image(layout: Path) -> None:
    """A two-layer OCI image layout with gzip layers, tagged `demo`."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str, annotations=None) -> oci.Descriptor:
        descriptor = oci.descriptor_of(media_type, data, annotations)
        (blobs / descriptor.digest.split(":", 1)[1]).write_bytes(data)
        return descriptor

    layer_tars = [_base_layer(), _app_layer()]
    layers = [put(gzip.compress(t, mtime=0), oci.OCI_LAYER_GZIP) for t in layer_tars]
    config = {
        "architecture": oci.linux_platform_of_machine(platform.machine()).architecture,
        "os": "linux",
        "config": {"Cmd": ["/app/hello.py"]},
        "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(t) for t in layer_tars]},
    }
    config_descriptor = put(oci.encode_json(config), oci.OCI_CONFIG)
    manifest = put(oci.encode_json(oci.build_manifest(config_descriptor, layers)), oci.OCI_MANIFEST,
                   {oci.ANNOTATION_REF_NAME: DEMO_TAG})
    (layout / "oci-layout").write_bytes(oci.OCI_LAYOUT_FILE_BYTES)
    (layout / "index.json").write_bytes(oci.encode_json(oci.build_index([manifest])))


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(workdir: str | None) -> int:
    from converter.image import convert_image
    from converter.layer import LayerOptions
    from lazyfs.inspect import inspect_target, verify_target

    with tempfile.TemporaryDirectory(prefix="lazyfs-demo-") as temp:
        root = Path(workdir) if workdir else Path(temp)
        root.mkdir(parents=True, exist_ok=True)
        source, converted = root / "sample-image", root / "sample-image-estargz"
        for path in (source, converted):
            if path.exists():
                raise SystemExit(f"lazyfs demo: {path} already exists; pick another --workdir")
        print(f"1. building a two-layer sample image from real files at {source}")
        write_sample_image(source)

        print("2. converting it to eStargz")
        started = time.perf_counter()
        result = convert_image(f"{source}:{DEMO_TAG}", str(converted), archive=False,
                               options=LayerOptions(), progress=None)
        convert_seconds = time.perf_counter() - started

        print("3. verifying every chunk, TOC and layer digest of the result")
        started = time.perf_counter()
        for line in verify_target(f"{converted}:{DEMO_TAG}", None):
            print("   " + line)
        verify_seconds = time.perf_counter() - started

        report = inspect_target(f"{converted}:{DEMO_TAG}")
        _print_stats(report, result, _tree_bytes(source), _tree_bytes(converted),
                     convert_seconds, verify_seconds)
    return 0


def _print_stats(report, result, source_bytes, output_bytes, convert_seconds, verify_seconds) -> None:
    uncompressed = sum(layer.uncompressed_size for layer in result.layers)
    print("\nstats")
    print(f"  image            {report['path']} (tag {report['tag']}, manifest {report['manifest_digest'][:19]}...)")
    for number, layer in enumerate(report["layers"], 1):
        print(f"  layer {number}          {layer['entry_count']:>6} entries {layer['chunk_count']:>6} chunks "
              f"{layer['blob_size']:>12,} bytes  TOC {layer['toc_digest'][:19]}...")
    print(f"  input image      {source_bytes:>12,} bytes (gzip layers)")
    print(f"  eStargz image    {output_bytes:>12,} bytes ({output_bytes / source_bytes:.3f}x the input)")
    print(f"  convert          {convert_seconds:6.2f} s  "
          f"({uncompressed / convert_seconds / 1e6:.1f} MB/s of uncompressed layers, {os.cpu_count()} cores)")
    print(f"  verify           {verify_seconds:6.2f} s")
