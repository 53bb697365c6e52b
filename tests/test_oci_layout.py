"""OCI documents (lazyfs.format.oci) and reading images from layouts and oci-archives.

Layouts are written by hand here, JSON dicts and all, so the reader is not tested against its
own writer. `Layout` and `two_layer_layout` are shared with test_convert_image.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from lazyfs.errors import FormatError, NotFound, VerificationError
from lazyfs.format import oci
from lazyfs.format.oci import Descriptor, Platform
from lazyfs.oci_layout import Reference, host_platform, open_image, parse_reference
from tests.tarbuild import dir_, file_, hardlink, symlink, tar_bytes

# --- builders ----------------------------------------------------------------------------------

LAYER1 = tar_bytes(
    dir_("bin/"),
    file_("bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755),
    hardlink("bin/hello-again", "bin/hello"),
    file_("foo", b"deleted by layer 2"),
    dir_("dir/"),
    file_("dir/a", b"a" * 5000),
    file_("dir/b", b"b"),
    symlink("link", "bin/hello"),
    file_("big", os.urandom(300_000)),
)
LAYER2 = tar_bytes(
    file_(".wh.foo"),                      # whiteout: removes /foo
    dir_("dir/"),
    file_("dir/.wh..wh..opq"),             # opaque: hides dir/a and dir/b
    file_("dir/c", b"c"),
    dir_("etc/"),
    file_("etc/motd", b"hi\n"),
)
CONFIG_EXTRAS = {"config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/hello"]}, "author": "tests",
                 "history": [{"created_by": "layer 1"}, {"created_by": "layer 2"}]}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_of(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def image_config(layer_tars=(LAYER1, LAYER2), arch: str = "amd64") -> dict:
    return {"architecture": arch, "os": "linux", **CONFIG_EXTRAS,
            "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layer_tars]}}


def tagged(desc: dict, tag: str) -> dict:
    return {**desc, "annotations": {"org.opencontainers.image.ref.name": tag}}


def on(desc: dict, arch: str) -> dict:
    return {**desc, "platform": {"os": "linux", "architecture": arch}}


class Layout:
    """An OCI image layout written by hand, one blob at a time. Descriptors are plain dicts."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes, media_type: str) -> dict:
        digest = sha256(data)
        self.path_of(digest).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def path_of(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def json_blob(self, obj: dict, media_type: str) -> dict:
        return self.blob(json.dumps(obj).encode(), media_type)

    def image(self, layer_tars=(LAYER1, LAYER2), *, arch: str = "amd64",
              compress=gzip_of, layer_media_type=oci.OCI_LAYER_GZIP) -> dict:
        """Write layers, config and manifest; return the manifest's descriptor."""
        config = image_config(layer_tars, arch)
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": self.json_blob(config, oci.OCI_CONFIG),
            "layers": [self.blob(compress(t), layer_media_type) for t in layer_tars],
        }
        return self.json_blob(manifest, oci.OCI_MANIFEST)

    def index(self, *entries: dict) -> None:
        index = {"schemaVersion": 2, "manifests": list(entries)}
        (self.root / "index.json").write_text(json.dumps(index))

    def tar(self, path: Path) -> Path:
        """This layout as an oci-archive."""
        with tarfile.open(path, "w") as tar:
            for name in ("oci-layout", "index.json", "blobs"):
                tar.add(self.root / name, arcname=name)
        return path


def two_layer_layout(root: Path, tag: str | None = "v1") -> Layout:
    layout = Layout(root)
    manifest = layout.image()
    layout.index(tagged(manifest, tag) if tag else manifest)
    return layout


def read_json(path: Path) -> dict:
    return json.loads(path.read_bytes())


# --- lazyfs.format.oci -------------------------------------------------------------------------

GOOD_DIGEST = "sha256:" + "ab" * 32
GOOD_DESC = {"mediaType": oci.OCI_MANIFEST, "digest": GOOD_DIGEST, "size": 3}


def test_descriptor_round_trips_with_annotations_and_platform():
    obj = {**GOOD_DESC, "annotations": {"a": "b"},
           "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}}
    desc = Descriptor.from_json(obj, "here")
    assert desc == Descriptor(oci.OCI_MANIFEST, GOOD_DIGEST, 3, {"a": "b"}, Platform("linux", "arm", "v7"))
    assert desc.to_json() == obj


def index_of(*manifests) -> bytes:
    return json.dumps({"schemaVersion": 2, "manifests": list(manifests)}).encode()


def manifest_of(**changes) -> bytes:
    manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                "config": {**GOOD_DESC, "mediaType": oci.OCI_CONFIG}, "layers": []}
    return json.dumps({**manifest, **changes}).encode()


def config_of(**changes) -> bytes:
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [GOOD_DIGEST]}}
    return json.dumps({**config, **changes}).encode()


@pytest.mark.parametrize("parse, data, message", [
    (oci.parse_index, b"{not json", "index.json: not valid JSON"),
    (oci.parse_index, b"\xff\xfe", "index.json: not valid JSON"),
    (oci.parse_index, b"[]", "index.json: expected a JSON object, got list"),
    (oci.parse_index, b'{"schemaVersion": 1, "manifests": []}', "schemaVersion must be 2, got 1"),
    (oci.parse_index, b'{"schemaVersion": 2}', "manifests must be a list"),
    (oci.parse_index, index_of({**GOOD_DESC, "digest": "sha256:abc"}),
     "manifests[0]: bad digest 'sha256:abc' (want sha256:<64 lowercase hex>)"),
    (oci.parse_index, index_of({**GOOD_DESC, "digest": "sha256:../../../../etc/passwd"}), "bad digest"),
    (oci.parse_index, index_of({**GOOD_DESC, "digest": "sha512:" + "ab" * 64}), "bad digest"),
    (oci.parse_index, index_of({**GOOD_DESC, "digest": GOOD_DIGEST.upper()}), "bad digest"),
    (oci.parse_index, index_of({**GOOD_DESC, "size": -1}), "size must be a non-negative integer"),
    (oci.parse_index, index_of({**GOOD_DESC, "size": True}), "size must be a non-negative integer"),
    (oci.parse_index, index_of({**GOOD_DESC, "size": "3"}), "size must be a non-negative integer"),
    (oci.parse_index, index_of({"digest": GOOD_DIGEST, "size": 3}), "mediaType must be a non-empty string"),
    (oci.parse_index, index_of({**GOOD_DESC, "annotations": {"a": 1}}), "annotations must map strings"),
    (oci.parse_index, index_of({**GOOD_DESC, "platform": {"os": "linux"}}),
     "manifests[0].platform: architecture must be a non-empty string"),
    (oci.parse_index, json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                                  "manifests": []}).encode(), "unexpected mediaType"),
    (oci.parse_manifest, manifest_of(mediaType=oci.OCI_INDEX), "unexpected mediaType"),
    (oci.parse_manifest, manifest_of(config=None), "manifest: config: expected a JSON object"),
    (oci.parse_manifest, manifest_of(layers={}), "layers must be a list"),
    (oci.parse_manifest, manifest_of(layers=[{**GOOD_DESC, "size": None}]), "layers[0]: size"),
    (oci.parse_config, config_of(rootfs=None), "config: rootfs: expected a JSON object"),
    (oci.parse_config, config_of(rootfs={"type": "x", "diff_ids": []}), "rootfs.type must be 'layers'"),
    (oci.parse_config, config_of(rootfs={"type": "layers"}), "rootfs.diff_ids must be a list"),
    (oci.parse_config, config_of(rootfs={"type": "layers", "diff_ids": ["md5:00"]}),
     "rootfs.diff_ids[0]: bad digest"),
    (oci.parse_config, config_of(architecture=None), "architecture must be a non-empty string"),
    (oci.parse_config, config_of(os=""), "os must be a non-empty string"),
])
def test_bad_documents_are_format_errors_that_say_what_is_wrong(parse, data, message):
    with pytest.raises(FormatError, match=re.escape(message)):
        parse(data)


def test_good_documents_parse():
    assert oci.parse_index(index_of(GOOD_DESC)).manifests[0].digest == GOOD_DIGEST
    manifest = oci.parse_manifest(manifest_of())
    assert (manifest.media_type, manifest.config.media_type, manifest.layers) == (
        oci.OCI_MANIFEST, oci.OCI_CONFIG, ())
    assert oci.config_diff_ids(oci.parse_config(config_of())) == [GOOD_DIGEST]
    oci.parse_oci_layout(oci.OCI_LAYOUT_FILE_BYTES)
    with pytest.raises(FormatError, match="unsupported imageLayoutVersion '2.0.0'"):
        oci.parse_oci_layout(b'{"imageLayoutVersion": "2.0.0"}')


def test_config_with_diff_ids_replaces_only_the_diff_ids():
    config = json.loads(config_of(history=[{"created_by": "x"}], config={"Env": ["A=1"]}))
    new = oci.config_with_diff_ids(config, ["sha256:" + "cd" * 32])
    assert new["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "cd" * 32]}
    assert {k: v for k, v in new.items() if k != "rootfs"} == {
        k: v for k, v in config.items() if k != "rootfs"}
    assert list(new) == list(config)                 # key order kept
    assert config["rootfs"]["diff_ids"] == [GOOD_DIGEST]   # input untouched


def test_built_documents_are_stable_and_parse_back():
    config = Descriptor(oci.OCI_CONFIG, GOOD_DIGEST, 10)
    layer = Descriptor(oci.OCI_LAYER_GZIP, "sha256:" + "01" * 32, 20,
                       {oci.ANNOTATION_TOC_DIGEST: GOOD_DIGEST})
    data = oci.encode_json(oci.build_manifest(config, [layer]))
    assert data == oci.encode_json(oci.build_manifest(config, [layer]))
    assert oci.parse_manifest(data) == oci.Manifest(oci.OCI_MANIFEST, config, (layer,))
    index = oci.parse_index(oci.encode_json(oci.build_index([config])))
    assert index.manifests == (config,)


def test_blob_relpath_refuses_anything_but_a_digest():
    assert oci.blob_relpath(GOOD_DIGEST) == "blobs/sha256/" + "ab" * 32
    with pytest.raises(FormatError):
        oci.blob_relpath("sha256:../../etc/passwd")


@pytest.mark.parametrize("machine, platform", [
    ("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"), ("armv7l", "linux/arm/v7"),
    ("riscv64", "linux/riscv64"),
])
def test_host_machine_names_map_to_oci_platforms(machine, platform):
    assert str(oci.linux_platform_of_machine(machine)) == platform


# --- references --------------------------------------------------------------------------------

def test_references_split_at_the_first_colon_after_an_existing_path(tmp_path):
    path = tmp_path / "with:colon"
    path.mkdir()
    assert parse_reference(str(path)) == Reference(str(path))
    assert parse_reference(f"{path}:v1") == Reference(str(path), tag="v1")
    assert parse_reference(f"{path}:reg.io:5000/app:1.0") == Reference(str(path), tag="reg.io:5000/app:1.0")
    assert parse_reference(f"{path}@{GOOD_DIGEST}") == Reference(str(path), digest=GOOD_DIGEST)
    with pytest.raises(FormatError, match="bad digest"):
        parse_reference(f"{path}@sha256:nothex")
    with pytest.raises(FormatError, match="empty tag"):
        parse_reference(f"{path}:")
    for missing in ("missing:v1", f"missing@{GOOD_DIGEST}"):
        with pytest.raises(NotFound, match="no such file or directory"):
            parse_reference(str(tmp_path / missing))


# --- opening layouts ---------------------------------------------------------------------------

def test_open_by_tag_gives_manifest_config_and_verified_layers(tmp_path):
    layout = two_layer_layout(tmp_path / "oci")
    with open_image(f"{layout.root}:v1") as image:
        assert image.tag == "v1"
        index_entry = read_json(layout.root / "index.json")["manifests"][0]
        assert image.manifest_descriptor.digest == index_entry["digest"]
        assert image.manifest_json == read_json(layout.path_of(index_entry["digest"]))
        assert image.config["author"] == "tests"
        assert sha256(image.config_bytes) == image.config_descriptor.digest
        assert [d.media_type for d in image.layers] == [oci.OCI_LAYER_GZIP] * 2
        layer_paths = [image.blob_path(desc) for desc in image.layers]
        assert [gzip.decompress(Path(p).read_bytes()) for p in layer_paths] == [LAYER1, LAYER2]
        assert oci.config_diff_ids(image.config) == [sha256(LAYER1), sha256(LAYER2)]


def test_open_without_tag_takes_the_only_image_and_its_tag(tmp_path):
    layout = two_layer_layout(tmp_path / "oci")
    with open_image(str(layout.root)) as image:
        assert image.tag == "v1"
    untagged = two_layer_layout(tmp_path / "untagged", tag=None)
    with open_image(str(untagged.root)) as image:
        assert image.tag is None


def test_open_by_digest(tmp_path):
    layout = two_layer_layout(tmp_path / "oci")
    digest = read_json(layout.root / "index.json")["manifests"][0]["digest"]
    with open_image(f"{layout.root}@{digest}") as image:
        assert (image.manifest_descriptor.digest, image.tag) == (digest, "v1")
    with pytest.raises(NotFound, match=f"no manifest {GOOD_DIGEST}"):
        open_image(f"{layout.root}@{GOOD_DIGEST}")


def test_a_missing_tag_is_not_found_and_the_message_lists_the_tags(tmp_path):
    layout = Layout(tmp_path / "oci")
    layout.index(tagged(layout.image(), "v1"), tagged(layout.image(arch="arm64"), "v2"))
    with pytest.raises(NotFound, match=r"no tag 'v3'; available tags: v1, v2$"):
        open_image(f"{layout.root}:v3")
    with pytest.raises(NotFound, match=r"holds several images; .*:TAG \(available tags: v1, v2\)"):
        open_image(str(layout.root))
    with open_image(f"{layout.root}:v2") as image:
        assert image.config["architecture"] == "arm64"


def multi_platform_layout(root: Path, *, nested: bool) -> Layout:
    layout = Layout(root)
    entries = [on(layout.image(arch="arm64"), "arm64"), on(layout.image(arch="amd64"), "amd64")]
    if nested:
        entries = [layout.json_blob({"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
                                     "manifests": entries}, oci.OCI_INDEX)]
    layout.index(*[tagged(e, "multi") for e in entries])
    return layout


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested-index"])
def test_the_wanted_platform_is_chosen_among_several(tmp_path, nested):
    layout = multi_platform_layout(tmp_path / "oci", nested=nested)
    for arch in ("arm64", "amd64"):
        with open_image(f"{layout.root}:multi", platform=Platform("linux", arch)) as image:
            assert image.config["architecture"] == arch
            assert image.tag == "multi"
    with pytest.raises(NotFound, match=r"no manifest for platform linux/s390x; "
                                       r"available: linux/arm64, linux/amd64"):
        open_image(str(layout.root), platform=Platform("linux", "s390x"))


def test_the_default_platform_is_the_host(tmp_path):
    if host_platform().architecture not in ("amd64", "arm64"):
        pytest.skip(f"the fixture has amd64 and arm64 images, the host is {host_platform()}")
    layout = multi_platform_layout(tmp_path / "oci", nested=True)
    with open_image(str(layout.root)) as image:
        assert image.config["architecture"] == host_platform().architecture


def test_a_digest_inside_a_nested_index_is_found(tmp_path):
    layout = multi_platform_layout(tmp_path / "oci", nested=True)
    inner = read_json(layout.path_of(read_json(layout.root / "index.json")["manifests"][0]["digest"]))
    arm = inner["manifests"][0]["digest"]
    with open_image(f"{layout.root}@{arm}") as image:
        assert image.config["architecture"] == "arm64"
        assert image.tag == "multi"


def test_a_tampered_layer_fails_verification_when_read(tmp_path):
    layout = two_layer_layout(tmp_path / "oci")
    with open_image(str(layout.root)) as image:
        layer = image.layers[1]
        path = layout.path_of(layer.digest)
        data = bytearray(path.read_bytes())
        data[-9] ^= 0xFF                       # same size, different content
        path.write_bytes(bytes(data))
        assert image.blob_path(image.layers[0])   # the untouched layer is fine
        with pytest.raises(VerificationError, match=f"blob {layer.digest}: content hashes to sha256:"):
            image.blob_path(layer)
        path.write_bytes(bytes(data[:-1]))
        with pytest.raises(VerificationError, match=f"{len(data) - 1} bytes on disk, its "
                                                    f"descriptor says {len(data)}"):
            image.blob_path(layer)


def test_a_tampered_config_fails_when_the_image_is_opened(tmp_path):
    layout = two_layer_layout(tmp_path / "oci")
    with open_image(str(layout.root)) as image:
        config_path = layout.path_of(image.config_descriptor.digest)
    config_path.write_bytes(config_path.read_bytes().replace(b"tests", b"tEsts"))
    with pytest.raises(VerificationError, match="content hashes to"):
        open_image(str(layout.root))


def test_a_missing_blob_is_not_found(tmp_path):
    layout = two_layer_layout(tmp_path / "oci")
    with open_image(str(layout.root)) as image:
        layout.path_of(image.layers[0].digest).unlink()
        with pytest.raises(NotFound, match=f"blob {image.layers[0].digest} is missing"):
            image.blob_path(image.layers[0])


def test_a_digest_cannot_lead_out_of_the_layout(tmp_path):
    layout = Layout(tmp_path / "oci")
    (tmp_path / "secret").write_text("{}")
    layout.index({"mediaType": oci.OCI_MANIFEST, "digest": "sha256:../../../secret", "size": 2})
    with pytest.raises(FormatError, match="bad digest 'sha256:../../../secret'"):
        open_image(str(layout.root))


@pytest.mark.parametrize("index_json, error, message", [
    (b"garbage", FormatError, "index.json: not valid JSON"),
    (b'{"schemaVersion": 2, "manifests": []}', NotFound, "index.json lists no manifests"),
    (index_of({**GOOD_DESC, "mediaType": "application/vnd.example+json"}), FormatError,
     "not an image manifest or index"),
])
def test_bad_index_json(tmp_path, index_json, error, message):
    layout = Layout(tmp_path / "oci")
    (layout.root / "index.json").write_bytes(index_json)
    with pytest.raises(error, match=message):
        open_image(str(layout.root))


def test_a_directory_without_a_layout_is_a_format_error(tmp_path):
    layout = two_layer_layout(tmp_path / "oci")
    (layout.root / "oci-layout").unlink()
    with pytest.raises(FormatError, match="no oci-layout"):
        open_image(str(layout.root))


def test_a_manifest_whose_config_is_not_an_image_is_refused(tmp_path):
    layout = Layout(tmp_path / "oci")
    config = layout.blob(b"{}", "application/vnd.example.config+json")
    manifest = layout.json_blob({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                                 "config": config, "layers": []}, oci.OCI_MANIFEST)
    layout.index(manifest)
    with pytest.raises(FormatError, match="not a container image"):
        open_image(str(layout.root))


def test_layers_and_diff_ids_must_agree_in_number(tmp_path):
    layout = Layout(tmp_path / "oci")
    manifest_desc = layout.image()
    manifest = read_json(layout.path_of(manifest_desc["digest"]))
    manifest["layers"].pop()
    layout.index(layout.json_blob(manifest, oci.OCI_MANIFEST))
    with pytest.raises(FormatError, match="1 layers but the config lists 2 diff_ids"):
        open_image(str(layout.root))


# --- oci-archive -------------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "tar.gz"])
def test_an_oci_archive_reads_like_its_layout_and_leaves_no_temp_files(tmp_path, compressed):
    layout = two_layer_layout(tmp_path / "oci")
    archive = layout.tar(tmp_path / "image.tar")
    if compressed:
        archive.write_bytes(gzip_of(archive.read_bytes()))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with open_image(str(layout.root)) as from_layout, \
            open_image(f"{archive}:v1", tmp_dir=str(scratch)) as from_archive:
        assert from_archive.manifest_descriptor == from_layout.manifest_descriptor
        assert from_archive.config == from_layout.config
        assert from_archive.tag == "v1"
        for desc in from_archive.layers:
            assert Path(from_archive.blob_path(desc)).read_bytes() == \
                Path(from_layout.blob_path(desc)).read_bytes()
        assert os.listdir(scratch)               # layers were copied out...
    assert os.listdir(scratch) == []             # ...and removed on close


def test_a_tampered_blob_in_an_archive_fails_verification(tmp_path):
    layout = two_layer_layout(tmp_path / "oci")
    with open_image(str(layout.root)) as image:
        path = layout.path_of(image.layers[0].digest)
    path.write_bytes(b"X" + path.read_bytes()[1:])
    archive = layout.tar(tmp_path / "image.tar")
    with open_image(str(archive)) as image:
        with pytest.raises(VerificationError):
            image.blob_path(image.layers[0])


def test_an_archive_blob_cannot_be_a_link_to_a_host_file(tmp_path):
    """Links in an archive resolve inside the archive only: /etc/hostname is never read."""
    layout = two_layer_layout(tmp_path / "oci")
    with open_image(str(layout.root)) as image:
        layer = image.layers[0]
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("oci-layout", "index.json"):
            tar.add(layout.root / name, arcname=name)
        for path in sorted((layout.root / "blobs" / "sha256").iterdir()):
            arcname = f"blobs/sha256/{path.name}"
            if path.name == layer.digest.removeprefix("sha256:"):
                tar.addfile(symlink(arcname, "/etc/hostname")[0])
            else:
                tar.add(path, arcname=arcname)
    with open_image(str(archive)) as image:
        with pytest.raises(FormatError, match=f"member blobs/sha256/{layer.digest[7:]} is not a "
                                              "regular file"):
            image.blob_path(layer)


def test_an_archive_without_a_layout_is_a_format_error(tmp_path):
    path = tmp_path / "not-a-layout.tar"
    path.write_bytes(tar_bytes(file_("index.json", b"{}")))
    with pytest.raises(FormatError, match="no oci-layout member"):
        open_image(str(path))
