"""`lazyfs inspect` and `lazyfs verify` over a lone blob or a whole OCI image."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TextIO

from lazyfs.blobfile import SeekableLayer, SourceBlob
from lazyfs.errors import FormatError, VerificationError
from lazyfs.format import oci
from lazyfs.format.toc import entry_to_json
from lazyfs.imageref import LoneBlob, SourceOptions, open_reference
from lazyfs.source import copy_to_file
from lazyfs.verify import LayerCheck, verify_layer


def _layer_report(blob: SourceBlob) -> dict:
    with blob:
        layer = SeekableLayer.open(blob)
        chunk_count = sum(len(item.chunks) for item in layer.entries)
        file_bytes = sum(item.entry.size for item in layer.entries if item.entry.type == "reg")
        return {
            "format": layer.format,
            "blob_size": blob.size,
            "toc_digest": layer.toc_digest,
            "toc_offset": layer.toc_blob_offset,
            "toc_size": layer.region.toc_end - layer.region.toc_start,
            "footer_size": layer.footer_size,
            "entry_count": len(layer.entries),
            "chunk_count": chunk_count,
            "file_bytes": file_bytes,
            "entries": [_entry_report(item) for item in layer.entries],
        }


def _entry_report(item) -> dict:
    out = entry_to_json(item.entry)
    out["xattrs"] = sorted(item.entry.xattrs)
    out["chunks"] = [
        {"file_offset": c.file_offset, "size": c.size, "blob_offset": c.blob_offset,
         "compressed_size": c.blob_end - c.blob_offset, "digest": c.digest}
        for c in item.chunks
    ]
    return out


def inspect_target(target: str, sources: SourceOptions | None = None) -> dict:
    """A JSON-ready description: {"kind", "layers": [...]} (plus manifest data for images).

    Only footers and TOCs are read, so a remote image is inspected without downloading it.
    """
    sources = sources or SourceOptions()
    image = open_reference(target, sources=sources)
    if isinstance(image, LoneBlob):
        blob = SourceBlob(sources.open(image.location))
        return {"kind": "blob", "path": target, "layers": [_layer_report(blob)]}
    with image:
        layers = []
        for descriptor in image.layers:
            report = {"digest": descriptor.digest, "media_type": descriptor.media_type,
                      "annotations": dict(descriptor.annotations or {})}
            report.update(_layer_report(SourceBlob(image.blobs.open_source(descriptor))))
            layers.append(report)
        return {"kind": "image", "path": target, "tag": image.tag,
                "manifest_digest": image.manifest_descriptor.digest, "layers": layers}


def _layer_checks(image) -> Iterator[tuple[LayerCheck, str]]:
    """What the manifest and config pin for each layer, with the layer's local path."""
    diff_ids = oci.config_diff_ids(image.config)
    for descriptor, diff_id in zip(image.layers, diff_ids):
        annotations = descriptor.annotations or {}
        toc_digest = annotations.get(oci.ANNOTATION_TOC_DIGEST)
        if not toc_digest:
            raise VerificationError(f"layer {descriptor.digest} has no {oci.ANNOTATION_TOC_DIGEST} "
                                    "annotation: its TOC is not pinned")
        size = annotations.get(oci.ANNOTATION_UNCOMPRESSED_SIZE)
        if size is not None and not (size.isascii() and size.isdigit()):
            raise FormatError(f"layer {descriptor.digest}: {oci.ANNOTATION_UNCOMPRESSED_SIZE} "
                              f"is not a decimal size: {size[:40]!r}")
        # Unverified path: verify_layer checks the blob digest itself, last, after the TOC and
        # the chunks, so a damaged layer is reported by its first bad chunk (and hashed once).
        yield (LayerCheck(toc_digest=toc_digest, blob_digest=descriptor.digest, diff_id=diff_id,
                          uncompressed_size=None if size is None else int(size)),
               image.blobs.unverified_path(descriptor))


def print_report(report: dict, out: TextIO) -> None:
    if report["kind"] == "image":
        print(f"image {report['path']}  tag {report.get('tag') or '-'}  manifest "
              f"{report['manifest_digest']}", file=out)
    for number, layer in enumerate(report["layers"], 1):
        title = layer.get("digest", os.path.basename(report["path"]))
        print(f"layer {number}: {title}", file=out)
        print(f"  format {layer['format']}, {layer['blob_size']} bytes, {layer['entry_count']} "
              f"entries, {layer['chunk_count']} chunks, {layer['file_bytes']} bytes of files", file=out)
        print(f"  TOC {layer['toc_digest']} at offset {layer['toc_offset']} "
              f"({layer['toc_size']} bytes compressed)", file=out)
        for entry in layer["entries"]:
            size = entry.get("size", 0)
            link = f" -> {entry['linkName']}" if entry.get("linkName") else ""
            print(f"  {entry['type']:8} {entry.get('mode', 0):06o} {size:>12} "
                  f"{len(entry['chunks']):>4}  {entry['name']}{link}", file=out)


def verify_target(target: str, toc_digest: str | None,
                  sources: SourceOptions | None = None,
                  verify_keys: tuple[str, ...] = ()) -> Iterator[str]:
    """Verify every layer, yielding one line per verified layer; raises on the first failure.

    Every byte is checked, so remote layers are copied to temporary files first. With
    `verify_keys`, the manifest's signature is checked first (lazyfs.signing).
    """
    if verify_keys:
        from lazyfs import signing   # cryptography is imported only by those who verify
    sources = sources or SourceOptions()
    image = open_reference(target, sources=sources)
    if isinstance(image, LoneBlob) and verify_keys:
        raise signing.require_image_for_keys(image.location)
    if isinstance(image, LoneBlob):
        with _local_copy(image.location, sources) as path:
            report = verify_layer(path, LayerCheck(toc_digest=toc_digest))
        pinned = "pinned" if toc_digest else "NOT pinned (pass --toc-digest to check it)"
        yield (f"ok {target}: {report.entries} entries, {report.chunks} chunks verified, "
               f"TOC {report.toc_digest} {pinned}")
        return
    with image:
        if verify_keys:
            key_path = signing.check_signed(image, verify_keys, sources)
            yield f"ok signature of manifest {image.manifest_descriptor.digest}: {key_path}"
        for number, (check, blob_path) in enumerate(_layer_checks(image), 1):
            report = verify_layer(blob_path, check)
            yield (f"ok layer {number} {check.blob_digest}: {report.entries} entries, "
                   f"{report.chunks} chunks, TOC {report.toc_digest} pinned")
        yield f"ok image {target}: manifest {image.manifest_descriptor.digest}"


@contextlib.contextmanager
def _local_copy(location: str, sources: SourceOptions) -> Iterator[str]:
    """A local path holding the blob at location (itself when it is a local file)."""
    if os.path.isfile(location):
        yield location
        return
    work_dir = tempfile.mkdtemp(prefix="lazyfs-verify-")
    try:
        path = os.path.join(work_dir, "blob")
        source = sources.open(location)
        try:
            copy_to_file(source, path)
        finally:
            source.close()
        yield path
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
