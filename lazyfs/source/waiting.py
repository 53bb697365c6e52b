"""Work that uses a cold start's waits for a server's answer.

A cold `lazyfs run` of an image on a web server waits a round trip for each of the image's
documents (index, manifest) with nothing to do. Then it forks the mount daemon, whose first
job is to ask for the TOCs, but which first had to import what that takes (the chunk cache
and the TOC reader, ~15 ms): time on the path to the program's first output. So the parent
imports those modules during a wait instead, and the fork inherits them.

`spare_time(work)` has the next request of the light client (lazyfs/source/light.py) run
`work` after the request is sent and before its answer is read, on the thread that waits
anyway. Not in a thread of its own: that would compete for the interpreter lock with the
requests being made (measured in session 6: no gain), where this takes none from them as long
as the work is shorter than the round trip.

Work that fails is only logged: it is an optimization, and the real code does the same work
again when it needs it (an import then reports its own error).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

_pending: list[Callable[[], None]] = []


@contextlib.contextmanager
def spare_time(work: Callable[[], None]) -> Iterator[None]:
    """Within: the light client's next wait for an answer first runs work(), once. On leaving,
    work that no wait has run is dropped (the image was local, or another client asked)."""
    _pending.append(work)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _pending.remove(work)


def use_wait() -> None:
    """Run the work waiting for a wait: called by a client that has sent a request and is
    about to read its answer."""
    while _pending:
        try:
            work = _pending.pop(0)
        except IndexError:  # taken by another thread meanwhile
            return
        try:
            work()
        except Exception:  # noqa: BLE001 - an optimization: the real code will do it again
            log.debug("work during a wait failed", exc_info=True)
