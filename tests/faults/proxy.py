"""A TCP fault proxy for the fault suite: put it between cdc and a peer (point the DSN at `port`) and
switch what the link does at runtime.

- `pass`: bytes flow both ways.
- `delay`: each chunk is held `delay_s` before it is forwarded.
- `reset`: every open connection is reset (RST, as a crashed middlebox or a peer's kernel sends)
  and new ones are reset as soon as they are accepted, until the mode changes.
- `blackhole`: nothing is forwarded and nothing is answered, as when a cable is pulled: bytes stay
  in the kernel's buffers, the peers see silence (no FIN, no RST) and time out on their own. When
  the link passes again, what was held flows on, as TCP's retransmissions would deliver it.

Threads, one listener and two pumps per connection: small, and independent of the test's event loop.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

MODES = ("pass", "delay", "reset", "blackhole")


def _abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Link:
    def __init__(self, proxy: "FaultProxy", client: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()

    def run(self) -> None:
        proxy = self.proxy
        if not proxy._wait_passable(self):
            return
        try:
            self.upstream = socket.create_connection(proxy.upstream, timeout=10)
        except OSError:
            self.abort()
            return
        for source, sink in ((self.client, self.upstream), (self.upstream, self.client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        proxy = self.proxy
        while not self.closed.is_set():
            if not proxy._wait_passable(self):
                return
            readable, _, _ = select.select([source], [], [], 0.2)
            if not readable or proxy.mode == "blackhole":
                continue
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:  # the peer closed: pass the close on
                self.close()
                return
            if proxy.mode == "delay":
                time.sleep(proxy.delay_s)
            try:
                sink.sendall(data)
            except OSError:
                self.abort()
                return
            proxy.bytes_forwarded += len(data)

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            for sock in (self.client, self.upstream):
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    sock.close()
            self.proxy._forget(self)

    def abort(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            for sock in (self.client, self.upstream):
                if sock is not None:
                    _abort(sock)
            self.proxy._forget(self)


class FaultProxy:
    """Listens on 127.0.0.1:`port` and forwards to `upstream_host:upstream_port`."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self.delay_s = 0.0
        self.bytes_forwarded = 0
        self.faults = 0  # how many times the mode was switched away from pass
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, mode: str, *, delay_s: float = 0.0) -> None:
        """Switch the link; `reset` resets every open connection at once."""
        assert mode in MODES, mode
        with self._lock:
            if mode != "pass" and self.mode == "pass":
                self.faults += 1
            self.mode, self.delay_s = mode, delay_s
            links = list(self._links)
            self._changed.notify_all()
        if mode == "reset":
            for link in links:
                link.abort()

    def _wait_passable(self, link: _Link) -> bool:
        """Hold a link while blackholed; False when it was reset or closed meanwhile."""
        with self._lock:
            while self.mode == "blackhole" and not link.closed.is_set() and not self._stopped.is_set():
                self._changed.wait(0.2)
            if self.mode != "reset":
                return not link.closed.is_set()
        link.abort()
        return False

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            link = _Link(self, client)
            with self._lock:
                self._links.add(link)
            threading.Thread(target=link.run, daemon=True).start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def close(self) -> None:
        self._stopped.set()
        self._server.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.abort()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
