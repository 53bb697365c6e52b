"""The multi-layer test image shared by the mount tests: every feature a rootfs has, with the
tree that extracting its layers in order gives (umoci unpack, an independent implementation of
the OCI whiteout rules) as the oracle."""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from converter.image import convert_image
from converter.layer import LayerOptions
from lazyfs.format.seekable import FORMATS
from tests.imagebuild import write_layout
from tests.mounting import require_fuse
from tests.tarbuild import blockdev, chardev, dir_, fifo, file_, hardlink, symlink

TAG = "test"
BIG = random.Random(7).randbytes(9 * 1024 * 1024 + 12345)  # three 4 MiB chunks
MANY = 20_000


def base_layer():
    members = [
        dir_("etc/"), file_("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        file_("etc/shadow", b"secret\n", mode=0o600),
        dir_("usr/"), dir_("usr/bin/"),
        file_("usr/bin/tool", b"\x7fELF" + bytes(range(256)) * 40, mode=0o4755),
        hardlink("usr/bin/tool-link", "usr/bin/tool"),
        symlink("usr/bin/alias", "tool"),
        file_("usr/bin/owned", b"owned", uid=1000, gid=1001, uname="alice", gname="staff", mode=0o640),
        dir_("dev/"), chardev("dev/null", 1, 3, mode=0o666), blockdev("dev/sda", 8, 0, mode=0o660),
        fifo("dev/fifo"),
        file_("xattrs", b"x", xattrs={"user.note": b"hello", "user.bin": b"\x00\x01\xff"}),
        dir_("data/", mode=0o1777), file_("data/big.bin", BIG),
        file_("data/empty"),
        file_("gone", b"deleted by layer 2"),
        dir_("gone-dir/"), file_("gone-dir/a", b"a"), dir_("gone-dir/sub/"), file_("gone-dir/sub/b", b"b"),
        dir_("opaque/"), file_("opaque/lower", b"hidden by the opaque marker"),
        file_("replaced", b"old content"),
        dir_("many/"),
    ]
    members += [file_(f"many/f{i:05d}", b"%d\n" % i if i % 3 else b"") for i in range(MANY)]
    return members


def upper_layer():
    return [
        file_(".wh.gone"),
        file_(".wh.gone-dir"),
        dir_("opaque/"), file_("opaque/.wh..wh..opq"), file_("opaque/upper", b"stays"),
        file_("replaced", b"new content, longer than before"),
        dir_("etc/"), file_("etc/added", b"added by layer 2\n"),
        dir_("usr/"), dir_("usr/bin/"), file_(".wh.nonexistent"),
    ]


@pytest.fixture(scope="session")
def source_image(tmp_path_factory):
    """(source layout, the oracle rootfs), built once for both formats."""
    require_fuse()
    if shutil.which("umoci") is None:
        pytest.skip("umoci is missing (apt-get install umoci): it is the independent oracle")
    root = tmp_path_factory.mktemp("image")
    source = write_layout(root / "source", [base_layer(), upper_layer()], TAG)
    bundle = root / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{source}:{TAG}", str(bundle)], check=True,
                   capture_output=True)
    return source, bundle / "rootfs"


@pytest.fixture(scope="session", params=FORMATS)
def image(request, source_image, tmp_path_factory):
    """(source layout, converted layout, the oracle rootfs), once per seekable format."""
    source, rootfs = source_image
    converted = tmp_path_factory.mktemp("converted") / request.param.replace(":", "-")
    convert_image(f"{source}:{TAG}", str(converted), archive=False,
                  options=LayerOptions(format=request.param))
    return source, converted, rootfs
