"""`lazyfs run` on a small real image: Debian's static busybox as the image's userland.

Every end-to-end test runs with both runtimes: the default chroot and `--runtime crun` (skipped
where crun is not installed). The image config (Env, WorkingDir, User, Entrypoint/Cmd) is
applied as a container runtime would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from converter.image import convert_image
from converter.layer import LayerOptions
from lazyfs import container, crun
from lazyfs.errors import NotFound
from lazyfs.oci_layout import open_image
from tests.imagebuild import write_layout
from tests.mounting import lazyfs_cmd, require_fuse
from tests.tarbuild import dir_, file_, symlink

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "ls", "wc", "mount", "id", "ip", "touch")

PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:An app:/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\nstaff:x:50:someone,app\nother:x:60:someone\n"

# name -> (image config, extra members of the upper layer)
IMAGES = {
    "bb": (None, []),
    "env": ({"Env": ["FOO=from the image config", "PATH=/bin"], "WorkingDir": "/srv/app"}, []),
    "numeric": ({"User": "4321:99"}, []),
    "named": ({"User": "app", "WorkingDir": "/home/app"},
              [file_("etc/passwd", PASSWD), file_("etc/group", GROUP),
               dir_("home/"), dir_("home/app/", uid=1000, gid=1000, mode=0o700)]),
    "entrypoint": ({"Entrypoint": ["/bin/sh", "-c"],
                    "Cmd": ["echo started by default as $0; exit 3", "the-image"]}, []),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    require_fuse()
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is missing (apt-get install busybox-static)")
    root = tmp_path_factory.mktemp("bb")
    built = {}
    for name, (config, extra) in IMAGES.items():
        base = [dir_("bin/"), file_("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
                *(symlink(f"bin/{applet}", "busybox") for applet in APPLETS),
                dir_("etc/"), file_("etc/motd", b"from the lower layer\n")]
        upper = [dir_("etc/"), file_("etc/release", b"busybox test image 1\n"), *extra]
        source = write_layout(root / f"{name}-source", [base, upper], name, config)
        converted = root / f"{name}-converted"
        convert_image(f"{source}:{name}", str(converted), archive=False, options=LayerOptions())
        built[name] = f"{converted}:{name}"
    return built


@pytest.fixture(scope="module")
def busybox_image(images):
    return images["bb"]


@pytest.fixture(params=["chroot", "crun"])
def runtime(request):
    if request.param == "crun" and shutil.which("crun") is None:
        pytest.skip("crun is not installed (apt-get install crun): --runtime crun untested")
    return request.param


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "scratch"
    path.mkdir()
    return path


def run(image, *command, scratch: Path, cache: Path, runtime: str = "chroot", options=(),
        term: str | None = None):
    env = {**os.environ, "LAZYFS_RUN_DIR": str(scratch)}
    env.pop("TERM", None)
    if term is not None:
        env["TERM"] = term
    args = ["run", "--cache-dir", cache, "--runtime", runtime, *options, image]
    if command:
        args += ["--", *command]
    return subprocess.run(lazyfs_cmd(*args), capture_output=True, text=True, env=env, timeout=120)


def assert_cleaned_up(scratch: Path) -> None:
    """No scratch directories, no mounts, no crun containers left behind."""
    assert list(scratch.iterdir()) == []
    assert str(scratch) not in Path("/proc/mounts").read_text()
    if os.path.isdir(crun.CRUN_STATE_DIR):
        assert [n for n in os.listdir(crun.CRUN_STATE_DIR) if n.startswith("lazyfs-")] == []


# --- end to end, both runtimes -------------------------------------------------------------------

def test_run_streams_output_and_returns_the_exit_status(busybox_image, runtime, scratch, tmp_path):
    script = ("cat /etc/motd /etc/release; echo computed $((6 * 7)); "
              "echo written > /etc/new && cat /etc/new; ls /proc/self/fd > /dev/null && echo proc ok; "
              "exit 5")
    result = run(busybox_image, "/bin/sh", "-c", script, scratch=scratch, cache=tmp_path / "cache",
                 runtime=runtime)
    assert result.returncode == 5, result.stderr
    assert result.stdout.splitlines() == ["from the lower layer", "busybox test image 1", "computed 42",
                                          "written", "proc ok"]
    assert_cleaned_up(scratch)


def test_the_image_is_unchanged_by_a_run(busybox_image, runtime, scratch, tmp_path):
    first = run(busybox_image, "/bin/sh", "-c", "echo changed > /etc/motd; cat /etc/motd",
                scratch=scratch, cache=tmp_path / "cache", runtime=runtime)
    assert (first.returncode, first.stdout) == (0, "changed\n"), first.stderr
    second = run(busybox_image, "/bin/cat", "/etc/motd", scratch=scratch, cache=tmp_path / "cache",
                 runtime=runtime)
    assert (second.returncode, second.stdout) == (0, "from the lower layer\n"), second.stderr


def test_a_missing_program_is_a_clear_error(busybox_image, runtime, scratch, tmp_path):
    result = run(busybox_image, "/bin/not-there", scratch=scratch, cache=tmp_path / "cache",
                 runtime=runtime)
    assert result.returncode != 0 and "not-there" in result.stderr
    assert "Traceback" not in result.stderr
    assert_cleaned_up(scratch)


def test_without_config_the_defaults_apply(busybox_image, runtime, scratch, tmp_path):
    result = run(busybox_image, "/bin/sh", "-c", "echo $PATH; echo $HOME; echo $TERM; pwd; id -u",
                 scratch=scratch, cache=tmp_path / "cache", runtime=runtime)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [container.DEFAULT_PATH, "/root", "dumb", "/", "0"]


def test_image_config_env_and_working_dir_are_applied(images, runtime, scratch, tmp_path):
    # /srv/app is not in the image: created, as container runtimes do.
    result = run(images["env"], "/bin/sh", "-c", "echo $FOO; pwd; echo $PATH; echo $TERM",
                 scratch=scratch, cache=tmp_path / "cache", runtime=runtime, term="xterm-caller")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["from the image config", "/srv/app", "/bin",
                                          "xterm-caller"]
    # A relative command is looked up in the image's PATH.
    result = run(images["env"], "echo", "found", scratch=scratch, cache=tmp_path / "cache",
                 runtime=runtime)
    assert (result.returncode, result.stdout) == (0, "found\n"), result.stderr
    assert_cleaned_up(scratch)


def test_numeric_user_from_the_config(images, runtime, scratch, tmp_path):
    script = ("id -u; id -g; cat /etc/motd; "
              "if touch /etc/new 2>/dev/null; then echo writable; else echo denied; fi")
    result = run(images["numeric"], "/bin/sh", "-c", script, scratch=scratch,
                 cache=tmp_path / "cache", runtime=runtime)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["4321", "99", "from the lower layer", "denied"]
    assert_cleaned_up(scratch)


def test_named_user_from_the_images_passwd(images, runtime, scratch, tmp_path):
    result = run(images["named"], "/bin/sh", "-c",
                 "id -u; id -g; id -G; echo $HOME; pwd; echo mine > own && cat own",
                 scratch=scratch, cache=tmp_path / "cache", runtime=runtime)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1000", "1000", "1000 50", "/home/app", "/home/app",
                                          "mine"]


def test_default_entrypoint_and_cmd(images, runtime, scratch, tmp_path):
    result = run(images["entrypoint"], scratch=scratch, cache=tmp_path / "cache", runtime=runtime)
    assert (result.returncode, result.stdout) == (3, "started by default as the-image\n"), \
        result.stderr
    # A command on the command line replaces Entrypoint and Cmd.
    result = run(images["entrypoint"], "/bin/echo", "given", scratch=scratch,
                 cache=tmp_path / "cache", runtime=runtime)
    assert (result.returncode, result.stdout) == (0, "given\n"), result.stderr
    assert_cleaned_up(scratch)


def test_private_network_has_only_loopback(busybox_image, runtime, scratch, tmp_path):
    result = run(busybox_image, "/bin/sh", "-c", "cat /proc/net/dev; echo ---; ip link show lo",
                 scratch=scratch, cache=tmp_path / "cache", runtime=runtime,
                 options=["--network", "none"])
    assert result.returncode == 0, result.stderr
    devices, _, link = result.stdout.partition("---\n")
    assert [line.split(":")[0].strip() for line in devices.splitlines()[2:]] == ["lo"]
    assert ",UP" in link   # brought up, as container runtimes do


def test_no_command_and_no_entrypoint_is_a_clear_error(busybox_image, scratch, tmp_path):
    result = run(busybox_image, scratch=scratch, cache=tmp_path / "cache")
    assert result.returncode != 0
    assert "Entrypoint or Cmd" in result.stderr and "Traceback" not in result.stderr
    assert_cleaned_up(scratch)


# --- the image config, without mounting ----------------------------------------------------------

@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_bytes(PASSWD + b"# comment\n+nis\nbroken\n")
    (root / "etc/group").write_bytes(GROUP)
    return root


def test_resolve_user_forms(rootfs):
    def resolve(text, root=rootfs):
        return container.resolve_user(text, str(root))

    User = container.User
    assert resolve("") == User(0, 0, [], "/root")
    assert resolve("app") == User(1000, 1000, [50], "/home/app")
    assert resolve("1000") == User(1000, 1000, [50], "/home/app")
    # An explicit group is the only group.
    assert resolve("app:staff") == User(1000, 50, [], "/home/app")
    assert resolve("app:7") == User(1000, 7, [], "/home/app")
    # A numeric uid needs no passwd entry (nor the image any account file).
    assert resolve("4321") == User(4321, 0, [], None)
    assert resolve("4321:99", rootfs / "nothing") == User(4321, 99, [], None)
    with pytest.raises(NotFound, match="nobody"):
        resolve("nobody")
    with pytest.raises(NotFound, match="wheel"):
        resolve("app:wheel")


def test_account_files_are_looked_up_inside_the_image(tmp_path, rootfs):
    # An image whose /etc/passwd is an absolute symlink, or climbs with "..": both stay inside.
    (tmp_path / "host-passwd").write_bytes(b"app:x:0:0::/:/bin/sh\n")
    (rootfs / "etc/passwd").rename(rootfs / "etc/passwd.real")
    (rootfs / "etc/passwd").symlink_to("/../../../host-passwd")
    assert container.resolve_in_root(str(rootfs), "/etc/passwd") == str(rootfs / "host-passwd")
    with pytest.raises(NotFound):
        container.resolve_user("app", str(rootfs))
    (rootfs / "etc/passwd").unlink()
    (rootfs / "etc/passwd").symlink_to("/etc/../etc/passwd.real")
    assert container.resolve_user("app", str(rootfs)).uid == 1000


def test_process_spec_environment():
    config = {"config": {"Env": ["PATH=/opt/bin", "HOME=/data", "A=1=2", "BROKEN", "TERM=vt100"],
                         "WorkingDir": "work/dir", "Cmd": ["run"]}}
    spec = container.process_spec(config, [], "/nonexistent", term="xterm")
    assert spec.args == ["run"]
    assert spec.env == {"PATH": "/opt/bin", "HOME": "/data", "A": "1=2", "TERM": "xterm"}
    assert spec.cwd == "/work/dir"
    assert container.process_spec(config, [], "/nonexistent").env["TERM"] == "vt100"
    lone = container.process_spec(None, ["/bin/true"], "/nonexistent")
    assert lone.env == {"PATH": container.DEFAULT_PATH, "HOME": "/root", "TERM": "dumb"}
    with pytest.raises(Exception, match="lone blob"):
        container.command_for(None, [])


def test_crun_bundle_config():
    spec = container.ProcessSpec(["/bin/sh"], {"A": "b"}, "/w", container.User(1000, 1000, [50]))
    config = crun.oci_runtime_config(spec, "/merged", hostname="h")
    assert config["root"] == {"path": "/merged", "readonly": False}
    assert config["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [50]}
    assert config["process"]["env"] == ["A=b"] and config["process"]["cwd"] == "/w"
    assert config["process"]["terminal"] is False
    assert config["process"]["capabilities"]["effective"] == []   # not root: none
    assert "CAP_MKNOD" not in config["process"]["capabilities"]["bounding"]
    kinds = [ns["type"] for ns in config["linux"]["namespaces"]]
    assert sorted(kinds) == ["ipc", "mount", "pid", "uts"]        # host network by default
    private = crun.oci_runtime_config(spec, "/merged", hostname="h", private_network=True)
    assert "network" in [ns["type"] for ns in private["linux"]["namespaces"]]
    assert {m["destination"] for m in config["mounts"]} >= {"/proc", "/dev", "/dev/pts", "/dev/shm",
                                                            "/sys"}


def test_cgroup2_is_hidden_from_crun_only_on_hybrid_hosts():
    hybrid = [("/", "ext4"), ("/sys/fs/cgroup", "tmpfs"), ("/sys/fs/cgroup/cpu", "cgroup"),
              ("/sys/fs/cgroup/unified", "cgroup2")]
    assert crun.cgroup2_mounts_to_hide(hybrid) == ["/sys/fs/cgroup/unified"]
    assert crun.cgroup2_mounts_to_hide([("/sys/fs/cgroup", "cgroup2")]) == []
    assert crun.cgroup2_mounts_to_hide(hybrid[:3]) == []


def test_over_http_the_image_documents_are_fetched_once(images, nginx, scratch, tmp_path):
    """`run` resolves the image, and the mount daemon it forks serves that same resolution:
    index, manifest and config cross the network once. The daemon takes over the documents'
    connection for its TOC read, while `run` reads the config on a connection of its own."""
    layout, _, tag = images["env"].rpartition(":")
    shutil.copytree(layout, Path(nginx.root) / "env")
    done = run(f"{nginx.url}/env:{tag}", "/bin/sh", "-c", "echo $FOO; cat /etc/release",
               scratch=scratch, cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the image config\nbusybox test image 1\n"
    documents = [r.uri for r in nginx.requests() if r.range == "" or r.uri.endswith(".json")]
    assert documents.count("/env/index.json") == 1
    # the manifest and the config: two whole-blob GETs, each once; the layers only by range
    whole_blobs = [uri for uri in documents if "/blobs/" in uri]
    assert len(whole_blobs) == 2 and len(set(whole_blobs)) == 2
    records = nginx.requests()
    connection_of = {r.uri: r.connection for r in records if r.range == ""}
    toc_read = next(r for r in records if r.range)
    manifest_uri, config_uri = (uri for uri in whole_blobs)
    with open_image(images["env"]) as local:  # which of the two is the config
        if local.config_descriptor.digest.endswith(manifest_uri.rsplit("/", 1)[-1]):
            manifest_uri, config_uri = config_uri, manifest_uri
    assert connection_of["/env/index.json"] == connection_of[manifest_uri] == toc_read.connection
    assert connection_of[config_uri] != toc_read.connection
    assert_cleaned_up(scratch)


def test_run_from_a_registry(images, scratch, tmp_path):
    """`lazyfs run oci://...`: the image config and the layers come from a docker-registry
    (pushed there by skopeo), through the same resolution as every other store."""
    from tests.registryserver import _shared_registry, push_layout, registry_missing_reason

    reason = registry_missing_reason()
    if reason:
        pytest.skip(reason)
    layout, _, tag = images["env"].rpartition(":")
    registry = _shared_registry()
    push_layout(layout, tag, f"{registry.host}/run/env:{tag}")
    done = run(f"oci://{registry.host}/run/env:{tag}", "/bin/sh", "-c", "echo $FOO; pwd",
               scratch=scratch, cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the image config\n/srv/app\n"
    assert_cleaned_up(scratch)


def test_a_wrong_config_read_after_the_mount_fails_cleanly(images, nginx, scratch, tmp_path):
    """With a command given, `run` reads the config while the daemon fetches the TOCs: a config
    that does not match its manifest is still refused, and nothing is left mounted."""
    layout, _, tag = images["env"].rpartition(":")
    root = Path(nginx.root) / "env"
    shutil.copytree(layout, root)

    def blob_path(digest: str) -> Path:
        return root / "blobs" / "sha256" / digest.split(":")[1]

    def put(document: dict) -> dict:
        data = json.dumps(document).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blob_path(digest).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    index = json.loads((root / "index.json").read_text())
    entry = next(e for e in index["manifests"]
                 if e.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads(blob_path(entry["digest"]).read_text())
    config = json.loads(blob_path(manifest["config"]["digest"]).read_text())
    config["rootfs"]["diff_ids"].append(config["rootfs"]["diff_ids"][0])  # one layer too many
    manifest["config"].update(put(config))
    entry.update(put(manifest))
    (root / "index.json").write_text(json.dumps(index))
    done = run(f"{nginx.url}/env:{tag}", "/bin/true", scratch=scratch, cache=tmp_path / "cache")
    assert done.returncode == 2, done.stderr
    assert "layers but the config lists" in done.stderr
    assert_cleaned_up(scratch)
