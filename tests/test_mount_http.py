"""The image published as a plain OCI layout on nginx (127.0.0.1), mounted over HTTP.

nginx's access log records every request with its Range header, so the tests can prove what
was fetched: only the chunks that reads touched, and nothing at all for a second read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.oci_layout import open_image
from tests.mounting import assert_mount_read_only_tocs, mounted
from tests.tarbuild import tree_of
from tests.testimage import BIG, TAG


@pytest.fixture
def published(image, nginx):
    """(layout URL with tag, {blob URI path: (entries by path, blob size, TOC region)})"""
    _, converted, _ = image
    shutil.copytree(converted, Path(nginx.root) / "layout")
    layers = {}
    with open_image(f"{converted}:{TAG}") as img:
        for desc in img.layers:
            path = img.blobs.unverified_path(desc)
            with LocalBlob(path) as blob:
                layer = SeekableLayer.open(blob)
                entries = {item.path: item for item in layer.entries}
                layers[f"/layout/blobs/sha256/{desc.digest.split(':')[1]}"] = (
                    entries, blob.size, layer.region)
    return f"{nginx.url}/layout:{TAG}", layers


def drop_kernel_caches() -> None:
    """So that a read reaches the FUSE daemon instead of the kernel's page cache."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def blob_ranges(nginx, layers) -> list[tuple[str, str]]:
    return [(r.uri, r.range) for r in nginx.requests() if r.uri in layers]


def chunk_range(chunk) -> str:
    return f"bytes={chunk.blob_offset}-{chunk.blob_end - 1}"


def test_mount_over_http_equals_the_extracted_layers(image, published, tmp_path):
    _, _, rootfs = image
    url, _ = published
    mount_dir = tmp_path / "mnt"
    with mounted(url, mount_dir, cache_dir=tmp_path / "cache"):
        assert tree_of(mount_dir) == tree_of(rootfs)


def test_only_touched_chunks_are_fetched_and_rereads_are_free(published, nginx, tmp_path):
    url, layers = published
    mount_dir = tmp_path / "mnt"
    base_uri = next(uri for uri, (entries, *_) in layers.items() if "data/big.bin" in entries)
    base_entries = layers[base_uri][0]
    big = base_entries["data/big.bin"]
    with mounted(url, mount_dir, "--no-background-fetch", cache_dir=tmp_path / "cache"):
        assert_mount_read_only_tocs(blob_ranges(nginx, layers),
                                    {uri: (size, region) for uri, (_, size, region)
                                     in layers.items()})
        nginx.clear_log()

        # Read 4 KiB in the middle of the big file's second chunk: exactly that chunk's range.
        with open(mount_dir / "data/big.bin", "rb") as f:
            f.seek(big.chunks[1].file_offset + 1000)
            assert f.read(4096) == BIG[big.chunks[1].file_offset + 1000:][:4096]
        assert blob_ranges(nginx, layers) == [(base_uri, chunk_range(big.chunks[1]))]
        nginx.clear_log()

        # A small file: its one chunk, from the layer that holds it.
        assert (mount_dir / "etc/passwd").read_bytes().startswith(b"root:")
        passwd = base_entries["etc/passwd"].chunks[0]
        assert blob_ranges(nginx, layers) == [(base_uri, chunk_range(passwd))]
        nginx.clear_log()

        # The same reads again, past the kernel's cache: served by lazyfs without a request.
        drop_kernel_caches()
        with open(mount_dir / "data/big.bin", "rb") as f:
            f.seek(big.chunks[1].file_offset)
            assert f.read(65536) == BIG[big.chunks[1].file_offset:][:65536]
        assert (mount_dir / "etc/passwd").read_bytes().startswith(b"root:")
        assert nginx.requests() == []

    # A remount with the same cache needs no blob request at all: TOCs and chunks are local.
    nginx.clear_log()
    with mounted(url, mount_dir, "--no-background-fetch", cache_dir=tmp_path / "cache"):
        assert (mount_dir / "etc/passwd").read_bytes().startswith(b"root:")
        assert blob_ranges(nginx, layers) == []
        assert {r.uri for r in nginx.requests()} <= {"/layout/index.json"} | {
            r.uri for r in nginx.requests() if "/blobs/" in r.uri and r.uri not in layers}


def test_a_tampered_blob_on_the_server_fails_that_read_only(published, nginx, tmp_path):
    url, layers = published
    base_uri = next(uri for uri, (entries, *_) in layers.items() if "data/big.bin" in entries)
    chunk = layers[base_uri][0]["data/big.bin"].chunks[2]
    served = Path(nginx.root) / base_uri.lstrip("/")
    with open(served, "r+b") as f:
        f.seek((chunk.blob_offset + chunk.blob_end) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    mount_dir = tmp_path / "mnt"
    with mounted(url, mount_dir, cache_dir=tmp_path / "cache"):
        fd = os.open(mount_dir / "data/big.bin", os.O_RDONLY)
        try:
            with pytest.raises(OSError):
                os.pread(fd, 4096, chunk.file_offset)
            assert os.pread(fd, 4096, 0) == BIG[:4096]
        finally:
            os.close(fd)
        assert (mount_dir / "etc/passwd").read_bytes().startswith(b"root:")
    assert not any((tmp_path / "cache" / "chunks").rglob(chunk.digest.split(":")[1]))
