"""Cold-start benchmark: time until a program's first output from an image on a slow network.

    sudo python3 bench/coldstart.py [--images python,numpy] [--runs 3] [--rate-mbit 100]
        [--rtt-ms 20] [--format zstd:chunked|estargz]
        [--modes full-pull,full-pull-zstd,lazyfs,lazyfs-rec,ratarmount,ratarmount-idx]
        [--ratarmount-runs 1] [--ratarmount-timeout 150] [--timeout 300]
        [--cache-dir /var/cache/lazyfs-bench] [--json PATH] [--chart PATH]

Needs root (network namespace, tc, mounts, chroot), debootstrap, nginx, curl, zstd, strace,
nsenter, fusermount3. The first run builds the images with debootstrap (a few minutes; cached under
--cache-dir, see bench/coldstart_images.py); ratarmount is installed into a venv there (pip:
ratarmount, plus fsspec and aiohttp, the optional dependencies its http:// support needs).
matplotlib, only for the chart, is optional: without it the chart is skipped with a message.
A default run takes about 11 minutes once the images exist, most of it ratarmount's.

The link (bench/netem.py): the images are served by nginx inside a network namespace whose
loopback is shaped with `tc tbf` to --rate-mbit, behind a proxy adding --rtt-ms of round trip
(half each way, plus one RTT before a new connection's first request, as a TCP handshake
costs). Every client below connects to that proxy, so all of their bytes cross the link.

Modes, for each image and its workload (python: `python3 -c 'print("hello")'`):

  full-pull       what users do today: index, manifest and config, then the gzip layer
                  downloaded with curl and extracted with tar as it arrives (download and
                  extraction overlap: the best case of a pull), its digest checked, then the
                  program started by chroot (lazyfs.run.start_in_image: the same overlay,
                  /proc, /dev, /sys and chroot that `lazyfs run` uses)
  full-pull-zstd  the same with the layer compressed by `zstd -3` instead of gzip (as docker,
                  containerd and buildah write zstd layers), extracted with `tar --zstd`:
                  what a pull costs once registries serve zstd; the goals stay against gzip's
  lazyfs          `lazyfs run URL -- CMD` on the converted image, fresh --cache-dir, with
                  --no-prefetch when lazyfs has that option. Converted with `lazyfs convert
                  --format FORMAT` (--format: zstd:chunked by default, or estargz), with the
                  converter's default levels
  lazyfs-rec      `lazyfs record` once on the image (not timed), `lazyfs convert --prioritize`
                  with that list, then `lazyfs run` with a fresh cache and default options. When
                  lazyfs has no `record` command this mode is reported unavailable, not faked
  ratarmount      ratarmount mounting the original gzip layer over HTTP (fsspec), cold: with no
                  index it must read the whole .tar.gz once to build one; then chroot as above
                  into an overlay over its mount
  ratarmount-idx  the same with an index built beforehand and served next to the layer
                  (--index-file URL): ratarmount's best case
  lower-bound     one round trip + the bytes the workload reads, gzip-compressed, at the link's
                  nominal rate + the workload's own start time from a warm local rootfs (no
                  network approach can beat that last part). The files are those the workload
                  opens, found with strace in the rootfs (all of each file counted)
  local           for reference: the workload from the rootfs already on disk, warm

Times are from launching the client (curl, `lazyfs run`, ratarmount) to the first byte the
program writes; each mode runs --runs times (ratarmount's: --ratarmount-runs, as each takes
minutes), interleaved (run 1 of every mode, then run 2, ...), and the median is reported. A
run over its time limit counts as slower than every other run; a mode whose median is such a
run is reported as "> LIMIT". Bytes and requests are nginx's access log for that run
(bytes_sent: bodies and headers), counting requests that completed by the first output; the
JSON has the totals until the program exited and every request with its time. Nothing is cached
between runs on the client: each run has its own new cache dir, extraction dir or index dir.
The server's files stay in the host's page cache (a CDN's or registry's would too).

Goals (from issue 4; reported PASS/FAIL, they do not fail the script), evaluated at 100 Mbit/s
and 20 ms on the python image: lazyfs-rec at most 10% of full-pull and within 2x of the lower
bound; lazyfs at least 2x faster than ratarmount (its better variant).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import http.client
import io
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (str(REPO), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import coldstart_images as images  # noqa: E402
import netem  # noqa: E402
from lazyfs.container import resolve_in_root  # noqa: E402

DEFAULT_CACHE = "/var/cache/lazyfs-bench"
NGINX = "/usr/sbin/nginx"
SERVER_PORT = 8080  # inside our own network namespace: nothing else listens there
SYNC_URI = "/.bench-sync"
RUN_TIMEOUT_S = 300.0
MB = 1e6
GOAL_LINK = netem.LinkSpec(100.0, 20.0)
GOAL_IMAGE = "python"

MODES = {
    "full-pull": "full pull (curl | tar, chroot)",
    "full-pull-zstd": "full pull, zstd layer",
    "lazyfs": "lazyfs run, no prefetch",
    "lazyfs-rec": "lazyfs run, recorded list",
    "ratarmount": "ratarmount, cold (builds index)",
    "ratarmount-idx": "ratarmount, prebuilt index",
    "lower-bound": "lower bound",
    "local": "local rootfs, warm (reference)",
}
TIMED_MODES = ("full-pull", "full-pull-zstd", "lazyfs", "lazyfs-rec", "ratarmount",
               "ratarmount-idx")
REQUIRED_TOOLS = ("debootstrap", "nsenter", "ip", "tc", "curl", "tar", "gzip", "zstd", "strace",
                  "fusermount3", "unshare")


# --- results -----------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One timed run of one mode."""
    image: str
    mode: str
    run: int
    first_output_s: float | None  # None: the run failed (see error)
    exit_s: float | None = None  # until the program (and the client) exited
    bytes_by_output: int = 0  # response bytes of requests completed by the first output
    requests_by_output: int = 0
    bytes_total: int = 0  # ... of all the run's requests
    requests_total: int = 0
    output: str = ""
    error: str = ""
    timed_out: bool = False
    mounted_s: float | None = None  # ratarmount: when its mount appeared
    started_wall: float = 0.0
    # Every request of the run: [seconds from the start to its end at the server, uri (blob
    # digests shortened), Range header, bytes sent]; shows where a mode's time goes.
    requests_log: list = field(default_factory=list)


@dataclass
class ModeSummary:
    image: str
    mode: str
    label: str
    available: bool
    reason: str = ""  # why not available, or what went wrong
    runs: int = 0
    failed: int = 0
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    bytes: int | None = None  # median over runs
    requests: int | None = None
    # Every run hit the mode's time limit: the program took more than this (a lower bound on
    # its time, which is all a "2x faster" comparison needs).
    over_s: float | None = None

    @property
    def seconds(self) -> float | None:
        """The median, or the time limit when every run exceeded it."""
        return self.median_s if self.median_s is not None else self.over_s


@dataclass
class LowerBound:
    image: str
    files: list[str]  # image paths the workload opened, first-open order
    file_bytes: int  # their sizes, summed
    wire_bytes: int  # the same, as one gzip -9 stream of a tar of them
    rtt_s: float
    transfer_s: float
    local_start_s: float  # median first output from the warm local rootfs
    local_runs: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.rtt_s + self.transfer_s + self.local_start_s


@dataclass
class Goal:
    name: str
    passed: bool | None  # None: could not be evaluated
    detail: str


@dataclass
class Features:
    """What the lazyfs under test offers; the benchmark adapts instead of assuming."""
    record: bool
    record_reason: str
    run_flags_no_prefetch: list[str]


# --- small helpers -----------------------------------------------------------------------------

def log(message: str) -> None:
    print(message, flush=True)


def lazyfs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazyfs", *args]


def missing_tools() -> list[str]:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not os.access(NGINX, os.X_OK):
        missing.append("nginx")
    return missing


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value >= 10 else f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def fmt_mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.1f} MB" if value >= 100_000 else f"{value / 1000:.0f} kB"


def await_output(proc: subprocess.Popen, started: float, timeout: float):
    """Read the program's stdout to the end; (seconds to its first byte, wall time of that
    byte, all output). The first byte is what a user sees: the start-up we measure."""
    fd = proc.stdout.fileno()
    chunks: list[bytes] = []
    first_s = first_wall = None
    deadline = started + timeout
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError(f"no end of output within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            break
        if first_s is None:
            first_s, first_wall = time.perf_counter() - started, time.time()
        chunks.append(data)
    return first_s, first_wall, b"".join(chunks).decode(errors="replace")


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait_s: float = 10) -> None:
    """End a process we started, by its pid: `sig`, then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def umount_quietly(path: str) -> None:
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", path], capture_output=True)
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", path], capture_output=True)


# --- the web server in the shaped namespace ----------------------------------------------------

@dataclass
class LogRecord:
    msec: float  # wall time when nginx finished the request
    uri: str
    status: int
    range: str
    bytes_sent: int


class Server:
    """nginx in the link's namespace, serving `www` on its 127.0.0.1:SERVER_PORT, reached from
    the host only through the link's delaying proxy (self.port)."""

    def __init__(self, link: netem.ShapedLink, www: Path, prefix: Path):
        self.link, self.www, self.prefix = link, www, prefix
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._syncs = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(self._config())
        error_log = self.prefix / "error.log"
        self.proc = subprocess.Popen(
            self.link.inside([NGINX, "-p", f"{self.prefix}/", "-c", str(conf), "-e", str(error_log)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = self.link.start_proxy(SERVER_PORT)
        deadline = time.monotonic() + 10
        while True:  # nginx may still be starting: the proxy then closes our connection
            try:
                self.records()
                return
            except (OSError, http.client.HTTPException, RuntimeError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {error_log.read_text()[-2000:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def _config(self) -> str:
        fields = {"msec": "$msec", "uri": "$request_uri", "status": "$status",
                  "range": "$http_range", "bytes_sent": "$bytes_sent"}
        log_format = "{" + ",".join(f'"{k}":"{v}"' for k, v in fields.items()) + "}"
        p = self.prefix
        return f"""
daemon off;
master_process on;
worker_processes 1;
user root;
pid "{p}/nginx.pid";
events {{ worker_connections 1024; }}
http {{
    types {{ }}
    default_type application/octet-stream;
    log_format bench escape=json '{log_format}';
    access_log "{p}/access.log" bench;
    client_body_temp_path "{p}/client_body";
    proxy_temp_path "{p}/proxy";
    fastcgi_temp_path "{p}/fastcgi";
    uwsgi_temp_path "{p}/uwsgi";
    scgi_temp_path "{p}/scgi";
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{SERVER_PORT};
        root "{self.www}";
        location = {SYNC_URI} {{ return 204; }}
        location / {{ }}
    }}
}}
"""

    def clear_log(self) -> None:
        self.records()  # every earlier line is written: none lands after the truncation
        os.truncate(self.prefix / "access.log", 0)

    def records(self) -> list[LogRecord]:
        """The requests logged since the last clear_log, exactly: a marker request goes last
        (through the link, like any client's) and nginx's one worker logs in order."""
        self._syncs += 1
        marker = f"{SYNC_URI}?n={self._syncs}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", marker, headers={"Connection": "close"})
            conn.getresponse().read()
        finally:
            conn.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = (self.prefix / "access.log").read_text().splitlines()
            raw = [json.loads(line) for line in lines if line.endswith("}")]
            if any(r["uri"] == marker for r in raw):
                return [LogRecord(float(r["msec"]), r["uri"], int(r["status"]), r["range"],
                                  int(r["bytes_sent"]))
                        for r in raw if not r["uri"].startswith(SYNC_URI)]
            time.sleep(0.005)
        raise RuntimeError(f"nginx did not log {marker}")


def count_traffic(result: RunResult, records: list[LogRecord], first_wall: float | None) -> None:
    result.requests_log = [[round(r.msec - result.started_wall, 3),
                            re.sub(r"([0-9a-f]{12})[0-9a-f]{52}", r"\1", r.uri), r.range, r.bytes_sent]
                           for r in records]
    result.bytes_total = sum(r.bytes_sent for r in records)
    result.requests_total = len(records)
    early = [r for r in records if first_wall is None or r.msec <= first_wall + 0.0005]
    result.bytes_by_output = sum(r.bytes_sent for r in early)
    result.requests_by_output = len(early)


# --- the benchmark's context --------------------------------------------------------------------

@dataclass
class Context:
    link: netem.LinkSpec
    server: Server
    scratch: Path
    features: Features
    ratarmount: str | None
    images: dict[str, images.BuiltImage]
    ratarmount_indexes: dict[str, str]  # image name -> URL path of its prebuilt index
    timeout_s: float = RUN_TIMEOUT_S
    ratarmount_timeout_s: float = RUN_TIMEOUT_S

    def url(self, path: str) -> str:
        return f"{self.server.url}/{path}"

    def tempdir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.scratch))


def image_config(layout: str) -> dict:
    from lazyfs.oci_layout import open_image

    with open_image(f"{layout}:{images.TAG}") as image:
        return image.config


def start_program(rootfs: str, config: dict, workload: tuple[str, ...]):
    """The program as `lazyfs run` starts it (overlay over `rootfs`, /proc, /dev, /sys,
    chroot, the image config's environment): the same start for every mode."""
    from lazyfs.container import process_spec
    from lazyfs.run import start_in_image

    spec = process_spec(config, list(workload), rootfs)
    return start_in_image(rootfs, spec.args, env=spec.env, stdout=subprocess.PIPE, cwd=spec.cwd,
                          user=spec.user)


def finish_run(ctx: Context, result: RunResult, started: float, proc: subprocess.Popen,
               expect: str, timeout: float) -> None:
    """Wait for the program's output and exit; fill in times and the server's figures."""
    try:
        first_s, first_wall, output = await_output(proc, started, timeout)
        status = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
    except subprocess.TimeoutExpired as exc:
        stop_process(proc, signal.SIGKILL)
        raise TimeoutError(f"the program did not exit within {timeout:.0f} s") from exc
    except BaseException:
        stop_process(proc, signal.SIGKILL)  # before its filesystem goes: no stuck reads
        raise
    result.exit_s = time.perf_counter() - started
    result.output = output.strip()[-500:]
    if status != 0 or expect not in output:
        result.error = f"exit status {status}, output {output.strip()[-300:]!r}"
    else:
        result.first_output_s = first_s
    count_traffic(result, ctx.server.records(), first_wall)


# --- mode 1: full pull --------------------------------------------------------------------------

def _get(conn: http.client.HTTPConnection, path: str) -> bytes:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {response.status}")
    return body


def pull_documents(ctx: Context, base: str) -> tuple[dict, dict]:
    """index.json, the manifest and the config over one keep-alive connection, as a registry
    client does (one round trip each)."""
    from lazyfs.format import oci

    conn = http.client.HTTPConnection("127.0.0.1", ctx.server.port, timeout=60)
    try:
        index = json.loads(_get(conn, f"/{base}/index.json"))
        manifest_digest = index["manifests"][0]["digest"]
        manifest = json.loads(_get(conn, f"/{base}/{oci.blob_relpath(manifest_digest)}"))
        config = json.loads(_get(conn, f"/{base}/{oci.blob_relpath(manifest['config']['digest'])}"))
    finally:
        conn.close()
    return manifest, config


def download_and_extract(url: str, digest: str, dest: Path, decompress: str = "--gzip") -> None:
    """curl → (sha256) → tar -x (--gzip or --zstd): extraction overlaps the download, and the
    blob is checked against its digest as a pull does (a mismatch fails the run)."""
    import hashlib

    curl = subprocess.Popen(["curl", "-sSf", url], stdout=subprocess.PIPE)
    tar = subprocess.Popen(["tar", "--numeric-owner", decompress, "-xpf", "-", "-C", str(dest)],
                           stdin=subprocess.PIPE)
    sha = hashlib.sha256()
    try:
        while block := os.read(curl.stdout.fileno(), 1 << 20):
            sha.update(block)
            tar.stdin.write(block)
    finally:
        tar.stdin.close()
        curl.stdout.close()
        curl_status, tar_status = curl.wait(), tar.wait()
    if curl_status or tar_status:
        raise RuntimeError(f"curl exited {curl_status}, tar exited {tar_status}")
    if "sha256:" + sha.hexdigest() != digest:
        raise RuntimeError(f"{url}: digest mismatch")


def run_full_pull(ctx: Context, image: images.BuiltImage, result: RunResult,
                  layout_name: str = "gzip") -> None:
    """layout_name: "gzip" (the full-pull mode) or "zstd" (full-pull-zstd)."""
    from lazyfs.format import oci

    name = image.spec.name
    dest = ctx.tempdir("pull-")
    dest.chmod(0o755)  # the image's "/" (mkdtemp makes it 0700)
    scratch = None
    try:
        started = time.perf_counter()
        manifest, config = pull_documents(ctx, f"{name}/{layout_name}")
        for layer in manifest["layers"]:
            download_and_extract(
                ctx.url(f"{name}/{layout_name}/{oci.blob_relpath(layer['digest'])}"),
                layer["digest"], dest, decompress=f"--{layout_name}")
        proc, scratch = start_program(str(dest), config, image.spec.workload)
        finish_run(ctx, result, started, proc, image.spec.expect, ctx.timeout_s)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)


# --- modes 2 and 3: lazyfs run -------------------------------------------------------------------

def run_lazyfs(ctx: Context, image: images.BuiltImage, result: RunResult, layout_name: str,
               flags: list[str]) -> None:
    cache = ctx.tempdir("lazyfs-cache-")
    run_dir = ctx.tempdir("lazyfs-run-")
    stderr_path = ctx.scratch / "lazyfs-run.stderr"
    env = {**os.environ, "LAZYFS_RUN_DIR": str(run_dir)}  # where run makes its mountpoint
    argv = lazyfs_argv("run", "--cache-dir", str(cache), *flags,
                       ctx.url(f"{image.spec.name}/{layout_name}:{images.TAG}"),
                       "--", *image.spec.workload)
    proc = None
    try:
        with open(stderr_path, "wb") as stderr:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO)
            finish_run(ctx, result, started, proc, image.spec.expect, ctx.timeout_s)
        if result.error:
            result.error += " " + stderr_path.read_text(errors="replace").strip()[-500:]
    finally:
        stop_process(proc)  # only when something went wrong: SIGTERM makes run clean up
        for leftover in run_dir.glob("*"):  # a run that was killed may leave its mount
            umount_quietly(str(leftover))
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


# --- mode 4: ratarmount ------------------------------------------------------------------------------

def ensure_ratarmount(cache: Path) -> tuple[str | None, str]:
    """ratarmount in a venv of its own under the cache (never in lazyfs's environment):
    (path or None, version or why not). fsspec and aiohttp are its optional dependencies for
    http:// sources."""
    venv = cache / "ratarmount-venv"
    exe = venv / "bin" / "ratarmount"
    if not exe.exists():
        log(f"  installing ratarmount into {venv} (pip: ratarmount fsspec aiohttp)")
        shutil.rmtree(venv, ignore_errors=True)
        for argv in ([sys.executable, "-m", "venv", str(venv)],
                     [str(venv / "bin" / "pip"), "install", "-q", "ratarmount", "fsspec", "aiohttp"]):
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                return None, f"cannot install ratarmount: {result.stderr.strip()[-300:]}"
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('ratarmount'), m.version('ratarmountcore'),"
         " m.version('fsspec'), m.version('rapidgzip'))"],
        capture_output=True, text=True).stdout.split()
    if len(version) != 4:
        return None, "ratarmount is installed but its version cannot be read"
    return str(exe), (f"ratarmount {version[0]} (ratarmountcore {version[1]}, fsspec {version[2]}, "
                      f"rapidgzip {version[3]})")


def build_ratarmount_index(ratarmount: str, image: images.BuiltImage) -> str:
    """ratarmount's index of the gzip layer, built from the local file once (cached)."""
    from lazyfs.format import oci

    out = Path(image.root) / "ratarmount" / f"{image.layer_digest.split(':')[1]}.index.sqlite"
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.unlink(missing_ok=True)
        blob = Path(image.gzip_layout) / oci.blob_relpath(image.layer_digest)
        result = subprocess.run([ratarmount, "--no-mount", "--index-file", str(partial), str(blob)],
                                capture_output=True, text=True, env=_ratarmount_env(out.parent))
        if result.returncode != 0 or not partial.exists():
            raise RuntimeError(f"ratarmount could not index {blob}: {result.stderr[-500:]}")
        partial.rename(out)
    return str(out)


def _ratarmount_env(home: Path) -> dict:
    # ratarmount keeps indexes in ~/.ratarmount and downloads remote ones to TMPDIR: both
    # point into a per-run directory, so no run reuses another's index.
    return {**os.environ, "HOME": str(home), "TMPDIR": str(home),
            "RATARMOUNT_INDEX_TMPDIR": str(home)}


def run_ratarmount(ctx: Context, image: images.BuiltImage, result: RunResult, indexed: bool) -> None:
    from lazyfs.format import oci

    name = image.spec.name
    home, mnt = ctx.tempdir("ratarmount-home-"), ctx.tempdir("ratarmount-mnt-")
    blob_url = ctx.url(f"{name}/gzip/{oci.blob_relpath(image.layer_digest)}")
    index = (["--index-file", ctx.url(ctx.ratarmount_indexes[name])] if indexed
             else ["--index-folders", str(home)])
    # -f: ratarmount refuses to daemonize while fsspec's threads run; it stays our child.
    argv = [ctx.ratarmount, "-f", *index, blob_url, str(mnt)]
    log_path = ctx.scratch / "ratarmount.log"
    proc = scratch = None
    try:
        with open(log_path, "wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    env=_ratarmount_env(home))
            wait_for_mount(str(mnt), proc, started, log_path, ctx.ratarmount_timeout_s)
            result.mounted_s = time.perf_counter() - started
            program, scratch = start_program(str(mnt), image_config(image.gzip_layout),
                                             image.spec.workload)
            finish_run(ctx, result, started, program, image.spec.expect, ctx.ratarmount_timeout_s)
    finally:
        umount_quietly(str(mnt))
        stop_process(proc)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(mnt, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def wait_for_mount(mnt: str, proc: subprocess.Popen, started: float, log_path: Path,
                   timeout: float) -> None:
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            raise RuntimeError(f"ratarmount exited {proc.returncode}: "
                               f"{log_path.read_text(errors='replace')[-800:]}")
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"ratarmount did not mount within {timeout:.0f} s")
        time.sleep(0.005)


# --- lazyfs features and recording --------------------------------------------------------------

def detect_features() -> Features:
    run_help = subprocess.run(lazyfs_argv("run", "--help"), capture_output=True, text=True, cwd=REPO)
    record = subprocess.run(lazyfs_argv("record", "--help"), capture_output=True, text=True, cwd=REPO)
    if record.returncode == 0:
        reason = ""
    else:
        last = (record.stderr.strip().splitlines() or ["?"])[-1]
        reason = f"`lazyfs record` is not available in this lazyfs ({last[:160]})"
    flags = ["--no-prefetch"] if "--no-prefetch" in run_help.stdout else []
    return Features(record.returncode == 0, reason, flags)


def record_list(image: images.BuiltImage, scratch: Path) -> tuple[str | None, str]:
    """`lazyfs record` of the workload on the converted image (local layout, not timed):
    (list path, "") or (None, why not)."""
    out = Path(image.root) / "recorded.list"
    cache = Path(tempfile.mkdtemp(prefix="record-cache-", dir=scratch))
    argv = lazyfs_argv("record", "--output", str(out), "--cache-dir", str(cache),
                       f"{image.lazy_layout}:{images.TAG}", "--", *image.spec.workload)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=RUN_TIMEOUT_S,
                                env={**os.environ, "LAZYFS_RUN_DIR": str(scratch)})
    except subprocess.TimeoutExpired:
        return None, "lazyfs record timed out"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if result.returncode != 0:
        return None, f"lazyfs record failed ({result.returncode}): {result.stderr.strip()[-300:]}"
    if not out.exists() or not out.read_text().strip():
        return None, "lazyfs record wrote no list"
    return str(out), ""


# --- mode 5: the lower bound ----------------------------------------------------------------------

_STRACE_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)(?:\s.*)?$")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_strace(text: str) -> list[str]:
    """Paths successfully opened or executed by processes after they chrooted (and by their
    children), in order. strace -f splits a call that another thread interrupted into
    `<unfinished ...>` and `<... resumed>` lines: they are joined first."""
    pending: dict[str, str] = {}
    chrooted: set[str] = set()
    paths: list[str] = []
    for line in text.splitlines():
        pid, _, rest = line.partition(" ")
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")]
            continue
        resumed = re.match(r"<\.\.\. \w+ resumed>(.*)", rest.lstrip())
        if resumed and pid in pending:
            line = f"{pid} {pending.pop(pid)}{resumed.group(1)}"
        match = _STRACE_LINE.match(line)
        if not match:
            continue
        pid, call, args, ret = match.groups()
        ret = int(ret)
        if call == "chroot" and ret == 0:
            chrooted.add(pid)
        elif call in ("clone", "clone3", "fork", "vfork") and ret > 0 and pid in chrooted:
            chrooted.add(str(ret))
        elif call in ("open", "openat", "execve") and ret >= 0 and pid in chrooted:
            if call == "openat" and not args.startswith("AT_FDCWD"):
                continue  # relative to a directory fd: not a path we can place
            quoted = _QUOTED.search(args)
            if quoted:
                path = codecs.decode(quoted.group(1), "unicode_escape")
                paths.append(path if path.startswith("/") else "/" + path)
    return paths


def opened_files(image: images.BuiltImage, scratch: Path) -> list[str]:
    """The image's regular files the workload opens, found with strace in the local rootfs."""
    trace = scratch / f"strace-{image.spec.name}.txt"
    argv = ["strace", "-f", "-qq", "-o", str(trace), "-e",
            "trace=chroot,execve,open,openat,clone,clone3,fork,vfork",
            sys.executable, str(Path(__file__).resolve()), "_enter", image.gzip_layout,
            image.rootfs, "--", *image.spec.workload]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if result.returncode != 0 or image.spec.expect not in result.stdout:
        raise RuntimeError(f"the traced workload failed: {result.stderr[-500:]}")
    seen: dict[str, None] = {}
    for path in parse_strace(trace.read_text(errors="replace")):
        try:
            host_path = resolve_in_root(image.rootfs, path)
        except OSError:  # a symlink loop: nothing was opened there
            continue
        if os.path.isfile(host_path) and not os.path.islink(host_path):
            seen.setdefault("/" + os.path.relpath(host_path, image.rootfs), None)
    return list(seen)


def compressed_size(root: str, paths: list[str]) -> int:
    """The files as one tar, gzip level 9: the least a lazy loader could ship for them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            tar.add(os.path.join(root, path.lstrip("/")), arcname=path.lstrip("/"), recursive=False)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    return len(deflate.compress(buf.getvalue()) + deflate.flush())


def local_start(image: images.BuiltImage, runs: int) -> list[float]:
    """First-output times of the workload from the rootfs on local disk (after one warm-up)."""
    config = image_config(image.gzip_layout)
    times = []
    for attempt in range(runs + 1):
        started = time.perf_counter()
        proc, scratch = start_program(image.rootfs, config, image.spec.workload)
        try:
            first_s, _, output = await_output(proc, started, RUN_TIMEOUT_S)
            proc.wait()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if image.spec.expect not in output:
            raise RuntimeError(f"the workload failed locally: {output[-300:]!r}")
        if attempt:
            times.append(first_s)
    return times


def lower_bound(image: images.BuiltImage, link: netem.LinkSpec, runs: int,
                scratch: Path) -> LowerBound:
    files = opened_files(image, scratch)
    file_bytes = sum(os.path.getsize(os.path.join(image.rootfs, p.lstrip("/"))) for p in files)
    wire = compressed_size(image.rootfs, files)
    local = local_start(image, runs)
    return LowerBound(image.spec.name, files, file_bytes, wire, link.rtt_s,
                      link.transfer_seconds(wire), median(local), local)


def enter_main(argv: list[str]) -> int:
    """`coldstart.py _enter LAYOUT ROOTFS -- CMD...`: run CMD in ROOTFS as every mode does
    (for strace, which must stay outside the chroot)."""
    layout, rootfs, dashdash, *command = argv
    assert dashdash == "--"
    from lazyfs.container import process_spec
    from lazyfs.run import start_in_image

    spec = process_spec(image_config(layout), command, rootfs)
    proc, scratch = start_in_image(rootfs, spec.args, env=spec.env, cwd=spec.cwd, user=spec.user)
    try:
        return proc.wait()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- preparing and running everything -------------------------------------------------------------

def prepare_images(args, features: Features, scratch: Path) -> tuple[dict, dict]:
    """Build, convert, record: (images by name, {image: reason mode lazyfs-rec is missing})."""
    built, rec_missing = {}, {}
    for name in args.images:
        log(f"image {name}:")
        image = images.build_image(Path(args.cache_dir), images.IMAGES[name], args.suite, args.mirror)
        if "full-pull-zstd" in args.modes:
            images.build_zstd_layout(image)
        images.convert_plain(image, args.format)
        if not features.record:
            rec_missing[name] = features.record_reason
        elif "lazyfs-rec" in args.modes:
            list_path, reason = record_list(image, scratch)
            if list_path:
                images.convert_recorded(image, list_path)
            else:
                rec_missing[name] = reason
        built[name] = image
        log(f"  {image.tar_bytes / MB:.1f} MB in {image.files:,} files; gzip layer "
            f"{image.layer_bytes / MB:.1f} MB; {image.layer_format} {image.lazy_bytes / MB:.1f} MB"
            + (f"; recorded list: {image.rec_files} files" if image.rec_layout else ""))
    return built, rec_missing


def publish(www: Path, built: dict[str, images.BuiltImage], indexes: dict[str, str]) -> dict[str, str]:
    """Symlinks under the web root: <image>/gzip, /zstd, /lazy, /rec and /ratarmount/<index>."""
    urls = {}
    for name, image in built.items():
        (www / name).mkdir(parents=True)
        (www / name / "gzip").symlink_to(image.gzip_layout)
        if image.zstd_layout:
            (www / name / "zstd").symlink_to(image.zstd_layout)
        (www / name / "lazy").symlink_to(image.lazy_layout)
        if image.rec_layout:
            (www / name / "rec").symlink_to(image.rec_layout)
        if name in indexes:
            (www / name / "ratarmount").symlink_to(Path(indexes[name]).parent)
            urls[name] = f"{name}/ratarmount/{Path(indexes[name]).name}"
    return urls


def run_mode(ctx: Context, image: images.BuiltImage, mode: str, run: int) -> RunResult:
    result = RunResult(image.spec.name, mode, run, None)
    reset_page_cache(ctx.server.www)
    ctx.server.clear_log()
    result.started_wall = time.time()
    try:
        if mode == "full-pull":
            run_full_pull(ctx, image, result)
        elif mode == "full-pull-zstd":
            run_full_pull(ctx, image, result, "zstd")
        elif mode == "lazyfs":
            run_lazyfs(ctx, image, result, "lazy", ctx.features.run_flags_no_prefetch)
        elif mode == "lazyfs-rec":
            run_lazyfs(ctx, image, result, "rec", [])
        elif mode == "ratarmount":
            run_ratarmount(ctx, image, result, indexed=False)
        elif mode == "ratarmount-idx":
            run_ratarmount(ctx, image, result, indexed=True)
    except TimeoutError as exc:
        result.error, result.timed_out = f"timed out: {exc}", True
    except Exception as exc:  # one failed run is a result, not the end of the benchmark
        result.error = f"{type(exc).__name__}: {exc}"
    if result.error and not result.requests_total:
        # What a failed or timed-out run moved before it was stopped.
        with contextlib.suppress(Exception):
            count_traffic(result, ctx.server.records(), None)
    if result.first_output_s is not None:
        log(f"  [{image.spec.name}] {mode:<15} run {run}: first output {fmt_s(result.first_output_s):>8}, "
            f"{fmt_mb(result.bytes_by_output):>9} in {result.requests_by_output} requests")
    else:
        log(f"  [{image.spec.name}] {mode:<15} run {run}: FAILED {result.error[:400]}")
    return result


# Before each timed run, the page cache is emptied and what a host keeps warm is read back in.
# Why: on this VM (Firecracker, ext4 on virtio), writing files gets slower as the page cache
# churns. Extracting the python layer (175 MB, 6,627 files) took 1.6-1.8 s right after
# `echo 1 > /proc/sys/vm/drop_caches` and 4.4, 6.8, 8.1 s on the following extractions (nearly
# all of it system time), so each full pull of a series was slower than the one before (the
# download ended at 5.6-6.0 s in five runs, the first output came 0.1 to 3.5 s after it), and
# the median pull measured our own earlier runs. A `sync` and waiting for write-back did not
# help; dropping the page cache does. What a host running containers has in memory anyway is
# then warmed again, so that no mode pays for reading its tools from disk: the interpreter and
# what lazyfs imports, tar, gzip and curl, and the files the web server serves.
WARM_UP_COMMANDS = (
    [sys.executable, "-c", "import lazyfs.cli, lazyfs.run, lazyfs.mount, lazyfs.fetch, "
                           "lazyfs.fs, lazyfs.prefetch, lazyfs.source.http, trio, pyfuse3, "
                           "requests"],
    ["tar", "--version"], ["gzip", "--version"], ["zstd", "--version"], ["curl", "--version"],
)


def reset_page_cache(served: Path) -> None:
    """Empty the page cache (after a sync), then warm the tools and every file under `served`
    (the web server's root, symlinks followed)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
    for argv in WARM_UP_COMMANDS:
        subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for root, _, names in os.walk(served, followlinks=True):
        for name in names:
            with contextlib.suppress(OSError), open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 20):
                    pass


def unavailable_modes(args, built, rec_missing, ratarmount_reason) -> dict[tuple[str, str], str]:
    out = {}
    for name in built:
        if "lazyfs-rec" in args.modes and name in rec_missing:
            out[(name, "lazyfs-rec")] = rec_missing[name]
        for mode in ("ratarmount", "ratarmount-idx"):
            if mode in args.modes and ratarmount_reason:
                out[(name, mode)] = ratarmount_reason
    return out


def summarize(results: list[RunResult], names: list[str], modes: list[str], unavailable: dict,
              bounds: dict[str, LowerBound], limits: dict[str, float]) -> list[ModeSummary]:
    summaries = []
    for name in names:
        for mode in modes:
            summaries.append(summarize_mode(results, name, mode, unavailable, limits[mode]))
        bound = bounds.get(name)
        if bound:
            summaries.append(ModeSummary(name, "lower-bound", MODES["lower-bound"], True,
                                         runs=1, median_s=bound.seconds, bytes=bound.wire_bytes,
                                         requests=1))
            summaries.append(ModeSummary(name, "local", MODES["local"], True,
                                         runs=len(bound.local_runs), median_s=bound.local_start_s,
                                         min_s=min(bound.local_runs), max_s=max(bound.local_runs),
                                         bytes=0, requests=0))
    return summaries


def summarize_mode(results: list[RunResult], name: str, mode: str, unavailable: dict,
                   limit: float) -> ModeSummary:
    """Median of the runs; a run that hit the time limit counts as slower than all others (so
    a median of such runs is only known to be over the limit)."""
    summary = ModeSummary(name, mode, MODES[mode], (name, mode) not in unavailable,
                          unavailable.get((name, mode), ""))
    runs = [r for r in results if r.image == name and r.mode == mode]
    ok = [r for r in runs if r.first_output_s is not None]
    slow = [r for r in runs if r.timed_out]
    summary.runs, summary.failed = len(runs), len(runs) - len(ok)
    if ok or slow:
        middle = median([r.first_output_s for r in ok] + [float("inf")] * len(slow))
        if middle == float("inf"):
            summary.over_s = limit
        else:
            summary.median_s = middle
        if ok:
            summary.min_s = min(r.first_output_s for r in ok)
            summary.max_s = max(r.first_output_s for r in ok)
            summary.bytes = int(median([r.bytes_by_output for r in ok]))
            summary.requests = int(median([r.requests_by_output for r in ok]))
        else:  # what the runs had moved when their time was up: a lower bound too
            summary.bytes = int(median([r.bytes_total for r in slow]))
            summary.requests = int(median([r.requests_total for r in slow]))
    if runs and not ok:
        summary.reason = runs[-1].error[:300]
    return summary


# --- report -------------------------------------------------------------------------------------

def find(summaries: list[ModeSummary], image: str, mode: str) -> ModeSummary | None:
    """The summary of a mode that has a time (a median, or 'over the limit')."""
    for s in summaries:
        if s.image == image and s.mode == mode and s.seconds is not None:
            return s
    return None


def fmt_time(s: ModeSummary) -> str:
    if s.median_s is not None:
        return fmt_s(s.median_s)
    return f"> {fmt_s(s.over_s)}" if s.over_s is not None else "n/a"


def workload_text(spec: images.ImageSpec) -> str:
    *head, last = spec.workload
    return " ".join(head) + " " + (repr(last) if " " in last or "(" in last else last)


def print_table(summaries: list[ModeSummary], built: dict, bounds: dict, runs: dict[str, int],
                out=sys.stdout) -> None:
    for name, image in built.items():
        spec, bound = image.spec, bounds.get(name)
        print(f"\nimage {name}: Debian {suite_of(image)} minbase + {', '.join(spec.packages)}: "
              f"{image.tar_bytes / MB:.1f} MB in {image.files:,} files; gzip layer "
              f"{image.layer_bytes / MB:.1f} MB; {image.layer_format} "
              f"{image.lazy_bytes / MB:.1f} MB", file=out)
        print(f"workload: {workload_text(spec)}" + (
            f" (opens {len(bound.files)} files of the image, {bound.file_bytes / MB:.1f} MB, "
            f"{bound.wire_bytes / MB:.1f} MB as gzip -9)" if bound else ""), file=out)
        pull, lower = find(summaries, name, "full-pull"), find(summaries, name, "lower-bound")
        header = (f"{'mode':<33}{'first output':>13}{'min - max':>17}{'transferred':>13}"
                  f"{'requests':>10}{'vs pull':>9}{'vs bound':>10}")
        print(header, file=out)
        print("-" * len(header), file=out)
        for s in (s for s in summaries if s.image == name):
            if s.seconds is None:
                why = s.reason or "no successful run"
                print(f"{s.label:<33}{'n/a':>13}  {why[:120]}", file=out)
                continue
            spread = (f"{s.min_s:.{2 if s.max_s >= 1 else 3}f} - {s.max_s:.{2 if s.max_s >= 1 else 3}f}"
                      if s.min_s is not None and s.runs > 1 else "")
            over = s.median_s is None
            vs_pull = f"{'>' if over else ''}{s.seconds / pull.seconds:.2f}x" if pull else "-"
            vs_bound = f"{'>' if over else ''}{s.seconds / lower.seconds:.2f}x" if lower else "-"
            notes = []
            if s.median_s is None:
                notes.append("timed out: figures are what it had reached by then")
            elif s.failed:
                notes.append(f"{s.failed} of {s.runs} runs failed or timed out")
            more = ">" if over else ""
            requests = f"{more}{s.requests}" if s.requests is not None else "-"
            print(f"{s.label:<33}{fmt_time(s):>13}{spread:>17}{more + fmt_mb(s.bytes):>13}"
                  f"{requests:>10}{vs_pull:>9}{vs_bound:>10}"
                  + (f"  ({'; '.join(notes)})" if notes else ""), file=out)
    print(f"\nfirst output: {runs_text(runs)} (min - max in seconds); transferred and requests: "
          "responses (headers included) completed by the first output, from nginx's log, median",
          file=out)


def runs_text(runs: dict[str, int]) -> str:
    counts = sorted(set(runs.values()), reverse=True)
    text = f"median of {counts[0]} runs" if counts else "no runs"
    odd = [m for m, n in runs.items() if n != (counts[0] if counts else 0)]
    if odd:
        text += "; " + ", ".join(f"{m}: {runs[m]}" for m in odd)
    return text


def suite_of(image: images.BuiltImage) -> str:
    return Path(image.rootfs).name.split("-")[0]


def evaluate_goals(summaries: list[ModeSummary], link: netem.LinkSpec) -> list[Goal]:
    if link != GOAL_LINK:
        note = f"not evaluated: the goals are for {GOAL_LINK.describe()}, this run used {link.describe()}"
        return [Goal("goals", None, note)]
    if not any(s.image == GOAL_IMAGE for s in summaries):
        return [Goal("goals", None, f"not evaluated: the {GOAL_IMAGE} image was not benchmarked")]
    def get(mode: str) -> ModeSummary | str:
        """The mode's summary, or why it has no time."""
        found = find(summaries, GOAL_IMAGE, mode)
        if found:
            return found
        raw = [s for s in summaries if s.image == GOAL_IMAGE and s.mode == mode]
        return f"no result for {mode}" + (f" ({raw[0].reason[:200]})" if raw and raw[0].reason else "")

    rats = [s for s in (get("ratarmount"), get("ratarmount-idx")) if isinstance(s, ModeSummary)]
    best_rat = min(rats, key=lambda s: s.seconds) if rats else "no result for ratarmount"
    return [
        ratio_goal("lazyfs-rec <= 10% of full pull", get("lazyfs-rec"), get("full-pull"), 0.10),
        ratio_goal("lazyfs-rec within 2x of the lower bound", get("lazyfs-rec"), get("lower-bound"), 2.0),
        ratio_goal("lazyfs-rec >= 2x faster than ratarmount", get("lazyfs-rec"), best_rat, 0.5),
        ratio_goal("lazyfs (no prefetch) >= 2x faster than ratarmount", get("lazyfs"), best_rat, 0.5),
    ]


def ratio_goal(name: str, ours: ModeSummary | str, base: ModeSummary | str, limit: float) -> Goal:
    """ours / base must be <= limit. A baseline only known to be over its time limit still
    decides the goal when even that limit is far enough. A str is why a result is missing."""
    for missing in (ours, base):
        if isinstance(missing, str):
            return Goal(name, None, f"not evaluated: {missing}")
    if ours.median_s is None:
        return Goal(name, False, f"{fmt_time(ours)}: over the time limit")
    ratio = ours.median_s / base.seconds
    detail = f"{fmt_s(ours.median_s)} / {fmt_time(base)} ({base.label}) = {ratio:.3f}, must be <= {limit:g}"
    if base.median_s is None:  # base is slower than base.seconds: the true ratio is smaller
        return Goal(name, True if ratio <= limit else None,
                    detail.replace(" = ", " < ") + ("" if ratio <= limit else " (undecided)"))
    return Goal(name, ratio <= limit, detail)


def print_goals(goals: list[Goal], out=sys.stdout) -> None:
    print(f"\ngoals ({GOAL_IMAGE} image, {GOAL_LINK.describe()}):", file=out)
    for goal in goals:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[goal.passed]
        print(f"  {verdict}  {goal.name}: {goal.detail}", file=out)


def print_timelines(results: list[RunResult], summaries: list[ModeSummary], out=sys.stdout) -> None:
    """Where the time of lazyfs's median runs on the goal image goes: each request up to the
    first output, by when it ended at the server (its response reaches the client RTT/2 later).
    The JSON has every run's requests."""
    for s in summaries:
        if s.image != GOAL_IMAGE or s.mode not in ("lazyfs", "lazyfs-rec") or s.median_s is None:
            continue
        ok = [r for r in results if r.image == s.image and r.mode == s.mode and r.first_output_s]
        run = min(ok, key=lambda r: abs(r.first_output_s - s.median_s))
        print(f"\ntimeline of {s.image} / {s.mode}, run {run.run} (first output at "
              f"{run.first_output_s:.3f} s): when each request ended at the server, uri, range, "
              "bytes", file=out)
        later = 0
        for offset, uri, range_, sent in run.requests_log:
            if offset > run.first_output_s:
                later += 1
                continue
            print(f"  {offset:7.3f} s  {uri:<44} {range_:<24} {sent:>10,}", file=out)
        if later:
            print(f"  ... and {later} more requests before the run ended", file=out)


CHART_COLORS = {"full-pull": "#9e9e9e", "full-pull-zstd": "#bdbdbd", "lazyfs": "#64b5f6",
                "lazyfs-rec": "#1565c0", "ratarmount": "#ffb74d", "ratarmount-idx": "#ef6c00", "lower-bound": "#66bb6a",
                "local": "#c8e6c9"}


def write_chart(summaries: list[ModeSummary], names: list[str], link: netem.LinkSpec,
                layer_format: str, runs: dict[str, int], path: str) -> None:
    """Horizontal bars per image, log scale; modes over their time limit hatched at it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"chart skipped: matplotlib is not installed (pip install matplotlib); {path} not written")
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 4.2 * len(names) + 0.6), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rows = [s for s in summaries if s.image == name]
        values = [s.seconds or 0 for s in rows]
        smallest = min([v for v in values if v > 0] + [s.min_s for s in rows if s.min_s],
                       default=0.01)
        for i, s in enumerate(rows):
            low = s.median_s - s.min_s if s.median_s is not None and s.min_s is not None else 0
            high = s.max_s - s.median_s if s.median_s is not None and s.max_s is not None else 0
            ax.barh(i, values[i], color=CHART_COLORS.get(s.mode, "#888"),
                    hatch="//" if s.median_s is None and s.over_s else None,
                    xerr=[[low], [high]] if low or high else None, capsize=3)
            text = fmt_time(s) if s.seconds is not None else "n/a: " + (s.reason or "failed")[:60]
            ax.text(max(values[i], s.max_s or 0, smallest) * 1.12, i, text, va="center", fontsize=8)
        pull = find(summaries, name, "full-pull")
        if name == GOAL_IMAGE and pull and link == GOAL_LINK:
            ax.axvline(pull.seconds * 0.1, color="#1565c0", linestyle="--", linewidth=1)
            ax.text(pull.seconds * 0.1, len(rows) - 0.45, " goal: 10% of full pull", fontsize=7,
                    color="#1565c0", va="bottom")
        ax.set_yticks(range(len(rows)), [s.label for s in rows])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(smallest / 2, max(values) * 4)
        ax.set_xlabel("seconds to the program's first output (log scale; median, min-max whiskers)")
        ax.set_title(f"{name} image")
    fig.suptitle(f"Cold start over an emulated {link.describe()} link ({runs_text(runs)})\n"
                 f"lazyfs images: {layer_format}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"chart written to {path}")


def conditions(link: netem.LinkSpec, layer_format: str, ratarmount_version: str,
               features: Features) -> dict:
    def first_line(argv: list[str]) -> str:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        except OSError:
            return "?"
        return ((result.stdout or result.stderr).strip().splitlines() or ["?"])[0]

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    os_release = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_release = line.split("=", 1)[1].strip('"')
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "lazyfs", "converter"],
                           capture_output=True, text=True, cwd=REPO).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(), "os": os_release, "python": platform.python_version(),
        "lazyfs": first_line(["git", "rev-parse", "--short", "HEAD"])
                  + (" + uncommitted changes" if dirty else ""),
        "lazyfs_format": layer_format, "lazyfs_record": features.record,
        "lazyfs_flags_no_prefetch": features.run_flags_no_prefetch,
        "nginx": first_line([NGINX, "-v"]), "curl": first_line(["curl", "--version"]),
        "ratarmount": ratarmount_version,
        "link": {"rate_mbit": link.rate_mbit, "rtt_ms": link.rtt_ms,
                 "how": "tc tbf on the loopback of a private network namespace + delaying TCP "
                        "proxy (bench/netem.py)"},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def print_conditions(cond: dict, out=sys.stdout) -> None:
    print("conditions:", file=out)
    for key in ("date", "cpu", "cores", "memory_gib", "kernel", "os", "python", "lazyfs",
                "lazyfs_format", "lazyfs_record", "lazyfs_flags_no_prefetch", "nginx", "curl",
                "ratarmount", "load_average_at_start", "load_average"):
        print(f"  {key:<25}{cond.get(key)}", file=out)
    link = cond["link"]
    print(f"  {'link':<25}{link['rate_mbit']:g} Mbit/s, {link['rtt_ms']:g} ms RTT ({link['how']})", file=out)


# --- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="python,numpy",
                        help=f"comma-separated, of: {', '.join(images.IMAGES)} (default python,numpy)")
    parser.add_argument("--modes", default=",".join(TIMED_MODES),
                        help=f"comma-separated timed modes (default all: {', '.join(TIMED_MODES)})")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode; the median is reported")
    parser.add_argument("--ratarmount-runs", type=int, default=1,
                        help="runs of each ratarmount mode (default 1: each run takes minutes, and "
                             "its spread does not matter next to its distance from lazyfs)")
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S,
                        help=f"seconds a run may take (default {RUN_TIMEOUT_S:g})")
    parser.add_argument("--ratarmount-timeout", type=float, default=150.0,
                        help="seconds a ratarmount run may take; one that takes longer is "
                             "reported as '> LIMIT' (default 150)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="link bandwidth (default 100)")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="link round trip (default 20)")
    parser.add_argument("--format", choices=("zstd:chunked", "estargz"), default="zstd:chunked",
                        help="what the lazyfs modes' images are converted to (default "
                             "zstd:chunked, the faster to start of the two; docs/benchmarks.md)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE,
                        help=f"images, conversions, ratarmount venv (default {DEFAULT_CACHE})")
    parser.add_argument("--suite", default=images.DEFAULT_SUITE, help="Debian suite (default bookworm)")
    parser.add_argument("--mirror", default=images.DEFAULT_MIRROR, help="Debian mirror for debootstrap")
    parser.add_argument("--json", help="raw numbers (default CACHE/results/coldstart.json)")
    parser.add_argument("--chart", help="PNG chart (default CACHE/results/coldstart.png)")
    args = parser.parse_args(argv)
    args.images = [n.strip() for n in args.images.split(",") if n.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name in args.images:
        if name not in images.IMAGES:
            parser.error(f"unknown image {name!r}")
    for mode in args.modes:
        if mode not in TIMED_MODES:
            parser.error(f"unknown mode {mode!r}")
    results = Path(args.cache_dir) / "results"
    args.json = args.json or str(results / "coldstart.json")
    args.chart = args.chart or str(results / "coldstart.png")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_enter"]:
        return enter_main(argv[1:])
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/coldstart.py needs root: network namespaces, tc, mounts and chroot")
    missing = missing_tools()
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (apt-get install debootstrap nginx-light "
                 "curl zstd strace util-linux iproute2 fuse3)")
    link = netem.LinkSpec(args.rate_mbit, args.rtt_ms)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=cache))
    # SIGTERM unwinds like Ctrl-C, so the finally blocks remove the namespace, the servers,
    # the mounts and the scratch directory.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    byte_compile_lazyfs()
    features = detect_features()
    log(f"lazyfs record: {'available' if features.record else features.record_reason}; "
        f"mode lazyfs passes {features.run_flags_no_prefetch or 'no flags (no --no-prefetch option)'}")
    try:
        return run_benchmark(args, link, cache, scratch, features)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def byte_compile_lazyfs() -> None:
    """Compile lazyfs to bytecode first, as `pip install` does: an editable install run with
    PYTHONDONTWRITEBYTECODE set (as one of our machines had) would otherwise compile every
    module on every start, ~50 ms of each lazyfs run there, which no user pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "lazyfs"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)


def run_benchmark(args, link: netem.LinkSpec, cache: Path, scratch: Path, features: Features) -> int:
    # Other work on the machine skews every figure (2 cores: the lazyfs daemon, the proxy and
    # nginx share them): the load averages at start and end are part of the conditions.
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    built, rec_missing = prepare_images(args, features, scratch)

    ratarmount, ratarmount_info, indexes = None, "", {}
    if any(m.startswith("ratarmount") for m in args.modes):
        ratarmount, ratarmount_info = ensure_ratarmount(cache)
        if ratarmount:
            for name, image in built.items():
                indexes[name] = build_ratarmount_index(ratarmount, image)
    ratarmount_reason = "" if ratarmount else ratarmount_info

    log("lower bounds (strace of the workload in the local rootfs, local start times):")
    bounds = {}
    for name, image in built.items():
        bounds[name] = lower_bound(image, link, args.runs, scratch)
        b = bounds[name]
        log(f"  {name}: {len(b.files)} files opened, {b.file_bytes / MB:.1f} MB "
            f"({b.wire_bytes / MB:.1f} MB gzip -9); local start {fmt_s(b.local_start_s)}; "
            f"bound {fmt_s(b.seconds)}")

    unavailable = unavailable_modes(args, built, rec_missing, ratarmount_reason)
    runs = {m: args.ratarmount_runs if m.startswith("ratarmount") else args.runs for m in args.modes}
    limits = {m: args.ratarmount_timeout if m.startswith("ratarmount") else args.timeout
              for m in args.modes}
    results: list[RunResult] = []
    www = scratch / "www"
    with netem.ShapedLink(link) as shaped:
        urls = publish(www, built, indexes)
        server = Server(shaped, www, scratch / "nginx")
        try:
            server.start()
            log(f"serving on {server.url} through an emulated {link.describe()} link")
            ctx = Context(link, server, scratch, features, ratarmount, built, urls,
                          args.timeout, args.ratarmount_timeout)
            # Interleaved (run 1 of every mode, then run 2...): a slow drift of the machine's
            # load spreads over all modes instead of biasing one.
            for run in range(1, max(runs.values(), default=0) + 1):
                for name, image in built.items():
                    for mode in args.modes:
                        if (name, mode) not in unavailable and run <= runs[mode]:
                            results.append(run_mode(ctx, image, mode, run))
        finally:
            server.stop()

    summaries = summarize(results, list(built), args.modes, unavailable, bounds, limits)
    cond = conditions(link, args.format, ratarmount_info or "not used", features)
    cond["load_average_at_start"] = load_at_start
    cond["runs"] = runs
    cond["time_limits_s"] = limits
    goals = evaluate_goals(summaries, link)
    print()
    print_conditions(cond)
    print_table(summaries, built, bounds, runs)
    print_goals(goals)
    print_timelines(results, summaries)
    write_json(args.json, cond, built, bounds, summaries, results, goals)
    write_chart(summaries, list(built), link, args.format, runs, args.chart)
    return 0


def write_json(path: str, cond, built, bounds, summaries, results, goals) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "conditions": cond,
        "images": {name: image.summary() for name, image in built.items()},
        "lower_bounds": {name: {**asdict(b), "seconds": b.seconds} for name, b in bounds.items()},
        "summaries": [asdict(s) for s in summaries],
        "runs": [asdict(r) for r in results],
        "goals": [asdict(g) for g in goals],
    }
    Path(path).write_text(json.dumps(doc, indent=2))
    log(f"raw numbers written to {path}")


if __name__ == "__main__":
    sys.exit(main())
