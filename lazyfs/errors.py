"""The one exception tree of lazyfs.

Every error lazyfs raises on purpose is a LazyfsError. The CLI turns it into a one-line message
and a non-zero exit code; the FUSE adapter (later) turns it into an errno after recording it.
The names say whose fault it was: the input (FormatError), the input's integrity
(VerificationError), a missing thing (NotFound), the network or store (FetchError), or the local
cache (CacheError).
"""


class LazyfsError(Exception):
    """Base of every error lazyfs raises deliberately."""

    exit_code = 1


class FormatError(LazyfsError):
    """Malformed or unsupported blob, footer, TOC, tar or image layout."""

    exit_code = 2


class VerificationError(FormatError):
    """A digest or signature does not match what pins it."""

    exit_code = 3


class NotFound(LazyfsError):
    """A file, tag, blob or entry that was asked for does not exist."""

    exit_code = 4


class FetchError(LazyfsError):
    """A source could not deliver the bytes asked for."""

    exit_code = 5

    def __init__(self, message: str, *, retriable: bool = False):
        super().__init__(message)
        self.retriable = retriable


class RangeNotSupported(FetchError):
    """The server ignored or mangled a Range request."""


class AuthError(FetchError):
    """A registry demands credentials we do not have, or refused the ones we sent. The message
    names the user and the file the credentials came from, never a password or token."""


class CacheError(LazyfsError):
    """The local cache is unusable (not a corrupt entry, which is refetched)."""

    exit_code = 6
