"""`lazyfs stats`: read a running mount's figures, which it serves as an xattr of its root."""

from __future__ import annotations

import errno
import json
import os
from typing import TextIO

from lazyfs.errors import LazyfsError, NotFound

STATS_XATTR = "user.lazyfs.stats"  # the same name lazyfs.fs serves


def read_stats(mountpoint: str) -> dict:
    try:
        raw = os.getxattr(mountpoint, STATS_XATTR)
    except FileNotFoundError:
        raise NotFound(f"{mountpoint}: no such directory") from None
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise NotFound(f"{mountpoint} is not a lazyfs mount") from None
        if exc.errno == errno.ENOTCONN:
            raise LazyfsError(f"{mountpoint}: the mount's daemon is gone; clear it with "
                              "`lazyfs umount`") from None
        raise LazyfsError(f"{mountpoint}: cannot read stats: {exc.strerror}") from None
    return json.loads(raw)


def print_stats(report: dict, out: TextIO) -> None:
    verified = "verified" if report.get("verified") else "NOT VERIFIED (--insecure-skip-verify)"
    print(f"image    {report.get('image')}  {verified}", file=out)
    print(f"entries  {report.get('entries')}   cache {report.get('cache_dir')}", file=out)
    columns = ("bytes_total", "bytes_fetched", "bytes_served", "chunks_fetched", "cache_hits",
               "cache_misses", "requests", "errors")
    print("layer " + "".join(f"{c:>15}" for c in columns), file=out)
    for number, layer in enumerate(report.get("layers", []), 1):
        print(f"{number:<6}" + "".join(f"{layer.get(c, 0):>15,}" for c in columns), file=out)
        if layer.get("last_error"):
            print(f"       last error: {layer['last_error']}", file=out)
    if report.get("last_error"):
        print(f"last handler error: {report['last_error']} ({report['handler_errors']} in all)", file=out)
