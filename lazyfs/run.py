"""`lazyfs run IMAGE -- CMD ARGS...`: start a program from a lazily mounted image.

    lower  = the image, mounted read-only by a lazyfs daemon
    merged = overlayfs(lower, upper = a temporary directory) so the program can write
    /proc, /dev, /sys from the host, then chroot(merged) and exec CMD

The overlay and the special mounts are made inside a private mount namespace that only the
program lives in, so they disappear with it and are never visible on the host; then the lazy
mount is unmounted and the temporary directories removed. The program's output streams
through, and its exit status becomes ours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import tempfile

from lazyfs.errors import LazyfsError
from lazyfs.mount import MountOptions, mount, umount

_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 0x1
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)),
           f"mount {target}")


def _enter_container(lower: str, upper: str, work: str, merged: str):
    """Runs in the child between fork and exec: namespace, overlay, special mounts, chroot."""

    def prepare() -> None:
        _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        # Nothing we mount from here on may propagate back to the host.
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        _mount("overlay", merged, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")
        for name, source, fstype, flags in (("proc", "proc", "proc", 0),
                                            ("dev", "/dev", None, _MS_BIND | _MS_REC),
                                            ("sys", "/sys", None, _MS_BIND | _MS_REC)):
            target = os.path.join(merged, name)
            os.makedirs(target, exist_ok=True)
            _mount(source, target, fstype, flags)
        os.chroot(merged)
        os.chdir("/")

    return prepare


DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root"}


def start_in_image(lower: str, command: list[str], *, env: dict | None = None,
                   stdout=None) -> tuple[subprocess.Popen, str]:
    """Start `command` in a writable overlay over the mounted image at `lower`.

    Returns the process and the scratch directory to remove once it has exited.
    """
    if not command:
        raise LazyfsError("no command to run: lazyfs run IMAGE -- CMD ARGS...")
    if os.geteuid() != 0:
        raise LazyfsError("lazyfs run needs root (mount namespaces, overlayfs and chroot)")
    scratch = tempfile.mkdtemp(prefix="lazyfs-run-", dir=os.environ.get("LAZYFS_RUN_DIR"))
    upper, work, merged = (os.path.join(scratch, d) for d in ("upper", "work", "merged"))
    for path in (upper, work, merged):
        os.mkdir(path)
    program_env = env if env is not None else {**DEFAULT_ENV, "TERM": os.environ.get("TERM", "dumb")}
    try:
        process = subprocess.Popen(command, preexec_fn=_enter_container(lower, upper, work, merged),
                                   env=program_env, close_fds=True, stdout=stdout)
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise LazyfsError(f"cannot start {command[0]!r} in the image: {exc}") from None
    return process, scratch


def exit_status(returncode: int) -> int:
    """A shell-style status: a program killed by signal N gives 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def run(image: str, command: list[str], options: MountOptions, *, env: dict | None = None) -> int:
    if os.geteuid() != 0:
        raise LazyfsError("lazyfs run needs root (mount namespaces, overlayfs and chroot)")
    lower = tempfile.mkdtemp(prefix="lazyfs-image-", dir=os.environ.get("LAZYFS_RUN_DIR"))
    options.foreground = False
    code = mount(image, lower, options, quiet=True)
    if code != 0:
        os.rmdir(lower)
        return code
    try:
        process, scratch = start_in_image(lower, command, env=env)
        try:
            return exit_status(process.wait())
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        try:
            umount(lower)
            os.rmdir(lower)
        except (LazyfsError, OSError) as exc:
            print(f"lazyfs run: {exc}", file=sys.stderr)
