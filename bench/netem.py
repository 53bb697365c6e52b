"""An emulated network link for benchmarks: bandwidth from `tc tbf`, latency from a proxy.

    with ShapedLink(LinkSpec(rate_mbit=100, rtt_ms=20)) as link:
        server = subprocess.Popen(link.inside(["nginx", ...]))   # listens on 127.0.0.1:8080
        port = link.start_proxy(8080)                              # in the netns
        # clients on the host use http://127.0.0.1:<port>/ and cross the emulated link

Why this shape:

- The kernel here has no `netem` qdisc, so delay cannot come from tc. `tbf` (token bucket)
  exists and shapes bandwidth exactly; a user-space proxy adds the round-trip time.
- The server lives in a network namespace of its own whose only interface is its loopback.
  `tbf` sits on that loopback, so it shapes only the server's traffic (never the host's other
  loopback users), and no address outside 127.0.0.0/8 is ever used. The namespace has no other
  way in: every client byte crosses the proxy and then the shaped interface.
- The proxy listens on the host's loopback (a socket made in the host namespace and inherited)
  and connects to the server from inside the namespace. It delays each direction by RTT/2 and
  holds the first client bytes of a connection until one RTT after the connection was accepted,
  which is what the TCP handshake costs a real client before it may send its request.
- The shaped leg is proxy <-> server on the namespace's loopback; its MTU is set to 1500 so the
  token bucket sees Ethernet-sized packets (and the goodput of a 100 Mbit/s Ethernet link, about
  94 Mbit/s after headers). Both directions share that one bucket, as on a half-duplex link;
  requests and ACKs are small next to the responses.

What it does not model: TCP slow start and loss recovery over the long path (the kernel's TCP
runs over the proxy's ~0 ms legs, so a connection reaches full rate at once, which slightly
favours many-request clients), and jitter.

`python3 bench/netem.py proxy --listen-fd N --upstream HOST:PORT --rtt-ms MS` runs the proxy
alone; ShapedLink starts it that way (`nsenter --net=...`), so its CPU is not the benchmark's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

# A direction's delay line stops reading from its source above this many queued bytes (and
# resumes below the low mark), so a slow reader cannot make the proxy buffer a whole blob.
_HIGH_WATER = 8 << 20
_LOW_WATER = 2 << 20
_PROXY_START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LinkSpec:
    rate_mbit: float = 100.0
    rtt_ms: float = 20.0

    @property
    def rtt_s(self) -> float:
        return self.rtt_ms / 1000

    def transfer_seconds(self, nbytes: int) -> float:
        """How long `nbytes` take at the nominal rate (headers and ACKs not counted)."""
        return nbytes * 8 / (self.rate_mbit * 1e6)

    def describe(self) -> str:
        return f"{self.rate_mbit:g} Mbit/s, {self.rtt_ms:g} ms RTT"


# --- the delaying proxy ------------------------------------------------------------------------

class _DelayLine:
    """One direction of a proxied connection: bytes go out `delay` seconds after they came in,
    in order, and never before `not_before` (loop time) + `delay`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, not_before: float = 0.0):
        self.loop = loop
        self.delay = delay
        self.not_before = not_before
        self.items: collections.deque = collections.deque()  # (deadline, bytes | "eof" | "close")
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.dst_paused = False
        self.src_paused = False
        self.closed = False
        self.src_eof = False  # the source sent FIN
        self.eof_written = False  # we sent FIN to the destination
        self.reverse: _DelayLine | None = None  # the other direction of the same pair

    def push(self, item) -> None:
        deadline = max(self.loop.time(), self.not_before) + self.delay
        self.items.append((deadline, item))
        if isinstance(item, bytes):
            self.queued += len(item)
        self.update_source()
        self._arm()

    def set_destination(self, dst: asyncio.Transport) -> None:
        self.dst = dst
        self._arm()

    def update_source(self) -> None:
        """Pause or resume reading the source: backpressure from the queue and the receiver."""
        if self.src is None or self.src.is_closing():
            return
        want_paused = self.queued > _HIGH_WATER or self.dst_paused
        if want_paused and not self.src_paused:
            self.src.pause_reading()
            self.src_paused = True
        elif not want_paused and self.src_paused and self.queued < _LOW_WATER:
            self.src.resume_reading()
            self.src_paused = False

    def _arm(self) -> None:
        if self.timer is None and self.items and self.dst is not None and not self.closed:
            self.timer = self.loop.call_at(self.items[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.items and self.items[0][0] <= now and not self.closed:
            _, item = self.items.popleft()
            if isinstance(item, bytes):
                self.queued -= len(item)
                # A receiver that reset its connection is closing before we hear of it (its
                # connection_lost comes a loop iteration later): what it would get is dropped,
                # as the network would drop it.
                if not self.dst.is_closing():
                    self.dst.write(item)
            elif item == "eof":
                if self.dst.can_write_eof() and not self.dst.is_closing():
                    self.dst.write_eof()
                self.eof_written = True
                if self.reverse is not None and self.reverse.src_eof:
                    self.dst.close()  # FIN both ways: the pair is done
            else:  # "close": the source is gone; close after what was queued (close() flushes)
                self.dst.close()
                self.closed = True
        self.update_source()
        self._arm()


class _Side(asyncio.Protocol):
    """One socket of a proxied pair. What it receives goes into `outgoing`; the line that
    writes to it is `incoming` (for backpressure from this socket's send buffer)."""

    def __init__(self, outgoing: _DelayLine, incoming: _DelayLine):
        self.outgoing, self.incoming = outgoing, incoming
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.outgoing.src = transport
        self.incoming.set_destination(transport)

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.outgoing.push("eof")
        self.outgoing.src_eof = True
        if self.incoming.eof_written:
            self.transport.close()  # FIN both ways: the pair is done
        return True  # half-close: keep sending what the other side still has for us

    def connection_lost(self, exc) -> None:
        # Nothing more can be written to this socket; the peer is closed once it has been sent
        # what this socket delivered before it went.
        self.incoming.closed = True
        if self.incoming.timer is not None:
            self.incoming.timer.cancel()
            self.incoming.timer = None
        self.outgoing.push("close")

    def pause_writing(self) -> None:
        self.incoming.dst_paused = True
        self.incoming.update_source()

    def resume_writing(self) -> None:
        self.incoming.dst_paused = False
        self.incoming.update_source()


async def _serve_proxy(listen: socket.socket, upstream: tuple[str, int], rtt_s: float) -> None:
    loop = asyncio.get_running_loop()
    one_way = rtt_s / 2

    def new_connection() -> _Side:
        accepted = loop.time()
        # The handshake: a real client sends its request one RTT after connect().
        to_server = _DelayLine(loop, one_way, not_before=accepted + rtt_s)
        to_client = _DelayLine(loop, one_way)
        to_server.reverse, to_client.reverse = to_client, to_server
        client = _Side(to_server, to_client)

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: _Side(to_client, to_server),
                                             *upstream)
            except OSError as exc:
                print(f"netem proxy: cannot reach {upstream}: {exc}", file=sys.stderr)
                if client.transport is not None:
                    client.transport.abort()

        loop.create_task(connect())
        return client

    server = await loop.create_server(new_connection, sock=listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def run_proxy(listen_fd: int, upstream: str, rtt_ms: float) -> None:
    host, _, port = upstream.rpartition(":")
    listen = socket.socket(fileno=listen_fd)
    listen.setblocking(False)
    try:
        asyncio.run(_serve_proxy(listen, (host, int(port)), rtt_ms / 1000))
    except KeyboardInterrupt:
        pass


# --- the namespace, the shaper, the proxy process ---------------------------------------------

def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


class ShapedLink:
    """A network namespace whose loopback is shaped to `spec`, and delaying proxies into it.

    Everything is undone by close() (also on errors half-way through __enter__): the proxies
    are stopped, any process still in the namespace is killed by pid (only we put processes
    there), and the namespace is deleted, which removes its qdisc.
    """

    def __init__(self, spec: LinkSpec, name: str | None = None):
        self.spec = spec
        self.name = name or f"lazyfs-bench-{os.getpid()}"
        self._proxies: list[subprocess.Popen] = []
        self._created = False

    def __enter__(self) -> "ShapedLink":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"

    def open(self) -> None:
        _run(["ip", "netns", "add", self.name])
        self._created = True
        _run(["ip", "-n", self.name, "link", "set", "lo", "mtu", "1500", "up"])
        # burst: a few full-size packets (tbf needs at least one MTU; with lo's GSO the kernel
        # splits bigger packets itself). latency: the queue holds 50 ms of traffic, a router's
        # buffer; above that packets are dropped and TCP recovers, as on a real bottleneck.
        rate = f"{self.spec.rate_mbit:g}mbit"
        _run(["tc", "-n", self.name, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
              "burst", "16kb", "latency", "50ms"])

    def inside(self, argv: list[str]) -> list[str]:
        """argv run in the namespace's network (the host's mounts and everything else)."""
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def qdisc_stats(self) -> str:
        return subprocess.run(["tc", "-n", self.name, "-s", "qdisc", "show", "dev", "lo"],
                              capture_output=True, text=True).stdout

    def start_proxy(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> int:
        """A delaying proxy on the host's 127.0.0.1:<returned port> to the namespace's
        upstream_host:upstream_port."""
        listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listen.bind(("127.0.0.1", 0))
            listen.listen(128)
            port = listen.getsockname()[1]
            fd = listen.fileno()
            proc = subprocess.Popen(
                self.inside([sys.executable, os.path.abspath(__file__), "proxy",
                             "--listen-fd", str(fd), "--upstream",
                             f"{upstream_host}:{upstream_port}", "--rtt-ms", str(self.spec.rtt_ms)]),
                pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            self._proxies.append(proc)
        finally:
            listen.close()  # the proxy has its own copy of the socket
        _wait_until_serving(proc)
        return port

    def close(self) -> None:
        for proc in self._proxies:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._proxies.clear()
        if not self._created:
            return
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        self._created = False


def _wait_until_serving(proc: subprocess.Popen) -> None:
    """The proxy prints one line once its server accepts; until then connections would sit in
    the kernel's backlog and their handshake delay would be counted from the wrong time."""
    ready: list[bytes] = []
    reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(_PROXY_START_TIMEOUT_S)
    if not ready or not ready[0].startswith(b"ready"):
        raise RuntimeError(f"the netem proxy did not start (status {proc.poll()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    proxy = commands.add_parser("proxy", help="run the delaying proxy")
    proxy.add_argument("--listen-fd", type=int, required=True,
                       help="an inherited listening TCP socket")
    proxy.add_argument("--upstream", required=True, help="HOST:PORT to connect to")
    proxy.add_argument("--rtt-ms", type=float, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # asyncio warns about writes to connections the peer has just reset; clients that close a
    # connection mid-response (a daemon unmounting, a cancelled prefetch) are normal here.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    run_proxy(args.listen_fd, args.upstream, args.rtt_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
