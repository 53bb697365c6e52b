"""What the benchmarks share: a one-layer source image, cache dropping, load checks, and a
`lazyfs mount --foreground` daemon that is always unmounted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lazyfs.format import oci

MOUNT_DEADLINE_SECONDS = 60
STATS_XATTR = "user.lazyfs.stats"


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return "sha256:" + sha.hexdigest()


def write_one_layer_layout(layout: Path, layer: Path, media_type: str, diff_id: str, tag: str) -> None:
    """An OCI layout whose only layer is the file `layer` (hard-linked, not copied), tagged."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer_desc = oci.Descriptor(media_type, sha256_file(layer), layer.stat().st_size)
    os.link(layer, blobs / layer_desc.digest.split(":", 1)[1])

    def put(data: bytes, kind: str, annotations=None) -> oci.Descriptor:
        desc = oci.descriptor_of(kind, data, annotations)
        (blobs / desc.digest.split(":", 1)[1]).write_bytes(data)
        return desc

    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    config_desc = put(oci.encode_json(config), oci.OCI_CONFIG)
    manifest = put(oci.encode_json(oci.build_manifest(config_desc, [layer_desc])), oci.OCI_MANIFEST,
                   {oci.ANNOTATION_REF_NAME: tag})
    (layout / "oci-layout").write_bytes(oci.OCI_LAYOUT_FILE_BYTES)
    (layout / "index.json").write_bytes(oci.encode_json(oci.build_index([manifest])))


def drop_caches() -> None:
    """Empty the kernel's page cache, so reads reach the disk or the FUSE daemon."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def other_cpu_use(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` while this benchmark is idle: other load."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def report_machine_load() -> float:
    busy = other_cpu_use()
    print(f"other CPU use before measuring: {busy:.0%} of {os.cpu_count()} CPUs"
          + ("  WARNING: the machine is busy; figures will be low and noisy" if busy > 0.2 else ""))
    return busy


def check_system() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache and mounts with allow_other")
    if not os.path.exists("/dev/fuse"):
        sys.exit("no /dev/fuse on this machine")
    if shutil.which("fusermount3") is None:
        sys.exit("fusermount3 is missing (apt-get install fuse3)")


class Mount:
    """A `lazyfs mount --foreground` daemon in a subprocess. `seconds` is the time until the
    mount answered a stat of its root. Always unmounted on exit."""

    def __init__(self, image: str, mountpoint: Path, cache_dir: Path, log: Path, *extra: str):
        self.image, self.mountpoint, self.cache_dir, self.log = image, mountpoint, cache_dir, log
        self.extra = extra
        self.daemon: subprocess.Popen | None = None
        self.seconds = 0.0

    def __enter__(self) -> "Mount":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if os.path.ismount(self.mountpoint):
            sys.exit(f"{self.mountpoint} is already a mount point")
        cmd = [sys.executable, "-m", "lazyfs", "mount", "--foreground", "--cache-dir",
               str(self.cache_dir), *self.extra, self.image, str(self.mountpoint)]
        with open(self.log, "ab") as log:
            start = time.perf_counter()
            self.daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + MOUNT_DEADLINE_SECONDS
            while True:
                if os.path.ismount(self.mountpoint):
                    os.stat(self.mountpoint)  # served by the daemon: the mount answers
                    self.seconds = time.perf_counter() - start
                    break
                if self.daemon.poll() is not None:
                    raise RuntimeError(f"the mount daemon exited with {self.daemon.returncode}:\n"
                                       + self.log.read_text(errors="replace")[-3000:])
                if time.monotonic() > deadline:
                    raise RuntimeError("the mount did not appear in time:\n"
                                       + self.log.read_text(errors="replace")[-3000:])
                time.sleep(0.002)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def stats(self) -> dict:
        """The daemon's counters summed over layers (read outside the timed passes)."""
        report = json.loads(os.getxattr(self.mountpoint, STATS_XATTR))
        keys = ("chunks_fetched", "bytes_fetched", "cache_hits", "cache_misses", "bytes_served")
        return {k: sum(layer.get(k, 0) for layer in report["layers"]) for k in keys}

    def __exit__(self, *exc) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        if self.daemon is None:
            return
        try:
            self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
