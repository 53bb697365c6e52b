"""Real kernel mounts of converted multi-layer images, compared with what extracting the layers
in order produces (umoci unpack applies the OCI whiteout rules independently of us)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.mounting import daemon_log, lazyfs_cmd, mounted, require_fuse
from tests.tarbuild import tree_of
from tests.testimage import BIG, MANY, TAG


@pytest.fixture
def mount_dir(tmp_path):
    return tmp_path / "mnt"


def test_mounted_image_equals_the_extracted_layers(image, mount_dir, tmp_path):
    _, converted, rootfs = image
    with mounted(f"{converted}:{TAG}", mount_dir, cache_dir=tmp_path / "cache"):
        actual = tree_of(mount_dir)
        expected = tree_of(rootfs)
        assert actual.keys() == expected.keys()
        assert actual == expected
        assert len(os.listdir(mount_dir / "many")) == MANY
        assert (mount_dir / "data/big.bin").read_bytes() == BIG
        assert not (mount_dir / "gone").exists() and not (mount_dir / "gone-dir").exists()
        assert sorted(os.listdir(mount_dir / "opaque")) == ["upper"]


def test_attributes_and_special_files(image, mount_dir, tmp_path):
    _, converted, _ = image
    with mounted(f"{converted}:{TAG}", mount_dir, cache_dir=tmp_path / "cache"):
        tool, link = os.lstat(mount_dir / "usr/bin/tool"), os.lstat(mount_dir / "usr/bin/tool-link")
        assert tool.st_ino == link.st_ino and tool.st_nlink == 2
        assert stat.S_IMODE(tool.st_mode) == 0o4755
        owned = os.lstat(mount_dir / "usr/bin/owned")
        assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1000, 1001, 0o640)
        null = os.lstat(mount_dir / "dev/null")
        assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
        assert stat.S_ISBLK(os.lstat(mount_dir / "dev/sda").st_mode)
        assert stat.S_ISFIFO(os.lstat(mount_dir / "dev/fifo").st_mode)
        assert os.readlink(mount_dir / "usr/bin/alias") == "tool"
        assert os.getxattr(mount_dir / "xattrs", "user.bin") == b"\x00\x01\xff"
        assert sorted(os.listxattr(mount_dir / "xattrs")) == ["user.bin", "user.note"]
        assert stat.S_IMODE(os.lstat(mount_dir / "data").st_mode) == 0o1777
        fs = os.statvfs(mount_dir)
        assert fs.f_namemax == 255 and fs.f_files >= MANY
        # Read-only: writes are refused, nothing changes.
        with pytest.raises(OSError) as refused:
            open(mount_dir / "etc/passwd", "w")
        assert refused.value.errno == errno.EROFS
        # Inode numbers are stable across remounts.
        inodes = {p: os.lstat(mount_dir / p).st_ino for p in ("etc/passwd", "many/f12345", "data")}
    with mounted(f"{converted}:{TAG}", mount_dir, cache_dir=tmp_path / "cache"):
        assert inodes == {p: os.lstat(mount_dir / p).st_ino for p in inodes}


def test_reads_at_every_offset_match(image, mount_dir, tmp_path):
    _, converted, _ = image
    rng = random.Random(3)
    with mounted(f"{converted}:{TAG}", mount_dir, cache_dir=tmp_path / "cache"):
        fd = os.open(mount_dir / "data/big.bin", os.O_RDONLY)
        try:
            for _ in range(200):
                offset = rng.randrange(len(BIG) + 10)
                length = rng.choice([1, 4096, 65536, 5 << 20])
                assert os.pread(fd, length, offset) == BIG[offset:offset + length]
        finally:
            os.close(fd)


def test_stats_are_readable_while_mounted(image, mount_dir, tmp_path):
    _, converted, _ = image
    with mounted(f"{converted}:{TAG}", mount_dir, cache_dir=tmp_path / "cache"):
        (mount_dir / "data/big.bin").read_bytes()
        result = subprocess.run(lazyfs_cmd("stats", mount_dir, "--json"), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["verified"] is True and len(report["layers"]) == 2
        base = report["layers"][0]
        assert base["chunks_fetched"] >= 3 and base["bytes_served"] >= len(BIG)
        assert 0 < base["bytes_fetched"] <= base["bytes_total"]
        human = subprocess.run(lazyfs_cmd("stats", mount_dir), capture_output=True, text=True)
        assert human.returncode == 0 and "bytes_fetched" in human.stdout


def chunk_cache_files(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "chunks").rglob("*") if p.is_file()]


def test_a_corrupt_cache_file_is_refetched_never_served(image, mount_dir, tmp_path):
    _, converted, _ = image
    cache = tmp_path / "cache"
    with mounted(f"{converted}:{TAG}", mount_dir, cache_dir=cache):
        assert (mount_dir / "data/big.bin").read_bytes() == BIG
    files = chunk_cache_files(cache)
    assert files, "reading should have filled the chunk cache"
    for path in files:
        data = bytearray(path.read_bytes())
        if data:
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with mounted(f"{converted}:{TAG}", mount_dir, cache_dir=cache):
        assert hashlib.sha256((mount_dir / "data/big.bin").read_bytes()).digest() == hashlib.sha256(BIG).digest()


def test_a_tampered_chunk_is_an_error_for_that_file_only(image, mount_dir, tmp_path):
    _, converted, _ = image
    tampered = tmp_path / "tampered"
    shutil.copytree(converted, tampered)
    from lazyfs.blobfile import LocalBlob, SeekableLayer
    from lazyfs.oci_layout import open_image

    with open_image(f"{tampered}:{TAG}") as img:
        blob_path = img.blobs.unverified_path(img.layers[0])
    with LocalBlob(blob_path) as blob:
        items = {i.path: i for i in SeekableLayer.open(blob).entries}
    chunk = items["data/big.bin"].chunks[1]
    os.chmod(blob_path, 0o644)
    with open(blob_path, "r+b") as f:  # random data is stored, so the flip inflates fine
        f.seek(chunk.blob_offset + (chunk.blob_end - chunk.blob_offset) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with mounted(f"{tampered}:{TAG}", mount_dir, cache_dir=tmp_path / "cache"):
        fd = os.open(mount_dir / "data/big.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == BIG[:4096]  # chunk 0 is intact
            with pytest.raises(OSError) as failed:
                os.pread(fd, 4096, chunk.file_offset + 10)
            assert failed.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert (mount_dir / "etc/passwd").read_bytes().startswith(b"root:")
        report = json.loads(os.getxattr(mount_dir, "user.lazyfs.stats"))
        # The gzip CRC or the chunk digest catches it, whichever comes first.
        assert report["layers"][0]["last_error"].startswith(("VerificationError", "FormatError"))
    assert "Traceback" not in daemon_log(mount_dir)


def test_lone_blob_needs_a_pin(image, mount_dir, tmp_path):
    _, converted, _ = image
    from lazyfs.oci_layout import open_image

    with open_image(f"{converted}:{TAG}") as img:
        desc = img.layers[1]
        blob = tmp_path / "upper.blob"
        shutil.copy(img.blobs.unverified_path(desc), blob)
        toc_digest = desc.annotations["containerd.io/snapshot/stargz/toc.digest"]
    mount_dir.mkdir(exist_ok=True)
    refused = subprocess.run(lazyfs_cmd("mount", blob, mount_dir), capture_output=True, text=True)
    assert refused.returncode == 3 and "--toc-digest" in refused.stderr
    wrong = subprocess.run(lazyfs_cmd("mount", "--toc-digest", "sha256:" + "1" * 64, blob, mount_dir),
                           capture_output=True, text=True)
    assert wrong.returncode == 3 and "pinned" in wrong.stderr and not os.path.ismount(mount_dir)
    with mounted(blob, mount_dir, "--toc-digest", toc_digest, cache_dir=tmp_path / "cache"):
        assert (mount_dir / "opaque/upper").read_bytes() == b"stays"
    with mounted(blob, mount_dir, "--insecure-skip-verify", cache_dir=tmp_path / "cache"):
        report = json.loads(os.getxattr(mount_dir, "user.lazyfs.stats"))
        assert report["verified"] is False and "INSECURE" in report["warning"]


def test_background_mount_and_umount(image, mount_dir, tmp_path):
    require_fuse()
    _, converted, _ = image
    mount_dir.mkdir()
    started = subprocess.run(lazyfs_cmd("mount", "--cache-dir", tmp_path / "cache", f"{converted}:{TAG}", mount_dir),
                             capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        assert os.path.ismount(mount_dir)  # ready when the command returns
        assert (mount_dir / "etc/added").read_bytes() == b"added by layer 2\n"
    finally:
        stopped = subprocess.run(lazyfs_cmd("umount", mount_dir), capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr
    assert not os.path.ismount(mount_dir)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unmounts_cleanly(image, mount_dir, tmp_path, signal_number):
    _, converted, _ = image
    with mounted(f"{converted}:{TAG}", mount_dir, cache_dir=tmp_path / "cache") as daemon:
        daemon.send_signal(signal_number)
        assert daemon.wait(timeout=20) == 0
        assert not os.path.ismount(mount_dir)


def test_a_killed_daemon_leaves_a_mount_umount_can_clear(image, mount_dir, tmp_path):
    _, converted, _ = image
    with mounted(f"{converted}:{TAG}", mount_dir, cache_dir=tmp_path / "cache") as daemon:
        daemon.kill()
        daemon.wait()
        with pytest.raises(OSError) as dead:
            os.listdir(mount_dir)
        assert dead.value.errno == errno.ENOTCONN
        cleared = subprocess.run(lazyfs_cmd("umount", mount_dir), capture_output=True, text=True)
        assert cleared.returncode == 0, cleared.stderr
        assert not os.path.ismount(mount_dir)


def _bdi_readahead_kib(mount_dir: Path) -> int:
    device = os.stat(mount_dir).st_dev
    path = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    return int(path.read_text())


@pytest.mark.parametrize("option, expected_kib", [((), 1024), (("--kernel-readahead", "256K"), 256)])
def test_the_kernel_readahead_is_set_so_reads_arrive_in_big_requests(image, mount_dir, tmp_path,
                                                                    option, expected_kib):
    _, converted, _ = image
    with mounted(f"{converted}:{TAG}", mount_dir, *option, cache_dir=tmp_path / "cache"):
        # A --foreground mount is up before it tunes (the daemon's readiness report waits).
        deadline = time.monotonic() + 10
        while _bdi_readahead_kib(mount_dir) != expected_kib and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _bdi_readahead_kib(mount_dir) == expected_kib
        assert (mount_dir / "data/big.bin").read_bytes() == BIG


def test_the_start_up_readahead_comes_first_when_recording_or_prefetching_recorded_reads(
        monkeypatch):
    """Recording: the start-up window all along. Prefetch ranges: the start-up window until
    the start-up settles (even if it settled before the mount served). Otherwise, and with
    --no-prefetch: the normal window from the start."""
    from lazyfs import mount as mount_module
    from lazyfs.fetchoptions import FetchOptions
    from lazyfs.layerspec import LayerSpec
    from lazyfs.mount import MountOptions, _readahead_for

    sets = []
    monkeypatch.setattr(mount_module, "_set_readahead", lambda device, size: sets.append(size))

    def layers(ranges):
        spec = LayerSpec(source=None, toc_digest=None, label="l", prefetch_ranges=ranges)
        return [type("Layer", (), {"spec": spec})()]

    options = MountOptions(kernel_readahead_bytes=1 << 20, startup_readahead_bytes=64 << 10)
    for opts, ranges, expected in (
            (options, [(0, 10)], [64 << 10, 1 << 20]),
            (options, None, [1 << 20]),
            (dataclasses.replace(options, fetch=FetchOptions(prefetch=False)), [(0, 10)],
             [1 << 20]),
            (dataclasses.replace(options, record=object()), None, [64 << 10])):
        sets.clear()
        readahead = _readahead_for(opts, layers(ranges))
        readahead.serving(7)
        readahead.settled()
        readahead.settled()
        assert sets == expected
    sets.clear()
    early = _readahead_for(options, layers([(0, 10)]))
    early.settled()
    early.serving(7)
    assert sets == [1 << 20]
