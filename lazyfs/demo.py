"""`lazyfs demo`: the main job end to end on a built-in sample, with no input from the user.

1. build a two-layer OCI image from real files on this machine: Debian's static busybox (a
   program to run), part of the Python standard library and a large data file, plus an upper
   layer with a whiteout and an opaque directory;
2. convert it to eStargz and verify the result;
3. publish the converted layout on a loopback web server (`lazyfs serve`);
4. mount it lazily over HTTP, run a program from it (`lazyfs run` when root: overlay + chroot;
   otherwise straight from the mount), and time the first line of output;
5. print the stats: how little of the image was fetched to start the program.

This module is CLI glue, so it may import `converter`; the library modules of `lazyfs` never do.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from lazyfs.errors import NotFound
from lazyfs.oci_layout import write_gzip_layout

DEMO_TAG = "demo"
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "wc", "head", "uname")
DEMO_SCRIPT = b"""#!/bin/sh
echo "hello from a lazily loaded image"
cat /etc/motd
echo "files under /usr/lib/python3: $(ls -R /usr/lib/python3 | wc -l) (listed, not fetched)"
"""
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


def _add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, 1_700_000_000
    tar.addfile(info)


def _busybox() -> bytes:
    for path in BUSYBOX_PATHS:
        if os.path.isfile(path):
            return Path(path).read_bytes()
    raise NotFound("the demo runs Debian's static busybox from the image: "
                   "apt-get install busybox-static (./quickstart.sh does)")


def _base_layer() -> bytes:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("bin", "etc", "tmp", "usr", "usr/lib", "usr/lib/python3", "opt", "opt/data"):
            _add_dir(tar, directory)
        _add_bytes(tar, "bin/busybox", _busybox(), 0o755)
        for applet in BUSYBOX_APPLETS:
            _add_symlink(tar, f"bin/{applet}", "busybox")
        _add_bytes(tar, "etc/motd", b"Only the chunks this program reads were fetched.\n")
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
        _add_bytes(tar, "app/hello.sh", DEMO_SCRIPT, 0o755)
        _add_bytes(tar, "opt/data/.wh.obsolete.txt", b"")
        _add_dir(tar, "usr/lib/python3/xml")
        _add_bytes(tar, "usr/lib/python3/xml/.wh..wh..opq", b"")
    return buf.getvalue()


def write_sample_image(layout: Path) -> None:
    """A two-layer OCI image layout with gzip layers, tagged `demo`."""
    write_gzip_layout(str(layout), [_base_layer(), _app_layer()], DEMO_TAG,
                      runtime_config={"Cmd": ["/app/hello.sh"]})


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(workdir: str | None) -> int:
    from converter.image import convert_image
    from converter.layer import LayerOptions
    from lazyfs.inspect import verify_target
    from lazyfs.serve import Server

    with tempfile.TemporaryDirectory(prefix="lazyfs-demo-") as temp:
        root = Path(workdir) if workdir else Path(temp)
        root.mkdir(parents=True, exist_ok=True)
        source, published = root / "sample-image", root / "www"
        converted = published / "sample"
        for path in (source, published):
            if path.exists():
                raise SystemExit(f"lazyfs demo: {path} already exists; pick another --workdir")
        print(f"1. building a two-layer sample image from real files at {source}")
        write_sample_image(source)

        print("2. converting it to eStargz and verifying the result")
        published.mkdir()
        started = time.perf_counter()
        result = convert_image(f"{source}:{DEMO_TAG}", str(converted), archive=False,
                               options=LayerOptions(), progress=None)
        convert_seconds = time.perf_counter() - started
        for line in verify_target(f"{converted}:{DEMO_TAG}", None):
            print("   " + line)

        with Server(str(published)) as server:
            url = f"{server.url}/sample:{DEMO_TAG}"
            print(f"3. serving it on loopback: {url}")
            figures = _mount_and_run(url, root)
        _print_stats(result, _tree_bytes(source), _tree_bytes(converted), convert_seconds, figures)
    return 0 if figures["exit_status"] == 0 else 1


def _mount_and_run(url: str, root: Path) -> dict:
    from lazyfs import stats
    from lazyfs.fetchoptions import FetchOptions
    from lazyfs.mount import MountOptions, mount, umount
    from lazyfs.run import exit_status, start_in_image

    mountpoint = root / "mnt"
    mountpoint.mkdir(exist_ok=True)
    as_root = os.geteuid() == 0
    how = "lazyfs run (overlay + chroot)" if as_root else "straight from the mount (not root)"
    print(f"4. mounting it lazily and running /app/hello.sh, {how}:")
    started = time.perf_counter()
    # No background fetch here: it would make the whole image local within a second, and the
    # point of the figures is what starting the program alone had to fetch.
    options = MountOptions(cache_dir=str(root / "cache"), fetch=FetchOptions(background_fetch=False))
    code = mount(url, str(mountpoint), options, quiet=True)
    if code != 0:
        raise SystemExit(code)
    scratch = None
    try:
        if as_root:
            process, scratch = start_in_image(str(mountpoint), ["/app/hello.sh"], stdout=subprocess.PIPE)
        else:
            busybox = str(mountpoint / "bin/busybox")
            process = subprocess.Popen([busybox, "sh", "-c", f"cd {mountpoint} && {busybox} cat etc/motd"],
                                       stdout=subprocess.PIPE)
        first_line = process.stdout.readline()
        first_output_seconds = time.perf_counter() - started
        rest = process.stdout.read()
        status = exit_status(process.wait())
        for line in (first_line + rest).decode(errors="replace").splitlines():
            print(f"   | {line}")
        report = stats.read_stats(str(mountpoint))
    finally:
        umount(str(mountpoint))
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"exit_status": status, "first_output_seconds": first_output_seconds, "stats": report}


def _print_stats(result, source_bytes, output_bytes, convert_seconds, figures) -> None:
    uncompressed = sum(layer.uncompressed_size for layer in result.layers)
    layers = figures["stats"]["layers"]
    total = sum(layer["bytes_total"] for layer in layers)
    fetched = sum(layer["bytes_fetched"] for layer in layers)
    print("\nstats")
    print(f"  input image        {source_bytes:>12,} bytes (gzip layers)")
    print(f"  eStargz image      {output_bytes:>12,} bytes ({output_bytes / source_bytes:.3f}x the input)")
    print(f"  convert            {convert_seconds:8.2f} s ({uncompressed / convert_seconds / 1e6:.1f} MB/s "
          f"of uncompressed layers, {os.cpu_count()} cores)")
    print(f"  first output after {figures['first_output_seconds']:8.3f} s (mount + start, cold cache, over HTTP)")
    print(f"  exit status        {figures['exit_status']:>8}")
    print(f"  fetched            {fetched:>12,} of {total:,} layer bytes ({100 * fetched / total:.1f}%)")
    for number, layer in enumerate(layers, 1):
        print(f"  layer {number}            {layer['bytes_fetched']:>12,} bytes fetched in {layer['requests']} "
              f"requests, {layer['chunks_fetched']} chunks, {layer['bytes_served']:,} bytes served")
