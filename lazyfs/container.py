"""What `lazyfs run` starts, from the image config as a container runtime reads it.

    config.Entrypoint + config.Cmd   the program, when the command line gives none (a command
                                     on the command line replaces both)
    config.Env                       the environment, over PATH (default below when the image
                                     has none) and HOME (the user's, from /etc/passwd); TERM
                                     comes from the caller's terminal
    config.WorkingDir                the working directory (default /; created if missing)
    config.User                      "uid[:gid]" or "name[:group]", names resolved with the
                                     image's own /etc/passwd and /etc/group

The same ProcessSpec drives both runtimes (chroot and crun). User names are looked up in the
mounted image, never on the host; symlinks met on the way are resolved inside the image's
root, so an image cannot point the lookup at a host file.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass, field

from lazyfs.errors import FormatError, LazyfsError, NotFound

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USAGE = "lazyfs run IMAGE -- CMD ARGS..."
_MAX_ID = 2**32 - 2            # (uid_t)-1 means "unchanged" to the kernel
_MAX_ACCOUNT_FILE_BYTES = 16 << 20
_MAX_SYMLINKS = 40             # as the kernel's ELOOP limit


@dataclass
class User:
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    home: str | None = None    # from /etc/passwd, when the user has an entry


@dataclass
class ProcessSpec:
    args: list[str]
    env: dict[str, str]
    cwd: str = "/"
    user: User = field(default_factory=User)


def runtime_config(image_config: dict | None) -> dict:
    """The `config` object of an OCI image config (Env, Cmd, ...); {} for a lone blob."""
    if image_config is None:
        return {}
    config = image_config.get("config") or {}
    if not isinstance(config, dict):
        raise FormatError("image config: 'config' is not an object")
    return config


def command_for(image_config: dict | None, command: list[str]) -> list[str]:
    """The argv to run: the command line's, else the image's Entrypoint + Cmd."""
    if command:
        return list(command)
    config = runtime_config(image_config)
    args = _string_list(config, "Entrypoint") + _string_list(config, "Cmd")
    if not args:
        if image_config is None:
            raise LazyfsError(f"no command to run (a lone blob has no image config): {USAGE}")
        raise LazyfsError(f"no command to run: the image config has no Entrypoint or Cmd: {USAGE}")
    return args


def process_spec(image_config: dict | None, command: list[str], rootfs: str, *,
                 term: str | None = None, extra_env: dict[str, str] | None = None) -> ProcessSpec:
    """Everything about the process but its root: argv, environment, working directory, user.

    `rootfs` is the image's root as the host sees it (the read-only mount), for the account
    files; `term` is the caller's TERM.
    """
    config = runtime_config(image_config)
    args = command_for(image_config, command)
    user_text = config.get("User") or ""
    if not isinstance(user_text, str):
        raise FormatError("image config: User is not a string")
    user = resolve_user(user_text, rootfs)

    env = {"PATH": DEFAULT_PATH}
    for item in _string_list(config, "Env"):
        name, sep, value = item.partition("=")
        if sep and name:        # "NAME" alone means nothing in an image config: skipped
            env[name] = value
    if "HOME" not in env:       # as runc and crun do: the user's home, or /
        env["HOME"] = user.home or ("/root" if user.uid == 0 else "/")
    # The program writes to the caller's terminal, so the caller's TERM describes it best.
    env["TERM"] = term or env.get("TERM") or "dumb"
    env.update(extra_env or {})

    cwd = config.get("WorkingDir") or "/"
    if not isinstance(cwd, str):
        raise FormatError("image config: WorkingDir is not a string")
    return ProcessSpec(args, env, posixpath.normpath(posixpath.join("/", cwd)), user)


def _string_list(config: dict, key: str) -> list[str]:
    value = config.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise FormatError(f"image config: {key} is not a list of strings")
    return value


# --- Users --------------------------------------------------------------------------------------

def resolve_user(text: str, rootfs: str) -> User:
    """Resolve a config User ("", "uid", "uid:gid", "name", "name:group", ...) in the image.

    As runc does: a numeric uid needs no /etc/passwd entry (then gid 0, home unknown); a name
    must have one. With no group given, the gid is the passwd entry's and the supplementary
    groups are every /etc/group entry listing the user's name; a group given explicitly is the
    only group.
    """
    user_part, sep, group_part = (text or "0").partition(":")
    if not user_part:
        raise FormatError(f"image config: User {text!r} has no user")
    passwd = _read_table(rootfs, "/etc/passwd", 7)
    entry = None
    if user_part.isdigit():
        uid = _check_id(int(user_part), text)
        entry = next((e for e in passwd if e[2] == str(uid)), None)
    else:
        entry = next((e for e in passwd if e[0] == user_part), None)
        if entry is None:
            raise NotFound(f"image config: user {user_part!r} is not in the image's /etc/passwd")
        uid = _entry_id(entry[2], "uid", entry[0])
    gid = _entry_id(entry[3], "gid", entry[0]) if entry else 0
    home = (entry[5] or None) if entry else None

    additional: list[int] = []
    if sep:
        if not group_part:
            raise FormatError(f"image config: User {text!r} has an empty group")
        if group_part.isdigit():
            gid = _check_id(int(group_part), text)
        else:
            group = next((g for g in _read_table(rootfs, "/etc/group", 3) if g[0] == group_part),
                         None)
            if group is None:
                raise NotFound(f"image config: group {group_part!r} is not in the image's "
                               "/etc/group")
            gid = _entry_id(group[2], "gid", group[0])
    elif entry is not None:
        for group in _read_table(rootfs, "/etc/group", 4):
            members = group[3].split(",") if len(group) > 3 else []
            if entry[0] in members and group[2].isdigit():
                number = int(group[2])
                if number not in additional and number <= _MAX_ID:
                    additional.append(number)
    return User(uid, gid, additional, home)


def _check_id(number: int, text: str) -> int:
    if number > _MAX_ID:
        raise FormatError(f"image config: User {text!r}: {number} is out of range")
    return number


def _entry_id(field_text: str, what: str, name: str) -> int:
    if not field_text.isdigit() or int(field_text) > _MAX_ID:
        raise FormatError(f"the image's account files: {name!r} has a bad {what} {field_text!r}")
    return int(field_text)


def _read_table(rootfs: str, path: str, min_fields: int) -> list[list[str]]:
    """The colon-separated lines of an account file in the image ([] when it has none).

    Lines too short, comments and NIS compat lines (+/-) are skipped; only the fields we use
    (name, id) are checked, where they are used.
    """
    try:
        with open(resolve_in_root(rootfs, path), "rb") as f:
            data = f.read(_MAX_ACCOUNT_FILE_BYTES)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    except OSError as exc:
        raise LazyfsError(f"cannot read {path} in the image: {exc.strerror}") from None
    table = []
    for line in data.decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if len(fields) >= min_fields and fields[0] and line[0] not in "#+-":
            table.append(fields)
    return table


def resolve_in_root(root: str, path: str) -> str:
    """`path` inside the tree at `root` with its symlinks resolved as if root were "/".

    Absolute symlink targets restart at root, and ".." stops at root, so the result never
    leaves the tree. A missing component ends the walk (opening the result then fails).
    """
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            mode = os.lstat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return os.path.join(candidate, *pending)
        if not stat.S_ISLNK(mode):
            resolved.append(part)
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, f"too many symbolic links resolving {path}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending = [p for p in target.split("/") if p not in ("", ".")] + pending
    return os.path.join(root, *resolved)
