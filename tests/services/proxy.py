"""A TCP proxy on loopback that a test can cut and restore, to make a storage service unreachable on demand.

While cut, the proxy's port is closed (new connections are refused) and every open connection is reset, so a
client sees exactly what it sees when the storage host goes away. ``restore()`` listens again on the same port.
Unlike stopping the emulator this works for services that keep their data in memory (moto) and is instant.

It can also misbehave the way a sick server or network does, for connections accepted from then on:
``hang()`` accepts and never answers; ``drip(after, interval)`` forwards the first ``after`` bytes of each
response stream normally, then one byte every ``interval`` seconds (a trickle no socket timeout catches);
``forward()`` goes back to normal.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .proc import free_port

_LOOPBACK_PORT = re.compile(r"127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class Drip:
    after: int = 0  # bytes of each connection's response stream forwarded normally
    interval: float = 2.0  # then one byte per interval
    connections: int | None = None  # drip this many connections, then forward again (None: all)


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self.connections = 0  # accepted so far, for diagnostics
        self._hang = False
        self._drip: Drip | None = None
        self.dripped = 0  # connections dripped so far

    # -- misbehaviour (applies to connections accepted from then on) ------------------------------------

    def hang(self) -> None:
        """Accept connections and never answer."""
        self._hang, self._drip = True, None

    def drip(self, after: int = 0, interval: float = 2.0, connections: int | None = None) -> None:
        """Forward each response's first ``after`` bytes, then one byte every ``interval`` seconds."""
        self._hang, self._drip, self.dripped = False, Drip(after, interval, connections), 0

    def forward(self) -> None:
        self._hang, self._drip = False, None

    # -- control ----------------------------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True, name="proxy-accept").start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the accept thread
            except OSError:
                pass
            listener.close()
        for conn in conns:
            _reset(conn)

    def restore(self) -> None:
        if self._listener is None:
            self.start()

    def close(self) -> None:
        self.cut()

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    # -- forwarding -------------------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            if self._hang:
                with self._lock:
                    self._conns.add(client)
                    self.connections += 1
                threading.Thread(target=_swallow, args=(client,), daemon=True, name="proxy-hang").start()
                continue
            drip = self._drip
            if drip is not None and drip.connections is not None:
                with self._lock:
                    if self.dripped >= drip.connections:
                        drip = None
                    else:
                        self.dripped += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while we connected
                    _reset(client)
                    _reset(upstream)
                    return
                self._conns.update((client, upstream))
                self.connections += 1
            pair = _Pair(self, client, upstream)
            for src, dst, slow in ((client, upstream, None), (upstream, client, drip)):
                threading.Thread(target=pair.pump, args=(src, dst, slow), daemon=True, name="proxy-pump").start()

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._conns.discard(s)


class _Pair:
    """One proxied connection: two pumps; the sockets are closed when both have finished."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self._proxy = proxy
        self._socks = (client, upstream)
        self._running = 2
        self._lock = threading.Lock()

    def pump(self, src: socket.socket, dst: socket.socket, drip: Drip | None = None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if drip is None or sent + len(data) <= drip.after:
                    dst.sendall(data)
                    sent += len(data)
                    continue
                for i in range(len(data)):  # past ``after``: one byte per interval
                    if sent >= drip.after:
                        time.sleep(drip.interval)
                    dst.sendall(data[i : i + 1])
                    sent += 1
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:
            for s in self._socks:  # one side failed (or was reset by cut()): end both
                _reset(s)
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._proxy._forget(*self._socks)
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


def _swallow(sock: socket.socket) -> None:
    """Read and discard what the client sends, answer nothing, until it or cut() closes the connection."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN, as a vanished host's connections end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv() on this socket
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def loopback_ports(env: Mapping[str, str]) -> set[int]:
    """The 127.0.0.1 ports named in ``env``'s values (endpoint URLs, emulator hosts)."""
    return {int(m.group(1)) for value in env.values() for m in _LOOPBACK_PORT.finditer(value)}


def redirect_env(env: Mapping[str, str], target_port: int, proxy_port: int) -> dict[str, str]:
    """``env`` with every ``127.0.0.1:target_port`` rewritten to go through the proxy."""
    pattern = re.compile(rf"127\.0\.0\.1:{target_port}\b")
    return {k: pattern.sub(f"127.0.0.1:{proxy_port}", v) for k, v in env.items()}
