"""The few Linux calls `lazyfs run` needs that Python's os module lacks: unshare, mount, umount2.

Used between fork and exec (subprocess preexec_fn) of the program or of crun, so the mounts
they make live only in a private mount namespace that dies with that process.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import socket
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# dlopen(NULL): the C library this process already has loaded. (ctypes.util.find_library
# forks `ldconfig -p` and parses its output, on the path to a cold start.)
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _encode(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)),
           f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_encode(target), flags), f"umount {target}")


def enter_private_mount_namespace(extra_flags: int = 0) -> None:
    """A new mount namespace (plus extra_flags namespaces) from which nothing propagates back."""
    unshare(CLONE_NEWNS | extra_flags)
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def mount_overlay(lower: str, upper: str, work: str, merged: str) -> None:
    mount("overlay", merged, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def loopback_up() -> None:
    """Bring `lo` up in a new network namespace (it starts down), as container runtimes do."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount this process sees, in mount order."""
    result = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                result.append((_unescape(fields[1]), fields[2]))
    return result


def set_readahead(device: int, size_bytes: int) -> bool:
    """Set the kernel's readahead window of a mounted filesystem (its st_dev) for its backing
    device info.

    For FUSE it also bounds how big the kernel's read requests to the daemon get (up to the
    1 MiB the FUSE protocol allows), hence how many requests a sequential read costs. Root
    only; False when the setting cannot be written.
    """
    try:
        bdi = f"{os.major(device)}:{os.minor(device)}"
        with open(f"/sys/class/bdi/{bdi}/read_ahead_kb", "w") as f:
            f.write(f"{max(4, size_bytes >> 10)}\n")
    except OSError:
        return False
    return True


def _unescape(field: str) -> str:
    # /proc/mounts and mountinfo escape blanks and backslashes as octal (\040).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
