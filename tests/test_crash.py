"""`kill -9` of the mount daemon in the middle of a fetch, then `lazyfs umount` and a remount
with the same cache directory: every file reads right, and no partial or unverified chunk is
ever visible in the cache.

The crash is placed exactly: a fault proxy answers the fetch of a big file's second part with
the headers and the first half of the body, then goes silent. The fetcher verifies and caches
each chunk as soon as its bytes are in, so at the moment of the kill some chunks of that very
request are in the cache and the rest is half-received in the daemon's memory.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.faultproxy import FaultProxy
from tests.imagebuild import converted_one_layer
from tests.mounting import (assert_cache_holds_only_verified, direct_read, lazyfs_cmd,
                            lazyfs_stats, mounted, require_fuse)
from tests.tarbuild import dir_, file_

KiB = 1024
CHUNK = 128 * KiB
TAG = "crash"
_rng = random.Random(7)
FILES = {
    "big.bin": _rng.randbytes(24 * CHUNK),
    "etc/conf": b"key = value\n" * 100,
    "small.bin": _rng.randbytes(10 * KiB),
}
# Read before the crash: these chunks are in the cache when the daemon dies.
READ_BEFORE = 4 * CHUNK


@pytest.fixture(scope="module")
def crash_layout(tmp_path_factory):
    """(converted layout dir, every chunk digest of the image)"""
    require_fuse()
    root = tmp_path_factory.mktemp("crash-image")
    members = [dir_("etc/")] + [file_(path, data) for path, data in FILES.items()]
    return converted_one_layer(root, members, TAG, CHUNK)


def blob_reads(method, path, headers) -> bool:
    return "/blobs/" in path and "Range" in headers


def cached_chunks(cache_dir: Path) -> list[Path]:
    return [path for path in (cache_dir / "chunks").rglob("*") if path.is_file()]


def test_kill_9_mid_fetch_then_umount_and_remount_reads_right(crash_layout, nginx, tmp_path):
    layout, digests = crash_layout
    shutil.copytree(layout, Path(nginx.root) / "layout")
    cache_dir = tmp_path / "cache"
    mount_dir = tmp_path / "mnt"
    big = FILES["big.bin"]
    try:
        with FaultProxy(nginx.url) as proxy:
            image = f"{proxy.url}/layout:{TAG}"
            with mounted(image, mount_dir, "--no-prefetch", "--no-background-fetch",
                         cache_dir=cache_dir) as daemon:
                assert direct_read(mount_dir / "big.bin", 0, READ_BEFORE) == big[:READ_BEFORE]
                # (The fetcher writes a chunk to the disk cache just after handing it to its
                # readers: wait for the writes.)
                before = _wait_for_chunks(cache_dir, READ_BEFORE // CHUNK)

                # A sequential read: the rest of its request is readahead, ~9 chunks in one
                # answer, of which the proxy sends half and then nothing.
                proxy.inject("stall", match=blob_reads)
                outcome: list = []
                reader = threading.Thread(target=lambda: outcome.append(
                    _read_or_error(mount_dir / "big.bin", READ_BEFORE, len(big) - READ_BEFORE)))
                reader.start()
                deadline = time.monotonic() + 20
                while proxy.faults_applied == 0 or len(cached_chunks(cache_dir)) <= before:
                    assert time.monotonic() < deadline, "the stalled fetch cached nothing"
                    time.sleep(0.02)
                time.sleep(0.2)  # now in the silence: the daemon waits for the rest
                os.kill(daemon.pid, signal.SIGKILL)
                daemon.wait(timeout=10)
                reader.join(timeout=20)
                assert not reader.is_alive(), "a read hung after the daemon died"
                # The read failed (the kernel aborts the dead daemon's requests), or returned
                # a prefix that is right: never other bytes.
                [result] = outcome
                if isinstance(result, OSError):
                    assert result.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), result
                else:
                    assert result == big[READ_BEFORE:READ_BEFORE + len(result)]

                # The dead mount: stats says what happened and what to do; umount clears it.
                stats = subprocess.run(lazyfs_cmd("stats", mount_dir), capture_output=True,
                                       text=True, timeout=30)
                assert stats.returncode != 0
                assert "daemon is gone" in stats.stderr and "lazyfs umount" in stats.stderr
                umount = subprocess.run(lazyfs_cmd("umount", mount_dir), capture_output=True,
                                        text=True, timeout=30)
                assert umount.returncode == 0, umount.stderr
                assert not os.path.ismount(mount_dir)
                assert os.listdir(mount_dir) == []  # the plain directory again
        # What the crash left: only complete, verified chunks of the image (a temp file of the
        # killed writer would be tolerated: it is never read, and a later open removes it).
        survived = cached_chunks(cache_dir)
        assert len(survived) > before
        assert_cache_holds_only_verified(cache_dir, digests, temp_files_allowed=True)
        # A power loss after the rename, before the kernel flushed it: a cut chunk file. The
        # remount must refetch it, never serve it.
        survived[0].write_bytes(survived[0].read_bytes()[:100])

        with mounted(f"{nginx.url}/layout:{TAG}", mount_dir, "--no-prefetch",
                     "--no-background-fetch", cache_dir=cache_dir) as daemon:
            for path, data in FILES.items():
                assert direct_read(mount_dir / path, 0, len(data) + 1) == data
                with open(mount_dir / path, "rb") as f:  # and through the page cache
                    assert f.read() == data
            assert daemon.poll() is None
            [layer] = lazyfs_stats(mount_dir)["layers"]
            # The chunks cached before the crash were used, not fetched again.
            assert layer["cache_hits"] >= len(survived) - 1
            assert layer["bytes_fetched"] < layer["bytes_total"]
        assert_cache_holds_only_verified(cache_dir, digests)
    finally:
        if os.path.ismount(mount_dir) or _is_dead_mount(mount_dir):
            subprocess.run(["fusermount3", "-u", "-z", str(mount_dir)], capture_output=True)


def _wait_for_chunks(cache_dir: Path, at_least: int, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while (count := len(cached_chunks(cache_dir))) < at_least:
        assert time.monotonic() < deadline, f"{count} chunks cached, not {at_least}"
        time.sleep(0.02)
    return count


def _read_or_error(path: Path, offset: int, size: int):
    try:
        return direct_read(path, offset, size)
    except OSError as exc:
        return exc


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False
