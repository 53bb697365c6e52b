"""Realistic images for bench/coldstart.py, built from Debian packages and cached.

    rootfs   debootstrap --variant=minbase SUITE with --include=PACKAGES, then apt's caches
             and package lists removed (as Debian's official images do)
    layer    one gzip layer of that tree (a deterministic PAX tar, `gzip -n -6` as docker and
             containerd compress by default), written to a file and never held in memory
    gzip     an OCI image layout with that layer: what a registry serves today
    zstd     the same with the layer compressed by `zstd -3` (layer.tar.zst), for the zstd pull
    FMT      `lazyfs convert --format` of it (esgz-: eStargz, zstd-: zstd:chunked); rec-FMT-
             the same with `--prioritize LIST`

Everything lands under CACHE/images/<name>-<key>/, where the key covers what the content
depends on (suite, packages; the converter's source for the converted layouts), so a rerun
rebuilds nothing that is still valid and a change of the converter converts again. Each step
writes to a `.partial` path and renames it when complete: an interrupted build is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lazyfs.format import oci  # noqa: E402
from lazyfs.oci_layout import host_platform  # noqa: E402

TAG = "latest"
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_BLOCK = 1 << 20


@dataclass(frozen=True)
class ImageSpec:
    name: str
    packages: tuple[str, ...]  # besides minbase
    workload: tuple[str, ...]  # the program whose start we time
    expect: str  # a substring of its output: a run that does not print it failed

    def key(self, suite: str) -> str:
        return f"{suite}-minbase-" + "+".join(self.packages)


IMAGES = {
    "python": ImageSpec("python", ("python3",), ("python3", "-c", 'print("hello")'), "hello"),
    # A bigger image whose workload reads much more: numpy's C extensions and BLAS/LAPACK.
    "numpy": ImageSpec("numpy", ("python3", "python3-numpy"),
                       ("python3", "-c", "import numpy; print('numpy', numpy.__version__)"),
                       "numpy "),
}


@dataclass
class BuiltImage:
    """Paths and sizes of one image in all its forms."""
    spec: ImageSpec
    root: str  # CACHE/images/<name>-<key>
    rootfs: str  # the extracted tree (what a full pull produces)
    gzip_layout: str
    layer_digest: str  # the gzip layer blob
    layer_bytes: int  # compressed
    tar_bytes: int  # uncompressed layer
    files: int  # regular files in the tree
    zstd_layout: str = ""  # the image with a zstd layer (build_zstd_layout)
    zstd_layer_bytes: int = 0
    layer_format: str = ""  # what `lazyfs convert --format` wrote: estargz or zstd:chunked
    lazy_layout: str = ""  # the converted image
    lazy_bytes: int = 0  # its layer blob
    convert_seconds: float = 0.0
    rec_layout: str = ""  # converted with a recorded list ("" when there is none)
    rec_list: str = ""
    rec_files: int = 0
    rec_lazy_bytes: int = 0

    def summary(self) -> dict:
        out = asdict(self)
        out["spec"] = asdict(self.spec)
        return out


# --- small helpers -----------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            sha.update(block)
    return "sha256:" + sha.hexdigest()


def source_hash(*globs: str) -> str:
    """A short hash of source files: a cache key that changes when the code changes."""
    sha = hashlib.sha256()
    for pattern in globs:
        for path in sorted(REPO.glob(pattern)):
            sha.update(path.relative_to(REPO).as_posix().encode() + b"\0")
            sha.update(path.read_bytes())
    return sha.hexdigest()[:12]


def _log(message: str) -> None:
    print(f"  [images] {message}", flush=True)


def _check_call(argv: list[str], **kwargs) -> None:
    kwargs.setdefault("stdout", subprocess.PIPE)
    result = subprocess.run(argv, stderr=subprocess.PIPE, **kwargs)
    if result.returncode != 0:
        output = (result.stdout or b"")[-2000:] + result.stderr[-4000:]
        raise RuntimeError(f"{argv[0]} {' '.join(argv[1:4])}... failed ({result.returncode}):\n"
                           + output.decode(errors="replace"))


def _lazyfs(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazyfs", *args]


# --- rootfs ------------------------------------------------------------------------------------

def build_rootfs(cache: Path, spec: ImageSpec, suite: str, mirror: str) -> Path:
    """debootstrap minbase + the spec's packages, cleaned; cached under CACHE/rootfs/KEY."""
    final = cache / "rootfs" / spec.key(suite)
    if (final / ".complete").exists():
        return final
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    _log(f"debootstrap {suite} minbase + {', '.join(spec.packages)} (once; a minute or two)")
    started = time.monotonic()
    _check_call(["debootstrap", "--variant=minbase", f"--include={','.join(spec.packages)}",
                 suite, str(partial), mirror])
    _clean_rootfs(partial)
    (partial / ".complete").write_text(json.dumps({"suite": suite, "mirror": mirror,
                                                   "packages": spec.packages}))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _log(f"rootfs ready in {time.monotonic() - started:.0f} s: {final}")
    return final


def _clean_rootfs(root: Path) -> None:
    """What Debian's official images drop: downloaded packages and package lists (apt-get
    update brings them back). Kept: everything a program of the image may read."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin",
                    "var/lib/apt/lists/*_*", "var/log/*.log"):
        for path in root.glob(pattern):
            path.unlink()


# --- layer tar and layout -----------------------------------------------------------------------

class _HashingWriter:
    """A write-only file object that hashes what passes through: the tar's diff_id."""

    def __init__(self, out):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.out.write(data)
        self.size += len(data)
        return len(data)


def _walk_sorted(root: Path):
    """(path, arcname) of every entry below root, parents first, names sorted: a reproducible
    member order. Symlinks to directories are entries, never followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            if rel == "." and name == ".complete":
                continue  # our marker, not part of the image
            arcname = name if rel == "." else f"{rel}/{name}"
            yield os.path.join(dirpath, name), arcname


def write_layer_tar(root: Path, out: Path) -> tuple[str, int, int]:
    """The tree as a PAX tar at `out`, streamed; (diff_id, tar bytes, regular files)."""
    files = 0
    with open(out, "wb") as raw:
        writer = _HashingWriter(raw)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path, arcname in _walk_sorted(root):
                info = tar.gettarinfo(path, arcname)
                if info is None:  # a socket: not representable, as in docker's tars
                    continue
                # Owners by number only: the host's user names mean nothing in the image.
                info.uname = info.gname = ""
                if info.isreg():
                    files += 1
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return "sha256:" + writer.sha.hexdigest(), writer.size, files


def write_layout(layout: Path, layer_blob: Path, media_type: str, diff_id: str, tag: str,
                 runtime_config: dict) -> str:
    """An OCI layout whose one layer is `layer_blob` (hard-linked, not copied or read into
    memory); returns the layer digest."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    digest = sha256_file(layer_blob)
    target = layout / oci.blob_relpath(digest)
    try:
        os.link(layer_blob, target)
    except OSError:
        shutil.copyfile(layer_blob, target)

    def put(data: bytes, media_type: str, annotations=None) -> oci.Descriptor:
        descriptor = oci.descriptor_of(media_type, data, annotations)
        (layout / oci.blob_relpath(descriptor.digest)).write_bytes(data)
        return descriptor

    layer = oci.Descriptor(media_type, digest, layer_blob.stat().st_size)
    config = {"architecture": host_platform().architecture, "os": "linux",
              "config": runtime_config,
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    config_descriptor = put(oci.encode_json(config), oci.OCI_CONFIG)
    manifest = put(oci.encode_json(oci.build_manifest(config_descriptor, [layer])),
                   oci.OCI_MANIFEST, {oci.ANNOTATION_REF_NAME: tag})
    (layout / "oci-layout").write_bytes(oci.OCI_LAYOUT_FILE_BYTES)
    (layout / "index.json").write_bytes(oci.encode_json(oci.build_index([manifest])))
    return digest


def build_image(cache: Path, spec: ImageSpec, suite: str = DEFAULT_SUITE,
                mirror: str = DEFAULT_MIRROR) -> BuiltImage:
    rootfs = build_rootfs(cache, spec, suite, mirror)
    root = cache / "images" / f"{spec.name}-{spec.key(suite)}"
    meta_path = root / "gzip.json"
    if not meta_path.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _log(f"{spec.name}: writing the gzip layer and its OCI layout")
        tar_path, gz_path = root / "layer.tar", root / "layer.tar.gz"
        diff_id, tar_bytes, files = write_layer_tar(rootfs, tar_path)
        with open(tar_path, "rb") as src, open(gz_path, "wb") as dst:
            _check_call(["gzip", "-n", "-6", "-c"], stdin=src, stdout=dst)
        tar_path.unlink()
        config = {"Env": [f"PATH={IMAGE_PATH}"], "Cmd": ["python3"]}
        partial = root / "gzip.partial"
        digest = write_layout(partial, gz_path, oci.OCI_LAYER_GZIP, diff_id, TAG, config)
        partial.rename(root / "gzip")
        meta_path.write_text(json.dumps({"layer_digest": digest, "tar_bytes": tar_bytes,
                                         "files": files, "layer_bytes": gz_path.stat().st_size}))
    meta = json.loads(meta_path.read_text())
    return BuiltImage(spec, str(root), str(rootfs), str(root / "gzip"), meta["layer_digest"],
                      meta["layer_bytes"], meta["tar_bytes"], meta["files"])


def build_zstd_layout(image: BuiltImage) -> None:
    """ROOT/zstd: the same image with its layer compressed by `zstd -3` (the level docker,
    containerd and buildah use for zstd layers) instead of gzip, for the zstd full pull."""
    root = Path(image.root)
    layout, zst_path = root / "zstd", root / "layer.tar.zst"
    if not layout.exists():
        _log(f"{image.spec.name}: writing the zstd layer and its OCI layout")
        manifest = _manifest(image.gzip_layout)
        config = _blob_json(image.gzip_layout, manifest["config"]["digest"])
        partial = root / "zstd.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with open(root / "layer.tar.gz", "rb") as src, open(zst_path, "wb") as dst:
            gunzip = subprocess.Popen(["gzip", "-dc"], stdin=src, stdout=subprocess.PIPE)
            try:
                _check_call(["zstd", "-3", "-q", "-c"], stdin=gunzip.stdout, stdout=dst)
            finally:
                gunzip.stdout.close()
                gunzip_status = gunzip.wait()  # reaped even when zstd failed
            if gunzip_status:
                raise RuntimeError("gzip -dc of the layer failed")
        write_layout(partial, zst_path, oci.OCI_LAYER_ZSTD, config["rootfs"]["diff_ids"][0], TAG,
                     config["config"])
        partial.rename(layout)
    image.zstd_layout, image.zstd_layer_bytes = str(layout), zst_path.stat().st_size


# --- conversions ---------------------------------------------------------------------------------

def converter_key() -> str:
    return source_hash("converter/*.py", "lazyfs/format/*.py")


def _blob_json(layout: str, digest: str):
    return json.loads(Path(layout, oci.blob_relpath(digest)).read_text())


def _manifest(layout: str) -> dict:
    """The manifest of the layout's one image."""
    index = json.loads(Path(layout, "index.json").read_text())
    return _blob_json(layout, index["manifests"][0]["digest"])


def _layer_blob_bytes(layout: str) -> int:
    """Total size of the layer blobs of the layout's one image."""
    return sum(layer["size"] for layer in _manifest(layout)["layers"])


def convert(image: BuiltImage, name: str, prioritize: str | None = None) -> tuple[str, float]:
    """`lazyfs convert --format image.layer_format` of the gzip layout into ROOT/<name>;
    cached. (layout, seconds)."""
    out = Path(image.root) / name
    timing = out.with_name(out.name + ".seconds")
    if out.exists() and timing.exists():
        return str(out), float(timing.read_text())
    shutil.rmtree(out, ignore_errors=True)
    argv = _lazyfs("convert", "--no-progress", "--format", image.layer_format)
    if prioritize:
        argv += ["--prioritize", prioritize]
    argv += [f"{image.gzip_layout}:{TAG}", str(out)]
    started = time.monotonic()
    _check_call(argv, cwd=REPO)
    seconds = time.monotonic() - started
    timing.write_text(f"{seconds:.3f}")
    _log(f"{image.spec.name}: converted to {out.name} in {seconds:.1f} s")
    return str(out), seconds


def _format_tag(layer_format: str) -> str:
    return {"estargz": "esgz", "zstd:chunked": "zstd"}[layer_format]


def convert_plain(image: BuiltImage, layer_format: str) -> None:
    """Convert into ROOT/<format>-<converter key>."""
    image.layer_format = layer_format
    prefix = f"{_format_tag(layer_format)}-"
    key = prefix + converter_key()
    _remove_stale(Path(image.root), prefix, keep=key)
    image.lazy_layout, image.convert_seconds = convert(image, key)
    image.lazy_bytes = _layer_blob_bytes(image.lazy_layout)


def convert_recorded(image: BuiltImage, list_path: str) -> None:
    """Convert with the recorded list, in the format of convert_plain; keyed by the format, the
    converter and the list's content."""
    prefix = f"rec-{_format_tag(image.layer_format)}-"
    list_hash = hashlib.sha256(Path(list_path).read_bytes()).hexdigest()[:8]
    key = f"{prefix}{converter_key()}-{list_hash}"
    _remove_stale(Path(image.root), prefix, keep=key)
    image.rec_layout, _ = convert(image, key, prioritize=list_path)
    image.rec_list = list_path
    image.rec_files = sum(1 for line in Path(list_path).read_text().splitlines()
                          if line.strip() and not line.startswith("#"))
    image.rec_lazy_bytes = _layer_blob_bytes(image.rec_layout)


def _remove_stale(root: Path, prefix: str, keep: str) -> None:
    for path in root.glob(prefix + "*"):
        if path.name not in (keep, keep + ".seconds"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
