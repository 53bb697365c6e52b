"""`lazyfs run` on a small real image: Debian's static busybox as the image's userland."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from converter.image import convert_image
from converter.layer import LayerOptions
from tests.imagebuild import write_layout
from tests.mounting import lazyfs_cmd, require_fuse
from tests.tarbuild import dir_, file_, symlink

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "ls", "wc", "mount", "id")


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory):
    require_fuse()
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is missing (apt-get install busybox-static)")
    root = tmp_path_factory.mktemp("bb")
    base = [dir_("bin/"), file_("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
            *(symlink(f"bin/{name}", "busybox") for name in APPLETS),
            dir_("etc/"), file_("etc/motd", b"from the lower layer\n")]
    upper = [dir_("etc/"), file_("etc/release", b"busybox test image 1\n")]
    source = write_layout(root / "source", [base, upper], "bb")
    converted = root / "converted"
    convert_image(f"{source}:bb", str(converted), archive=False, options=LayerOptions())
    return f"{converted}:bb"


def run(image, *command, scratch: Path, cache: Path):
    env = {**os.environ, "LAZYFS_RUN_DIR": str(scratch)}
    return subprocess.run(lazyfs_cmd("run", "--cache-dir", cache, image, "--", *command),
                          capture_output=True, text=True, env=env, timeout=120)


def test_run_streams_output_and_returns_the_exit_status(busybox_image, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    script = ("cat /etc/motd /etc/release; echo computed $((6 * 7)); "
              "echo written > /etc/new && cat /etc/new; ls /proc/self/fd > /dev/null && echo proc ok; "
              "exit 5")
    result = run(busybox_image, "/bin/sh", "-c", script, scratch=scratch, cache=tmp_path / "cache")
    assert result.returncode == 5, result.stderr
    assert result.stdout.splitlines() == ["from the lower layer", "busybox test image 1", "computed 42",
                                          "written", "proc ok"]
    # Everything is cleaned up: no scratch directories, no mounts left behind.
    assert list(scratch.iterdir()) == []
    assert str(scratch) not in Path("/proc/mounts").read_text()


def test_the_image_is_unchanged_by_a_run(busybox_image, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    first = run(busybox_image, "/bin/sh", "-c", "echo changed > /etc/motd; cat /etc/motd",
                scratch=scratch, cache=tmp_path / "cache")
    assert (first.returncode, first.stdout) == (0, "changed\n"), first.stderr
    second = run(busybox_image, "/bin/cat", "/etc/motd", scratch=scratch, cache=tmp_path / "cache")
    assert (second.returncode, second.stdout) == (0, "from the lower layer\n"), second.stderr


def test_a_missing_program_is_a_clear_error(busybox_image, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = run(busybox_image, "/bin/not-there", scratch=scratch, cache=tmp_path / "cache")
    assert result.returncode != 0 and "not-there" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(scratch.iterdir()) == []
