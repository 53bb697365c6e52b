"""The mount daemon's life: resolve, open layers, build the tree, serve FUSE, unmount cleanly.

`lazyfs mount` returns once the mount is ready, leaving the daemon in the background. The
parent forks before anything else happens (no threads exist yet, so forking is safe), and the
child reports back through a pipe: "ok" once the filesystem is mounted, or the one-line error
and exit code that stopped it. So every error of resolving and opening the image is printed by
the command the user ran, with its exit code, exactly as in the foreground.

SIGTERM and SIGINT end the daemon with a clean unmount. A daemon that died anyway leaves a
mount whose every access fails with ENOTCONN; `lazyfs umount` clears it (lazy unmount).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from lazyfs.errors import LazyfsError, NotFound
from lazyfs.fetchoptions import BUSY_POLL_S, FetchOptions

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 10 << 30


@dataclass
class MountOptions:
    toc_digest: str | None = None
    insecure: bool = False
    cache_dir: str | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    foreground: bool = False
    log_file: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ca_cert: str | None = None
    s3_endpoint: str | None = None
    # The kernel's readahead window for the mount, which also caps its read requests (FUSE
    # allows up to 1 MiB): bigger requests, fewer of them.
    kernel_readahead_bytes: int = 1 << 20
    # The window while a program starts from an image whose prefetch is what a recorded
    # start-up read (prefetch ranges), and while `lazyfs record` records: the two must be the
    # same, or the kernel asks at run time for bytes around the recorded ones that were not
    # prefetched, each a round trip. Small: what the kernel reads around a page fault of a
    # library is then mostly what the program uses (KernelReadahead).
    startup_readahead_bytes: int = 128 << 10
    busy_poll_s: float = BUSY_POLL_S  # see fetchoptions; 0: never poll
    fetch: FetchOptions = field(default_factory=FetchOptions)  # connections, retries, prefetch
    # `lazyfs record`: a lazyfs.record.RecordTarget; the daemon appends each regular file's
    # path at its first read to that file. None: no recording.
    record: object | None = None
    # Public keys (PEM paths): refuse the image unless one of them signed it (lazyfs.signing).
    verify_keys: tuple[str, ...] = ()

    def source_options(self):
        """How to reach the image's store (lazyfs.imageref.SourceOptions)."""
        from lazyfs.imageref import SourceOptions

        return SourceOptions(headers=self.headers or None, ca_cert=self.ca_cert,
                             timeout=self.fetch.timeouts_s(), s3_endpoint=self.s3_endpoint)


def mount(ref: str, mountpoint: str, options: MountOptions, *, quiet: bool = False,
          image=None, meanwhile=None) -> int:
    """Mount `ref` at `mountpoint`; in a background daemon unless options.foreground.

    `image`: ref already resolved (a lazyfs.image.MountImage), as `lazyfs run` has it: the
    daemon, a fork of this process, serves it without fetching index and manifest again, and
    reuses its kept-alive connections. The caller must not close it (the daemon owns it from
    then on). `meanwhile()`: called here while the background daemon starts (`lazyfs run`
    reads the image config); it must not raise.
    """
    if not os.path.isdir(mountpoint):
        raise NotFound(f"mountpoint {mountpoint} is not a directory")
    if options.foreground:
        return _serve(ref, mountpoint, options, ready_fd=None, image=image)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        _detach_stdio(options.log_file)
        code = 1
        try:
            code = _serve(ref, mountpoint, options, ready_fd=write_fd, image=image)
        finally:
            os._exit(code)
    os.close(write_fd)
    if meanwhile is not None:
        meanwhile()
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode("utf-8", "replace")
    if message.startswith("ok"):
        if not quiet:
            print(f"mounted {ref} at {mountpoint} (daemon pid {pid})", file=sys.stderr)
        return 0
    _, status = os.waitpid(pid, 0)
    code, _, text = message.partition(" ")
    print(text.strip() or f"lazyfs mount: the daemon exited with status {status}", file=sys.stderr)
    return int(code) if code.isdigit() else 1


def _detach_stdio(log_file: str | None) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_file else devnull
    os.dup2(target, 1)
    os.dup2(target, 2)


def _report(ready_fd: int | None, message: str) -> None:
    if ready_fd is not None:
        os.write(ready_fd, message.encode())
        os.close(ready_fd)


def _serve(ref: str, mountpoint: str, options: MountOptions, ready_fd: int | None,
           image=None) -> int:
    try:
        # (It imports trio and pyfuse3 while it waits for the TOCs.)
        session = open_session(ref, options, image=image)
    except LazyfsError as exc:
        _report(ready_fd, f"{exc.exit_code} lazyfs mount: error: {exc}")
        if ready_fd is None:
            raise
        return exc.exit_code
    except BaseException as exc:
        _report(ready_fd, f"1 lazyfs mount: unexpected error: {type(exc).__name__}: {exc}")
        raise
    import pyfuse3
    import trio

    try:
        fuse_options = {"fsname=lazyfs", "subtype=lazyfs", "ro", "default_permissions"}
        if os.geteuid() == 0:
            fuse_options.add("allow_other")  # containers run as other users
        try:
            pyfuse3.init(session.fs, mountpoint, fuse_options)
        except RuntimeError as exc:
            _report(ready_fd, f"1 lazyfs mount: error: cannot mount at {mountpoint}: {exc}")
            return 1
        _when_serving(mountpoint, session.readahead, ready_fd)
        try:
            trio.run(_main, session)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        session.close()
    return 0


def _when_serving(mountpoint: str, readahead: "KernelReadahead", ready_fd: int | None) -> None:
    """Once the mount answers, tune the kernel's readahead for it, then report it ready.

    The FUSE handshake (INIT) happens when the loop starts and lowers the readahead window to
    what the daemon accepts, so the setting must come after it: a thread stats the mount
    root, which the kernel holds until INIT is done and the loop answers. Reporting "ok" only
    then also means that `lazyfs mount` returns when the mount really serves."""
    def wait_then_tune() -> None:
        try:
            device = os.stat(mountpoint).st_dev
        except OSError as exc:
            _report(ready_fd, f"1 lazyfs mount: error: the mount at {mountpoint} does not "
                              f"answer: {exc.strerror}")
            return
        readahead.serving(device)
        _report(ready_fd, "ok")

    threading.Thread(target=wait_then_tune, name="lazyfs-ready", daemon=True).start()


class KernelReadahead:
    """The kernel's readahead window of the mount, set once it serves, and changed once if a
    start-up window comes first.

    Normally the window is MountOptions.kernel_readahead_bytes from the start: sequential
    reads then reach the daemon as 1 MiB requests instead of the kernel's default 128 KiB, and
    each FUSE request costs the daemon a fixed ~0.1-0.3 ms, so 8x fewer of them is most of the
    sequential throughput (docs/benchmarks.md).

    A start-up window (`startup_bytes`) comes first while `lazyfs record` records, and when the
    prefetch holds only what a recorded start-up read: the kernel must then ask for what it
    asked while recording, not for the bytes around them that were left out. It is raised to
    the normal window once the start-up has settled (`settled`: the prefetch is over and the
    mount has been quiet, lazyfs.prefetch), never while recording. A file keeps the window it
    was opened with (the kernel copies it at open), so the program that started keeps reading
    as it did when recorded.

    Best effort: setting it needs root; without it, the kernel's default stays."""

    def __init__(self, size_bytes: int, startup_bytes: int | None = None, *,
                 settles: bool = True):
        self.size_bytes = size_bytes
        self.startup_bytes = startup_bytes
        self.settles = settles and startup_bytes is not None
        self._device: int | None = None
        self._settled = False
        self._lock = threading.Lock()

    def serving(self, device: int) -> None:
        """The mount answers (its INIT is done): set the first window."""
        with self._lock:
            self._device = device
            starting = self.startup_bytes is not None and not self._settled
            _set_readahead(device, self.startup_bytes if starting else self.size_bytes)

    def settled(self) -> None:
        """The start-up is over: the normal window from now on (for files opened from now)."""
        with self._lock:
            if not self.settles or self._settled:
                return
            self._settled = True
            if self._device is not None:
                _set_readahead(self._device, self.size_bytes)


def _set_readahead(device: int, size_bytes: int) -> None:
    from lazyfs import linux

    if not linux.set_readahead(device, size_bytes):
        log.info("could not set the kernel readahead of the mount (not root?)")


async def _main(session: "Session") -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        nursery.start_soon(session.fs.activity.keep_loop_awake)
        if session.background is not None:
            # Returns once the prefetch has claimed its chunks: reads then wait for it.
            await nursery.start(session.background)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


@dataclass
class Session:
    fs: object
    close: object
    background: object = None  # async fn(task_status=...): prefetch, then background fetch
    readahead: KernelReadahead | None = None


def _readahead_for(options: MountOptions, layers) -> KernelReadahead:
    """The start-up window while recording, or when some layer's prefetch is only what a
    recorded start-up read; else the normal window throughout."""
    sparse = options.fetch.prefetch and any(layer.spec.prefetch_ranges is not None
                                            for layer in layers)
    recording = options.record is not None
    startup = options.startup_readahead_bytes if (recording or sparse) else None
    return KernelReadahead(options.kernel_readahead_bytes, startup, settles=not recording)


def open_session(ref: str, options: MountOptions, image=None) -> Session:
    """Everything a mount serves, ready before the kernel sees it: errors surface here.

    `image`: ref already resolved (see mount()); None to resolve it here."""
    if image is None:
        from lazyfs.source import waiting

        with waiting.spare_time(preload_session_modules):
            image = resolve_image(ref, options)
    from lazyfs.cache import ChunkCache, default_cache_dir
    from lazyfs.layer import open_layers
    from lazyfs.tree import build_tree

    try:
        cache = ChunkCache(options.cache_dir or default_cache_dir(), options.cache_bytes)
        speculating = (_start_speculative_prefetch(image.layers, cache)
                       if options.fetch.prefetch else [])
        # Fetching the TOCs is round trips of waiting: meanwhile a thread imports what serving
        # needs (trio, pyfuse3, the fetcher: ~0.2 s of a cold start). Not earlier: while the
        # image resolves, it would compete with that for the interpreter, and it first waits
        # for the TOC requests to be on their way, so as not to delay sending them.
        serving_imported, prefetched = threading.Event(), threading.Event()
        threading.Thread(target=_import_modules, args=(speculating, serving_imported, prefetched),
                         name="lazyfs-imports", daemon=True).start()
        # Again after a transient failure: a layer already opened comes from the TOC cache.
        layers = _retried(lambda: open_layers(image.layers, cache), options)
        tree = build_tree([layer.entries for layer in layers])
        for warning in tree.warnings:
            log.warning("%s", warning)
        serving_imported.wait()
        from lazyfs.fetch import ChunkFetcher
        from lazyfs.fs import LazyFS
        from lazyfs.prefetch import prefetch_and_background

        fetcher = ChunkFetcher(layers, cache, options=options.fetch)
        description = {**image.description, "cache_dir": cache.root, "entries": tree.entry_count}
        if not description.get("verified"):
            description["warning"] = "INSECURE: TOC not verified (--insecure-skip-verify)"
            log.warning("%s: %s", ref, description["warning"])
        recorder = options.record.open(tree) if options.record is not None else None
        fs = LazyFS(tree, layers, fetcher, description=description, recorder=recorder,
                    awake_window_s=options.busy_poll_s)
        readahead = _readahead_for(options, layers)
        return Session(fs,
                       image.close,
                       functools.partial(prefetch_and_background, fetcher,
                                         prefetched=prefetched.set,
                                         settled=readahead.settled if readahead.settles
                                         else None),
                       readahead)
    except BaseException:
        image.close()
        raise


def _start_speculative_prefetch(specs, cache) -> list:
    """Have each remote layer's TOC read carry the download of its prioritized files
    (lazyfs/source/speculative.py); the SpeculativeSources. Only on a cold mount: a cached
    TOC means the layer was mounted before, and its prefetched chunks are likely in the cache
    already."""
    from lazyfs.source.file import FileSource
    from lazyfs.source.speculative import SpeculativeSource

    started = []
    for spec in specs:
        windows = (spec.prefetch_ranges if spec.prefetch_ranges is not None
                   else [(0, spec.prefetch_end or 0)])
        if (spec.prefetch_end and windows and not isinstance(spec.source, FileSource)
                and not (spec.toc_digest and cache.has_toc(spec.toc_digest))):
            spec.source = SpeculativeSource(spec.source, windows)
            started.append(spec.source)
    return started


def resolve_image(ref: str, options: MountOptions, *, defer_config: bool = True):
    """ref resolved to what a mount serves (lazyfs.image.MountImage): its layers, and its
    config, read at the first use of `.config` unless `defer_config` is False (see
    image_config: the mount itself needs none of it)."""
    from lazyfs.image import resolve_mount_image

    return _retried(lambda: resolve_mount_image(ref, toc_digest=options.toc_digest,
                                                insecure=options.insecure,
                                                sources=options.source_options(),
                                                verify_keys=options.verify_keys,
                                                defer_config=defer_config), options)


def image_config(image, options: MountOptions) -> dict | None:
    """The config of a resolved image (lazyfs.image.MountImage), read now if it was deferred,
    under the mount's retry policy."""
    return _retried(lambda: image.config, options)


def _retried(attempt, options: MountOptions):
    """attempt() under the mount's retry policy: a reset or a 503 while opening the image is
    retried with backoff, as the reads of a mounted image are, rather than failing the mount."""
    from lazyfs.retry import retrying_blocking

    def on_retry(exc, retry: int, delay_s: float) -> None:
        log.warning("opening the image: retry %d in %.2f s: %s", retry + 1, delay_s, exc)

    return retrying_blocking(attempt, options.fetch.retry, on_retry=on_retry)


# What a mount daemon imports before it serves (open_session, _serve).
_SERVING_MODULES = ("trio", "pyfuse3", "lazyfs.cache", "lazyfs.fetch", "lazyfs.fs",
                    "lazyfs.layer", "lazyfs.prefetch", "lazyfs.tree")
# Then, once the prefetch is over, what HTTP reads after the first ones need (their first
# requests went over a lighter client: lazyfs/source/light.py). Not before: the program that
# is starting needs the interpreter for the prefetch, which decodes what it reads.
_HTTP_MODULES = ("requests", "requests.adapters")


# What the daemon needs before it asks for the TOCs: `lazyfs run` loads them before it forks
# the daemon, while it waits for the image's documents (lazyfs/source/waiting.py), and
# `lazyfs mount`'s daemon while it waits for them itself.
_SESSION_MODULES = ("lazyfs.cache", "lazyfs.layer", "lazyfs.tree", "lazyfs.source.file",
                    "lazyfs.source.speculative")


def preload_session_modules() -> None:
    _import_all(_SESSION_MODULES)


# How long the imports wait for the TOC requests to be sent, at most.
IMPORTS_WAIT_S = 0.5


def _import_modules(speculating: list, serving_imported: threading.Event,
                    prefetched: threading.Event) -> None:
    deadline = time.monotonic() + IMPORTS_WAIT_S
    for source in speculating:
        source.asking.wait(max(0.0, deadline - time.monotonic()))
    try:
        _import_all(_SERVING_MODULES)
    finally:
        serving_imported.set()
    if "lazyfs.source.http" in sys.modules:
        prefetched.wait()
        _import_all(_HTTP_MODULES)


def _import_all(names: tuple[str, ...]) -> None:
    import importlib

    try:
        for name in names:
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - the real import, later, reports it
        log.debug("preloading %s failed", names, exc_info=True)


def umount(mountpoint: str) -> int:
    """Unmount; a mount whose daemon died (ENOTCONN) is detached lazily."""
    mountpoint = os.path.abspath(mountpoint)
    first = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if first.returncode == 0:
        return 0
    lazy = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
    if lazy.returncode == 0:
        return 0
    raise LazyfsError(f"cannot unmount {mountpoint}: {first.stderr.strip() or lazy.stderr.strip()}")
