"""Resolve what the user asked to mount into layers: where each blob is and what pins its TOC.

Any reference `lazyfs.imageref` understands: a lone seekable blob (a path or URL: needs
--toc-digest or --insecure-skip-verify), or an image in a layout directory, an oci-archive, a
layout on a web server or in a bucket, or a registry repository.

For images, the manifest pins every layer's TOC digest (the stargz annotation), and the
manifest itself is pinned by the index (or by the @digest the user gave); every document is
checked against its digest before it is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from lazyfs.errors import FormatError, VerificationError
from lazyfs.format import oci
from lazyfs.imageref import LoneBlob, SourceOptions, open_reference
from lazyfs.layerspec import LayerSpec

__all__ = ["MountImage", "SourceOptions", "resolve_mount_image"]

log = logging.getLogger(__name__)


@dataclass
class MountImage:
    layers: list[LayerSpec]
    description: dict  # what `lazyfs stats` shows about the image
    close_store: Callable[[], None] = field(default=lambda: None)
    # The image (lazyfs.oci_layout.ImageSource) whose config `config` reads; None for a lone
    # blob.
    source_image: object | None = None

    @property
    def config(self) -> dict | None:
        """The OCI image config (Env, Cmd, User, ... under "config"); None for a lone blob.
        Read at the first use when the image was resolved with `defer_config`."""
        return None if self.source_image is None else self.source_image.config

    def close(self) -> None:
        """Close the layers' sources (with the connections they keep) and the image's store."""
        try:
            for spec in self.layers:
                spec.source.close()
        finally:
            self.close_store()


def resolve_mount_image(ref: str, *, toc_digest: str | None = None, insecure: bool = False,
                        sources: SourceOptions | None = None,
                        verify_keys: tuple[str, ...] = (),
                        defer_config: bool = False) -> MountImage:
    """`verify_keys`: refuse the image unless one of these public keys signed its manifest
    (lazyfs.signing); a signed manifest only protects layers whose TOC it pins, so no
    --insecure-skip-verify then. `defer_config`: a remote image's config is read at the first
    use of MountImage.config (the mount itself needs none of it)."""
    sources = sources or SourceOptions()
    target = open_reference(ref, sources=sources, defer_config=defer_config)
    if isinstance(target, LoneBlob):
        _refuse_keys_for_lone_blob(target, verify_keys)
        return _lone_blob(target.location, sources.open(target.location), toc_digest, insecure)
    signed_by = _check_signed(target, verify_keys, sources)
    image = _from_image(target, ref, insecure and not verify_keys)
    if signed_by is not None:
        image.description["signed_by"] = signed_by
    return image


def _check_signed(image, verify_keys: tuple[str, ...], sources: SourceOptions) -> str | None:
    """The key that signed image, None when no key is asked for; closes image on refusal."""
    if not verify_keys:
        return None
    from lazyfs import signing   # cryptography is imported only by those who verify

    try:
        return signing.check_signed(image, verify_keys, sources)
    except BaseException:
        image.close()
        raise


def _refuse_keys_for_lone_blob(target: LoneBlob, verify_keys: tuple[str, ...]) -> None:
    if verify_keys:
        from lazyfs import signing

        raise signing.require_image_for_keys(target.location)


def _lone_blob(location: str, source, toc_digest: str | None, insecure: bool) -> MountImage:
    if toc_digest is None and not insecure:
        raise VerificationError(
            f"{location} is a lone blob: nothing pins its TOC. Pass --toc-digest "
            "(printed by `lazyfs convert`) or, knowingly, --insecure-skip-verify")
    if toc_digest is not None:
        oci.check_digest(toc_digest, "--toc-digest")
    spec = LayerSpec(source=source, toc_digest=toc_digest, label=location)
    return MountImage([spec], {"image": location, "verified": toc_digest is not None})


def _from_image(image, name: str, insecure: bool) -> MountImage:
    close = image.close
    try:
        specs = []
        for number, desc in enumerate(image.layers, 1):
            toc_digest = (desc.annotations or {}).get(oci.ANNOTATION_TOC_DIGEST)
            if toc_digest is None and not insecure:
                raise FormatError(
                    f"{name}: layer {number} ({desc.digest}) has no {oci.ANNOTATION_TOC_DIGEST} "
                    "annotation: it is not a seekable layer (convert the image with "
                    "`lazyfs convert`) or its TOC is not pinned")
            if toc_digest is not None:
                oci.check_digest(toc_digest, f"{name}: layer {number} TOC digest annotation")
            annotations = desc.annotations or {}
            position = (annotations.get(oci.ANNOTATION_ZSTD_MANIFEST_POSITION)
                        or annotations.get(oci.STORAGE_ANNOTATION_ZSTD_MANIFEST_POSITION))
            prefetch_end = _decimal(annotations.get(oci.ANNOTATION_PREFETCH_END))
            specs.append(LayerSpec(source=image.blobs.open_source(desc), toc_digest=toc_digest,
                                   label=desc.digest, blob_size=desc.size, toc_position=position,
                                   toc_offset=_decimal(annotations.get(oci.ANNOTATION_TOC_OFFSET)),
                                   prefetch_end=prefetch_end,
                                   prefetch_ranges=_prefetch_ranges(annotations, desc.size,
                                                                    f"{name}: layer {number}")))
    except BaseException:
        for spec in specs:
            spec.source.close()
        close()
        raise
    verified = all(spec.toc_digest for spec in specs)
    description = {"image": name, "tag": image.tag, "manifest": image.manifest_descriptor.digest,
                   "verified": verified}
    return MountImage(specs, description, close, source_image=image)


def _prefetch_ranges(annotations, blob_size: int, where: str) -> list[tuple[int, int]] | None:
    """The prefetch ranges hint; None when absent, or malformed (said in the log: the mount
    then prefetches every prioritized file whole, as before the hint existed)."""
    text = annotations.get(oci.ANNOTATION_PREFETCH_RANGES)
    if text is None:
        return None
    try:
        return oci.parse_ranges(text, blob_size)
    except FormatError as exc:
        log.warning("%s: ignored: %s", where, exc)
        return None


def _decimal(text: str | None) -> int | None:
    """A hint annotation's number; None when absent or not a plain decimal."""
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    return int(text)
