"""`lazyfs push IMAGE DEST`: copy a converted image to where hosts will mount it from.

    IMAGE   DIR[:TAG|@sha256:...]          an OCI layout or an oci-archive (or any reference
                                           lazyfs.imageref reads whose store lists tags)
    DEST    DIR[:TAG]                      a local directory (network shares are directories):
                                           creates or updates an OCI layout
            s3://BUCKET/PREFIX/LAYOUT[:TAG]   an OCI layout under an S3 prefix (lazyfs.s3)
            oci://REGISTRY/REPO[:TAG]      a registry repository (lazyfs.registry)

Without a TAG, DEST gets the source's tag. What is copied is the whole top-level entry the
source reference names (an image index with every platform manifest under it, or a manifest),
plus the signature of every manifest copied: cosign's convention is a manifest tagged
`sha256-<hex>.sig` beside the image, so those tags travel with it.

Order is what makes a push safe to interrupt and to read while it runs:
1. blobs (configs and layers), content-addressed: a blob already at DEST with the right size is
   skipped, so a second push of the same image sends nothing;
2. manifests, children before the indexes that name them;
3. the tags last (a layout's index.json, rewritten atomically). A reader never sees a tag
   before everything it names, and a push that fails anywhere leaves DEST's tags as they were.

Destinations implement `Destination`; a layout in any flat key space (a directory, an S3
prefix) only needs a `LayoutStore`, which `LayoutDestination` turns into a Destination.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from lazyfs.errors import FormatError, LazyfsError, NotFound
from lazyfs.format import oci
from lazyfs.format.oci import Descriptor
from lazyfs.oci_layout import (MAX_INDEX_DEPTH, MAX_JSON_BYTES, LocalBlobs, Reference, TarIndex,
                               parse_reference)

_COPY_BLOCK_BYTES = 1 << 20
# Published files are read by a web server running as another user: world-readable, whatever
# mkstemp's private 0600 was.
_PUBLISHED_FILE_MODE = 0o644
_SIGNATURE_SUFFIX = ".sig"


class PushError(LazyfsError):
    """The destination refused or failed a write, or cannot be pushed to at all."""


# --- The interface destinations implement --------------------------------------------------------

class LayoutStore(Protocol):
    """A layout's flat key space: a directory, an S3 prefix.

    Keys are "oci-layout", "index.json" and "blobs/sha256/<hex>". Puts are atomic: a reader
    never sees a partial object. progress(n) is called with the bytes sent since its last call.
    """

    name: str  # for messages; no credentials

    def exists(self, key: str) -> int | None:
        """The object's size in bytes when present, else None."""
        ...

    def get(self, key: str, max_bytes: int) -> bytes | None:
        """The object's content (None when missing); FormatError beyond max_bytes."""
        ...

    def put_file(self, key: str, path: str, progress: Callable[[int], None]) -> None:
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        ...

    def close(self) -> None:
        ...


class Destination(Protocol):
    """Where `lazyfs push` copies an image."""

    name: str

    def has_blob(self, desc: Descriptor) -> bool:
        ...

    def put_blob(self, desc: Descriptor, path: str, progress: Callable[[int], None]) -> None:
        ...

    def put_manifest(self, desc: Descriptor, data: bytes, tag: str | None) -> None:
        """Manifests AND image indexes; children are always put before their parents."""
        ...

    def finish(self) -> None:
        """Make the pushed tags visible (a layout writes index.json, merging existing tags)."""
        ...

    def close(self) -> None:
        ...


# --- A layout in a directory ---------------------------------------------------------------------

class DirStore:
    """A LayoutStore in a local directory (or a mounted network share).

    Every put writes a temporary file in the object's own directory, fsyncs it and renames it
    over the key: readers (a web server serving the directory) see the old object or the whole
    new one, and a crash leaves at most a `.*.partial` file that no reader asks for.
    """

    def __init__(self, root: str):
        self.root = root
        self.name = root
        if os.path.lexists(root) and not os.path.isdir(root):
            raise PushError(f"{root}: exists and is not a directory")
        if os.path.isdir(root) and not os.path.lexists(os.path.join(root, "oci-layout")):
            try:
                foreign = os.listdir(root)
            except OSError as exc:
                raise PushError(f"{root}: cannot list: {exc.strerror}") from None
            if foreign:
                # Pushing into someone's populated directory would scatter blobs/ and
                # index.json among their files.
                raise PushError(f"{root}: not empty and not an OCI layout; push to a new or "
                                "empty directory, or to an existing layout")

    def exists(self, key: str) -> int | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise PushError(f"{self.name}: cannot look at {key}: {exc.strerror}") from None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def get(self, key: str, max_bytes: int) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                data = f.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise PushError(f"{self.name}: cannot read {key}: {exc.strerror}") from None
        if len(data) > max_bytes:
            raise FormatError(f"{self.name}: {key} is larger than {max_bytes} bytes")
        return data

    def put_file(self, key: str, path: str, progress: Callable[[int], None]) -> None:
        with open(path, "rb") as src:
            def copy(out) -> None:
                while block := src.read(_COPY_BLOCK_BYTES):
                    out.write(block)
                    progress(len(block))

            self._put(key, copy)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put(key, lambda out: out.write(data))

    def close(self) -> None:
        return None

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if key.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"bad layout key {key!r}")
        return os.path.join(self.root, *parts)

    def _put(self, key: str, write: Callable) -> None:
        final = self._path(key)
        directory = os.path.dirname(final)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.", suffix=".partial",
                                       dir=directory)
            try:
                with os.fdopen(fd, "wb") as out:
                    write(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, _PUBLISHED_FILE_MODE)
                os.rename(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(directory)  # the rename itself survives a crash
        except OSError as exc:
            raise PushError(f"{self.name}: cannot write {key}: {exc.strerror or exc}") from None


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- A layout in any store -----------------------------------------------------------------------

class LayoutDestination:
    """An OCI image layout written through a LayoutStore.

    Blobs and manifests go to blobs/sha256/<hex>; finish() writes `oci-layout` and then
    index.json: the entries already there are kept, except those carrying a tag this push
    sets, which are replaced. The existing index.json is checked before anything is uploaded,
    so a corrupt one fails the push at once, not after the blobs.
    """

    def __init__(self, store: LayoutStore):
        self.store = store
        self.name = store.name
        self._tagged: list[Descriptor] = []
        try:
            marker = store.get("oci-layout", MAX_JSON_BYTES)
            if marker is not None:
                oci.parse_oci_layout(marker, f"{self.name}: oci-layout")
            self._existing_index()
        except BaseException:
            store.close()
            raise

    def has_blob(self, desc: Descriptor) -> bool:
        return self.store.exists(oci.blob_relpath(desc.digest)) == desc.size

    def put_blob(self, desc: Descriptor, path: str, progress: Callable[[int], None]) -> None:
        self.store.put_file(oci.blob_relpath(desc.digest), path, progress)

    def put_manifest(self, desc: Descriptor, data: bytes, tag: str | None) -> None:
        if not self.has_blob(desc):
            self.store.put_bytes(oci.blob_relpath(desc.digest), data)
        if tag is not None:
            annotations = {**desc.annotations, oci.ANNOTATION_REF_NAME: tag}
            self._tagged.append(dataclasses.replace(desc, annotations=annotations))

    def finish(self) -> None:
        if self.store.exists("oci-layout") is None:
            self.store.put_bytes("oci-layout", oci.OCI_LAYOUT_FILE_BYTES)
        # Read again just before writing: keeps tags another push set meanwhile (a narrow race
        # remains; concurrent pushes of one layout need a lock a plain directory cannot give).
        index = self._existing_index() or {"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
                                           "manifests": []}
        pushed_tags = {desc.ref_name for desc in self._tagged}
        kept = [entry for entry in index["manifests"]
                if (entry.get("annotations") or {}).get(oci.ANNOTATION_REF_NAME) not in pushed_tags]
        # The existing document is kept as it was (unknown fields, index annotations); only
        # its list of entries changes.
        index = {**index, "manifests": kept + [desc.to_json() for desc in self._tagged]}
        self.store.put_bytes("index.json", oci.encode_json(index))

    def close(self) -> None:
        self.store.close()

    def _existing_index(self) -> dict | None:
        data = self.store.get("index.json", MAX_JSON_BYTES)
        if data is None:
            return None
        where = f"{self.name}: index.json"
        oci.parse_index(data, where)  # validates every entry
        return oci.parse_json_object(data, where)


# --- Destination references ----------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A parsed DEST: where, and the tag to set there (None: keep the source's)."""

    scheme: str | None     # None for a directory, "s3" or "oci"
    base: str              # the directory, s3://BUCKET/PREFIX/LAYOUT or oci://REGISTRY/REPO
    tag: str | None

    def reference(self, tag: str) -> str:
        """The reference `lazyfs mount` takes for the pushed image."""
        return f"{self.base}:{tag}"


def parse_destination(dest: str) -> Target:
    from lazyfs.imageref import scheme_of
    from lazyfs.source import file_url_path

    scheme = scheme_of(dest)
    if scheme == "file":
        dest, scheme = file_url_path(dest), None
    if scheme not in (None, "s3", "oci"):
        raise PushError(f"{dest}: cannot push to {scheme}:// (a web server or CDN serves a "
                        "directory: push to that directory, or to s3:// or oci://)")
    if scheme is None and os.path.lexists(dest):
        return Target(None, dest, None)
    head, slash, last = dest.rpartition("/")
    if "@" in last:
        raise PushError(f"{dest}: a destination takes a tag (DEST:TAG), not a digest")
    name, colon, tag = last.partition(":")
    if scheme == "oci" and "/" not in dest.split("://", 1)[1].strip("/"):
        raise PushError(f"{dest}: a registry destination is oci://REGISTRY/REPOSITORY[:TAG]")
    if colon and not tag:
        raise PushError(f"{dest}: empty tag after ':'")
    base = head + slash + name
    if len(base) > 1:
        base = base.rstrip("/") or "/"
    if not base or base.endswith(":/"):
        raise PushError(f"{dest}: names no directory, bucket or repository")
    return Target(scheme, base, tag or None)


def open_destination(target: Target, sources=None) -> Destination:
    """The Destination a Target names; remote ones are imported on first use."""
    if target.scheme is None:
        return LayoutDestination(DirStore(target.base))
    try:
        if target.scheme == "s3":
            from lazyfs.s3 import S3PushStore

            return LayoutDestination(S3PushStore(target.base, sources))
        from lazyfs.registry import RegistryDestination

        # The repository without a tag: tags come with put_manifest.
        return RegistryDestination(target.base, sources)
    except ImportError as exc:
        raise PushError(f"{target.base}: cannot push to {target.scheme}:// here: {exc}") from None


# --- The image being pushed ----------------------------------------------------------------------

class PushSource:
    """An image store as push reads it: its top-level index and verified blobs.

    Local layouts and archives list every tag in index.json. A remote store's index may list
    only what the reference named (a registry's), so other tags are asked for by name.
    """

    def __init__(self, reference: Reference, index: oci.Index, blobs, store=None):
        self.name = reference.path
        self.reference = reference
        self.index = index
        self.blobs = blobs           # LocalBlobs or imageref.RemoteBlobs: read(), path()
        self._store = store

    def entries_tagged(self, tag: str) -> list[Descriptor]:
        found = [desc for desc in self.index.manifests if desc.ref_name == tag]
        if found or self._store is None:
            return found
        try:
            index = self._store.index(Reference(self.name, tag=tag))
        except NotFound:
            return []
        return [desc for desc in index.manifests if desc.ref_name == tag]

    def close(self) -> None:
        self.blobs.close()

    def __enter__(self) -> PushSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_push_source(ref: str, sources=None) -> PushSource:
    from lazyfs import imageref
    from lazyfs.source import file_url_path

    scheme = imageref.scheme_of(ref)
    if scheme == "file":
        ref, scheme = file_url_path(ref), None
    if scheme is None:
        reference = parse_reference(ref)
        if os.path.isdir(reference.path):
            return _open_layout_dir(reference)
        return _open_archive(reference)
    remote = imageref.open_remote(ref, sources or imageref.SourceOptions())
    if isinstance(remote, imageref.LoneBlob):
        raise FormatError(f"{ref}: a lone blob, not an image (name a layout as URL:TAG)")
    blobs, index, reference = remote
    return PushSource(reference, index, blobs, blobs.store)


def _open_layout_dir(reference: Reference) -> PushSource:
    root = reference.path

    def read(relpath: str) -> bytes:
        try:
            with open(os.path.join(root, relpath), "rb") as f:
                data = f.read(MAX_JSON_BYTES + 1)
        except FileNotFoundError:
            raise FormatError(f"{root}: no {relpath} (not an OCI image layout)") from None
        if len(data) > MAX_JSON_BYTES:
            raise FormatError(f"{root}: {relpath} is larger than {MAX_JSON_BYTES} bytes")
        return data

    def locate(digest: str) -> str:
        path = os.path.join(root, oci.blob_relpath(digest))
        if not os.path.isfile(path):
            raise NotFound(f"{root}: blob {digest} is missing")
        return path

    oci.parse_oci_layout(read("oci-layout"), f"{root}: oci-layout")
    index = oci.parse_index(read("index.json"), f"{root}: index.json")
    return PushSource(reference, index, LocalBlobs(locate))


def _open_archive(reference: Reference) -> PushSource:
    archive = TarIndex(reference.path)
    try:
        for required in ("oci-layout", "index.json"):
            if required not in archive.members:
                raise FormatError(f"{reference.path}: no {required} member (not an OCI layout "
                                  "or oci-archive)")
        oci.parse_oci_layout(archive.read("oci-layout"), f"{reference.path}: oci-layout")
        index = oci.parse_index(archive.read("index.json"), f"{reference.path}: index.json")
    except BaseException:
        archive.close()
        raise
    blobs = LocalBlobs(lambda digest: archive.extract(oci.blob_relpath(digest)),
                       cleanup=archive.close)
    return PushSource(reference, index, blobs)


# --- What to copy --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestPut:
    desc: Descriptor
    data: bytes              # verified against desc
    tag: str | None          # None for a child of an index


@dataclass
class PushPlan:
    tag: str                                    # the tag set at the destination
    blobs: dict[str, Descriptor] = dataclasses.field(default_factory=dict)  # digest -> desc
    manifests: list[ManifestPut] = dataclasses.field(default_factory=list)  # children first
    signature_tags: list[str] = dataclasses.field(default_factory=list)


def signature_tag(manifest_digest: str) -> str:
    """cosign's tag for the signature of a manifest: sha256-<hex>.sig."""
    return manifest_digest.replace(":", "-", 1) + _SIGNATURE_SUFFIX


def plan_push(source: PushSource, dest_tag: str | None) -> PushPlan:
    """Everything to copy, read and verified before the destination is touched: a missing tag,
    blob or a malformed manifest fails here, having written nothing."""
    top, source_tag = _top_entries(source)
    tag = dest_tag or source_tag
    if tag is None:
        raise PushError(f"{source.name}: the image has no tag; name one in the destination "
                        "(DEST:TAG)")
    plan = PushPlan(tag)
    for desc in top:
        _add_tree(source, plan, desc, tag, depth=0)
    signed = list(dict.fromkeys(put.desc.digest for put in plan.manifests))
    for digest in signed:
        sig_tag = signature_tag(digest)
        entries = source.entries_tagged(sig_tag)
        for desc in entries:
            _add_tree(source, plan, desc, sig_tag, depth=0)
        if entries:
            plan.signature_tags.append(sig_tag)
    return plan


def _top_entries(source: PushSource) -> tuple[list[Descriptor], str | None]:
    """The top-level entries the source reference names, and the tag they carry there."""
    reference, name = source.reference, source.name
    entries = source.index.manifests
    if reference.digest is not None:
        for desc in entries:
            if desc.digest == reference.digest:
                return [desc], desc.ref_name
        nested = _find_nested(source, entries, reference.digest, depth=0)
        if nested is None:
            raise NotFound(f"{name}: no manifest {reference.digest}")
        return [nested], None   # a platform manifest has no tag of its own
    image_tags = sorted({d.ref_name for d in entries
                         if d.ref_name and not _is_signature_tag(d.ref_name)})
    if reference.tag is not None:
        chosen = source.entries_tagged(reference.tag)
        if not chosen:
            raise NotFound(f"{name}: no tag {reference.tag!r}; available tags: "
                           f"{', '.join(image_tags) or '(none)'}")
        return chosen, reference.tag
    if len(image_tags) > 1:
        raise NotFound(f"{name}: holds several images; name one as {name}:TAG (available "
                       f"tags: {', '.join(image_tags)})")
    chosen = [d for d in entries if not (d.ref_name and _is_signature_tag(d.ref_name))]
    if not chosen:
        raise NotFound(f"{name}: index.json lists no images")
    return chosen, image_tags[0] if image_tags else None


def _is_signature_tag(tag: str) -> bool:
    return tag.startswith("sha256-") and tag.endswith(_SIGNATURE_SUFFIX)


def _find_nested(source: PushSource, entries, digest: str, depth: int) -> Descriptor | None:
    if depth >= MAX_INDEX_DEPTH:
        return None
    for desc in entries:
        if desc.media_type in oci.INDEX_MEDIA_TYPES:
            children = oci.parse_index(source.blobs.read(desc),
                                       f"{source.name}: index {desc.digest}").manifests
            for child in children:
                if child.digest == digest:
                    return child
            found = _find_nested(source, children, digest, depth + 1)
            if found is not None:
                return found
    return None


def _add_tree(source: PushSource, plan: PushPlan, desc: Descriptor, tag: str | None,
              depth: int) -> None:
    """Add desc's blobs and manifests to the plan, children before desc itself."""
    already = any(put.desc.digest == desc.digest and put.tag == tag for put in plan.manifests)
    if already:
        return
    data = source.blobs.read(desc)   # verified against desc
    where = f"{source.name}: {desc.digest}"
    if desc.media_type in oci.INDEX_MEDIA_TYPES:
        if depth >= MAX_INDEX_DEPTH:
            raise FormatError(f"{where}: image indexes nested deeper than {MAX_INDEX_DEPTH}")
        for child in oci.parse_index(data, where).manifests:
            _add_tree(source, plan, child, None, depth + 1)
    elif desc.media_type in oci.MANIFEST_MEDIA_TYPES:
        manifest = oci.parse_manifest(data, where)
        for blob in (manifest.config, *manifest.layers):
            plan.blobs.setdefault(blob.digest, blob)
    else:
        raise FormatError(f"{where}: media type {desc.media_type!r} is not an image manifest "
                          "or index")
    plan.manifests.append(ManifestPut(desc, data, tag))


# --- Copying -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PushResult:
    reference: str          # what `lazyfs mount` takes
    blobs_copied: int
    blobs_skipped: int      # already at the destination
    bytes_sent: int
    manifests: int
    signatures: int
    seconds: float

    def summary(self) -> str:
        return (f"{_count(self.blobs_copied, 'blob')} copied "
                f"({_human_bytes(self.bytes_sent)}), {self.blobs_skipped} skipped (already "
                f"there), {_count(self.manifests, 'manifest')}, "
                f"{_count(self.signatures, 'signature')} in {self.seconds:.1f} s: "
                f"{self.reference}")


def push(image_ref: str, dest: str, *, sources=None, progress: bool | None = None) -> PushResult:
    """Copy the image image_ref names to dest. progress: a bar on stderr (None: on a terminal)."""
    started = time.monotonic()
    target = parse_destination(dest)
    with open_push_source(image_ref, sources) as source:
        plan = plan_push(source, target.tag)
        destination = open_destination(target, sources)
        try:
            copied, skipped, sent = copy_plan(source, plan, destination, progress)
        finally:
            destination.close()
    return PushResult(target.reference(plan.tag), copied, skipped, sent, len(plan.manifests),
                      len(plan.signature_tags), time.monotonic() - started)


def copy_plan(source: PushSource, plan: PushPlan, destination: Destination,
              progress: bool | None = False) -> tuple[int, int, int]:
    """Blobs, then manifests (children first), then finish(): the only order in which any
    Destination is called. Returns (blobs copied, blobs skipped, bytes sent)."""
    from tqdm import tqdm

    missing = [desc for desc in plan.blobs.values() if not destination.has_blob(desc)]
    total_bytes = sum(desc.size for desc in missing)
    show = progress if progress is not None else sys.stderr.isatty()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"pushing to {destination.name}", file=sys.stderr, disable=not show) as bar:
        for desc in missing:
            # Verified before it leaves: a corrupt local blob is never published.
            destination.put_blob(desc, source.blobs.path(desc), bar.update)
    for put in plan.manifests:
        destination.put_manifest(put.desc, put.data, put.tag)
    destination.finish()
    return len(missing), len(plan.blobs) - len(missing), total_bytes


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    scaled = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        scaled /= 1024
        if scaled < 1024:
            break
    return f"{scaled:.1f} {unit}"
