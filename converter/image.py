"""Convert a whole image: every layer to eStargz, then a new OCI layout or oci-archive.

The output is built in a work directory beside dst and renamed into place only when complete,
so a failure (or a kill) never leaves a half-written image at dst. The work directory also
receives the layers copied out of an input archive, so they live on dst's filesystem, not in
a possibly small /tmp.

What changes in the image: each layer becomes an eStargz blob (media type tar+gzip, annotated
with its TOC digest and uncompressed size); the config gets the new diff_ids and nothing else
changes in it; the manifest is new (OCI); index.json tags it with the input's tag.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass

from tqdm import tqdm

from converter.inputs import open_image_input
from converter.layer import LayerOptions, LayerResult, convert_layer
from lazyfs.errors import FormatError, LazyfsError, NotFound
from lazyfs.format import oci
from lazyfs.format.oci import Descriptor
from lazyfs.oci_layout import ImageSource

_DIR_MODE = 0o755
_FILE_MODE = 0o644


@dataclass(frozen=True)
class ImageResult:
    manifest_digest: str
    config_digest: str
    tag: str | None
    layers: tuple[LayerResult, ...]    # bottom layer first


def convert_image(src_ref: str, dst: str, *, archive: bool, options: LayerOptions,
                  progress: bool | None = None, sources=None) -> ImageResult:
    """Convert the image src_ref ("PATH[:TAG|@DIGEST]": OCI layout, oci-archive or
    docker-archive, or any remote image reference lazyfs.imageref reads, reached with
    `sources`) into an OCI layout directory at dst, or an oci-archive tar if archive.

    progress: a bar over layers on stderr; None means "if stderr is a terminal and there is
    more than one layer".
    """
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    if os.path.lexists(dst):
        raise LazyfsError(f"{dst}: already exists; remove it or choose another destination")
    if not os.path.isdir(parent):
        raise NotFound(f"{parent}: no such directory for the output")
    work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".partial", dir=parent)
    try:
        with open_image_input(src_ref, tmp_dir=work_dir, sources=sources) as source:
            out_path = os.path.join(work_dir, "image.tar" if archive else "layout")
            writer = ArchiveWriter(out_path) if archive else LayoutWriter(out_path)
            with writer:
                result = _convert(source, writer, work_dir, options, progress)
        os.rename(out_path, dst)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


def _convert(source: ImageSource, writer: LayoutWriter | ArchiveWriter, work_dir: str,
             options: LayerOptions, progress: bool | None) -> ImageResult:
    for desc in source.layers:
        if desc.media_type not in oci.LAYER_MEDIA_TYPES:
            raise FormatError(f"{source.name}: layer {desc.digest} has unsupported media type"
                              f" {desc.media_type!r}")
    results = _convert_layers(source, writer, work_dir, options, progress)
    _check_prioritized_found(options.prioritized_files, results)
    config_bytes = oci.encode_json(
        oci.config_with_diff_ids(source.config, [r.diff_id for r in results]))
    config_desc = writer.add_blob_bytes(oci.OCI_CONFIG, config_bytes)
    manifest = oci.build_manifest(config_desc, [_layer_descriptor(r) for r in results],
                                  source.manifest.annotations)
    manifest_desc = writer.add_blob_bytes(oci.OCI_MANIFEST, oci.encode_json(manifest))
    entry = dataclasses.replace(
        manifest_desc, platform=oci.config_platform(source.config),
        annotations={oci.ANNOTATION_REF_NAME: source.tag} if source.tag else {})
    writer.add_file("index.json", oci.encode_json(oci.build_index([entry])))
    writer.add_file("oci-layout", oci.OCI_LAYOUT_FILE_BYTES)
    return ImageResult(manifest_desc.digest, config_desc.digest, source.tag, tuple(results))


def _convert_layers(source: ImageSource, writer: LayoutWriter | ArchiveWriter, work_dir: str,
                    options: LayerOptions, progress: bool | None) -> list[LayerResult]:
    # A prioritized file lives in one layer, so no single layer may insist on having them all;
    # the image as a whole is checked afterwards.
    layer_options = dataclasses.replace(options, missing_prioritized_ok=True)
    staged_path = os.path.join(work_dir, "layer.estargz")
    show = progress if progress is not None else len(source.layers) > 1 and sys.stderr.isatty()
    results = []
    with tqdm(total=len(source.layers), unit="layer", desc="converting", file=sys.stderr,
              disable=not show) as bar:
        for number, desc in enumerate(source.layers, 1):
            blob_path = source.blob_path(desc)
            try:
                result = convert_layer(blob_path, staged_path, layer_options)
            except (FormatError, NotFound) as exc:   # say which layer: its message cannot
                raise type(exc)(f"{source.name}: layer {number} ({desc.digest}): {exc}") from exc
            writer.move_blob(result.blob_digest, staged_path)
            results.append(result)
            bar.update(1)
    return results


def _check_prioritized_found(listed: tuple[str, ...], results: list[LayerResult]) -> None:
    """Raise NotFound if a prioritized file is in no layer at all."""
    if not listed:
        return
    missing = set(listed)
    for result in results:
        missing &= set(result.missing_prioritized)
    if missing:
        names = sorted(missing)
        raise NotFound(f"{len(names)} prioritized file(s) in no layer of the image: "
                       + ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else ""))


def _layer_descriptor(result: LayerResult) -> Descriptor:
    return Descriptor(result.media_type, result.blob_digest, result.blob_size, dict(result.annotations))


# --- Writers -----------------------------------------------------------------------------------

class LayoutWriter:
    """Writes an OCI layout directory."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"))

    def move_blob(self, digest: str, path: str) -> None:
        """Move the file at path into the layout as the blob digest names."""
        # A duplicate layer yields the same digest: replacing the file with itself is harmless.
        os.replace(path, os.path.join(self.root, oci.blob_relpath(digest)))

    def add_blob_bytes(self, media_type: str, data: bytes) -> Descriptor:
        desc = oci.descriptor_of(media_type, data)
        self.add_file(oci.blob_relpath(desc.digest), data)
        return desc

    def add_file(self, relpath: str, data: bytes) -> None:
        with open(os.path.join(self.root, relpath), "wb") as f:
            f.write(data)

    def __enter__(self) -> LayoutWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


class ArchiveWriter:
    """Writes an oci-archive: the layout's files streamed into one tar as they are produced.

    Streaming rather than tarring a finished layout halves the disk needed. Entries carry
    fixed owners, modes and mtime, so the same image always gives the same archive bytes.
    """

    def __init__(self, path: str):
        self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)
        self._blobs: set[str] = set()
        for name in ("blobs", "blobs/sha256"):
            self._tar.addfile(_tar_info(name, tarfile.DIRTYPE, _DIR_MODE))

    def move_blob(self, digest: str, path: str) -> None:
        if digest not in self._blobs:
            info = _tar_info(oci.blob_relpath(digest), tarfile.REGTYPE, _FILE_MODE)
            info.size = os.path.getsize(path)
            with open(path, "rb") as f:
                self._tar.addfile(info, f)
            self._blobs.add(digest)
        os.unlink(path)

    def add_blob_bytes(self, media_type: str, data: bytes) -> Descriptor:
        desc = oci.descriptor_of(media_type, data)
        if desc.digest not in self._blobs:
            self.add_file(oci.blob_relpath(desc.digest), data)
            self._blobs.add(desc.digest)
        return desc

    def add_file(self, relpath: str, data: bytes) -> None:
        info = _tar_info(relpath, tarfile.REGTYPE, _FILE_MODE)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._tar.close()


def _tar_info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, 0
    return info
