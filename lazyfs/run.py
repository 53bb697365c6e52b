"""`lazyfs run IMAGE [-- CMD ARGS...]`: start a program from a lazily mounted image.

    config = the image config (Entrypoint/Cmd, Env, WorkingDir, User), read up front; the
             mount daemon, forked from here, serves the layers of that same resolution
    lower  = the image, mounted read-only by a lazyfs daemon
    merged = overlayfs(lower, upper = a temporary directory) so the program can write

Two runtimes start the program in `merged`:

    chroot (default)  /proc, /dev, /sys from the host, chroot(merged), chdir(WorkingDir), drop
                      to the config's User (setgroups/setgid/setuid), exec CMD
    crun              an OCI bundle run by crun (lazyfs/crun.py): pid/ipc/uts/mount
                      namespaces, its own /proc, /dev, /sys, capabilities

Both share the host network unless --network none asks for a private one (only loopback).
The overlay and the special mounts are made inside a private mount namespace that only the
program (or crun) lives in, so they disappear with it and are never visible on the host; then
the lazy mount is unmounted and the temporary directories removed. The program's output
streams through, and its exit status becomes ours.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable

from lazyfs import linux
from lazyfs.container import DEFAULT_PATH, User, command_for, process_spec
from lazyfs.errors import LazyfsError
from lazyfs.mount import MountOptions, mount, umount

RUNTIMES = ("chroot", "crun")
NETWORKS = ("host", "none")

# The environment of start_in_image's callers that pass none (the demo); `run` builds the
# program's environment from the image config instead.
DEFAULT_ENV = {"PATH": DEFAULT_PATH, "HOME": "/root"}


def make_scratch(lower: str, parent: str | None = None) -> tuple[str, tuple[str, str, str]]:
    """A scratch directory holding the overlay's upper, work and merged directories."""
    scratch = tempfile.mkdtemp(prefix="lazyfs-run-", dir=parent or os.environ.get("LAZYFS_RUN_DIR"))
    dirs = tuple(os.path.join(scratch, d) for d in ("upper", "work", "merged"))
    try:
        for path in dirs:
            os.mkdir(path)
        # The overlay's root directory takes upper's mode and owner: give it the image root's
        # (not whatever mkdir made), as the image's users expect of "/".
        root = os.stat(lower)
        os.chown(dirs[0], root.st_uid, root.st_gid)
        os.chmod(dirs[0], stat.S_IMODE(root.st_mode))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch, dirs  # type: ignore[return-value]


def _enter_container(lower: str, upper: str, work: str, merged: str, *, cwd: str,
                     user: User | None, private_network: bool):
    """Runs in the child between fork and exec: namespace, overlay, special mounts, chroot,
    working directory, user."""

    def prepare() -> None:
        try:
            # Nothing we mount from here on may propagate back to the host.
            linux.enter_private_mount_namespace(linux.CLONE_NEWNET if private_network else 0)
            if private_network:
                linux.loopback_up()
            linux.mount_overlay(lower, upper, work, merged)
            bind = linux.MS_BIND | linux.MS_REC
            for name, source, fstype, flags in (("proc", "proc", "proc", 0),
                                                ("dev", "/dev", None, bind),
                                                ("sys", "/sys", None, bind)):
                target = os.path.join(merged, name)
                os.makedirs(target, exist_ok=True)
                linux.mount(source, target, fstype, flags)
            os.chroot(merged)
            # As runc and crun do: a missing working directory is created (by root), and
            # entered before privileges are dropped.
            os.makedirs(cwd, exist_ok=True)
            os.chdir(cwd)
            if user is not None:
                os.setgroups(user.additional_gids)
                os.setgid(user.gid)
                os.setuid(user.uid)
        except BaseException as exc:
            # subprocess reports only "Exception occurred in preexec_fn": say what it was.
            os.write(2, f"lazyfs run: {exc}\n".encode(errors="replace"))
            raise

    return prepare


def start_in_image(lower: str, command: list[str], *, env: dict | None = None, stdout=None,
                   cwd: str = "/", user: User | None = None,
                   private_network: bool = False) -> tuple[subprocess.Popen, str]:
    """Start `command` chrooted into a writable overlay over the mounted image at `lower`.

    `user` None keeps root with the caller's groups. Returns the process and the scratch
    directory to remove once it has exited.
    """
    if not command:
        raise LazyfsError("no command to run: lazyfs run IMAGE -- CMD ARGS...")
    if os.geteuid() != 0:
        raise LazyfsError("lazyfs run needs root (mount namespaces, overlayfs and chroot)")
    scratch, (upper, work, merged) = make_scratch(lower)
    if env is None:
        env = {**DEFAULT_ENV, "TERM": os.environ.get("TERM", "dumb")}
    prepare = _enter_container(lower, upper, work, merged, cwd=cwd, user=user,
                               private_network=private_network)
    try:
        process = subprocess.Popen(command, preexec_fn=prepare, env=env, close_fds=True,
                                   stdout=stdout)
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise LazyfsError(f"cannot start {command[0]!r} in the image: {exc}") from None
    return process, scratch


def exit_status(returncode: int) -> int:
    """A shell-style status: a program killed by signal N gives 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def run(image: str, command: list[str], options: MountOptions, *, env: dict | None = None,
        runtime: str = "chroot", network: str = "host",
        after_exit: Callable[[str], None] | None = None) -> int:
    """Run `command` (empty: the image's Entrypoint + Cmd) from `image`; its exit status.

    `env` adds to (and overrides) the environment built from the image config. `after_exit`
    is called with the image's mountpoint once the program has exited, before the image is
    unmounted; not when the mount failed or the run was interrupted (`lazyfs record` learns
    from it that the program ran, and reads the mount's stats).
    """
    from lazyfs.mount import image_config, preload_session_modules, resolve_image
    from lazyfs.source import waiting

    if os.geteuid() != 0:
        raise LazyfsError("lazyfs run needs root (mount namespaces, overlayfs and chroot)")
    if runtime not in RUNTIMES:
        raise LazyfsError(f"unknown runtime {runtime!r} (one of: {', '.join(RUNTIMES)})")
    if network not in NETWORKS:
        raise LazyfsError(f"unknown network {network!r} (one of: {', '.join(NETWORKS)})")
    crun = None
    if runtime == "crun":
        from lazyfs.crun import find_crun

        crun = find_crun()
    # Resolved once, here: the config decides what runs, and the mount daemon (a fork of this
    # process) serves the very same manifest's layers without fetching anything again. The
    # config is read once the daemon is fetching the TOCs (a round trip off a cold start's
    # path), unless the command must come from it: with none there, say so before mounting.
    # While the documents' answers are awaited, the daemon's first modules load, so that the
    # fork asks for the TOCs without importing them first (lazyfs/source/waiting.py).
    with waiting.spare_time(preload_session_modules):
        resolved = resolve_image(image, options)
    if not command:
        try:
            command_for(image_config(resolved, options), command)
        except BaseException:
            resolved.close()
            raise
    lower = tempfile.mkdtemp(prefix="lazyfs-image-", dir=os.environ.get("LAZYFS_RUN_DIR"))
    options.foreground = False
    config_read: dict = {}  # "config", or the "error" that reading it raised

    def read_config() -> None:
        try:
            config_read["config"] = image_config(resolved, options)
        except BaseException as exc:  # raised once the mount is up, to be unmounted
            config_read["error"] = exc

    code = mount(image, lower, options, quiet=True, image=resolved, meanwhile=read_config)
    if code != 0:
        os.rmdir(lower)
        return code
    previous_sigterm = _exit_on_sigterm()
    try:
        if "error" in config_read:
            raise config_read["error"]
        config = config_read["config"]
        spec = process_spec(config, command, lower, term=os.environ.get("TERM"), extra_env=env)
        if crun is not None:
            from lazyfs.crun import run_in_crun

            code = run_in_crun(lower, spec, crun=crun, private_network=network == "none")
        else:
            process, scratch = start_in_image(lower, spec.args, env=spec.env, cwd=spec.cwd,
                                              user=spec.user, private_network=network == "none")
            try:
                code = exit_status(process.wait())
            finally:
                if process.poll() is None:  # interrupted: the program goes before its filesystem
                    process.kill()
                    process.wait()
                shutil.rmtree(scratch, ignore_errors=True)
        if after_exit is not None:
            after_exit(lower)
        return code
    finally:
        try:
            umount(lower)
            os.rmdir(lower)
        except (LazyfsError, OSError) as exc:
            print(f"lazyfs run: {exc}", file=sys.stderr)
        _restore_sigterm(previous_sigterm)


def _exit_on_sigterm():
    """SIGTERM becomes SystemExit(143), so that the cleanup above runs (as Ctrl-C's
    KeyboardInterrupt does) instead of leaving a mount or a crun container behind."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, terminate)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
