"""Real FUSE mounts for tests: a daemon in a subprocess, waited for with a deadline, always
unmounted. Skips cleanly where FUSE is not available."""

from __future__ import annotations

import contextlib
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
