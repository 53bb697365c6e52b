"""Build real OCI image layouts for tests: gzip layers made with tarfile, tagged in index.json."""

from __future__ import annotations

from pathlib import Path

from lazyfs.oci_layout import write_gzip_layout
from tests.tarbuild import tar_bytes


def write_layout(layout: Path, layers: list[list], tag: str = "test",
                 config: dict | None = None) -> Path:
    """An OCI image layout at `layout` whose layers are the given member lists (lowest first).

    `config` is the image config's runtime part (Env, Cmd, Entrypoint, WorkingDir, User...).
    """
    write_gzip_layout(str(layout), [tar_bytes(*members) for members in layers], tag,
                      runtime_config=config, architecture="amd64")
    return layout


def converted_one_layer(root: Path, members: list, tag: str, chunk_size: int,
                        layer_format: str = "estargz") -> tuple[Path, set[str]]:
    """A one-layer image of `members`, converted (root/converted): (its layout, the digest of
    every chunk in it)."""
    from converter.image import convert_image
    from converter.layer import LayerOptions
    from lazyfs.blobfile import LocalBlob, SeekableLayer
    from lazyfs.oci_layout import open_image

    source = write_layout(root / "source", [members], tag)
    converted = root / "converted"
    convert_image(f"{source}:{tag}", str(converted), archive=False,
                  options=LayerOptions(format=layer_format, chunk_size=chunk_size))
    with open_image(f"{converted}:{tag}") as image:
        [desc] = image.layers
        with LocalBlob(image.blobs.unverified_path(desc)) as blob:
            digests = {chunk.digest for item in SeekableLayer.open(blob).entries
                       for chunk in item.chunks}
    return converted, digests
