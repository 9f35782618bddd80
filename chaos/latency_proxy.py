"""A TCP proxy that slows a dependency down: every chunk it relays, either way, is held `delay_s` first.

Put it between the cluster and Redis (`redis_url` pointing at the proxy) to see what a slow Redis
costs: with a request/reply protocol each round trip then takes at least 2 x delay_s. It listens on
127.0.0.1 only, relays to a TCP host:port or a Unix socket path, and stops with `close()`.
"""

from __future__ import annotations

import socket
import threading
import time


class LatencyProxy:
    """Relays connections from 127.0.0.1:<port> to `upstream`, holding each chunk `delay_s`."""

    def __init__(self, upstream: str | tuple[str, int], delay_s: float) -> None:
        """`upstream`: a Unix socket path, or (host, port)."""
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.upstream = upstream
        self.delay_s = delay_s
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="latency-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                if isinstance(self.upstream, str):
                    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    server.connect(self.upstream)
                else:
                    server = socket.create_connection(self.upstream, timeout=5)
                    server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                data = source.recv(1 << 16)
                if not data:
                    break
                time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def __enter__(self) -> "LatencyProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
