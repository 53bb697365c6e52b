"""A blob in a local file, read with os.pread on one descriptor.

pread takes the offset as an argument and never moves a shared file position, so one descriptor
serves any number of threads at once without a lock (a seek + read pair would need one).
"""

from __future__ import annotations

import os
import stat
import threading

from lazyfs.errors import FetchError, NotFound
from lazyfs.source import check_range


class FileSource:
    def __init__(self, path: str):
        self.path = path
        self.requests = 0
        self._lock = threading.Lock()
        self._blob_size: int | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no such blob: {path}") from None
        except OSError as exc:
            raise FetchError(f"cannot open blob {path}: {exc.strerror}") from exc
        if stat.S_ISDIR(os.fstat(self._fd).st_mode):
            os.close(self._fd)
            raise FetchError(f"{path} is a directory, not a blob")

    def size(self) -> int:
        if self._blob_size is None:
            self._blob_size = os.fstat(self._fd).st_size
        return self._blob_size

    def read(self, blob_offset: int, length: int) -> bytes:
        check_range(blob_offset, length)
        if length == 0:
            return b""
        parts = []
        got = 0
        # Loop because pread may return less than asked for large reads (Linux caps one call at
        # about 2 GiB); only a 0-byte return means end of file.
        while got < length:
            with self._lock:
                self.requests += 1
            try:
                part = os.pread(self._fd, length - got, blob_offset + got)
            except OSError as exc:
                raise FetchError(f"{self.path}: reading {length} bytes at {blob_offset}: "
                                 f"{exc.strerror}") from exc
            if not part:
                raise FetchError(f"{self.path}: {length} bytes at {blob_offset} asked for, only "
                                 f"{got} available (blob is {os.fstat(self._fd).st_size} bytes: "
                                 "truncated, or a read past the end)")
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def describe(self) -> str:
        return self.path

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
