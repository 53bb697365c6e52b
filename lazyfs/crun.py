"""`lazyfs run --runtime crun`: the program in a real OCI container, run by crun.

    bundle/config.json   process (args, env, cwd, user from the image config), root.path =
                         the merged overlay (writable), namespaces mount/pid/ipc/uts (+network
                         with --network none), /proc /dev /dev/pts /dev/shm /dev/mqueue /sys
    crun run --bundle BUNDLE ID     in the foreground: output streams through, its exit status
                                    is the program's (128 + N for a signal)
    crun delete -f ID               always, whatever happened

The overlay over the lazy mount is made in a private mount namespace that crun is started in
(as the chroot runtime does for the program), so it is never visible on the host and
disappears with crun; crun's own container mounts live in the container's namespace below it.

Cgroups (why `--cgroup-manager=disabled` and a hidden cgroup v2 mount): crun 1.8 detects a
"hybrid" host (cgroup v1 controllers on a tmpfs /sys/fs/cgroup plus a cgroup2 mount at
/sys/fs/cgroup/unified) and refuses to start any container ("cgroups in hybrid mode not
supported, drop all controllers from cgroupv2") when the v2 hierarchy has a controller bound
to it, as this kind of VM does (hugetlb). The check comes before the cgroup manager is chosen,
so `--cgroup-manager=disabled` alone does not help. Unmounting the cgroup2 mount inside the
private namespace crun runs in (never on the host) makes crun see a plain v1 ("legacy") host;
with the cgroupfs manager it would then create cgroups in the host's v1 hierarchies, so we
also disable the manager: lazyfs run sets no resource limits, and the container's processes
stay in the caller's cgroups, exactly as with the chroot runtime. Nothing about the host's
cgroups changes. On a pure cgroup v2 (or pure v1) host nothing is hidden.

Without a devices cgroup nothing would back the device allowlist, so the capability set is
Docker's default minus CAP_MKNOD (no device node can be made; /dev is a fresh tmpfs holding
crun's default devices only). A non-root user gets no effective capabilities.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys

from lazyfs import linux
from lazyfs.container import ProcessSpec
from lazyfs.errors import LazyfsError, NotFound

CRUN_STATE_DIR = "/run/crun"     # crun's default --root

# Docker's default capabilities without CAP_MKNOD (see the module docstring).
CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]

MASKED_PATHS = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap"]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

MOUNTS = [
    {"destination": "/proc", "type": "proc", "source": "proc",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs",
     "options": ["nosuid", "noexec", "nodev", "ro"]},
]

_GLOBAL_OPTIONS = ["--cgroup-manager=disabled"]


def find_crun() -> str:
    path = shutil.which("crun")
    if path is None:
        raise NotFound("--runtime crun: crun is not installed (apt-get install crun), "
                       "or use the default chroot runtime")
    return path


def oci_runtime_config(spec: ProcessSpec, rootfs: str, *, hostname: str,
                       private_network: bool = False) -> dict:
    """The bundle's config.json (OCI runtime spec 1.0)."""
    user: dict = {"uid": spec.user.uid, "gid": spec.user.gid}
    if spec.user.additional_gids:
        user["additionalGids"] = list(spec.user.additional_gids)
    effective = CAPABILITIES if spec.user.uid == 0 else []
    namespaces = ["pid", "ipc", "uts", "mount"] + (["network"] if private_network else [])
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": user,
            "args": list(spec.args),
            "env": [f"{name}={value}" for name, value in spec.env.items()],
            "cwd": spec.cwd,                       # crun creates it when missing
            "capabilities": {"bounding": CAPABILITIES, "effective": effective,
                             "permitted": effective, "inheritable": [], "ambient": []},
            "noNewPrivileges": False,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": hostname,
        "mounts": [dict(m, options=list(m["options"])) for m in MOUNTS],
        "linux": {
            "namespaces": [{"type": kind} for kind in namespaces],
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }


def cgroup2_mounts_to_hide(mounts: list[tuple[str, str]] | None = None) -> list[str]:
    """The cgroup2 mounts of a hybrid host, which crun 1.8 refuses (see the module docstring)."""
    mounts = linux.mounts() if mounts is None else mounts
    types = {point: fstype for point, fstype in mounts}   # the last mount at a point wins
    if types.get("/sys/fs/cgroup") == "cgroup2":
        return []                                          # unified: crun's own mode
    return sorted({point for point, fstype in mounts
                   if fstype == "cgroup2" and point.startswith("/sys/fs/cgroup/")},
                  key=len, reverse=True)                   # deepest first


def _crun_namespace(hidden: list[str], overlay: tuple[str, str, str, str] | None):
    """preexec_fn for crun: private mount namespace, cgroup2 hidden, the overlay mounted."""

    def prepare() -> None:
        try:
            linux.enter_private_mount_namespace()
            for point in hidden:
                linux.umount(point, linux.MNT_DETACH)
            if overlay is not None:
                linux.mount_overlay(*overlay)
        except BaseException as exc:
            # subprocess reports only "Exception occurred in preexec_fn": say what it was.
            os.write(2, f"lazyfs run: {exc}\n".encode(errors="replace"))
            raise

    return prepare


def run_in_crun(lower: str, spec: ProcessSpec, *, crun: str, private_network: bool = False,
                scratch_parent: str | None = None) -> int:
    """Run spec in a container whose root is a writable overlay over `lower`; its status."""
    from lazyfs.run import exit_status, make_scratch

    scratch, (upper, work, merged) = make_scratch(lower, scratch_parent)
    container_id = f"lazyfs-{os.getpid()}-{secrets.token_hex(4)}"
    hidden = cgroup2_mounts_to_hide()
    process = None
    try:
        config = oci_runtime_config(spec, merged, hostname=container_id,
                                    private_network=private_network)
        with open(os.path.join(scratch, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        try:
            process = subprocess.Popen(
                [crun, *_GLOBAL_OPTIONS, "run", "--bundle", scratch, container_id],
                preexec_fn=_crun_namespace(hidden, (lower, upper, work, merged)), close_fds=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise LazyfsError(f"cannot start crun: {exc}") from None
        return exit_status(process.wait())
    finally:
        _delete(crun, container_id, hidden)
        if process is not None and process.poll() is None:
            process.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def _delete(crun: str, container_id: str, hidden: list[str]) -> None:
    """`crun delete -f`: kills what is left and removes crun's state; quiet when already gone."""
    result = subprocess.run([crun, *_GLOBAL_OPTIONS, "delete", "-f", container_id],
                            preexec_fn=_crun_namespace(hidden, None), capture_output=True,
                            text=True, close_fds=True)
    if result.returncode != 0 and os.path.exists(os.path.join(CRUN_STATE_DIR, container_id)):
        print(f"lazyfs run: crun delete -f {container_id}: {result.stderr.strip()}",
              file=sys.stderr)

