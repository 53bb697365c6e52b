"""Build real OCI image layouts for tests: gzip layers made with tarfile, tagged in index.json."""

from __future__ import annotations

import gzip
from pathlib import Path

from lazyfs.format import oci
from tests.tarbuild import tar_bytes


def write_layout(layout: Path, layers: list[list], tag: str = "test",
                 config: dict | None = None) -> Path:
    """An OCI image layout at `layout` whose layers are the given member lists (lowest first).

    `config` is the image config's runtime part (Env, Cmd, Entrypoint, WorkingDir, User...).
    """
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str, annotations=None) -> oci.Descriptor:
        descriptor = oci.descriptor_of(media_type, data, annotations)
        (blobs / descriptor.digest.split(":", 1)[1]).write_bytes(data)
        return descriptor

    tars = [tar_bytes(*members) for members in layers]
    layer_descriptors = [put(gzip.compress(t, mtime=0), oci.OCI_LAYER_GZIP) for t in tars]
    image_config = {"architecture": "amd64", "os": "linux", "config": dict(config or {}),
                    "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(t) for t in tars]}}
    config_descriptor = put(oci.encode_json(image_config), oci.OCI_CONFIG)
    manifest = put(oci.encode_json(oci.build_manifest(config_descriptor, layer_descriptors)),
                   oci.OCI_MANIFEST, {oci.ANNOTATION_REF_NAME: tag})
    (layout / "oci-layout").write_bytes(oci.OCI_LAYOUT_FILE_BYTES)
    (layout / "index.json").write_bytes(oci.encode_json(oci.build_index([manifest])))
    return layout
