"""Real FUSE mounts for tests: a daemon in a subprocess, waited for with a deadline, always
unmounted. Skips cleanly where FUSE is not available."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

MOUNT_DEADLINE_SECONDS = 30


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    if os.geteuid() != 0:
        pytest.skip("FUSE tests mount with allow_other and need root")
    if not any(os.access(os.path.join(d, "fusermount3"), os.X_OK) for d in os.get_exec_path()):
        pytest.skip("fusermount3 is missing (apt-get install fuse3)")


def lazyfs_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "lazyfs", *map(str, args)]


@contextlib.contextmanager
def mounted(image, mountpoint: Path, *extra, cache_dir: Path, log: Path | None = None):
    """Mount `image` at `mountpoint` in a foreground daemon; yield the daemon's Popen."""
    require_fuse()
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = log or mountpoint.parent / f"{mountpoint.name}.log"
    with open(log, "wb") as log_file:
        daemon = subprocess.Popen(
            lazyfs_cmd("--debug", "mount", "--foreground", "--cache-dir", cache_dir, *extra, image, mountpoint),
            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + MOUNT_DEADLINE_SECONDS
        while not os.path.ismount(mountpoint):
            if daemon.poll() is not None:
                raise AssertionError(f"the mount daemon exited with {daemon.returncode}:\n"
                                     + log.read_text(errors="replace")[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError("the mount did not appear in time:\n"
                                     + log.read_text(errors="replace")[-4000:])
            time.sleep(0.05)
        yield daemon
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def daemon_log(mountpoint: Path) -> str:
    return (mountpoint.parent / f"{mountpoint.name}.log").read_text(errors="replace")


# --- reading through a mount, and checking what it left in its cache ---------------------------

def direct_read(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` (fewer at the end of the file) with O_DIRECT: each read(2) goes
    to the daemon (no page cache, and no second try of a failed read by the kernel's
    readahead). In a loop, as programs read; an error is the OSError of the read."""
    return read_in_a_loop(path, offset, size, os.O_DIRECT)


def read_in_a_loop(path: Path, offset: int, size: int, flags: int = 0) -> bytes:
    """`size` bytes at `offset` (fewer at the end of the file), pread in a loop as programs
    read: when a later part of a big read fails, the kernel returns the part before it (a
    short read), and the next read reports the error (the OSError raised here)."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        out = b""
        while len(out) < size:
            part = os.pread(fd, size - len(out), offset + len(out))
            if not part:
                break
            out += part
        return out
    finally:
        os.close(fd)


def forget_pages(path: Path) -> None:
    """Drop the kernel's cached pages of one file: its next buffered read goes to the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def assert_cache_holds_only_verified(cache_dir: Path, chunk_digests: set[str], *,
                                     temp_files_allowed: bool = False, timeout_s: float = 10):
    """Every chunk file in a lazyfs cache directory is named by one of `chunk_digests`
    ("sha256:..."), and its bytes hash to its name; every TOC record matches the checksum in
    front of it; no temp file is left (waiting a little: a readahead chunk may still be on its
    way in), unless `temp_files_allowed` (a killed daemon's, removed by a later open)."""
    names = {digest.removeprefix("sha256:") for digest in chunk_digests}
    for chunk_file in (cache_dir / "chunks").rglob("*"):
        if chunk_file.is_file():
            assert chunk_file.name in names, f"not a chunk of the image: {chunk_file}"
            assert hashlib.sha256(chunk_file.read_bytes()).hexdigest() == chunk_file.name, \
                f"unverified bytes in the cache: {chunk_file}"
    for toc_file in (cache_dir / "tocs").rglob("*"):
        if toc_file.is_file():
            raw = toc_file.read_bytes()
            # lazyfs.cache: 32 bytes sha256(record), then the record.
            assert hashlib.sha256(raw[32:]).digest() == raw[:32], toc_file
    if temp_files_allowed:
        return
    deadline = time.monotonic() + timeout_s
    while left := list((cache_dir / "tmp").iterdir()):
        assert time.monotonic() < deadline, f"temp files left in the cache: {left}"
        time.sleep(0.05)


def daemon_rss_bytes(pid: int) -> int:
    """The resident set size of a process, from /proc/PID/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def lazyfs_stats(mount_dir: Path) -> dict:
    """`lazyfs stats --json MOUNT`, run as a user would."""
    done = subprocess.run(lazyfs_cmd("stats", "--json", mount_dir), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_mount_read_only_tocs(reads, layers: dict, *, whole_tail: bool = True) -> None:
    """Mounting read each layer's TOC and nothing else of its blob.

    `reads`: (layer key, Range header) of each blob GET the mount made; `layers`: layer key →
    (blob size, TOCRegion). eStargz: the TOC and the footer after it, which the converter's
    TOC-offset annotation locates, and with `whole_tail` exactly that in one read;
    zstd:chunked: exactly the TOC range the manifest annotation locates.
    """
    assert {key for key, _ in reads} == set(layers)
    for key, (blob_size, region) in layers.items():
        spans = sorted(tuple(map(int, header.removeprefix("bytes=").split("-")))
                       for k, header in reads if k == key)
        if region.format == "zstd:chunked":
            assert spans == [(region.toc_start, region.toc_end - 1)]
            continue
        assert spans[0][0] >= region.toc_start and spans[-1][1] == blob_size - 1, spans
        if whole_tail:
            assert spans == [(region.toc_start, blob_size - 1)], spans
