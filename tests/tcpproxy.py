"""A TCP proxy between cdc and PostgreSQL that can stall or cut its connections.

``stall()`` stops forwarding on every open connection without closing it, as a network
path does that drops packets without a reset: neither end hears anything again. ``cut()``
closes them (both ends see the connection end). New connections are forwarded normally.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class _Pipe:
    client: socket.socket
    upstream: socket.socket
    stalled: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.pipes: list[_Pipe] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            pipe = _Pipe(client, upstream)
            with self.lock:
                self.pipes.append(pipe)
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(pipe, src, dst), daemon=True).start()

    def _pump(self, pipe: _Pipe, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if pipe.stalled.is_set():
                    continue  # swallowed: the path is dead, nothing reaches the other end
                dst.sendall(data)
        except OSError:
            pass
        if not pipe.stalled.is_set():
            pipe.close()

    def stall(self) -> int:
        """Stall every open connection; how many."""
        with self.lock:
            live = [p for p in self.pipes if not p.stalled.is_set()]
        for pipe in live:
            pipe.stalled.set()
        return len(live)

    def cut(self) -> None:
        with self.lock:
            pipes, self.pipes = self.pipes, []
        for pipe in pipes:
            pipe.close()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()
